#!/usr/bin/env bash
# Side-by-side load test of doh-proxy against the peers of
# ../shared/peers/peers.sh (dnsdist with its packet cache, unbound, the
# `doh-proxy` crate), all forwarding to the same NSD on 127.0.0.1:5300.
# Every run is bounded (request count and a timeout); only loopback is used.
#
#   bash benches/load.sh                 # N=100000 requests per cache-hit run
#   N=20000 bash benches/load.sh         # quicker
#   SCEN="hit_h2 hit_h2_idle" bash benches/load.sh   # only some scenarios
#   BIN=/tmp/old/doh-proxy NOBUILD=1 bash benches/load.sh  # another build (every doh-proxy instance)
#   PGO=1 bash benches/load.sh          # the profile-guided build (benches/pgo.sh)
#
# Scenarios: hit_h2, hit_h1, reject, miss, hit_h2_idle (cache hits while
# examples/idle_conns holds 10,000 idle connections open, doh-proxy and
# dnsdist only). When redis-server is installed, a second doh-proxy with
# `--redis` (server "doh-proxy-redis") runs hit_h2 and miss beside the
# first, and scenario fleet_ab alternates cache-hit runs on the two
# instances (ROUNDS, 5) and reports the median ratio: what sharing bans,
# the budget and the client count costs a cache hit.
#
# Handshake economy (doh-proxy against dnsdist, ROUNDS interleaved rounds,
# medians of the per-round ratios):
#   fresh   h2load -c 1000 -n 2000 (a new TLS connection for every two
#           requests), FRESH_REPS runs per server and round
#   hit_ab  cache hits over long-lived HTTP/2 (10 conns x 10 streams)
#   miss_ab unique names, each a miss forwarded to NSD, N/5 per run (ten
#           h2load of one connection x 10 streams, each with its own names)
#   miss_full the same with both caches full: each server is first asked
#           FILL (110000) names of its own, unmeasured, so that every miss
#           measured meets a full cache (dnsdist's of 100,000 entries then
#           stores nothing more; doh-proxy's, of the same size, stores a
#           name from its second query on), as on a resolver that has run
#           for a while
#   resume  examples/handshakes: RESUME_CLIENTS (20000) clients connect
#           once (full handshakes) and come back (resumed or not), against
#           doh-proxy with tickets, doh-proxy with --tls-ticket-lifetime 0
#           (session cache only), doh-proxy with an RSA-2048 certificate,
#           and dnsdist
#
# Prints a Markdown table: requests/s, p99 latency, CPU seconds per 100k
# requests for each server and scenario, peak RSS, and the ratio of
# doh-proxy to each peer. Numbers from one run only: compare ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/flags.sh
N=${N:-100000}
SCEN=${SCEN:-hit_h2 hit_h1 reject miss hit_h2_idle fleet_ab fresh hit_ab miss_ab miss_full resume}
ROUNDS=${ROUNDS:-5}
FRESH_REPS=${FRESH_REPS:-5}
RESUME_CLIENTS=${RESUME_CLIENTS:-20000}
IDLE=${IDLE:-10000}
want() { [[ " $SCEN " == *" $1 "* ]]; }
PEERS=${PEERS:-../shared/peers/peers.sh}
export BASE=${BASE:-/tmp/doh-peers}
OUT=$(mktemp -d /tmp/doh-load.XXXXXX)
CA=$BASE/tls/ca.pem
H='accept: application/dns-message'

echo "== peers (NSD, dnsdist, unbound, the doh-proxy crate)" >&2
WITH_DNSCRYPT=0 WITH_PY=0 WITH_DOH_PROXY=1 bash "$PEERS" > "$OUT/peers.log" 2>&1 ||
  { tail -20 "$OUT/peers.log"; exit 1; }
echo "== building doh-proxy (release)" >&2
[ -n "${NOBUILD:-}" ] || cargo build --release --quiet --bin doh-proxy --example idle_conns --example handshakes
if [ -n "${PGO:-}" ]; then # the profile-guided build, as production runs it
  [ -n "${NOBUILD:-}" ] || bash benches/pgo.sh
  BIN=${BIN:-target/pgo/doh-proxy}
fi
# Every doh-proxy below (with --redis, without tickets, with RSA) is this
# build: their ratios compare configurations, never two builds.
BIN=${BIN:-target/release/doh-proxy}
"$BIN" -l 127.0.0.1:8443 --listen-http 127.0.0.1:8088 -u 127.0.0.1:5300 \
  --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen 127.0.0.1:9199 \
  "${OUT_OF_THE_WAY[@]}" --max-conns $((IDLE + 2000)) > "$OUT/ours.log" 2>&1 &
