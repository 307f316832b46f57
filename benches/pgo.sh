#!/usr/bin/env bash
# A profile-guided build of doh-proxy: what to run in production.
#
#   bash benches/pgo.sh            # -> target/pgo/doh-proxy
#
# Builds doh-proxy instrumented, runs it through a training load on
# loopback (cache hits and misses over HTTP/2, misses on a full cache,
# fresh TLS connections, HTTP/1.1, POST, refusals, DNS over TLS), merges
# the counts and builds again with them: the compiler then lays out the
# code a request runs through together and keeps what it never runs out
# of the way. A miss runs through more code than the instruction cache
# holds, which is where a miss cost as much as dnsdist's although it
# executes fewer instructions (BENCHMARKS.md); measured against the plain
# build, both loaded at once (`benches/ab_cpu.sh`): about a sixth less CPU
# per miss and a quarter less per cache hit. Nothing else changes: the
# same source, the same checks, only the code's layout and inlining.
#
# The profile is made by the toolchain that builds, every time (nothing
# stale is kept): about 15 minutes on 2 cores (two release builds).
# Needs llvm-profdata (`rustup component add llvm-tools`), h2load, kdig,
# and a DNS server on loopback for the training's misses: UPSTREAM
# (127.0.0.1:5300, the peers' NSD: bash ../shared/peers/peers.sh; names
# under example.test are asked). Only loopback is used. The peers'
# certificate is used when it is there, else the proxy's self-signed one.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/flags.sh
BASE=${BASE:-/tmp/doh-peers}
OUT=${OUT:-$PWD/target/pgo}
PORT=${PORT:-8493}
UPSTREAM=${UPSTREAM:-127.0.0.1:5300}
H='accept: application/dns-message'
PROFDATA=$(find "$(rustc --print sysroot)" -name llvm-profdata -type f 2>/dev/null | head -1)
[ -n "$PROFDATA" ] || { echo "llvm-profdata is needed: rustup component add llvm-tools" >&2; exit 1; }
kdig @"${UPSTREAM%:*}" -p "${UPSTREAM##*:}" +timeout=2 +retry=0 www.example.test A > /dev/null ||
  { echo "no DNS server answers on $UPSTREAM (bash ../shared/peers/peers.sh starts one)" >&2; exit 1; }
TLS=()
[ -f "$BASE/tls/cert.pem" ] && TLS=(--tls-cert "$BASE/tls/cert.pem" --tls-key "$BASE/tls/key.pem")
for t in h2load kdig; do command -v $t >/dev/null || { echo "$t is needed" >&2; exit 1; }; done

mkdir -p "$OUT"
echo "== instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$OUT/profiles" cargo build --release --target-dir "$OUT/gen"
# Build scripts ran instrumented too: only the proxy's own run counts.
rm -rf "$OUT/profiles"

echo "== training" >&2
# A small cache, so that the misses also meet a full one.
"$OUT/gen/release/doh-proxy" -l "127.0.0.1:$PORT" --listen-dot "127.0.0.1:$((PORT + 1))" \
  -u "$UPSTREAM" "${TLS[@]}" \
  --metrics-listen 127.0.0.1:9493 --cache-size 20000 "${OUT_OF_THE_WAY[@]}" > "$OUT/train.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:9493/healthz >/dev/null && break; sleep 0.1; done
URL=$(python3 benches/uris.py "$PORT" www.example.test)
train() {
  h2load "$@" -H "$H" > "$OUT/train.out" 2>&1
  grep -q ", 0 failed, 0 errored" "$OUT/train.out" || { echo "training run failed: $*" >&2; exit 1; }
}
train -n 100000 -c 10 -m 10 "$URL"
pids=()
for c in $(seq 0 9); do
  python3 benches/uris.py "$PORT" "pgo-$RANDOM-$c-" 3000 > "$OUT/uris-$c"
  h2load -n 3000 -c 1 -m 10 -i "$OUT/uris-$c" -H "$H" > "$OUT/miss-$c.out" 2>&1 & pids+=($!)
done
wait "${pids[@]}"
for c in $(seq 0 9); do
  grep -q ", 0 failed, 0 errored" "$OUT/miss-$c.out" || { echo "training run failed: misses" >&2; exit 1; }
done
rm -f "$OUT"/uris-* "$OUT"/miss-*.out
for _ in 1 2 3; do train -n 2000 -c 500 "$URL"; done
train --h1 -n 20000 -c 10 "$URL"
python3 - "$OUT/query.bin" <<'PY'
import struct, sys
name = b"".join(bytes([len(l)]) + l for l in b"www.example.test".split(b".")) + b"\0"
open(sys.argv[1], "wb").write(struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1))
PY
train -n 20000 -c 10 -m 10 -d "$OUT/query.bin" -H 'content-type: application/dns-message' \
  "https://127.0.0.1:$PORT/dns-query"
# Refusals: a wrong path, an obsolete draft's parameter.
h2load -n 5000 -c 10 -m 10 "https://127.0.0.1:$PORT/nope" -H "$H" > /dev/null 2>&1 || true
h2load -n 5000 -c 10 -m 10 "https://127.0.0.1:$PORT/dns-query?ct=x&dns=AAAB" -H "$H" > /dev/null 2>&1 || true
for i in $(seq 1 100); do
  kdig @127.0.0.1 -p $((PORT + 1)) +tls "dot$i.example.test" A > /dev/null ||
    { echo "training run failed: kdig +tls" >&2; exit 1; }
done
kill -TERM $pid
wait $pid || true
trap - EXIT
"$PROFDATA" merge -o "$OUT/merged.profdata" "$OUT/profiles"
# Named by its content: cargo rebuilds every crate when the profile
# changes (it sees the flags change), never mixing two trainings.
sum=$(sha256sum "$OUT/merged.profdata" | cut -c1-16)
rm -f "$OUT"/doh-proxy-*.profdata
mv "$OUT/merged.profdata" "$OUT/doh-proxy-$sum.profdata"

echo "== optimized build" >&2
# (Functions the training never ran have no counts: the compiler says so
# for each, into the log.)
RUSTFLAGS="-Cprofile-use=$OUT/doh-proxy-$sum.profdata" cargo build --release --target-dir "$OUT/use" \
  2> "$OUT/build.log" || { tail -30 "$OUT/build.log" >&2; exit 1; }
cp "$OUT/use/release/doh-proxy" "$OUT/doh-proxy"
echo "built: $OUT/doh-proxy" >&2
