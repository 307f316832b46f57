//! Test harness: a private CA and certificate, a scriptable UDP/TCP
//! upstream that counts what it is asked, the proxy on ephemeral loopback
//! ports, and HTTP/1.1 and HTTP/2 clients over real TLS that can bind any
//! 127.x.y.z source address to play many clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use doh_proxy::config::Config;
use doh_proxy::server::{self, Running};
use hickory_proto::op::Message;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

pub struct Pki {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub ca_der: CertificateDer<'static>,
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
            dir,
        };
        std::fs::write(&pki.cert, leaf.pem()).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        pki
    })
}

/// How the mock upstream answers a name, chosen by its first label.
///
/// - `short`: A 192.0.2.5, TTL 5 - `long`: A 192.0.2.36, TTL 3600 - `nx*`: NXDOMAIN with SOA minimum 5
/// - `tc`: truncated over UDP, full over TCP - `spoof`: a wrong-ID answer first
/// - `fail`: SERVFAIL - `slow`: answers after 300 ms - `nodata`: NOERROR, no answer
/// - anything else: A 192.0.2.1, TTL 300
pub struct MockUpstream {
    pub addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    /// While set, nothing is answered.
    pub paused: Arc<AtomicBool>,
    pub total: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
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
        };
        let (counts, paused, total) = (m.counts.clone(), m.paused.clone(), m.total.clone());
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
                *counts.lock().unwrap().entry(name.clone()).or_default() += 1;
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
                let Ok((mut s, _)) = tcp.accept().await else {
                    continue;
                };
                let paused = paused.clone();
                let tcpq = tcpq.clone();
                tokio::spawn(async move {
                    let Ok(len) = s.read_u16().await else { return };
                    let mut q = vec![0u8; len as usize];
                    if s.read_exact(&mut q).await.is_err() || paused.load(Ordering::SeqCst) {
                        return;
                    }
                    tcpq.fetch_add(1, Ordering::SeqCst);
                    let Some(name) = qname(&q) else { return };
                    for msg in answers(&q, &name, true).await {
                        let mut out = (msg.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&msg);
                        let _ = s.write_all(&out).await;
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

fn question_end(q: &[u8]) -> usize {
    let mut i = 12;
    while q[i] != 0 {
        i += 1 + q[i] as usize;
    }
    i + 5
}

async fn answers(q: &[u8], name: &str, tcp: bool) -> Vec<Vec<u8>> {
    let first = name.split('.').next().unwrap_or("");
    let qend = question_end(q);
    let edns = q[11] > 0;
    let mut r = q[..qend].to_vec();
    r[2] = 0x80 | (q[2] & 0x01); // QR, RD copied
    r[3] = 0x80; // RA
    r[6..12].copy_from_slice(&[0, 0, 0, 0, 0, 0]);
    let a = |r: &mut Vec<u8>, ttl: u32, ip: [u8; 4]| {
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&[0, 4]);
        r.extend_from_slice(&ip);
    };
    let mut ancount = 0u16;
    let mut nscount = 0u16;
    match first {
        "short" => {
            a(&mut r, 5, [192, 0, 2, 5]);
            ancount = 1;
        }
        "long" => {
            a(&mut r, 3600, [192, 0, 2, 36]);
            ancount = 1;
        }
        "tc" if !tcp => r[2] |= 0x02,
        "fail" => r[3] |= 2,
        "slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            a(&mut r, 300, [192, 0, 2, 7]);
            ancount = 1;
        }
        "nodata" => {}
        n if n.starts_with("nx") => {
            r[3] |= 3;
            // test. SOA, TTL 3600, minimum 5
            let zone = qend - 4 - 6; // the last label "test." of the name
            r.extend_from_slice(&[
                0xC0 | (zone >> 8) as u8,
                zone as u8,
                0,
                6,
                0,
                1,
                0,
                0,
                0x0E,
                0x10,
                0,
                22,
                0,
                0,
            ]);
            for v in [1u32, 3600, 600, 86400, 5] {
                r.extend_from_slice(&v.to_be_bytes());
            }
            nscount = 1;
        }
        _ => {
            a(&mut r, 300, [192, 0, 2, 1]);
            ancount = 1;
        }
    }
    r[6..8].copy_from_slice(&ancount.to_be_bytes());
    r[8..10].copy_from_slice(&nscount.to_be_bytes());
    if edns {
        r[11] = 1;
        r.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
    }
    if first == "spoof" && !tcp {
        let mut fake = r.clone();
        fake[0] ^= 0x55;
        let last = fake.len() - 1 - if edns { 11 } else { 0 };
        fake[last] = 66; // a poisoned address
        return vec![fake, r];
    }
    vec![r]
}

/// The proxy on ephemeral loopback ports, TLS with the test PKI.
pub async fn proxy(upstreams: &[SocketAddr], tweak: impl FnOnce(&mut Config)) -> Running {
    let p = pki();
    let mut cfg = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        listen_http: vec!["127.0.0.1:0".parse().unwrap()],
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(p.cert.clone()),
        tls_key: Some(p.key.clone()),
        upstream: upstreams.to_vec(),
        upstream_timeout: 1000,
        ..Config::default()
    };
    tweak(&mut cfg);
    cfg.validate().expect("test config is valid");
    server::start(cfg).await.expect("proxy starts")
}

/// A DNS query as a stub would send it, case of `name` preserved, with EDNS.
pub fn query(name: &str, qtype: u16, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for l in name.trim_end_matches('.').split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
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
}

impl Client {
    pub async fn connect(
        running: &Running,
        proto: Proto,
        source: Option<IpAddr>,
    ) -> std::io::Result<Client> {
        let tls_addr = running.tls_addrs[0];
        let http_addr = running.http_addrs[0];
        let io_err = |e: hyper::Error| std::io::Error::other(e);
        match proto {
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

    pub async fn send(&mut self, mut req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        let resp = match self {
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

/// GET on the admin listener.
pub async fn admin(running: &Running, method: &str, path: &str, token: Option<&str>) -> Reply {
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

/// The value of one exact metric line (`name{labels}`), 0 when absent.
pub async fn metric(running: &Running, series: &str) -> f64 {
    let text = admin(running, "GET", "/metrics", None).await.body;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
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
