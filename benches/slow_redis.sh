#!/usr/bin/env bash
# What a slow Redis costs a request (the latency side of "Redis is never
# on a request's path for more than a few milliseconds"): two doh-proxy
# instances in front of the peers' NSD, one on its own and one whose
# --redis goes through a relay holding every reply DELAY ms (30: slow but
# up, leases late; 500: past the command timeout, Redis down), queried in
# turns by examples/slow_redis. Loopback only; bounded by N requests.
#
#   bash benches/slow_redis.sh            # DELAYS="30 500", N=2000
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
DELAYS=${DELAYS:-30 500}
PEERS=${PEERS:-../shared/peers/peers.sh}
export BASE=${BASE:-/tmp/doh-peers}
OUT=$(mktemp -d /tmp/doh-slow-redis.XXXXXX)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

WITH_DNSCRYPT=0 WITH_PY=0 WITH_DOH_PROXY=0 bash "$PEERS" > "$OUT/peers.log" 2>&1 ||
  { tail -20 "$OUT/peers.log"; exit 1; }
[ -n "${NOBUILD:-}" ] || cargo build --release --quiet --bin doh-proxy --example slow_redis
redis-server --port 6391 --bind 127.0.0.1 --save '' --appendonly no > "$OUT/redis.log" 2>&1 &
pids+=($!)

relay() { # relay PORT DELAY_MS: to redis on 6391, every reply held DELAY_MS
  python3 - "$1" "$2" <<'PY' &
import asyncio, sys
port, delay = int(sys.argv[1]), int(sys.argv[2]) / 1000
async def pipe(r, w, hold):
    while data := await r.read(65536):
        if hold:
            await asyncio.sleep(hold)
        w.write(data)
        await w.drain()
    w.close()
async def serve(cr, cw):
    sr, sw = await asyncio.open_connection("127.0.0.1", 6391)
    await asyncio.gather(pipe(cr, sw, 0), pipe(sr, cw, delay))
async def main():
    s = await asyncio.start_server(serve, "127.0.0.1", port)
    await s.serve_forever()
asyncio.run(main())
PY
  pids+=($!)
}

proxy() { # proxy HTTP_PORT METRICS_PORT [extra flags]
  local http=$1 metrics=$2
  shift 2
  target/release/doh-proxy --listen-http "127.0.0.1:$http" -l 127.0.0.1:0 -u 127.0.0.1:5300 \
    --trusted-proxy 127.0.0.1 --metrics-listen "127.0.0.1:$metrics" \
    --per-ip-qps 1000000 --per-ip-burst 1000000 --per-prefix-qps 1000000 "$@" \
    > "$OUT/proxy-$http.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$metrics/healthz" >/dev/null && return; sleep 0.1; done
  echo "doh-proxy on $http did not start" >&2; tail "$OUT/proxy-$http.log" >&2; exit 1
}

proxy 8091 9191
for d in $DELAYS; do
  relay $((16390 + d % 1000)) "$d"
  proxy $((8092 + d % 1000)) $((9192 + d % 1000)) --redis "redis://127.0.0.1:$((16390 + d % 1000))/0"
  up() { curl -fs "http://127.0.0.1:$((9192 + d % 1000))/metrics" | awk '/^doh_redis_up /{print $2}'; }
  # Under the 250 ms command timeout the link comes up; past it, never.
  if [ "$d" -lt 250 ]; then
    for _ in $(seq 100); do [ "$(up)" = 1 ] && break; sleep 0.1; done
  fi
  echo "### Redis answering in $d ms (redis_up $(up))"
  target/release/examples/slow_redis --alone 127.0.0.1:8091 --slow "127.0.0.1:$((8092 + d % 1000))" --n "$N"
done
