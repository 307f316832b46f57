#!/usr/bin/env bash
# Server CPU per request of two builds of doh-proxy, loaded at the same
# time with the same workload: what a change costs or saves, kernel and
# wake-ups included (which benches/instructions.sh leaves out), on a
# machine too noisy for runs one after the other to compare (the load of a
# shared 2-core machine moves from one minute to the next, and here both
# builds live through the same minute).
#
#   A=/path/before B=/path/after bash benches/ab_cpu.sh
#   SCEN=hit ROUNDS=20 A=… B=… bash benches/ab_cpu.sh
#   A=x B=x B_ARGS="--cache-size 1000" bash benches/ab_cpu.sh   # one build, two settings
#   A=/path/build B=dnsdist bash benches/ab_cpu.sh   # against the peers' dnsdist
#
# With B=dnsdist the second server is the dnsdist the peers script runs
# (DoH on 8453, its packet cache on, never restarted: a miss is a name
# neither has seen), loaded at the same time as the build: a ratio below 1
# there means dnsdist spends less per request. Both servers then share the
# two cores with each other and the clients, which costs each of them more
# than a run of its own does (benches/load.sh), so its ratios are not the
# targets' figures; what they show is which of the two holds up better
# under the same contention.
#
# Each round starts both builds afresh (cold caches, nothing left from the
# round before), gives each CLIENTS h2load clients (5 by default; one TLS
# HTTP/2 connection of 10 streams each) at once, and reads each server's CPU time over all
# its threads (/proc/PID/task/*/schedstat, in nanoseconds). SCEN=miss
# (default): PER unique names per client, each a miss forwarded to NSD;
# SCEN=hit: PER requests per client for one name (60,000 by default,
# `--max-requests-per-conn` raised above it for both builds: a round of
# 10,000 hits lasts a fraction of a second, and rounds of two builds
# differing only in their clock reads ran from 0.67 to 1.42; one build
# against itself runs from about 0.86 to 1.08 with 60,000). A_ARGS and
# B_ARGS add flags to either. The builds swap ports every other round.
# FILL=N first asks each server N unique names of its own (a cache of
# the default 100,000 answers is full after FILL=110000, and every miss
# measured then replaces or is refused an entry, as on a resolver that has
# run for a while). Prints each round's B/A ratio and their median (below
# 1: B spends less). Needs h2load and the peers (NSD on 127.0.0.1:5300, the
# certificate in /tmp/doh-peers/tls); only loopback is used.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/flags.sh
: "${A:?A=path of the first build}" "${B:?B=path of the second build}"
SCEN=${SCEN:-miss}
ROUNDS=${ROUNDS:-10}
CLIENTS=${CLIENTS:-5}
if [ "$SCEN" = hit ]; then PER=${PER:-60000}; else PER=${PER:-2000}; fi
BASE=${BASE:-/tmp/doh-peers}
OUT=$(mktemp -d /tmp/doh-abcpu.XXXXXX)
PIDS=""
trap 'kill $PIDS 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$OUT"' EXIT
export SSL_CERT_FILE=$BASE/tls/ca.pem
H='accept: application/dns-message'
[ -f "$BASE/tls/cert.pem" ] || { echo "start the peers first: bash ../shared/peers/peers.sh" >&2; exit 1; }


start() { # start <bin> <port> <metrics port> [flags…]: prints the pid once it answers
  local bin=$1 port=$2 mport=$3; shift 3
  "$bin" -l "127.0.0.1:$port" -u 127.0.0.1:5300 \
    --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen "127.0.0.1:$mport" \
    "${OUT_OF_THE_WAY[@]}" "$@" > "$OUT/server-$port.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$mport/healthz" >/dev/null && break; sleep 0.1; done
  echo "$pid"
}

cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {print s}'; }

