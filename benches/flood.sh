#!/usr/bin/env bash
# The upstream budget under a flood: h2load sends unique names (plain, then
# truncated: the TCP retry is a second packet) from an allowlisted address,
# far over --upstream-qps, to the release binary in front of a counting
# upstream (benches/count_upstream.py). Prints, per run, the requests/s of
# the flood and the packets the upstream received in each second. The
# budget must hold close to QPS in every second after the first (which
# also carries the burst): never far above, never starved.
#
#   bash benches/flood.sh             # QPS=50, N=600000 requests per run
#
# Loopback only; every run is bounded by its request count and a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
QPS=${QPS:-50}
N=${N:-600000}
C=${C:-60}
PORT=${PORT:-5399}
OUT=$(mktemp -d /tmp/doh-flood.XXXXXX)
command -v h2load >/dev/null || apt-get install -y -q nghttp2-client >/dev/null
cargo build --release --quiet --bin doh-proxy
python3 - "$OUT" <<'PY'
import base64, random, struct, sys
def q(name):
    m = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        m += bytes([len(label)]) + label.encode()
    return m + b"\0" + struct.pack(">HH", 1, 1)
for kind in ("plain", "tc"):
    with open(f"{sys.argv[1]}/uris-{kind}", "w") as f:
        for i in range(int(600000)):
            name = f"{kind}{i}x{random.randrange(10**9)}.example.test"
            f.write("https://127.0.0.1:8443/dns-query?dns="
                    + base64.urlsafe_b64encode(q(name)).decode().rstrip("=") + "\n")
PY
python3 benches/count_upstream.py "$PORT" > "$OUT/upstream.log" 2>&1 &
UP=$!
target/release/doh-proxy -l 127.0.0.1:8443 -u "127.0.0.1:$PORT" --upstream-qps "$QPS" \
  --allow 127.0.0.1 --metrics-listen 127.0.0.1:9198 --max-conns-per-ip 1000 \
  > "$OUT/proxy.log" 2>&1 &
PX=$!
trap 'kill $PX $UP 2>/dev/null || true' EXIT
sleep 2
for kind in plain tc; do
  from=$(date +%s)
  timeout 120 h2load -c "$C" -m 10 -t 2 -n "$N" -i "$OUT/uris-$kind" > "$OUT/h2load-$kind.out" 2>&1 || true
  to=$(date +%s)
  sleep 2
  rate=$(grep -oE 'finished in [0-9.]+s, [0-9.]+ req/s' "$OUT/h2load-$kind.out" | awk '{print $4}')
  # Whole seconds of the flood, after its first.
  secs=$(awk -v a="$from" -v b="$to" '$1 > a && $1 < b {printf "%s ", $2}' "$OUT/upstream.log")
  echo "$kind: flood ${rate} req/s for $((to - from)) s; upstream packets per second after the first: $secs"
done
curl -s 127.0.0.1:9198/metrics | grep -E '^doh_upstream_budget_exhausted_total'
