//! Test harness: a private CA and certificate, a scriptable UDP/TCP
//! upstream that counts what it is asked, the proxy on ephemeral loopback
//! ports, and HTTP/1.1 and HTTP/2 clients over real TLS that can bind any
//! 127.x.y.z source address to play many clients.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
pub use doh_proxy::app::{self, Running};
use doh_proxy::config::{Config, UpstreamSpec};
pub use doh_proxy::server::listener::Kind;
use hickory_proto::op::Message;
use hickory_proto::op::{MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

pub struct Pki {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub ca_der: CertificateDer<'static>,
    issuer: Mutex<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>>,
}

/// A new leaf for localhost / 127.0.0.1 signed by the test CA: (cert PEM,
/// key PEM, cert DER).
pub fn new_leaf() -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = pki().issuer.lock().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &*ca)
        .unwrap();
    (leaf.pem(), key.serialize_pem(), leaf.der().clone())
}

/// A CA and a leaf for localhost / 127.0.0.1 / ::1, made once per test binary.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("doh-test-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "::1".into(),
        ])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
        let pki = Pki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            ca_der: ca.der().clone(),
            issuer: Mutex::new(ca),
        };
        std::fs::write(&pki.cert, leaf.pem()).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&pki.ca, pki.issuer.lock().unwrap().pem()).unwrap();
        pki
    })
}

/// How the mock upstream answers a name, chosen by its first label.
///
/// - `short`: A 192.0.2.5, TTL 5 - `long`: A 192.0.2.36, TTL 3600 - `nx*`: NXDOMAIN with SOA minimum 5
/// - `tc`: truncated over UDP, full over TCP - `spoof`: a wrong-ID answer first
/// - `fail`: SERVFAIL - `slow`: answers after 300 ms - `nodata`: NOERROR, no answer
/// - `dead*`: never answered (a name whose servers are gone)
/// - `slow15*`: answers after 1.5 s - `many`: 28 A records
/// - `big*`: 60 KB of TXT, sent whole even over UDP - `mid*`: 12 KB of TXT
/// - anything else: A 192.0.2.1, TTL 300
pub struct MockUpstream {
    pub addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    /// While set, nothing is answered.
    pub paused: Arc<AtomicBool>,
    pub total: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    /// While set, every other UDP query but the probes' is dropped.
    pub flapping: Arc<AtomicBool>,
}

impl MockUpstream {
    pub async fn start() -> MockUpstream {
        Self::start_on("127.0.0.1").await
    }

