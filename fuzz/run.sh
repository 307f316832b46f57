#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 20), starting from
# the committed seeds. A crash fails the run and leaves its input in
# fuzz/artifacts/. Builds in FUZZ_TARGET_DIR (default fuzz/target).
# Installs cargo-fuzz if missing (needs the nightly toolchain).
set -euo pipefail
cd "$(dirname "$0")"
SECS=${1:-20}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly)"; exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi
status=0
for t in request answer rewrite config state; do
  mkdir -p "corpus/$t"
  echo "--- fuzz $t for ${SECS}s"
  log=$(mktemp)
  if cargo +nightly fuzz run --target-dir "${FUZZ_TARGET_DIR:-target}" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$SECS" -rss_limit_mb=2048 -print_final_stats=1 > "$log" 2>&1; then
    grep -E '^Done|number_of_executed_units|new_units_added' "$log"
  else
    echo "!!! fuzz target $t failed:"; grep -vE '^#[0-9]+' "$log" | tail -n 60
    status=1
  fi
  rm -f "$log"
done
exit $status
