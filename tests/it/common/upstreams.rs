//! Upstreams for the proxy to forward to: a scriptable UDP/TCP one that
//! counts what it is asked, one that never answers, one speaking DNS over
//! TLS.

use super::*;

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
            // The mock's behaviour, not a wait: a slow authoritative server.
            tokio::time::sleep(Duration::from_millis(300)).await;
            r.add_answer(a(300, [192, 0, 2, 7]));
        }
        n if n.starts_with("slow15") => {
            // Likewise: slower than a short --upstream-timeout.
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