OURS=$!
FLEET=""
REDIS_PID=""
NOTICKETS=""
RSA=""
trap 'kill $OURS $FLEET $REDIS_PID $NOTICKETS $RSA 2>/dev/null; rm -rf "$OUT"' EXIT
if want resume; then
  # The same proxy without tickets, and one with an RSA-2048 leaf from the
  # peers' CA: what resumption saves when a full handshake signs with RSA.
  "$BIN" -l 127.0.0.1:8473 -u 127.0.0.1:5300 --tls-ticket-lifetime 0 \
    --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen 127.0.0.1:9197 \
    "${OUT_OF_THE_WAY[@]}" > "$OUT/notickets.log" 2>&1 &
  NOTICKETS=$!
  openssl req -newkey rsa:2048 -nodes -keyout "$OUT/rsa.key" -out "$OUT/rsa.csr" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
  openssl x509 -req -in "$OUT/rsa.csr" -CA "$BASE/tls/ca.pem" -CAkey "$BASE/tls/ca.key" -days 2 \
    -copy_extensions copy -out "$OUT/rsa.pem" 2>/dev/null
  "$BIN" -l 127.0.0.1:8483 -u 127.0.0.1:5300 \
    --tls-cert "$OUT/rsa.pem" --tls-key "$OUT/rsa.key" --metrics-listen 127.0.0.1:9196 \
    "${OUT_OF_THE_WAY[@]}" > "$OUT/rsa.log" 2>&1 &
  RSA=$!
fi
if command -v redis-server >/dev/null; then
  redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no > "$OUT/redis.log" 2>&1 &
  REDIS_PID=$!
  "$BIN" -l 127.0.0.1:8463 --listen-http 127.0.0.1:8098 -u 127.0.0.1:5300 \
    --tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem" --metrics-listen 127.0.0.1:9198 \
    "${OUT_OF_THE_WAY[@]}" --redis redis://127.0.0.1:6390/0 > "$OUT/fleet.log" 2>&1 &
  FLEET=$!
fi
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:9199/healthz >/dev/null 2>&1 && break; sleep 0.1; done
if [ -n "$FLEET" ]; then
  for _ in $(seq 1 100); do
    curl -s http://127.0.0.1:9198/metrics 2>/dev/null | grep -q '^doh_redis_up 1' && break; sleep 0.1
  done
fi

# name | pid | TLS port | plain port (- when none)
SERVERS=(
  "doh-proxy|$OURS|8443|8088"
  ${FLEET:+"doh-proxy-redis|$FLEET|8463|8098"}
  "dnsdist|$(cat "$BASE/run/dnsdist.pid")|8453|8083"
  "unbound|$(cat "$BASE/run/unbound.pid")|8455|-"
  "doh-proxy-crate|$(cat "$BASE/run/doh-proxy-tls.pid")|8454|3000"
)
# The cache-hit query (its dns= parameter); the miss runs use
# benches/uris.py for unique names (NXDOMAIN from NSD), a fresh set per server.
Q=$(python3 benches/uris.py 0 www.example.test | sed 's/.*dns=//')
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run <scenario> <server> <pid> <h2load args...>
run() {
  local scen=$1 name=$2 pid=$3; shift 3
  local t0 t1 log="$OUT/$scen-$name.log"
  t0=$(cpu_ticks "$pid")
  SSL_CERT_FILE=$CA timeout 180 h2load "$@" -H "$H" --log-file="$log" > "$OUT/$scen-$name.out" 2>&1 || true
  t1=$(cpu_ticks "$pid")
  python3 - "$scen" "$name" "$OUT/$scen-$name.out" "$log" "$((t1 - t0))" "$(getconf CLK_TCK)" >> "$OUT/results.tsv" <<'EOF'
import re, sys
scen, name, out, log, ticks, hz = sys.argv[1:7]
text = open(out).read()
m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
rps = float(m.group(1)) if m else 0.0
m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
done = int(m.group(2)) if m else 0
codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
codes = "/".join(codes.groups()) if codes else "?"
lat = sorted(int(l.split("\t")[2]) for l in open(log) if l.count("\t") >= 2) if done else []
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else 0.0
cpu = int(ticks) / int(hz)
per100k = cpu / done * 100000 if done else 0.0
print(f"{scen}\t{name}\t{rps:.0f}\t{p99:.2f}\t{per100k:.2f}\t{done}\t{codes}")
EOF
}

