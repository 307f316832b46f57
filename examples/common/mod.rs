//! Shared by the examples: an HTTP/2 DoH client over TLS that can bind a
//! source address, query building, and reading the proxy's metrics.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpSocket;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Accepts any certificate: for `--insecure` against the self-signed default.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS settings: trust `ca` (a PEM file), or nothing at all with `None`.
pub fn tls(ca: Option<&str>) -> Result<tokio_rustls::TlsConnector, Error> {
    let cfg = client_config(ca, b"h2")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// A client configuration trusting `ca` (or anything, with `None`),
/// offering `alpn`.
pub fn client_config(ca: Option<&str>, alpn: &[u8]) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = match ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let pem = std::fs::read(path)?;
            for c in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots.add(c?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// An HTTP/2 connection to `addr` over TLS, from `source` if given.
pub async fn connect(
    tls: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<SendRequest<Full<Bytes>>, Error> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = sock.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from("localhost")?, tcp).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends a GET for `path_and_query`; returns the status and body.
pub async fn get(
    send: &mut SendRequest<Full<Bytes>>,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Bytes), Error> {
    let mut b = http::Request::get(format!("https://localhost{path_and_query}"))
        .header("accept", "application/dns-message");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    send.ready().await?;
    let resp = send.send_request(b.body(Full::new(Bytes::new()))?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// A plain HTTP/2 (h2c) connection to a proxy's `--listen-http`.
pub async fn h2c(addr: &str) -> Result<SendRequest<Full<Bytes>>, Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A GET on behalf of `client`, as a trusted reverse proxy sends it
/// (`X-Forwarded-For`); returns the status.
pub async fn get_as(
    send: &mut SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
    client: &str,
) -> Result<u16, Error> {
    let req = http::Request::get(format!("http://{host}{path}"))
        .header("x-forwarded-for", client)
        .body(Full::new(Bytes::new()))?;
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await?;
    Ok(status)
}

/// A DNS query for `name`/`qtype`, with EDNS.
pub fn query(name: &str, qtype: u16, id: u16) -> Vec<u8> {
    doh_proxy::dns::query_message(name, qtype, id, true).unwrap_or_default()
}

pub fn dns_path(path: &str, name: &str, qtype: u16) -> String {
    format!(
        "{path}?dns={}",
        doh_proxy::doh::encode_dns_param(&query(name, qtype, 0))
    )
}

/// Sum of every sample of `family` (with any labels matching `filter`)
/// on a Prometheus text page.
pub async fn metric_sum(metrics_url: &str, family: &str, filter: &str) -> Result<f64, Error> {
    let url: http::Uri = metrics_url.parse()?;
    let host = url
        .authority()
        .ok_or("metrics URL needs a host")?
        .as_str()
        .to_string();
    let tcp = tokio::net::TcpStream::connect(&host).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(url.path())
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let body = send
        .send_request(req)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']) && l.contains(filter)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// CPU seconds (user and system) a process has used (Linux), if known.
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name, which may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Resident set of a process in MiB (Linux), if known.
pub fn rss_mib(pid: Option<u32>) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// The pid of the running `doh-proxy`, if there is exactly one.
pub fn find_pid() -> Option<u32> {
    let mut found = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "doh-proxy")
        {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// Parses `--name value` style arguments with defaults.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// Milliseconds at a percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}