    /// The mock on another loopback address (`::1` for IPv6).
    pub async fn start_on(ip: &str) -> MockUpstream {
        let ip: IpAddr = ip.parse().unwrap();
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind((ip, port)).await {
                break (udp, tcp);
            }
        };
        let m = MockUpstream {
            addr: udp.local_addr().unwrap(),
            counts: Default::default(),
            paused: Default::default(),
            total: Default::default(),
            tcp_queries: Default::default(),
            flapping: Default::default(),
        };
        let (counts, paused, total) = (m.counts.clone(), m.paused.clone(), m.total.clone());
        let flapping = m.flapping.clone();
        let mut flap = false;
        let udp = Arc::new(udp);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                if paused.load(Ordering::SeqCst) {
                    continue;
                }
                let q = buf[..n].to_vec();
                let Some(name) = qname(&q) else { continue };
                total.fetch_add(1, Ordering::SeqCst);
                if name.starts_with("dead") {
                    continue;
                }
                *counts.lock().unwrap().entry(name.clone()).or_default() += 1;
                if flapping.load(Ordering::SeqCst) && !name.is_empty() {
                    flap = !flap;
                    if flap {
                        continue;
                    }
                }
                let udp = udp.clone();
                tokio::spawn(async move {
                    for msg in answers(&q, &name, false).await {
                        let _ = udp.send_to(&msg, from).await;
                    }
                });
            }
        });
        let (paused, tcpq) = (m.paused.clone(), m.tcp_queries.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = tcp.accept().await else {
                    continue;
                };
                let paused = paused.clone();
                let tcpq = tcpq.clone();
                tokio::spawn(async move {
                    // Many queries per connection, answered as they are
                    // ready (RFC 7766 pipelining).
                    let (mut r, w) = s.into_split();
                    let w = Arc::new(tokio::sync::Mutex::new(w));
                    loop {
                        let Ok(len) = r.read_u16().await else { return };
                        let mut q = vec![0u8; len as usize];
                        if r.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        if paused.load(Ordering::SeqCst) {
                            continue;
                        }
                        tcpq.fetch_add(1, Ordering::SeqCst);
                        let Some(name) = qname(&q) else { continue };
                        let w = w.clone();
                        tokio::spawn(async move {
                            for msg in answers(&q, &name, true).await {
                                let mut out = (msg.len() as u16).to_be_bytes().to_vec();
                                out.extend_from_slice(&msg);
                                let _ = w.lock().await.write_all(&out).await;
                            }
                        });
                    }
                });
            }
        });
        m
    }

    /// Queries received over UDP for `name` (lowercase, trailing dot).
    pub fn count(&self, name: &str) -> usize {
        self.counts.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// The question name of a query, lowercased, with a trailing dot.
pub fn qname(q: &[u8]) -> Option<String> {
    let mut i = 12;
    let mut out = String::new();
    loop {
        let l = *q.get(i)? as usize;
        if l == 0 {
            break;
        }
        out.push_str(&String::from_utf8_lossy(q.get(i + 1..i + 1 + l)?).to_lowercase());
        out.push('.');
        i += 1 + l;
    }
    Some(out)
}

/// The answers the mock sends for query `q` (its first label `first`).
async fn answers(q: &[u8], name: &str, tcp: bool) -> Vec<Vec<u8>> {
    let Ok(query) = Message::from_vec(q) else {
        return Vec::new();
    };
    let first = name.split('.').next().unwrap_or("");
    let mut r = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_desired = query.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.metadata.checking_disabled = query.metadata.checking_disabled;
    let Some(question) = query.queries.first().cloned() else {
        return Vec::new();
    };
    let qname = question.name().clone();
    r.add_query(question);
    let a = |ttl: u32, ip: [u8; 4]| {
        Record::from_rdata(
            qname.clone(),
            ttl,
            RData::A(A::new(ip[0], ip[1], ip[2], ip[3])),
        )
    };
    match first {
        "short" => {
            r.add_answer(a(5, [192, 0, 2, 5]));
        }
        "long" => {
            r.add_answer(a(3600, [192, 0, 2, 36]));
        }
        "tc" if !tcp => r.metadata.truncation = true,
        "fail" => r.metadata.response_code = ResponseCode::ServFail,
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.add_answer(a(300, [192, 0, 2, 7]));
        }
        n if n.starts_with("slow15") => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            r.add_answer(a(300, [192, 0, 2, 15]));
        }
        "nodata" => {}
        "many" => {
            for i in 0..28u8 {
                r.add_answer(a(300, [192, 0, 2, i]));
            }
        }
        n if n.starts_with("big") || n.starts_with("mid") => {
            let total = if n.starts_with("big") { 60_000 } else { 12_000 };
            let strings: Vec<String> = (0..total / 250).map(|_| "x".repeat(249)).collect();
            // Records of at most 15 KB each (RDLENGTH is 16 bits).
            for chunk in strings.chunks(60) {
                let part = chunk.to_vec();
                r.add_answer(Record::from_rdata(
                    qname.clone(),
                    3600,
                    RData::TXT(hickory_proto::rr::rdata::TXT::new(part)),
                ));
            }
        }
        n if n.starts_with("nx") => {
            r.metadata.response_code = ResponseCode::NXDomain;
            // test. SOA, TTL 3600, minimum 5
            let zone = Name::from_ascii("test.").unwrap();
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 3600, 600, 86400, 5);
            r.add_authority(Record::from_rdata(zone, 3600, RData::SOA(soa)));
        }
        _ => {
            r.add_answer(a(300, [192, 0, 2, 1]));
        }
    }
    if let Some(e) = &query.edns {
        let mut e = e.clone();
        e.set_max_payload(1232);
        r.set_edns(e);
    }
    let wire = r.to_vec().unwrap();
    if first == "spoof" && !tcp {
        let mut fake = r.clone();
        fake.metadata.id ^= 0x5555;
        fake.answers = vec![a(300, [192, 0, 2, 66])]; // a poisoned address
        return vec![fake.to_vec().unwrap(), wire];
    }
    vec![wire]
}

