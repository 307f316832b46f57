#!/usr/bin/env bash
# User-space instructions per cache hit and per miss, counted by valgrind's
# callgrind: a measure of our own work that the noise of a shared 2-core
# machine hardly moves (the same build counts within about 1 % from run to
# run: how many answers share a write, and how often a connection waiting
# for the slowed-down server looks quiet, still depend on timing; give each
# build twice, interleaved, to compare two),
# for A/B comparisons of changes too small for the CPU time of
# benches/load.sh to show. It leaves out what the kernel spends (sockets,
# loopback) and what cache misses cost, so it complements load.sh, never
# replaces it.
#
#   BINS="/path/a /path/b" bash benches/instructions.sh
#
# Each build serves, under callgrind, HITS requests for one name over ten
# long-lived TLS HTTP/2 connections (10 streams each), then 10 x PER unique
# names (misses forwarded to NSD) over ten more connections; counters are
# zeroed after a warm-up. Each figure holds its ten connections'
# handshakes (about 6 % of either with the defaults), the same for every
# build. Needs valgrind, h2load and the peers
# (NSD on 127.0.0.1:5300, the certificate in /tmp/doh-peers/tls).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/flags.sh
BINS=${BINS:-target/release/doh-proxy}
HITS=${HITS:-5000}
PER=${PER:-300}
BASE=${BASE:-/tmp/doh-peers}
OUT=$(mktemp -d /tmp/doh-instr.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export SSL_CERT_FILE=$BASE/tls/ca.pem
H='accept: application/dns-message'
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
[ -f "$BASE/tls/cert.pem" ] || { echo "start the peers first: bash ../shared/peers/peers.sh" >&2; exit 1; }

URL=$(python3 benches/uris.py 8443 www.example.test)

misses() { # misses <tag>: ten h2load clients, each with names of its own
  local c pids=()
  for c in $(seq 0 9); do python3 benches/uris.py 8443 "$1-$c-" "$PER" > "$OUT/uris-$c"; done
  for c in $(seq 0 9); do
    h2load -n "$PER" -c 1 -m 10 -i "$OUT/uris-$c" -H "$H" > "$OUT/miss-$c.out" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  local ok
  ok=$(cat "$OUT"/miss-*.out | awk '/succeeded/ {s += $8} END {print s + 0}')
  [ "$ok" -eq $((PER * 10)) ] || echo "warning: $ok of $((PER * 10)) misses succeeded" >&2
}

total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}'; }

printf '| build | instructions per hit | instructions per miss |\n|---|---:|---:|\n'
for bin in $BINS; do
  valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.%p" --dump-instr=no \
    "$bin" -l 127.0.0.1:8443 -u 127.0.0.1:5300 \
    --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen 127.0.0.1:9199 \
    "${OUT_OF_THE_WAY[@]}" > "$OUT/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do curl -sf http://127.0.0.1:9199/healthz >/dev/null && break; sleep 0.2; done
  h2load -n 200 -c 1 "$URL" -H "$H" >/dev/null
  misses "warm-$RANDOM" # every worker thread past its first handshake
  callgrind_control -z "$pid" >/dev/null 2>&1
  h2load -n "$HITS" -c 10 -m 10 "$URL" -H "$H" > "$OUT/hits.out"
  callgrind_control -d "$pid" >/dev/null 2>&1
  callgrind_control -z "$pid" >/dev/null 2>&1
  misses "miss-$RANDOM"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  grep -q "$HITS succeeded" "$OUT/hits.out" || { echo "$bin: hits failed" >&2; cat "$OUT/hits.out" >&2; exit 1; }
  hit=$(total "$OUT/cg.$pid.1")
  miss=$(total "$OUT/cg.$pid.2")
  printf '| %s | %d | %d |\n' "$bin" $((hit / HITS)) $((miss / (PER * 10)))
  rm -f "$OUT"/cg.*
done
