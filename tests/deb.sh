#!/usr/bin/env bash
# The Debian package end to end on this machine: build it, check where its
# files go, lint it, install it, verify the installed units and the
# shipped configuration, then remove and purge it and check what is left.
# systemd is not PID 1 on the CI machine: the maintainer scripts enable the
# service and skip starting it, as Debian's helpers do in a chroot.
# Needs root (apt-get). Loopback only: nothing here sends a packet.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
for p in lintian dpkg-dev systemd; do
  dpkg -s "$p" >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends "$p" >/dev/null
done
fail() { echo "deb: $*"; exit 1; }

bash debian/build.sh --quiet
deb=$(ls -t "${CARGO_TARGET_DIR:-target}"/debian/doh-proxy_*.deb | head -1)
echo "--- $deb"

contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/doh-proxy ./usr/lib/systemd/system/doh-proxy.service \
         ./usr/share/doc/doh-proxy/examples/doh-proxy.socket ./etc/doh-proxy/doh-proxy.toml \
         ./usr/share/doc/doh-proxy/copyright ./usr/share/doc/doh-proxy/changelog.Debian.gz \
         ./usr/share/doc/doh-proxy/examples/prometheus-alerts.yml \
         ./usr/share/doc/doh-proxy/examples/grafana-dashboard.json; do
  grep -qx "$f" <<<"$contents" || fail "$f is not in the package"
done
grep -q '^ExecStart=/usr/bin/doh-proxy' <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/systemd/system/doh-proxy.service) \
  || fail "the service does not run /usr/bin/doh-proxy"
ctrl=$(mktemp -d)
dpkg-deb -e "$deb" "$ctrl"
grep -qx /etc/doh-proxy/doh-proxy.toml "$ctrl/conffiles" || fail "the configuration is not a conffile"
grep -q deb-systemd-helper "$ctrl/postinst" || fail "postinst does not enable the service"
echo "Depends: $(dpkg-deb -f "$deb" Depends)"

# Lintian: no error. Warnings accepted (README, "Install on Debian"):
# no-manual-page (--help is the manual), initial-upload-closes-no-bugs (not
# an upload to Debian: no ITP bug to close).
lintian --fail-on error,warning --suppress-tags no-manual-page,initial-upload-closes-no-bugs "$deb"

apt-get install -y -q "$(realpath "$deb")" >/dev/null
test -x /usr/bin/doh-proxy || fail "not installed"
test -L /etc/systemd/system/multi-user.target.wants/doh-proxy.service || fail "the service is not enabled"
test ! -e /etc/systemd/system/sockets.target.wants/doh-proxy.socket || fail "the socket unit must not be enabled"
systemd-analyze verify /lib/systemd/system/doh-proxy.service
score=$(systemd-analyze security --offline=true /lib/systemd/system/doh-proxy.service 2>&1 | awk '/Overall exposure level/ {print $(NF-2)}')
echo "systemd-analyze security: exposure $score"
awk -v s="$score" 'BEGIN { exit !(s + 0 <= 2.0) }' || fail "exposure $score is over 2.0"
doh-proxy check -c /etc/doh-proxy/doh-proxy.toml

apt-get remove -y -q doh-proxy >/dev/null
test ! -e /usr/bin/doh-proxy || fail "the binary is still there after remove"
test -e /etc/doh-proxy/doh-proxy.toml || fail "remove must keep the conffile"
mkdir -p /var/lib/private/doh-proxy && touch /var/lib/private/doh-proxy/state.json
apt-get purge -y -q doh-proxy >/dev/null
for f in /etc/doh-proxy /var/lib/doh-proxy /var/lib/private/doh-proxy \
         /etc/systemd/system/multi-user.target.wants/doh-proxy.service; do
  test ! -e "$f" || fail "$f is left after purge"
done
dpkg -s doh-proxy >/dev/null 2>&1 && fail "still known to dpkg after purge"
echo "deb: 1 passed, 0 failed"
