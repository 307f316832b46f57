//! DNS over HTTPS to one upstream (RFC 8484), with hyper's HTTP/2 client
//! over rustls: one connection, kept open and multiplexed, reopened with
//! backoff when it breaks. Queries go as POST with ID 0, as RFC 8484
//! recommends for cacheability; the answer must carry ID 0 and our
//! question.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server::{accept, Backoff};
use super::{ExchangeError, Exchanged};
use crate::dns::DNS_MESSAGE;
use crate::dns::{self, Key};
use crate::metrics::UpstreamMetrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A connection with nothing in flight this long is closed.
const IDLE: Duration = Duration::from_secs(60);

pub struct HttpsLink {
    addr: SocketAddr,
    label: String,
    connector: TlsConnector,
    name: ServerName<'static>,
    uri: http::Uri,
    sender: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    backoff: Backoff,
    metrics: UpstreamMetrics,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl HttpsLink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: SocketAddr,
        label: String,
        connector: TlsConnector,
        name: ServerName<'static>,
        path: &str,
        metrics: UpstreamMetrics,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<HttpsLink, String> {
        let host = match &name {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            ServerName::IpAddress(_) => match addr.ip() {
                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                v4 => v4.to_string(),
            },
            _ => addr.ip().to_string(),
        };
        let uri = format!("https://{host}:{}{path}", addr.port())
            .parse::<http::Uri>()
            .map_err(|e| format!("upstream {label}: {e}"))?;
        Ok(HttpsLink {
            addr,
            label,
            connector,
            name,
            uri,
            sender: tokio::sync::Mutex::new(None),
            backoff: Backoff::default(),
            metrics,
            tasks,
            shutdown,
        })
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ExchangeError> {
        let mut slot = self.sender.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        *slot = None;
        self.backoff.check()?;
        match tokio::time::timeout(CONNECT_TIMEOUT, self.open()).await {
            Ok(Ok(s)) => {
                self.backoff.succeeded(&self.label);
                *slot = Some(s.clone());
                Ok(s)
            }
            Ok(Err(e)) => {
                self.backoff.failed(&self.label, &e);
                Err(ExchangeError::Connect(e.to_string()))
            }
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                self.backoff.failed(&self.label, &e);
                Err(ExchangeError::Connect(e.to_string()))
            }
        }
    }

    async fn open(&self) -> std::io::Result<SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let tls = self.connector.connect(self.name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(std::io::Error::other("the upstream does not speak HTTP/2"));
        }
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(IDLE / 2))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        self.metrics.connections.inc();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
        Ok(send)
    }

    pub async fn exchange(&self, key: &Key) -> Result<Exchanged, ExchangeError> {
        let mut send = self.sender().await?;
        send.ready().await.map_err(|_| ExchangeError::Closed)?;
        let mut req = Request::new(Full::new(Bytes::from(dns::upstream_query(0, key))));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        let h = req.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(DNS_MESSAGE));
        h.insert(header::ACCEPT, HeaderValue::from_static(DNS_MESSAGE));
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| ExchangeError::Connect(e.to_string()))?;
        if resp.status() != StatusCode::OK {
            return Err(ExchangeError::Status(resp.status().as_u16()));
        }
        let body = Limited::new(resp.into_body(), 65535)
            .collect()
            .await
            .map_err(|_| ExchangeError::Closed)?
            .to_bytes();
        accept(&body, 0, key).map(Exchanged::Answer).map_err(|e| {
            self.metrics.dropped();
            ExchangeError::Answer(e)
        })
    }
}
