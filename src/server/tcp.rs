//! TCP listeners for DoH: accept, admission, then everything else in the
//! connection's own task.
//!
//! The accept loop does nothing but accept and ask the guard whether the
//! peer may connect: a refused connection is closed before any byte is
//! read. The PROXY header, the TLS handshake and HTTP run in the
//! connection's task, all within `--handshake-timeout` of accept, so one
//! client that says nothing delays nobody.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::{self, HttpConn};
use super::io::ConnIo;
use crate::guard::ConnTicket;
use crate::metrics::AcceptError;
use crate::pipeline::{App, Peer};
use crate::proxyproto;
use crate::reject::ConnReject;

/// What every TCP DoH listener shares. Timeouts and the PROXY protocol
/// setting are read from the settings in force at each accept.
#[derive(Clone)]
pub struct Listener {
    pub app: Arc<App>,
    /// `None` for plain HTTP.
    pub tls: Option<TlsAcceptor>,
    pub extra_headers: Arc<::http::HeaderMap>,
}

/// Binds a TCP listener (SO_REUSEADDR, backlog 1024), non-blocking, to be
/// registered by whichever runtime accepts on it.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
    Ok(sock.listen(1024)?.into_std()?)
}

/// The kernel's send buffer for one client connection, at most (Linux
/// doubles it for its bookkeeping). Left alone, it grows to 4 MiB for a
/// client that does not read: kernel memory an attacker holds per
/// connection. A DNS answer is at most 64 KiB, most are under 1 KiB, so a
/// few hundred KiB never slow an honest client; past them the answers wait
/// in the proxy, where `--write-timeout` sees them.
pub const SEND_BUFFER: usize = 128 * 1024;

/// Bounds an accepted connection's kernel send buffer ([`SEND_BUFFER`]).
pub fn bound_send_buffer(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_send_buffer_size(SEND_BUFFER);
}

/// Registers a listening socket with the current runtime.
pub fn register(listener: std::net::TcpListener) -> Option<TcpListener> {
    match TcpListener::from_std(listener) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen");
            None
        }
    }
}

impl Listener {
    /// Accepts on `listener` (one worker's duplicate of the listening
    /// socket) and serves each admitted connection on this worker.
    pub async fn run(
        self,
        listener: std::net::TcpListener,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let Some(listener) = register(listener) else {
            return;
        };
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors or similar: count, back off,
                        // do not spin.
                        let kind = AcceptError::of(&e);
                        self.app.metrics.wire.accept_error(kind);
                        tracing::warn!(error = %e, kind = kind.label(), "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let ticket = match self.app.guard.admit(peer.ip()) {
                Ok(t) => t,
                Err(reason) => {
                    if self.app.verbose() {
                        tracing::info!(peer = %peer, reason = reason.label(), "connection refused");
                    }
                    continue;
                }
            };
            let this = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(this.serve(ticket, stream, peer, shutdown));
        }
    }

    /// One connection, from its PROXY header to its end.
    ///
    /// Not an `async fn`, and what comes before HTTP (the PROXY header,
    /// the TLS handshake) in a boxed future of its own, freed when it is
    /// done: this future is what an idle connection's task holds, and it
    /// keeps only what HTTP needs (an `async fn` would also keep its
    /// arguments twice, and the handshake's state for the connection's
    /// whole life).
    fn serve(
        self,
        ticket: ConnTicket,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let prelude = Box::pin(self.prelude(ticket.conn().clone(), stream, peer, shutdown));
        async move {
            if let Some((serving, _client_ticket)) = prelude.await {
                serving.await;
            }
            drop(ticket);
        }
    }

    /// The PROXY header (from a trusted proxy, with `--proxy-protocol`),
    /// the admission of the client it names, and the TLS handshake: the
    /// connection's HTTP, boxed (its streams moved in, nothing of them
    /// left in the task's future), or `None` when it must close.
    async fn prelude(
        self,
        conn: Arc<crate::guard::Conn>,
        mut stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Option<(Serving, Option<ConnTicket>)> {
        let _ = stream.set_nodelay(true);
        bound_send_buffer(&stream);
        let app = &self.app;
        let settings = app.conn.load_full();
        let deadline = Instant::now() + settings.handshake_timeout;
        let mut proxied = None;
        if settings.proxy_protocol && app.guard.is_trusted_proxy(peer.ip()) {
            match tokio::time::timeout_at(deadline, proxyproto::read_header(&mut stream)).await {
                Ok(Ok(client)) => proxied = Some(client),
                _ => {
                    app.metrics
                        .guard
                        .conn_rejected(ConnReject::ProxyHeader, false);
                    return None;
                }
            }
        }
        // The client a PROXY header names meets its own bans, rates and caps.
        let client_ticket = match proxied {
            Some(Some(client)) => Some(app.guard.admit_proxied(client).ok()?),
            Some(None) => Some(app.guard.admit_proxied(crate::net::UNKNOWN_CLIENT).ok()?),
            None => None,
        };
        let io = ConnIo::new(stream);
        let mut c = HttpConn {
            app: app.clone(),
            peer: Peer::new(conn, proxied),
            h2: None,
            tls: self.tls.is_some(),
            first_request: settings.handshake_timeout,
            idle: settings.idle_timeout,
            write: settings.write_timeout,
            extra_headers: self.extra_headers.clone(),
        };
        let serving: Serving = match &self.tls {
            Some(acceptor) => {
                let (tls, h2) = super::handshake::tls(app, acceptor, io, deadline, &c.peer).await?;
                c.h2 = Some(h2);
                Box::pin(http::serve(c, TokioIo::new(tls), shutdown))
            }
            None => Box::pin(http::serve(c, TokioIo::new(io), shutdown)),
        };
        Some((serving, client_ticket))
    }
}

/// A connection's HTTP, being served.
type Serving = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