# run_miss <scenario> <server> <pid> <TLS port>: N/5 unique names, each a
# miss. h2load sends every client through the same URI list from its start,
# so one h2load with -c 10 would ask each name ten times (90 % hits): ten
# h2load processes of one connection x 10 streams, each with its own
# names, make every request a miss; the server's CPU is read over all ten.
run_miss() {
  local scen=$1 name=$2 pid=$3 port=$4 per=$((N / 50)) t0 t1 c
  local tag="$scen-$RANDOM-$name" pids=()
  for c in $(seq 0 9); do python3 benches/uris.py "$port" "$tag-$c-" "$per" > "$OUT/uris-miss-$c"; done
  t0=$(cpu_ticks "$pid")
  for c in $(seq 0 9); do
    SSL_CERT_FILE=$CA timeout 180 h2load -n "$per" -c 1 -m 10 -i "$OUT/uris-miss-$c" -H "$H" \
      --log-file="$OUT/miss-$c.log" > "$OUT/miss-$c.out" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}" || true
  t1=$(cpu_ticks "$pid")
  python3 - "$scen" "$name" "$OUT" "$((t1 - t0))" "$(getconf CLK_TCK)" >> "$OUT/results.tsv" <<'PY'
import glob, re, sys
scen, name, out, ticks, hz = sys.argv[1:6]
rps = done = 0
codes = [0, 0, 0, 0]
lat = []
for f in glob.glob(f"{out}/miss-*.out"):
    text = open(f).read()
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    rps += float(m.group(1)) if m else 0.0
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done", text)
    done += int(m.group(1)) if m else 0
    c = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if c:
        codes = [a + int(b) for a, b in zip(codes, c.groups())]
for f in glob.glob(f"{out}/miss-*.log"):
    lat += [int(l.split("\t")[2]) for l in open(f) if l.count("\t") >= 2]
lat.sort()
p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else 0.0
cpu = int(ticks) / int(hz)
per100k = cpu / done * 100000 if done else 0.0
print(f"{scen}\t{name}\t{rps:.0f}\t{p99:.2f}\t{per100k:.2f}\t{done}\t{'/'.join(map(str, codes))}")
PY
  rm -f "$OUT"/miss-* "$OUT"/uris-miss-*
}

for s in "${SERVERS[@]}"; do
  IFS='|' read -r name pid tls plain <<< "$s"
  echo "== $name" >&2
  url="https://127.0.0.1:$tls/dns-query?dns=$Q"
  curl -s --cacert "$CA" -H "$H" "$url" -o /dev/null   # warm the cache
  want hit_h2 && run hit_h2 "$name" "$pid" -n "$N" -c 10 -m 10 "$url"
  # unbound's DoH is HTTP/2 only; the Redis instance differs only in what
  # it shares, which hit_h2 and miss show.
  if want hit_h1 && [[ $name != unbound && $name != doh-proxy-redis ]]; then
    run hit_h1 "$name" "$pid" -n "$((N / 2))" -c 10 -m 1 --h1 "$url"
  fi
  want reject && [ "$name" != doh-proxy-redis ] && run reject "$name" "$pid" -n "$N" -c 10 -m 10 \
    "https://127.0.0.1:$tls/dns-query?ct=application/dns-udpwireformat&dns=$Q"
  want miss && run_miss miss "$name" "$pid" "$tls"
  if want hit_h2_idle && [[ $name == doh-proxy || $name == dnsdist ]]; then
    target/release/examples/idle_conns --addr "127.0.0.1:$tls" --conns "$IDLE" --ca "$CA" \
      > "$OUT/idle-$name.out" 2>&1 &
    idle=$!
    for _ in $(seq 1 600); do grep -q '^ready' "$OUT/idle-$name.out" && break; sleep 0.2; done
    echo "   idle connections: $(head -1 "$OUT/idle-$name.out")" >&2
    run hit_h2_idle "$name" "$pid" -n "$N" -c 10 -m 10 "$url"
    kill $idle 2>/dev/null; wait $idle 2>/dev/null || true
    sleep 2
  fi
  echo -e "rss\t$name\t$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")" >> "$OUT/results.tsv"
done

if want fleet_ab && [ -n "$FLEET" ]; then
  echo "== fleet_ab: doh-proxy and doh-proxy-redis in turns, $ROUNDS rounds" >&2
  for r in $(seq 1 "$ROUNDS"); do
    run "fleet_ab_$r" doh-proxy "$OURS" -n "$N" -c 10 -m 10 "https://127.0.0.1:8443/dns-query?dns=$Q"
    run "fleet_ab_$r" doh-proxy-redis "$FLEET" -n "$N" -c 10 -m 10 "https://127.0.0.1:8463/dns-query?dns=$Q"
  done
