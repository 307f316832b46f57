#!/usr/bin/env bash
# Builds the Debian package: target/debian/doh-proxy_VERSION-1_ARCH.deb.
# The service unit is examples/systemd/doh-proxy.service with the binary
# where the package puts it (/usr/bin); the socket unit is shipped as an
# example only (it binds port 443 on every address). Needs cargo-deb (installed if missing)
# and dpkg-dev (for the computed dependencies). PGO=1 packages the
# profile-guided build of benches/pgo.sh instead (which needs a DNS
# server on loopback for its training, see there; the package goes to
# target/pgo/use/debian/).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
dpkg -s dpkg-dev >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends dpkg-dev
rm -rf target/debian-units
mkdir -p target/debian-units/service
sed 's|/usr/local/bin/doh-proxy|/usr/bin/doh-proxy|' examples/systemd/doh-proxy.service \
  > target/debian-units/service/doh-proxy.service
if [ -n "${PGO:-}" ]; then
  bash benches/pgo.sh
  export CARGO_TARGET_DIR=$PWD/target/pgo/use
  set -- --no-build "$@"
fi
# Stripped: the release profile keeps line tables for profiling.
cargo deb --strip --no-separate-debug-symbols "$@"
