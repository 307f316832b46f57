#!/usr/bin/env bash
# End to end with real software: NSD serves a zone on loopback, doh-proxy
# forwards to it, and real clients (curl --doh-url, kdig +https GET/POST,
# dig +https, dnspython) resolve through the TLS and the plain-HTTP
# listeners. Everything stays on 127.0.0.1.
#
#   bash tests/e2e.sh [path/to/doh-proxy]     (default: target/debug/doh-proxy)
set -uo pipefail

BIN=${1:-target/debug/doh-proxy}
BASE=$(mktemp -d /tmp/doh-e2e.XXXXXX)
NSD_PORT=5390 TLS_PORT=8543 HTTP_PORT=8580 ADMIN_PORT=9553 DOT_PORT=8593 DOQ_PORT=8594
UNBOUND_DOT=8953 DOT_FRONT=8544 DOT_FRONT_ADMIN=9554 DOH_FRONT=8545 DOH_FRONT_ADMIN=9555
ACME_TLS=8546 ACME_ADMIN=9556 PEBBLE_PORT=14500 PEBBLE_MGMT=15500
export DEBIAN_FRONTEND=noninteractive
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  if [ -f "$BASE/nsd.pid" ]; then
    local n; n=$(cat "$BASE/nsd.pid"); kill "$n" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$n" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$BASE"
}
trap cleanup EXIT

need=()
for p in nsd unbound pebble knot-dnsutils bind9-dnsutils python3-venv openssl curl nftables; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
VENV=${DOH_E2E_VENV:-/tmp/doh-e2e-venv}
if ! "$VENV/bin/python" -c 'import dns.query, aioquic; assert dns.query.have_doh' 2>/dev/null; then
  { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; } && "$VENV/bin/pip" install -q 'dnspython[doh,doq]'
fi

# A private CA and a leaf for localhost / 127.0.0.1 (rustls refuses a CA as end entity).
T=$BASE/tls; mkdir -p "$T"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$T/ca.key" -out "$T/ca.pem" \
  -days 30 -subj "/CN=doh-e2e-CA" -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$T/key.pem" -out "$T/leaf.csr" \
  -subj "/CN=localhost" 2>/dev/null
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n' > "$T/leaf.ext"
openssl x509 -req -in "$T/leaf.csr" -CA "$T/ca.pem" -CAkey "$T/ca.key" -CAcreateserial -out "$T/cert.pem" \
  -days 30 -extfile "$T/leaf.ext" 2>/dev/null
CA=$T/ca.pem

cat > "$BASE/example.test.zone" <<'EOF'
$ORIGIN example.test.
$TTL 3600
@       IN SOA  ns1.example.test. hostmaster.example.test. ( 1 3600 600 86400 5 )
@       IN NS   ns1.example.test.
ns1     IN A    127.0.0.1
@       IN A    192.0.2.1
www     IN CNAME example.test.
short 5 IN A    192.0.2.5
txt  60 IN TXT  "hello from the local zone"
multi 300 IN A  192.0.2.10
multi 300 IN A  192.0.2.11
multi 300 IN A  192.0.2.12
acme    IN A    127.0.0.1
EOF
cat > "$BASE/nsd.conf" <<EOF
server:
    ip-address: 127.0.0.1
    port: $NSD_PORT
    server-count: 1
    username: ""
    chroot: ""
    zonesdir: "$BASE"
    database: ""
    zonelistfile: "$BASE/zone.list"
    xfrdfile: "$BASE/xfrd.state"
    xfrdir: "$BASE"
    pidfile: "$BASE/nsd.pid"
    logfile: "$BASE/nsd.log"
    rrl-ratelimit: 0
    rrl-whitelist-ratelimit: 0
remote-control:
    control-enable: no
zone:
    name: "example.test"
    zonefile: "example.test.zone"
EOF
nsd -c "$BASE/nsd.conf" || { echo "nsd did not start"; cat "$BASE/nsd.log"; exit 1; }

# unbound as a DNS-over-TLS upstream (its tls-service-key), forwarding to NSD.
cat > "$BASE/unbound.conf" <<EOF
server:
    username: ""
    chroot: ""
    directory: "$BASE"
    use-syslog: no
    logfile: "$BASE/unbound.log"
    num-threads: 1
    interface: 127.0.0.1@$UNBOUND_DOT
    tls-port: $UNBOUND_DOT
    tls-service-key: "$T/key.pem"
    tls-service-pem: "$T/cert.pem"
    do-ip6: no
    do-not-query-localhost: no
    module-config: "iterator"
    local-zone: "test." nodefault
    access-control: 127.0.0.0/8 allow
    qname-minimisation: no
