//! Listeners and connections: accept, admission, TLS, HTTP/1.1 and HTTP/2.
//!
//! The accept loop does nothing but accept and ask the guard whether the
//! peer may connect: a refused connection is closed before any byte is
//! read. Everything else — PROXY header, TLS handshake (with a timeout),
//! HTTP — runs in the connection's own task, so one client that says
//! nothing delays nobody. A watchdog closes connections with nothing in
//! flight and no bytes moving for `--idle-timeout`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::metrics::ConnReject;
use crate::pipeline::{self, App, ConnInfo};
use crate::{admin, dns, proxyproto, tls};

/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);
/// HTTP/2 header list limit; HTTP/1.1 headers are limited to 16 KiB by the
/// pipeline, inside a 64 KiB read buffer so that a long target gets its 414.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
const H1_MAX_BUF: usize = 64 * 1024;
const H2_MAX_STREAMS: u32 = 100;
/// Writes buffered per connection before they go out without a flush.
const WRITE_BUF: usize = 64 * 1024;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A running proxy: its bound addresses and the means to stop it.
pub struct Running {
    pub tls_addrs: Vec<SocketAddr>,
    pub http_addrs: Vec<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish (a few seconds at
    /// most), and returns.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let deadline = Instant::now() + DRAIN;
        while self.app.guard.open_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Binds every listener and starts serving. Fails if a listener cannot be
/// bound or the TLS identity cannot be loaded.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let upstreams = cfg.upstreams()?;
    let tls_config = if cfg.listen.is_empty() {
        None
    } else {
        let id = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => tls::load_pair(c, k)?,
            _ => {
                let id = tls::self_signed()?;
                tracing::warn!(
                    fingerprint = %id.fingerprint(),
                    "NO CERTIFICATE GIVEN: serving a self-signed certificate for localhost \
                     generated at start. Clients will not trust it; use --tls-cert/--tls-key."
                );
                id
            }
        };
        Some(TlsAcceptor::from(tls::server_config(id)?))
    };
    let mut tls_listeners = Vec::new();
    for a in &cfg.listen {
        tls_listeners.push(bind(*a).await?);
    }
    let mut http_listeners = Vec::new();
    for a in &cfg.listen_http {
        http_listeners.push(bind(*a).await?);
    }
    let admin_listener = bind(cfg.metrics_listen).await?;
    // From here on the configuration names the bound addresses (port 0 in
    // the file becomes the port the kernel chose): the ban file needs them.
    let mut cfg = cfg;
    cfg.listen = tls_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    cfg.listen_http = http_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let app = Arc::new(App::new(cfg, &upstreams));
    let (shutdown, rx) = watch::channel(false);
    let mut running = Running {
        tls_addrs: tls_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        http_addrs: http_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect(),
        admin_addr: admin_listener.local_addr()?,
        app: app.clone(),
        shutdown,
        tasks: Vec::new(),
    };
    for l in tls_listeners {
        let t = tls_config.clone();
        running
            .tasks
            .push(tokio::spawn(accept_loop(app.clone(), l, t, rx.clone())));
    }
    for l in http_listeners {
        running
            .tasks
            .push(tokio::spawn(accept_loop(app.clone(), l, None, rx.clone())));
    }
    running.tasks.push(tokio::spawn(admin::serve(
        app.clone(),
        admin_listener,
        rx.clone(),
    )));
    running.tasks.push(tokio::spawn(housekeeping(app.clone())));
    running.tasks.push(tokio::spawn(health_probe(app.clone())));
    running.tasks.push(tokio::spawn(summary(app.clone())));
    for a in &running.tls_addrs {
        tracing::info!(listen = %a, "serving DoH over TLS");
    }
    for a in &running.http_addrs {
        tracing::info!(listen = %a, "serving DoH over plain HTTP");
    }
    tracing::info!(listen = %running.admin_addr, "admin listener (/metrics, /healthz, /bans)");
    Ok(running)
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
    Ok(sock.listen(1024)?)
}

async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or similar: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let ticket = match app.guard.admit(peer.ip()) {
            Ok(t) => t,
            Err(reason) => {
                if app.cfg.verbose > 0 {
                    tracing::info!(peer = %peer, reason = reason.label(), "connection refused");
                }
                continue;
            }
        };
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ticket = ticket;
            serve_conn(app, stream, peer, tls, shutdown).await;
        });
    }
}

async fn serve_conn(
    app: Arc<App>,
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let handshake = Duration::from_secs(app.cfg.handshake_timeout);
    let mut proxied = None;
    if app.cfg.proxy_protocol && app.guard.is_trusted_proxy(peer.ip()) {
        match tokio::time::timeout(handshake, proxyproto::read_header(&mut stream)).await {
            Ok(Ok(client)) => proxied = client,
            _ => {
                app.metrics.conn_rejected(ConnReject::ProxyHeader, false);
                return;
            }
        }
    }
    // The client a PROXY header names meets its own bans and caps.
    let _client_ticket = match proxied {
        Some(client) => match app.guard.admit_proxied(client) {
            Ok(t) => Some(t),
            Err(_) => return,
        },
        None => None,
    };
    let info = Arc::new(ConnInfo::new(peer.ip(), proxied));
    let last = Arc::new(AtomicU64::new(now_ms()));
    let io = ConnIo::new(stream, last.clone());
    match tls {
        Some(acceptor) => {
            let tls_stream = match tokio::time::timeout(handshake, acceptor.accept(io)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    app.metrics
                        .conn_rejected(ConnReject::HandshakeFailed, false);
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    app.metrics
                        .conn_rejected(ConnReject::HandshakeTimeout, false);
                    return;
                }
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_http(
                app,
                TokioIo::new(tls_stream),
                Some(h2),
                info,
                last,
                shutdown,
            )
            .await;
        }
        None => serve_http(app, TokioIo::new(io), None, info, last, shutdown).await,
    }
}

