#!/usr/bin/env bash
# Cache hits over DoH (HTTP/2), DNS over TLS and DNS over QUIC against one
# release doh-proxy, in interleaved rounds: queries/s and the server's CPU
# per query for each (examples/dns_load.rs). Needs NSD on 127.0.0.1:5300
# (bash ../shared/peers/peers.sh). Loopback only.
#   ROUNDS=3 SECS=10 CONNS=10 INFLIGHT=10 bash benches/transports.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3} SECS=${SECS:-10} CONNS=${CONNS:-10} INFLIGHT=${INFLIGHT:-10}
[ -n "${NOBUILD:-}" ] || cargo build --release --bin doh-proxy --example dns_load
BIN=${BIN:-target/release/doh-proxy}
"$BIN" -l 127.0.0.1:8443 --listen-dot 127.0.0.1:8873 --listen-doq 127.0.0.1:8873 \
  -u 127.0.0.1:5300 --metrics-listen 127.0.0.1:9193 --min-ttl 3600 \
  --per-ip-qps 100000000 --per-ip-burst 100000000 --per-prefix-qps 100000000 \
  --max-conns-per-ip 100000 --per-ip-conn-rate 100000 --per-prefix-conn-rate 100000 \
  --ban-after 4294967295 --max-requests-per-conn 4000000000 --log-format json >/tmp/transports-proxy.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
sleep 1
for r in $(seq "$ROUNDS"); do
  for t in doh:8443 dot:8873 doq:8873; do
    target/release/examples/dns_load --proto "${t%%:*}" --addr "127.0.0.1:${t#*:}" \
      --conns "$CONNS" --inflight "$INFLIGHT" --secs "$SECS" --pid "$pid" | sed "s/^/round $r /"
  done
done