forward-zone:
    name: "."
    forward-addr: 127.0.0.1@$NSD_PORT
EOF
unbound -d -c "$BASE/unbound.conf" > "$BASE/unbound.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  ss -lnt "( sport = :$UNBOUND_DOT )" | grep -q LISTEN && break; sleep 0.1
done

"$BIN" -l 127.0.0.1:$TLS_PORT --listen-http 127.0.0.1:$HTTP_PORT -u 127.0.0.1:$NSD_PORT \
  --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" --metrics-listen 127.0.0.1:$ADMIN_PORT \
  --listen-dot 127.0.0.1:$DOT_PORT \
  --listen-doq 127.0.0.1:$DOQ_PORT \
  --trusted-proxy 127.0.0.2 --ban-file "$BASE/bans.nft" --ban-after 5 \
  --per-ip-conn-rate 1000 --per-prefix-conn-rate 1000 \
  > "$BASE/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" >/dev/null 2>&1 && break; sleep 0.1
done
if ! kill -0 "${PIDS[1]}" 2>/dev/null; then
  echo "doh-proxy did not start:"; cat "$BASE/proxy.log"; echo "e2e: 0 passed, 1 failed"; exit 1
fi
# Two more instances: one forwarding over DNS over TLS to unbound, one
# forwarding over DNS over HTTPS to the first instance.
"$BIN" -l 127.0.0.1:$DOT_FRONT -u "tls://127.0.0.1:$UNBOUND_DOT#localhost" --upstream-ca "$CA" \
  --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" --metrics-listen 127.0.0.1:$DOT_FRONT_ADMIN \
  > "$BASE/dot-front.log" 2>&1 &
PIDS+=($!)
"$BIN" -l 127.0.0.1:$DOH_FRONT -u "https://127.0.0.1:$TLS_PORT/dns-query#localhost" --upstream-ca "$CA" \
  --tls-cert "$T/cert.pem" --tls-key "$T/key.pem" --metrics-listen 127.0.0.1:$DOH_FRONT_ADMIN \
  > "$BASE/doh-front.log" 2>&1 &