/// The admin token of the test configuration: changing state on the admin
/// listener needs one.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// The test configuration: ephemeral loopback ports, TLS with the test PKI,
/// an admin token ([`ADMIN_TOKEN`], which [`admin`] sends unless told
/// otherwise).
pub fn test_config(upstreams: &[SocketAddr]) -> Config {
    let p = pki();
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        listen_http: vec!["127.0.0.1:0".parse().unwrap()],
        listen_h3: vec!["127.0.0.1:0".parse().unwrap()],
        listen_dot: vec!["127.0.0.1:0".parse().unwrap()],
        listen_doq: vec!["127.0.0.1:0".parse().unwrap()],
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        admin_token: Some(ADMIN_TOKEN.into()),
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        upstream: upstreams.iter().map(|a| UpstreamSpec::udp(*a)).collect(),
        upstream_timeout: 1000,
        // Tests open many connections from one address quickly.
        per_ip_conn_rate: 1000,
        per_prefix_conn_rate: 10_000,
        ..Config::default()
    }
}

/// An upstream that never answers and counts what it is asked, by name.
pub struct SilentUpstream {
    pub addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl SilentUpstream {
    pub async fn start() -> SilentUpstream {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let s = SilentUpstream {
            addr: udp.local_addr().unwrap(),
            counts: Default::default(),
        };
        let counts = s.counts.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, _)) = udp.recv_from(&mut buf).await {
                if let Some(name) = qname(&buf[..n]) {
                    *counts.lock().unwrap().entry(name).or_default() += 1;
                }
            }
        });
        s
    }

    pub fn count(&self, name: &str) -> usize {
        self.counts.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

/// A DNS-over-TLS server with the test certificate, answering pipelined
/// queries as the mock upstream does, out of order as they are ready.
pub struct MockDot {
    pub addr: SocketAddr,
    /// TLS connections accepted.
    pub connections: Arc<AtomicUsize>,
    pub queries: Arc<AtomicUsize>,
}

impl MockDot {
    /// With `break_after`, the connection that receives that query (counted
    /// over all connections) is closed at once, that query unanswered.
    pub async fn start(break_after: Option<usize>) -> MockDot {
        let p = pki();
        let cert = std::fs::read(&p.cert).unwrap();
        let key = std::fs::read(&p.key).unwrap();
        let chain = rustls_pemfile::certs(&mut cert.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut key.as_slice())
            .unwrap()
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let m = MockDot {
            addr: listener.local_addr().unwrap(),
            connections: Default::default(),
            queries: Default::default(),
        };
        let (conns, queries) = (m.connections.clone(), m.queries.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (conns, queries) = (conns.clone(), queries.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    conns.fetch_add(1, Ordering::SeqCst);
                    let (mut r, w) = tokio::io::split(tls);
                    let w = Arc::new(tokio::sync::Mutex::new(w));
                    loop {
                        let Ok(len) = r.read_u16().await else { return };
                        let mut q = vec![0u8; len as usize];
                        if r.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let n = queries.fetch_add(1, Ordering::SeqCst) + 1;
                        if Some(n) == break_after {
                            let mut w = w.lock().await;
                            let _ = w.shutdown().await;
                            return;
                        }
                        let Some(name) = qname(&q) else { continue };
                        let w = w.clone();
                        tokio::spawn(async move {
                            // Out of order: later queries may overtake.
                            tokio::time::sleep(Duration::from_millis(u64::from(q[1] % 20))).await;
                            for msg in answers(&q, &name, true).await {
                                let mut out = (msg.len() as u16).to_be_bytes().to_vec();
                                out.extend_from_slice(&msg);
                                let _ = w.lock().await.write_all(&out).await;
                            }
                        });
                    }
                });
            }
        });
        m
    }
}

