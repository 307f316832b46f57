#!/usr/bin/env bash
# Memory per idle TLS HTTP/2 connection, and how much of it comes back once
# the connections close: doh-proxy and dnsdist, each started fresh for the
# measurement, both in front of the peers' NSD (../shared/peers/peers.sh).
# Only loopback is used; every wait is bounded.
#
#   bash benches/idle_mem.sh                  # 5,000 connections, 3 rounds
#   CONNS=10000 ROUNDS=1 bash benches/idle_mem.sh
#   SERVERS="doh-proxy" bash benches/idle_mem.sh
#   EXTRA="--flag value" bash benches/idle_mem.sh    # more doh-proxy flags
#   FIRST=20 bash benches/idle_mem.sh    # 20 GETs each first: busy, then quiet
#
# Each connection comes from its own 127.20.x.y address
# (examples/idle_conns), does one TLS handshake, one GET (FIRST of them,
# one after the other), then stays silent
# within both servers' idle timeouts (30 s). Resident memory (VmRSS) is read
# before, with every connection open (after a 2 s settle), and again once
# the server has closed them all and 3 s have passed. Prints a Markdown
# table with KiB per idle connection and the share returned.
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-5000}
ROUNDS=${ROUNDS:-3}
SERVERS=${SERVERS:-doh-proxy dnsdist}
EXTRA=${EXTRA:-}
FIRST=${FIRST:-1}
BIN=${BIN:-target/release/doh-proxy}
PEERS=${PEERS:-../shared/peers/peers.sh}
export BASE=${BASE:-/tmp/doh-peers}
OUT=$(mktemp -d /tmp/doh-idle.XXXXXX)
CA=$BASE/tls/ca.pem
PID=""
trap 'kill $PID 2>/dev/null; rm -rf "$OUT"' EXIT

if ! dig +short +time=1 +tries=1 @127.0.0.1 -p 5300 www.example.test >/dev/null 2>&1; then
  echo "== peers (NSD)" >&2
  WITH_DNSCRYPT=0 WITH_PY=0 WITH_DOH_PROXY=0 bash "$PEERS" > "$OUT/peers.log" 2>&1 ||
    { tail -20 "$OUT/peers.log"; exit 1; }
fi
echo "== building (release)" >&2
[ -n "${NOBUILD:-}" ] || cargo build --release --quiet --bin doh-proxy --example idle_conns

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

start() { # start <server> -> sets PID and PORT
  case $1 in
    doh-proxy)
      PORT=8543
      # shellcheck disable=SC2086
      "$BIN" -l 127.0.0.1:$PORT -u 127.0.0.1:5300 \
        --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen 127.0.0.1:9189 \
        --max-conns-per-ip 10000 --max-conns $((CONNS + 100)) \
        --per-ip-conn-rate 100000000 --per-prefix-conn-rate 100000000 $EXTRA \
        > "$OUT/doh-proxy.log" 2>&1 &
      PID=$! ;;
    dnsdist)
      PORT=8553
      cat > "$OUT/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:5311")
newServer({address="127.0.0.1:5300", name="nsd"})
addDOHLocal("127.0.0.1:$PORT", "$BASE/tls/cert.pem", "$BASE/tls/key.pem", "/dns-query", {reusePort=true})
setMaxTCPClientThreads(10)
pc = newPacketCache(100000, {maxTTL=86400, minTTL=0})
getPool(""):setCache(pc)
EOF
      dnsdist -C "$OUT/dnsdist.conf" --supervised --disable-syslog > "$OUT/dnsdist.log" 2>&1 &
      PID=$! ;;
  esac
  local url="https://127.0.0.1:$PORT/dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlBHRlc3QAAAEAAQ"
  for _ in $(seq 1 100); do
    curl -sf --cacert "$CA" -H 'accept: application/dns-message' "$url" -o /dev/null && return 0
    sleep 0.1
  done
  echo "$1 did not start" >&2; cat "$OUT/$1.log" >&2; exit 1
}

echo -e "server\tround\tbefore\topen\tafter" > "$OUT/results.tsv"
for r in $(seq 1 "$ROUNDS"); do
  for s in $SERVERS; do
    start "$s"
    sleep 1
    fd0=$(fds "$PID"); before=$(rss "$PID")
    target/release/examples/idle_conns --addr "127.0.0.1:$PORT" --conns "$CONNS" --every 3600 --first "$FIRST" --ca "$CA" \
      > "$OUT/idle.out" 2>&1 &
    idle=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$OUT/idle.out" && break; sleep 0.2; done
    echo "   $s round $r: $(head -1 "$OUT/idle.out")" >&2
    sleep 2
    open=$(rss "$PID")
    kill "$idle"; wait "$idle" 2>/dev/null || true
    for _ in $(seq 1 300); do [ "$(fds "$PID")" -le $((fd0 + 5)) ] && break; sleep 0.1; done
    sleep 3
    after=$(rss "$PID")
    echo -e "$s\t$r\t$before\t$open\t$after" >> "$OUT/results.tsv"
    kill "$PID"; wait "$PID" 2>/dev/null || true
    PID=""
  done
done

python3 - "$OUT/results.tsv" "$CONNS" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
conns, cpu = int(sys.argv[2]), sys.argv[3]
print(f"{conns} idle TLS HTTP/2 connections (one GET each), fresh server per round; CPU: {cpu}\n")
print("| server | round | RSS before MiB | with connections MiB | after close MiB | KiB per idle connection | returned |")
print("|---|---:|---:|---:|---:|---:|---:|")
per = {}
for s, r, b, o, a in rows:
    b, o, a = int(b), int(o), int(a)
    kib = (o - b) / conns
    ret = (o - a) / (o - b) if o > b else 0.0
    per.setdefault(s, []).append((kib, ret))
    print(f"| {s} | {r} | {b/1024:.1f} | {o/1024:.1f} | {a/1024:.1f} | {kib:.1f} | {ret:.0%} |")
print()
for s, xs in per.items():
    k = sorted(x[0] for x in xs); t = sorted(x[1] for x in xs)
    print(f"{s}: median {k[len(k)//2]:.1f} KiB per idle connection, {t[len(t)//2]:.0%} returned after close")
EOF