/// Serves HTTP on one connection. `h2`: ALPN's choice, or `None` to detect
/// (plain listeners: HTTP/1.1 or h2c with prior knowledge).
async fn serve_http<I>(
    app: Arc<App>,
    io: I,
    h2: Option<bool>,
    info: Arc<ConnInfo>,
    last: Arc<AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(app.cfg.handshake_timeout))
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(Some(32))
        .max_local_error_reset_streams(Some(64))
        .max_send_buf_size(64 * 1024);
    let builder = match h2 {
        Some(true) => builder.http2_only(),
        Some(false) => builder.http1_only(),
        None => builder,
    };
    let svc_info = info.clone();
    let svc_app = app.clone();
    let svc = service_fn(move |req| pipeline::handle(svc_app.clone(), svc_info.clone(), req));
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let idle = Duration::from_secs(app.cfg.idle_timeout);
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
                return;
            }
            _ = info.close.notified() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
                return;
            }
            _ = tick.tick() => {
                let quiet = Duration::from_millis(now_ms().saturating_sub(last.load(Ordering::Relaxed)));
                if info.inflight.load(Ordering::Relaxed) == 0 && quiet >= idle {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// The client's TCP stream, as every layer above sees it: it remembers
/// when bytes last moved (for the idle watchdog), and buffers writes until
/// a flush. A flush with data waiting first yields once to the scheduler,
/// so that the other streams of an HTTP/2 connection whose answers are
/// ready add theirs: ten answers then leave in one send instead of ten.
/// On loopback and busy servers the send syscall is the largest single cost
/// of a cache hit.
struct ConnIo {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    buf: Vec<u8>,
    sent: usize,
    yielded: bool,
}

impl ConnIo {
    fn new(inner: TcpStream, last: Arc<AtomicU64>) -> ConnIo {
        ConnIo {
            inner,
            last,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }

    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > 4 * WRITE_BUF {
            self.buf.shrink_to(WRITE_BUF);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() + data.len() > WRITE_BUF {
            ready!(self.poll_drain(cx))?;
        }
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.buf.len() + total > WRITE_BUF {
            ready!(self.poll_drain(cx))?;
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.buf.is_empty() {
            if !self.yielded {
                self.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(self.poll_drain(cx))?;
        }
        self.yielded = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Every second: bans, limiter pruning, ban file. (Gauges that need a
/// count are set when /metrics is scraped.)
async fn housekeeping(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        app.guard.tick();
    }
}

/// How often the upstreams are probed when no query has reached them.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Keeps upstream health known without traffic: when no upstream answered
/// for a while, asks for the root NS (any answer, even REFUSED, counts).
async fn health_probe(app: Arc<App>) {
    let key = dns::Key::new(".", 2, false).expect("the root name is valid");
    loop {
        let recent = app
            .upstream
            .since_last_answer()
            .is_some_and(|d| d < PROBE_EVERY);
        if !recent {
            let _ = app.upstream.resolve(&key).await;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// One line a minute that tells an operator what is going on.
async fn summary(app: Arc<App>) {
    use crate::reject::Outcome;
    let every = Duration::from_secs(60);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut last_upstream = 0u64;
    loop {
        tick.tick().await;
        let m = &app.metrics;
        let mut rejects = m.rejects_by_reason();
        rejects.sort_by_key(|r| std::cmp::Reverse(r.1));
        let top: Vec<String> = rejects
            .iter()
            .filter(|r| r.1 > 0)
            .take(3)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        let hits = m.cache_hits.get();
        let misses = m.cache_misses.get();
        let sent = m.upstream_sent();
        let qps = (sent - last_upstream) as f64 / every.as_secs_f64();
        last_upstream = sent;
        tracing::info!(
            requests = Outcome::ALL.iter().map(|o| m.requests_by_outcome(*o)).sum::<u64>(),
            answered = m.requests_by_outcome(Outcome::Answered),
            rejected = m.requests_by_outcome(Outcome::Rejected),
            rate_limited = m.requests_by_outcome(Outcome::RateLimited),
            top_rejects = %top.join(","),
            hit_ratio = format!("{:.3}", hits as f64 / (hits + misses).max(1) as f64),
            upstream_qps = format!("{qps:.1}"),
            unique_clients = app.unique.estimate(),
            bans_active = app.guard.bans().len(),
            connections = app.guard.open_connections(),
            "summary"
        );
    }
}