/// The proxy on ephemeral loopback ports, TLS with the test PKI.
pub async fn proxy(upstreams: &[SocketAddr], tweak: impl FnOnce(&mut Config)) -> Running {
    let mut cfg = test_config(upstreams);
    tweak(&mut cfg);
    let (settings, _) = cfg.settings().expect("test config is valid");
    app::start(settings).await.expect("proxy starts")
}

/// A DNS query as a stub would send it, case of `name` preserved, with EDNS.
pub fn query(name: &str, qtype: u16, id: u16) -> Vec<u8> {
    doh_proxy::dns::query_message(name, qtype, id, true).expect("a valid name")
}

/// A query with EDNS payload `payload` and, when `padding`, an EDNS(0)
/// Padding option (RFC 7830) of 16 bytes.
pub fn query_with_opt(name: &str, id: u16, payload: u16, padding: bool) -> Vec<u8> {
    let mut q = query(name, 1, id);
    // The OPT record is last: root name, type, class (= payload), TTL, RDLENGTH.
    let n = q.len();
    q[n - 8..n - 6].copy_from_slice(&payload.to_be_bytes());
    if padding {
        q[n - 2..].copy_from_slice(&20u16.to_be_bytes());
        q.extend_from_slice(&[0, 12, 0, 16]);
        q.extend_from_slice(&[0; 16]);
    }
    q
}

pub fn get_path(msg: &[u8]) -> String {
    format!("/dns-query?dns={}", doh_proxy::doh::encode_dns_param(msg))
}

/// The GET target for an A query for `name`.
pub fn ok_path(name: &str) -> String {
    get_path(&query(name, 1, 1))
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).body(Full::new(Bytes::new())).unwrap()
}

pub fn post(body: Vec<u8>, content_type: &str) -> Request<Full<Bytes>> {
    Request::post("/dns-query")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn dns(&self) -> Message {
        Message::from_vec(&self.body).expect("a DNS message")
    }
    pub fn max_age(&self) -> u32 {
        let cc = self.headers.get("cache-control").unwrap().to_str().unwrap();
        cc.strip_prefix("max-age=").unwrap().parse().unwrap()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TLS, ALPN http/1.1
    H1,
    /// TLS, ALPN h2
    H2,
    /// Plain HTTP/1.1
    PlainH1,
    /// h2c with prior knowledge
    PlainH2,
    /// HTTP/3 over QUIC
    H3,
}

pub async fn tcp_from(source: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    sock.connect(to).await
}

pub fn tls_connector(alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// An open client connection on which requests can be sent.
pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    H3(H3Client),
}

pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP/3 client connection (quinn + h3).
pub struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    /// Kept for the connection's life.
    _endpoint: quinn::Endpoint,
}

/// A TLS 1.3 client configuration for QUIC trusting the test CA, ALPN h3.
pub fn quic_tls() -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki().ca_der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls
}

/// A QUIC client endpoint on `source` trusting the test CA, ALPN h3.
pub fn quic_client(source: IpAddr) -> quinn::Endpoint {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(quic_tls()).unwrap();
    let mut ep = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep
}