PIDS+=($!)
# ACME: pebble (Let's Encrypt's test CA) on loopback, resolving names with
# NSD, validating with TLS-ALPN-01 on a fourth instance's TLS listener. A
# renewal threshold longer than pebble's validity renews every 10 s.
cat > "$BASE/pebble.json" <<EOF
{"pebble": {"listenAddress": "127.0.0.1:$PEBBLE_PORT", "managementListenAddress": "127.0.0.1:$PEBBLE_MGMT",
  "certificate": "$T/cert.pem", "privateKey": "$T/key.pem", "httpPort": 5902, "tlsPort": $ACME_TLS,
  "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF
PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 pebble -config "$BASE/pebble.json" -dnsserver 127.0.0.1:$NSD_PORT \
  > "$BASE/pebble.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do ss -lnt "( sport = :$PEBBLE_PORT )" | grep -q LISTEN && break; sleep 0.1; done
"$BIN" -l 127.0.0.1:$ACME_TLS -u 127.0.0.1:$NSD_PORT --metrics-listen 127.0.0.1:$ACME_ADMIN \
  --acme-domain acme.example.test --acme-directory "https://127.0.0.1:$PEBBLE_PORT/dir" --acme-ca "$CA" \
  --acme-cache "$BASE/acme" --acme-contact mailto:ops@example.test --acme-renew-days 100000 \
  > "$BASE/acme-front.log" 2>&1 &
PIDS+=($!)
for port in $DOT_FRONT_ADMIN $DOH_FRONT_ADMIN $ACME_ADMIN; do
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/metrics" >/dev/null 2>&1 && break; sleep 0.1; done
done

ok=0 bad=0
chk() { # chk "what" command...
  local what=$1; shift
  if out=$(timeout 20 bash -c "$*" 2>&1); then
    ok=$((ok + 1)); echo "ok   $what"
  else
    bad=$((bad + 1)); echo "FAIL $what"; echo "$out" | head -5 | sed 's/^/     /'
  fi
}
b64q() { # base64url DNS query for name $1, type A
  python3 -c "
import base64,struct,sys
n=b''.join(bytes([len(l)])+l.encode() for l in sys.argv[1].split('.'))+b'\0'
q=struct.pack('>HHHHHH',0x1234,0x0100,1,0,0,0)+n+struct.pack('>HH',1,1)
print(base64.urlsafe_b64encode(q).decode().rstrip('='))" "$1"
}
Q=$(b64q short.example.test)
TLS=https://localhost:$TLS_PORT/dns-query
PLAIN=http://127.0.0.1:$HTTP_PORT/dns-query
PY=$VENV/bin/python
# dnspython resolves a host name in the URL itself: give it the address.
TLS_IP=https://127.0.0.1:$TLS_PORT/dns-query

chk "curl GET over TLS (HTTP/2)" \
  "curl -sf --cacert $CA --http2 '$TLS?dns=$Q' | od -An -tx1 | tr -d ' \n' | grep -q c0000205"
chk "curl POST over TLS (HTTP/1.1)" \
  "python3 -c \"import base64,sys;s='$Q';sys.stdout.buffer.write(base64.urlsafe_b64decode(s+'='*(-len(s)%4)))\" |
   curl -sf --cacert $CA --http1.1 -H 'content-type: application/dns-message' --data-binary @- '$TLS' | od -An -tx1 | tr -d ' \n' | grep -q c0000205"
chk "curl --doh-url (TLS) resolves a name" \
  "curl -sf --cacert $CA --doh-url $TLS 'http://ns1.example.test:$ADMIN_PORT/healthz' -o /dev/null"
# (curl only speaks DoH over https: the plain listener is checked with h2c.)
chk "curl GET over the plain listener (h2c)" \
  "curl -sf --http2-prior-knowledge '$PLAIN?dns=$Q' | od -An -tx1 | tr -d ' \\n' | grep -q c0000205"
chk "kdig +https POST" \
  "kdig +short @127.0.0.1 -p $TLS_PORT +https +tls-ca=$CA +tls-hostname=localhost short.example.test | grep -qx 192.0.2.5"
chk "kdig +https GET" \
  "kdig +short @127.0.0.1 -p $TLS_PORT +https-get +tls-ca=$CA +tls-hostname=localhost txt.example.test TXT | grep -q hello"
chk "dig +https" \
  "dig +short @127.0.0.1 -p $TLS_PORT +https +tls-ca=$CA +tls-hostname=localhost multi.example.test | sort | tr '\n' ' ' | grep -q '192.0.2.10 192.0.2.11 192.0.2.12'"
chk "dig +https-get" \
  "dig +short @127.0.0.1 -p $TLS_PORT +https-get +tls-ca=$CA +tls-hostname=localhost www.example.test | grep -qx 192.0.2.1"
chk "dig +http-plain (plain listener)" \
  "dig +short @127.0.0.1 -p $HTTP_PORT +http-plain short.example.test | grep -qx 192.0.2.5"
chk "dnspython dns.query.https over TLS (GET)" \
  "$PY -c \"import dns.message,dns.query; r=dns.query.https(dns.message.make_query('multi.example.test','A'),'$TLS_IP',verify='$CA',post=False,timeout=5); assert len(r.answer[0])==3\""
chk "dnspython dns.query.https over TLS (POST)" \
  "$PY -c \"import dns.message,dns.query,dns.rcode; r=dns.query.https(dns.message.make_query('nope.example.test','A'),'$TLS_IP',verify='$CA',timeout=5); assert r.rcode()==dns.rcode.NXDOMAIN\""
chk "dnspython dns.query.https over the plain listener" \
  "$PY -c \"import dns.message,dns.query; r=dns.query.https(dns.message.make_query('short.example.test','A'),'$PLAIN',timeout=5); assert r.answer[0][0].address=='192.0.2.5'\""
chk "answers keep no authority NS nor glue (NSD sends both)" \
  "dig @127.0.0.1 -p $NSD_PORT multi.example.test | grep -q 'AUTHORITY: 1, ADDITIONAL: 2' &&
   dig @127.0.0.1 -p $TLS_PORT +https +tls-ca=$CA +tls-hostname=localhost multi.example.test | grep -q 'AUTHORITY: 0, ADDITIONAL: 1'"
chk "negative answers keep their SOA" \
  "dig @127.0.0.1 -p $TLS_PORT +https +tls-ca=$CA +tls-hostname=localhost nothere.example.test | grep -q 'AUTHORITY: 1, ADDITIONAL: 1'"
chk "kdig +tls (DNS over TLS listener)" \
  "kdig +short @127.0.0.1 -p $DOT_PORT +tls +tls-ca=$CA +tls-hostname=localhost multi.example.test | sort | tr '\n' ' ' | grep -q '192.0.2.10 192.0.2.11 192.0.2.12' &&
   curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep -qE '^doh_requests_total\\{outcome=\"answered\",transport=\"dot\"\\} [1-9]'"
chk "dnspython dns.query.quic (DNS over QUIC): answers, NXDOMAIN, ID 0, several streams on one connection" \
  "$PY -c \"
import dns.message, dns.query, dns.rcode, dns.quic
with dns.quic.SyncQuicManager(verify_mode='$CA', server_name='localhost') as m:
    conn = m.connect('127.0.0.1', $DOQ_PORT)
    for name, want in [('multi.example.test', dns.rcode.NOERROR), ('nothere.example.test', dns.rcode.NXDOMAIN), ('short.example.test', dns.rcode.NOERROR)]:
        r = dns.query.quic(dns.message.make_query(name, 'A'), '127.0.0.1', port=$DOQ_PORT, connection=conn, timeout=5)
        assert r.rcode() == want, (name, r.rcode())
        assert r.id == 0, r.id
    r = dns.query.quic(dns.message.make_query('short.example.test', 'A'), '127.0.0.1', port=$DOQ_PORT, verify='$CA', hostname='localhost', timeout=5)
    assert r.answer[0][0].address == '192.0.2.5'
\" &&
   curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep -qE '^doh_requests_total\\{outcome=\"answered\",transport=\"doq\"\\} [1-9]'"
chk "kdig +tls, several queries on one connection (+keepopen)" \
  "kdig @127.0.0.1 -p $DOT_PORT +tls +tls-ca=$CA +tls-hostname=localhost +keepopen +short short.example.test txt.example.test TXT www.example.test | tr '\n' ' ' | grep -q '192.0.2.5.*hello.*192.0.2.1'"
chk "DNS over TLS upstream (unbound): kdig through a second instance" \
  "kdig +short @127.0.0.1 -p $DOT_FRONT +https +tls-ca=$CA +tls-hostname=localhost multi.example.test | sort | tr '\n' ' ' | grep -q '192.0.2.10 192.0.2.11 192.0.2.12' &&
   curl -s http://127.0.0.1:$DOT_FRONT_ADMIN/metrics | grep -q 'doh_upstream_connections_total{upstream=\"tls://127.0.0.1:$UNBOUND_DOT#localhost\"} 1'"
chk "DNS over HTTPS upstream (the first instance): dig through a third" \
  "dig +short @127.0.0.1 -p $DOH_FRONT +https +tls-ca=$CA +tls-hostname=localhost short.example.test | grep -qx 192.0.2.5 &&
   curl -s http://127.0.0.1:$DOH_FRONT_ADMIN/metrics | grep -q 'doh_upstream_connections_total{upstream=\"https://127.0.0.1:$TLS_PORT/dns-query#localhost\"} 1'"
chk "doh-proxy check refuses an upstream that is not an address" \
  "out=\$($BIN check -u dns.example:53 2>&1); rc=\$?; [ \$rc -ne 0 ] && echo \"\$out\" | grep -q 'not an IP address'"
acme_serial() {
  echo | openssl s_client -connect 127.0.0.1:$ACME_TLS -servername acme.example.test 2>/dev/null |
    openssl x509 -noout -serial -issuer 2>/dev/null
}
acme_orders() {
  curl -s http://127.0.0.1:$ACME_ADMIN/metrics | awk '/^doh_acme_orders_total\{result="ok"\}/ {print $2}'
}
export ACME_TLS ACME_ADMIN
export -f acme_serial acme_orders
chk "ACME: pebble issues a certificate by TLS-ALPN-01, served without restart" \
  "for i in \$(seq 1 60); do [ \"\$(acme_orders)\" -ge 1 ] 2>/dev/null && break; sleep 0.5; done;
   acme_serial | grep -qi 'issuer=.*Pebble' && test -s $BASE/acme/cert.pem && test -s $BASE/acme/account.json"
FIRST_SERIAL=$(acme_serial | grep serial)
chk "ACME: the renewal is served without restart (new serial, same process)" \
  "for i in \$(seq 1 60); do [ \"\$(acme_orders)\" -ge 2 ] 2>/dev/null && break; sleep 0.5; done;
   s=\$(acme_serial | grep serial); [ -n \"\$s\" ] && [ \"\$s\" != '$FIRST_SERIAL' ] &&
   curl -s http://127.0.0.1:$ACME_ADMIN/metrics | grep -qE '^doh_tls_cert_expiry_seconds [1-9]'"
chk "ACME: the instance answers DoH with its issued certificate" \
  "curl -sf --resolve acme.example.test:$ACME_TLS:127.0.0.1 -k 'https://acme.example.test:$ACME_TLS/dns-query?dns=$Q' -o /dev/null"
chk "obsolete draft (ct=) gets 400" \
  "test \$(curl -s -o /dev/null -w '%{http_code}' --cacert $CA '$TLS?ct=application/dns-udpwireformat&dns=$Q') = 400"
# Over HTTP/2, twenty times: a refusal that went out before the body was
# read would end its stream with RST_STREAM(NO_ERROR), which curl 7.88
# takes for a failed transfer (exit 92, no status) about 4 times in 10.
# Each from its own address: refusals score towards a ban (--ban-after 5).
chk "obsolete media type gets 415 (HTTP/2, 20 in a row)" \
  "for i in \$(seq 20); do test \$(curl -s -o /dev/null -w '%{http_code}' --http2 --interface 127.0.5.\$i --cacert $CA -H 'content-type: application/dns-udpwireformat' --data-binary x '$TLS') = 415 || exit 1; done"
chk "obsolete media type gets 415 (HTTP/1.1)" \
  "test \$(curl -s -o /dev/null -w '%{http_code}' --http1.1 --cacert $CA -H 'content-type: application/dns-udpwireformat' --data-binary x '$TLS') = 415"
chk "cache hit: NSD asked once for a name asked 5 times" \
  "for i in 1 2 3 4 5; do kdig +short @127.0.0.1 -p $TLS_PORT +https +tls-ca=$CA +tls-hostname=localhost multi.example.test >/dev/null; done;
   curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep -E '^doh_cache_hits_total [1-9]'"
# Five garbage requests from 127.0.0.9 (behind the trusted proxy 127.0.0.2) ban it.
chk "garbage through a trusted proxy is banned (403), others still served" \
  "for i in 1 2 3 4 5; do curl -s -o /dev/null --interface 127.0.0.2 -H 'X-Forwarded-For: 192.0.2.99' '$PLAIN?ct=x'; done;
   test \$(curl -s -o /dev/null -w '%{http_code}' --interface 127.0.0.2 -H 'X-Forwarded-For: 192.0.2.99' '$PLAIN?dns=$Q') = 403 &&
   test \$(curl -s -o /dev/null -w '%{http_code}' --interface 127.0.0.2 -H 'X-Forwarded-For: 192.0.2.98' '$PLAIN?dns=$Q') = 200 &&
   curl -s http://127.0.0.1:$ADMIN_PORT/bans | grep -q 192.0.2.99"
chk "ban file lists the ban" "sleep 1.5; grep -q '192.0.2.99/32 timeout' $BASE/bans.nft"
if nft -c -f "$BASE/bans.nft" >/dev/null 2>"$BASE/nft.err"; then
  chk "ban file passes nft -c -f" "true"
elif grep -qiE 'operation not permitted|netlink|cache initialization' "$BASE/nft.err"; then
  echo "skip nft -c -f (no netlink in this sandbox: $(head -1 "$BASE/nft.err"))"
else
  chk "ban file passes nft -c -f" "cat $BASE/nft.err; false"
fi
chk "doh-proxy check accepts the shipped doh-proxy.toml" "$BIN check -c doh-proxy.toml"
chk "doh-proxy check refuses a public admin listener without a token" \
  "out=\$($BIN check -u 127.0.0.1:53 --metrics-listen 0.0.0.0:9153 2>&1); rc=\$?; [ \$rc -ne 0 ] && echo \"\$out\" | grep -q admin_token"

if [ "$bad" -gt 0 ]; then
  echo "--- proxy log"; tail -20 "$BASE/proxy.log"
  echo "--- refusals"; curl -s http://127.0.0.1:$ADMIN_PORT/metrics | grep -E '^doh_(rejects|connections_rejected|bans)_total' | grep -v ' 0$'
fi
echo "e2e: $ok passed, $bad failed"
[ "$bad" = 0 ]
