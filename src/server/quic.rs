//! QUIC listeners — DoH over HTTP/3 ([`super::h3`]) and DNS over QUIC
//! ([`super::doq`]): one accept loop, one admission and one handshake for
//! both; each serves what it serves on the connection it is handed
//! ([`QuicService`]).
//!
//! UDP brings back what TCP keeps out (incidents 2 and 4): spoofed
//! sources and amplification. So, at the first Initial packet, before the
//! server does any handshake work: a banned or denied source gets nothing
//! at all; when more unvalidated handshakes arrive per second than
//! `--h3-retry-threshold` (one threshold for every QUIC listener: the
//! work it bounds is the same handshake), an unvalidated source gets a
//! stateless Retry (RFC 9000 §8.1) and must prove it owns its address; only
//! a validated source is ever scored or limited by its connection rate, so
//! that spoofing somebody's address can never get them banned. Until its
//! handshake completes, a QUIC connection takes a place in the global count
//! only: the per-address, per-prefix and per-network caps it shares with
//! TCP are taken (and the connection rate spent, as by a TCP accept) once
//! the handshake proved the address, so spoofed Initials cannot lock the
//! real owner of an address out. quinn never sends an unvalidated address
//! more than three times what it received. No 0-RTT; at most 100
//! concurrent streams; at most [`SEND_WINDOW`] of answers buffered per
//! connection; the same first-request, idle and write deadlines as over
//! TCP, and the close that ends a connection reaches its client.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::amplification::Guarded;
use super::handshake;
use super::http::H2_MAX_STREAMS;
use crate::guard::ConnTicket;
use crate::metrics::{Handshake, QuicRefusal};
use crate::pipeline::{App, Peer};
use crate::reject::ConnReject;

/// Bytes quinn may have sent to a client and not seen acknowledged, per
/// connection (quinn's default is 10 MB): what a client that grants
/// credit and never acknowledges can hold of our memory.
pub const SEND_WINDOW: u64 = 256 * 1024;
/// How long a closed connection's address stays validated, so that the
/// CONNECTION_CLOSE still goes out through the anti-amplification books.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// A QUIC endpoint with `tls` (which names the ALPN), on a socket that
/// enforces the anti-amplification limit; clients may open `uni_streams`
/// unidirectional streams at once (HTTP/3's control and QPACK streams;
/// none for DNS over QUIC).
pub fn endpoint(
    std_socket: std::net::UdpSocket,
    tls: Arc<rustls::ServerConfig>,
    idle: Duration,
    uni_streams: u32,
) -> anyhow::Result<(quinn::Endpoint, Arc<Guarded>)> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| anyhow::anyhow!("QUIC TLS configuration: {e}"))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(H2_MAX_STREAMS.into())
        .send_window(SEND_WINDOW)
        .max_concurrent_uni_streams(uni_streams.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle)
                .map_err(|e| anyhow::anyhow!("idle timeout for QUIC: {e}"))?,
        ));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    // A connection keeps the address it was admitted under.
    config.migration(false);
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = Guarded::new(quinn::Runtime::wrap_udp_socket(&*runtime, std_socket)?);
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.clone(),
        runtime,
    )?;
    Ok((endpoint, socket))
}