impl H3Client {
    pub async fn connect(addr: SocketAddr, source: IpAddr) -> Result<H3Client, ClientError> {
        let ep = quic_client(source);
        let conn = tokio::time::timeout(Duration::from_secs(3), ep.connect(addr, "localhost")?)
            .await
            .map_err(|_| "QUIC handshake timed out")??;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Client {
            send,
            _endpoint: ep,
        })
    }

    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, ClientError> {
        let (mut parts, body) = req.into_parts();
        parts.uri = format!("https://localhost{}", parts.uri).parse()?;
        let body = body.collect().await?.to_bytes();
        let mut stream = self
            .send
            .send_request(Request::from_parts(parts, ()))
            .await?;
        if !body.is_empty() {
            stream.send_data(body).await?;
        }
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        let mut data = Vec::new();
        while let Some(mut chunk) = stream.recv_data().await? {
            use bytes::Buf;
            while chunk.has_remaining() {
                let c = chunk.chunk();
                data.extend_from_slice(c);
                let n = c.len();
                chunk.advance(n);
            }
        }
        Ok(Reply {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: Bytes::from(data),
        })
    }
}

impl Client {
    pub async fn connect(
        running: &Running,
        proto: Proto,
        source: Option<IpAddr>,
    ) -> std::io::Result<Client> {
        let tls_addr = running.addrs(Kind::Https)[0];
        let http_addr = running.addrs(Kind::Http)[0];
        let io_err = |e: hyper::Error| std::io::Error::other(e);
        match proto {
            Proto::H3 => {
                let source = source.unwrap_or(IpAddr::from([127, 0, 0, 1]));
                H3Client::connect(running.addrs(Kind::H3)[0], source)
                    .await
                    .map(Client::H3)
                    .map_err(std::io::Error::other)
            }
            Proto::H1 | Proto::H2 => {
                let tcp = tcp_from(source, tls_addr).await?;
                let alpn: &[u8] = if proto == Proto::H2 {
                    b"h2"
                } else {
                    b"http/1.1"
                };
                let tls = tls_connector(alpn)
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Self::handshake(TokioIo::new(tls), proto == Proto::H2)
                    .await
                    .map_err(io_err)
            }
            Proto::PlainH1 | Proto::PlainH2 => {
                let tcp = tcp_from(source, http_addr).await?;
                Self::handshake(TokioIo::new(tcp), proto == Proto::PlainH2)
                    .await
                    .map_err(io_err)
            }
        }
    }

    /// TLS and HTTP over an already connected stream (after a PROXY header, say).
    pub async fn over_tls(tcp: TcpStream, h2: bool) -> std::io::Result<Client> {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let tls = tls_connector(alpn)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        Self::handshake(TokioIo::new(tls), h2)
            .await
            .map_err(std::io::Error::other)
    }

