# Sourced by the load scripts: the budgets raised out of the way of the
# load generator, which is one address on loopback, so that it is measured
# rather than rate-limited, capped or banned.
# shellcheck disable=SC2034 # used by the scripts that source this
OUT_OF_THE_WAY=(
  --per-ip-qps 100000000 --per-ip-burst 100000000 --per-prefix-qps 100000000
  --per-ip-conn-rate 100000000 --per-prefix-conn-rate 100000000
  --upstream-qps 1000000 --max-conns-per-ip 10000 --ban-after 4294967295
)