fi

DNSDIST_PID=$(cat "$BASE/run/dnsdist.pid")
if want fresh; then
  echo "== fresh: doh-proxy and dnsdist in turns, $ROUNDS rounds of $FRESH_REPS x (h2load -c 1000 -n 2000)" >&2
  for r in $(seq 1 "$ROUNDS"); do
    for k in $(seq 1 "$FRESH_REPS"); do
      run "fresh_${r}_$k" doh-proxy "$OURS" -n 2000 -c 1000 "https://127.0.0.1:8443/dns-query?dns=$Q"
      run "fresh_${r}_$k" dnsdist "$DNSDIST_PID" -n 2000 -c 1000 "https://127.0.0.1:8453/dns-query?dns=$Q"
    done
  done
fi
if want hit_ab; then
  echo "== hit_ab: doh-proxy and dnsdist in turns, $ROUNDS rounds" >&2
  for r in $(seq 1 "$ROUNDS"); do
    run "hit_ab_$r" doh-proxy "$OURS" -n "$N" -c 10 -m 10 "https://127.0.0.1:8443/dns-query?dns=$Q"
    run "hit_ab_$r" dnsdist "$DNSDIST_PID" -n "$N" -c 10 -m 10 "https://127.0.0.1:8453/dns-query?dns=$Q"
  done
fi
if want miss_ab; then
  echo "== miss_ab: doh-proxy and dnsdist in turns, $ROUNDS rounds of $((N / 5)) unique names" >&2
  for r in $(seq 1 "$ROUNDS"); do
    run_miss "miss_ab_$r" doh-proxy "$OURS" 8443
    run_miss "miss_ab_$r" dnsdist "$DNSDIST_PID" 8453
  done
fi
if want miss_full; then
  FILL=${FILL:-110000}
  echo "== miss_full: $FILL names to fill both caches, then $ROUNDS rounds of $((N / 5)) unique names" >&2
  fill() { # fill <pid> <port>: FILL names, unmeasured
    local c pids=()
    for c in $(seq 0 9); do python3 benches/uris.py "$2" "fill-$RANDOM-$c-" $((FILL / 10)) > "$OUT/uris-fill-$c"; done
    for c in $(seq 0 9); do
      SSL_CERT_FILE=$CA timeout 300 h2load -n $((FILL / 10)) -c 1 -m 10 -i "$OUT/uris-fill-$c" -H "$H" > /dev/null 2>&1 &
      pids+=($!)
    done
    wait "${pids[@]}" || true
    rm -f "$OUT"/uris-fill-*
  }
  fill "$OURS" 8443
  fill "$DNSDIST_PID" 8453
  for r in $(seq 1 "$ROUNDS"); do
    run_miss "miss_full_$r" doh-proxy "$OURS" 8443
    run_miss "miss_full_$r" dnsdist "$DNSDIST_PID" 8453
  done
fi
if want resume; then
  echo "== resume: $RESUME_CLIENTS clients, twice" >&2
  for target in "doh-proxy (tickets)|$OURS|8443|$CA" "doh-proxy (session cache only)|$NOTICKETS|8473|$CA" \
                "doh-proxy (RSA-2048, tickets)|$RSA|8483|$CA" "dnsdist|$DNSDIST_PID|8453|$CA"; do
    IFS='|' read -r name pid port ca <<< "$target"
    echo "### $name" >> "$OUT/resume.md"
    target/release/examples/handshakes --addr "127.0.0.1:$port" --ca "$ca" --clients "$RESUME_CLIENTS" \
      --server-pid "$pid" >> "$OUT/resume.md" 2>> "$OUT/resume.err" || true
    echo >> "$OUT/resume.md"
  done
fi

python3 - "$OUT/results.tsv" "$N" <<'EOF'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
res = {(r[0], r[1]): r for r in rows if r[0] != "rss"}
rss = {r[1]: int(r[2]) for r in rows if r[0] == "rss"}
servers = ["doh-proxy", "doh-proxy-redis", "dnsdist", "unbound", "doh-proxy-crate"]
names = {"hit_h2": "cache hit, TLS HTTP/2 (10 conns x 10 streams)",
         "hit_h2_idle": "cache hits with 10,000 idle connections open, TLS HTTP/2",
         "hit_h1": "cache hit, TLS HTTP/1.1 (10 conns)",
         "reject": "obsolete-draft request (`ct=`), TLS HTTP/2",
         "miss": "unique names (misses), TLS HTTP/2"}