    async fn handshake<I>(io: I, h2: bool) -> Result<Client, hyper::Error>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if h2 {
            let (send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await?;
            tokio::spawn(conn);
            Ok(Client::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Client::H1(send))
        }
    }

    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Result<Reply, ClientError> {
        let resp = match self {
            Client::H3(c) => return c.send(req).await,
            Client::H1(s) => {
                req.headers_mut()
                    .entry("host")
                    .or_insert(http::HeaderValue::from_static("localhost"));
                s.ready().await?;
                s.send_request(req).await?
            }
            Client::H2(s) => {
                let uri = format!("https://localhost{}", req.uri());
                *req.uri_mut() = uri.parse().unwrap();
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// One request on a fresh connection.
pub async fn send(running: &Running, proto: Proto, req: Request<Full<Bytes>>) -> Reply {
    let mut c = Client::connect(running, proto, None)
        .await
        .expect("connect");
    c.send(req).await.expect("response")
}

/// One request on a fresh connection from a given source address.
pub async fn send_from(
    running: &Running,
    proto: Proto,
    source: &str,
    req: Request<Full<Bytes>>,
) -> std::io::Result<Reply> {
    let mut c = Client::connect(running, proto, Some(source.parse().unwrap())).await?;
    c.send(req).await.map_err(std::io::Error::other)
}

/// A request on the admin listener, with `token` (`None`: [`ADMIN_TOKEN`];
/// `Some("")`: no `Authorization` header at all).
pub async fn admin(running: &Running, method: &str, path: &str, token: Option<&str>) -> Reply {
    let token = Some(token.unwrap_or(ADMIN_TOKEN)).filter(|t| !t.is_empty());
    let tcp = TcpStream::connect(running.admin_addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let resp = send
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// The sum of the series of a metric family whose labels include those of
/// `series` (`name{k="v",...}` or `name`). Series counted only in dry-run
/// (`dry_run="true"`) are left out unless `series` asks for them.
pub async fn metric(running: &Running, series: &str) -> f64 {
    let text = admin(running, "GET", "/metrics", None).await.body;
    sum_series(&String::from_utf8_lossy(&text), series)
}

pub fn sum_series(text: &str, series: &str) -> f64 {
    let (family, wanted) = split_series(series);
    let dry = wanted.iter().any(|l| l.starts_with("dry_run="));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, labels) = split_series(name_labels);
            (name == family
                && wanted.iter().all(|w| labels.contains(w))
                && (dry || !labels.iter().any(|x| x.starts_with("dry_run="))))
            .then(|| value.trim().parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

fn split_series(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|x| !x.is_empty())
                .collect(),
        ),
        None => (s, Vec::new()),
    }
}

/// Resident set of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// A GET with an X-Forwarded-For header.
pub fn get_xff(path: &str, xff: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("x-forwarded-for", xff)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The leaf certificate a TLS listener serves now (a fresh handshake).
pub async fn served_cert(addr: SocketAddr) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connector(b"h2")
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A port free on 127.0.0.1 for TCP (and most likely UDP) right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tests that allocate a lot, or measure the memory of this process (which
/// every test shares), take this for their whole run: one at a time, so
/// that no measurement counts another heavy test's memory.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after
/// `within` (a bound for a busy machine, never a measurement).
pub async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool, within: Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < within {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// A scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("doh-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `doh-proxy` binary, run as a service would run it.
pub struct Proc {
    pub child: std::process::Child,
    pub tls: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: PathBuf,
}

impl Proc {
    /// Starts the binary with `args` (its TLS and admin listeners on the
    /// ports given) in `dir`, and waits until it answers.
    pub async fn start(
        dir: &std::path::Path,
        tls: u16,
        admin: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let stderr = dir.join("stderr.log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_doh-proxy"));
        cmd.args([
            "-l",
            &format!("127.0.0.1:{tls}"),
            "--metrics-listen",
            &format!("127.0.0.1:{admin}"),
        ])
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let p = Proc {
            child,
            tls: SocketAddr::from(([127, 0, 0, 1], tls)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            stderr,
        };
        for _ in 0..100 {
            if TcpStream::connect(p.admin).await.is_ok() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("doh-proxy did not start:\n{}", p.log());
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the process to exit; its status.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// A request over TLS HTTP/2 from `source`.
    pub async fn send(&self, source: &str, req: Request<Full<Bytes>>) -> std::io::Result<Reply> {
        let tcp = tcp_from(Some(source.parse().unwrap()), self.tls).await?;
        let mut c = Client::over_tls(tcp, true).await?;
        c.send(req).await.map_err(std::io::Error::other)
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let body = admin_at(self.admin, "GET", "/metrics").await.body;
        sum_series(&String::from_utf8_lossy(&body), series)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request to an admin listener.
pub async fn admin_at(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// Makes sure `program` is on the PATH, installing Debian's `package` once
/// with apt-get when it is not (the suite runs as root on Debian, as the
/// end-to-end script does). Panics with what is missing otherwise.
pub fn need(program: &str, package: &str) {
    static APT: Mutex<()> = Mutex::new(());
    let found = || {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found() {
        return;
    }
    let _one_at_a_time = APT.lock().unwrap_or_else(|e| e.into_inner());
    if found() {
        return;
    }
    let _ = std::process::Command::new("sh")
        .args([
            "-c",
            &format!(
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {package} \
                 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {package})"
            ),
        ])
        .stdout(std::process::Stdio::null())
        .status();
    assert!(found(), "{program} is missing (Debian package {package})");
}