/// What a QUIC listener serves on a connection whose handshake completed
/// and whose address was admitted.
pub trait QuicService: Send + Sync + 'static {
    /// Unidirectional streams a client may open at once.
    const UNI_STREAMS: u32;

    /// Serves `conn` until it ends or `shutdown`; `deadline` is the end of
    /// the connection's first-request deadline.
    fn serve(
        &self,
        app: &Arc<App>,
        conn: quinn::Connection,
        peer: Peer,
        deadline: Instant,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

/// Runs a listener serving `service` on `endpoint`.
pub fn spawn<S: QuicService>(
    (endpoint, socket): (quinn::Endpoint, Arc<Guarded>),
    app: &Arc<App>,
    retry_threshold: u32,
    service: Arc<S>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let l = QuicListener {
        app: app.clone(),
        socket,
        retry_threshold,
        service,
    };
    tasks.spawn(l.run(endpoint, tasks.clone(), shutdown.clone()));
}

pub struct QuicListener<S> {
    pub app: Arc<App>,
    /// The socket's anti-amplification books.
    pub socket: Arc<Guarded>,
    /// Unvalidated handshakes per second beyond which Retry is required;
    /// 0 requires it always.
    pub retry_threshold: u32,
    pub service: Arc<S>,
}

impl<S> Clone for QuicListener<S> {
    fn clone(&self) -> Self {
        QuicListener {
            app: self.app.clone(),
            socket: self.socket.clone(),
            retry_threshold: self.retry_threshold,
            service: self.service.clone(),
        }
    }
}

impl<S: QuicService> QuicListener<S> {
    pub async fn run(
        self,
        endpoint: quinn::Endpoint,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let unvalidated: Option<DefaultDirectRateLimiter> = NonZeroU32::new(self.retry_threshold)
            .map(|n| RateLimiter::direct(Quota::per_second(n)));
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
                _ = shutdown.cancelled() => break,
            };
            let ip = incoming.remote_address().ip();
            let m = &self.app.metrics;
            if let Err(reason) = self.app.guard.precheck(ip) {
                // Nothing back: there is nothing to amplify.
                m.wire.quic_refusal(QuicRefusal::Ignored);
                m.guard.conn_rejected(reason, false);
                incoming.ignore();
                continue;
            }
            let validated = incoming.remote_address_validated();
            if validated {
                self.socket.validate(incoming.remote_address());
            } else {
                let over = match &unvalidated {
                    Some(l) => l.check().is_err(),
                    None => true,
                };
                if over && incoming.may_retry() {
                    m.wire.quic_refusal(QuicRefusal::Retry);
                    let _ = incoming.retry();
                    continue;
                }
            }
            let ticket = match self.app.guard.admit_quic(ip, validated) {
                Ok(t) => t,
                Err(_) => {
                    m.wire.quic_refusal(QuicRefusal::Refused);
                    incoming.refuse();
                    continue;
                }
            };
            let this = self.clone();
            let shutdown = shutdown.clone();
            let tasks2 = tasks.clone();
            tasks.spawn(async move {
                this.serve(ticket, incoming, validated, tasks2, shutdown)
                    .await
            });
        }
        endpoint.close(0u32.into(), b"shutting down");
    }

    /// Serves one QUIC connection. A source that was not validated before
    /// the handshake is not scored for a failed one: it may be spoofed.
    async fn serve(
        self,
        ticket: ConnTicket,
        incoming: quinn::Incoming,
        validated: bool,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let addr = incoming.remote_address();
        self.serve_conn(ticket, incoming, validated, tasks, shutdown)
            .await;
        // The close just queued goes out through the books of this
        // address: keep them a moment (it is sent within milliseconds).
        tokio::time::sleep(CLOSE_GRACE).await;
        self.socket.forget(addr);
    }

    async fn serve_conn(
        &self,
        ticket: ConnTicket,
        incoming: quinn::Incoming,
        validated: bool,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let app = &self.app;
        let peer = Peer::new(ticket.conn().clone(), None);
        let deadline = Instant::now() + app.conn.load().handshake_timeout;
        let addr = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(_) => return,
        };
        let conn = match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer.conn.peer(), error = %e, "QUIC handshake failed");
                // Scored only from a source that proved its address.
                handshake::refused(app, &peer, ConnReject::HandshakeFailed, validated);
                return;
            }
            Err(_) => {
                handshake::refused(app, &peer, ConnReject::HandshakeTimeout, false);
                return;
            }
        };
        // Counted as full: QUIC does not report whether it resumed.
        app.metrics.wire.handshake(Handshake::Full);
        // The handshake proved the address.
        self.socket.validate(addr);
        // Now the address's caps and (unless its Retry token spent it)
        // its connection rate, as for a TCP accept; refusals score.
        let _places = match app.guard.admit_quic_handshaken(addr.ip(), validated) {
            Ok(t) => t,
            Err(reason) => {
                app.metrics.wire.quic_refusal(QuicRefusal::Refused);
                tracing::debug!(peer = %addr, reason = reason.label(), "QUIC connection refused after its handshake");
                conn.close(0x100u32.into(), b"refused");
                return;
            }
        };
        self.service
            .serve(app, conn, peer, deadline, tasks, shutdown)
            .await;
        drop(ticket);
    }
}