print(f"Requests per cache-hit run: {sys.argv[2]}; status columns are 2xx/3xx/4xx/5xx.\n")
print("| scenario | server | req/s | p99 ms | CPU s / 100k req | statuses | doh-proxy req/s ratio |")
print("|---|---|---:|---:|---:|---|---:|")
for scen in names:
    if not any(k[0] == scen for k in res):
        continue
    ours = res.get((scen, "doh-proxy"))
    for s in servers:
        r = res.get((scen, s))
        if not r:
            continue
        ratio = ""
        if s != "doh-proxy" and ours and float(r[2]) > 0:
            ratio = f"{float(ours[2]) / float(r[2]):.2f}x"
        print(f"| {names[scen]} | {s} | {r[2]} | {r[3]} | {r[4]} | {r[6]} | {ratio} |")
print("\n| server | peak RSS (MiB) |\n|---|---:|")
for s in servers:
    if s in rss:
        print(f"| {s} | {rss[s] / 1024:.1f} |")
ab = sorted(float(res[(k, "doh-proxy-redis")][2]) / float(res[(k, "doh-proxy")][2])
            for (k, s) in res if k.startswith("fleet_ab_") and s == "doh-proxy"
            and (k, "doh-proxy-redis") in res and float(res[(k, "doh-proxy")][2]) > 0)
if ab:
    print(f"\nCache hits with `--redis` against without, in turns ({len(ab)} rounds of {sys.argv[2]}): "
          f"median ratio {ab[len(ab) // 2]:.3f} (each round: {', '.join(f'{x:.3f}' for x in ab)}).")
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]
def rounds(prefix):
    """Per round and server: (mean req/s, CPU s per 100k requests)."""
    acc = {}
    for (k, s), r in res.items():
        if not k.startswith(prefix):
            continue
        rnd = k[len(prefix):].split("_")[0]
        a = acc.setdefault((rnd, s), [0.0, 0, 0.0, 0])
        done = int(r[5])
        a[0] += float(r[2]); a[3] += 1
        a[1] += done; a[2] += float(r[4]) * done / 100000
    return {key: (a[0] / a[3], a[2] / a[1] * 100000 if a[1] else 0.0) for key, a in acc.items()}
for prefix, what in (("fresh_", "a new TLS connection for every 2 requests (h2load -c 1000 -n 2000)"),
                     ("hit_ab_", "cache hits over long-lived TLS HTTP/2 (10 conns x 10 streams)"),
                     ("miss_ab_", "unique names (misses) over long-lived TLS HTTP/2 (10 conns x 10 streams)"),
                     ("miss_full_", "unique names (misses) meeting full caches (10 conns x 10 streams)")):
    per = rounds(prefix)
    rnds = sorted({k[0] for k in per if (k[0], "dnsdist") in per and (k[0], "doh-proxy") in per}, key=int)
    if not rnds:
        continue
    rps = [per[(r, "doh-proxy")][0] / per[(r, "dnsdist")][0] for r in rnds if per[(r, "dnsdist")][0] > 0]
    cpu = [per[(r, "dnsdist")][1] / per[(r, "doh-proxy")][1] for r in rnds if per[(r, "doh-proxy")][1] > 0]
    print(f"\n{what}, doh-proxy and dnsdist in turns, {len(rnds)} rounds:\n")
    print("| round | doh-proxy req/s | dnsdist req/s | doh-proxy CPU s / 100k | dnsdist CPU s / 100k |")
    print("|---|---:|---:|---:|---:|")
    for r in rnds:
        o, d = per[(r, "doh-proxy")], per[(r, "dnsdist")]
        print(f"| {r} | {o[0]:.0f} | {d[0]:.0f} | {o[1]:.2f} | {d[1]:.2f} |")
    if rps and cpu:
        print(f"\nMedian of the rounds: req/s {median(rps):.2f}x dnsdist's; "
              f"server CPU per request {median(cpu):.2f}x less than dnsdist's.")
hit = res.get(("hit_h2", "doh-proxy")); rej = res.get(("reject", "doh-proxy"))
if hit and rej and float(rej[4]) > 0:
    print(f"\ndoh-proxy: a rejected request costs {float(hit[4]) / float(rej[4]):.2f}x less CPU than a cache hit "
          f"({rej[4]} vs {hit[4]} CPU s per 100k).")
EOF
if [ -s "$OUT/resume.md" ]; then
  echo
  echo "Returning clients ($RESUME_CLIENTS, each with its own session store; examples/handshakes):"
  echo
  cat "$OUT/resume.md"
  head -5 "$OUT/resume.err" 2>/dev/null || true
fi
