//! DNS queries and the clients that send them: HTTP/1.1 and HTTP/2 over
//! TLS and in the clear, HTTP/3, from any 127.x.y.z source address.

use super::*;

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