ratios=()
for r in $(seq 1 "$ROUNDS"); do
  if ((r % 2)); then pa=8443 pb=8444; else pa=8444 pb=8443; fi
  more=()
  [ "$SCEN" = hit ] && more=(--max-requests-per-conn $((PER + 1)))
  # shellcheck disable=SC2086 # the extra flags are words
  a=$(start "$A" "$pa" 9191 "${more[@]}" ${A_ARGS:-})
  if [ "$B" = dnsdist ]; then
    pb=8453 b=$(cat "$BASE/run/dnsdist.pid") own=$a
  else
    # shellcheck disable=SC2086
    b=$(start "$B" "$pb" 9192 "${more[@]}" ${B_ARGS:-}) own="$a $b"
  fi
  PIDS=$own
  for c in $(seq 0 $((CLIENTS - 1))); do
    if [ "$SCEN" = miss ]; then
      python3 benches/uris.py "$pa" "r$r-a$c-$RANDOM-" "$PER" > "$OUT/a$c"
      python3 benches/uris.py "$pb" "r$r-b$c-$RANDOM-" "$PER" > "$OUT/b$c"
    else
      python3 benches/uris.py "$pa" www.example.test > "$OUT/a$c"
      python3 benches/uris.py "$pb" www.example.test > "$OUT/b$c"
    fi
  done
  if [ "${FILL:-0}" -gt 0 ]; then
    jobs=()
    for c in $(seq 0 $((CLIENTS - 1))); do
      python3 benches/uris.py "$pa" "f$r-a$c-$RANDOM-" $((FILL / CLIENTS)) > "$OUT/fa$c"
      python3 benches/uris.py "$pb" "f$r-b$c-$RANDOM-" $((FILL / CLIENTS)) > "$OUT/fb$c"
      timeout 300 h2load -n $((FILL / CLIENTS)) -c 1 -m 10 -i "$OUT/fa$c" -H "$H" > /dev/null 2>&1 & jobs+=($!)
      timeout 300 h2load -n $((FILL / CLIENTS)) -c 1 -m 10 -i "$OUT/fb$c" -H "$H" > /dev/null 2>&1 & jobs+=($!)
    done
    wait "${jobs[@]}" || true
  fi
  # One request each first, so that neither is counted starting up.
  h2load -n 1 -c 1 -i "$OUT/a0" -H "$H" >/dev/null; h2load -n 1 -c 1 -i "$OUT/b0" -H "$H" >/dev/null
  a0=$(cpu_ns "$a"); b0=$(cpu_ns "$b")
  jobs=()
  for c in $(seq 0 $((CLIENTS - 1))); do
    timeout 120 h2load -n "$PER" -c 1 -m 10 -i "$OUT/a$c" -H "$H" > "$OUT/a$c.out" 2>&1 & jobs+=($!)
    timeout 120 h2load -n "$PER" -c 1 -m 10 -i "$OUT/b$c" -H "$H" > "$OUT/b$c.out" 2>&1 & jobs+=($!)
  done
  wait "${jobs[@]}" || true
  a1=$(cpu_ns "$a"); b1=$(cpu_ns "$b")
  # shellcheck disable=SC2086 # one or two pids
  kill $own 2>/dev/null || true; wait $own 2>/dev/null || true
  PIDS=""
  oka=$(cat "$OUT"/a?.out | awk '/status codes/ {s += $3} END {print s + 0}')
  okb=$(cat "$OUT"/b?.out | awk '/status codes/ {s += $3} END {print s + 0}')
  n=$((PER * CLIENTS))
  [ "$oka" = "$n" ] && [ "$okb" = "$n" ] || { echo "round $r: $oka and $okb of $n answered 2xx" >&2; exit 1; }
  ratio=$(python3 -c "print(f'{($b1 - $b0) / ($a1 - $a0):.3f}')")
  ratios+=("$ratio")
  python3 -c "print(f'round $r ($SCEN): A {($a1 - $a0) / 1e9 / $n * 1e5:.2f}, B {($b1 - $b0) / 1e9 / $n * 1e5:.2f} CPU s per 100k; B/A $ratio')"
done
python3 -c "import statistics, sys; r = [float(x) for x in sys.argv[1:]]; print(f'median B/A over {len(r)} rounds: {statistics.median(r):.3f} ({sum(x < 1 for x in r)} of {len(r)} below 1)')" "${ratios[@]}"
