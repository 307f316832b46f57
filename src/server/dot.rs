//! DNS over TLS listeners (RFC 7858, with RFC 7766's pipelining): many
//! queries per connection, each answered as soon as it is ready, out of
//! order. The same guard and pipeline as DoH: a banned or over-cap peer is
//! closed at accept; a client over its budget gets `REFUSED`; a message
//! that is not one valid query gets `FORMERR` and the connection is closed
//! (and scored); first-request and idle deadlines as for HTTPS.
//!
//! A client that pipelines queries and never reads its answers must cost
//! a bounded, short-lived amount: a query holds one of [`MAX_PENDING`]
//! places from when it is read until its answer is written into the
//! socket, reading stops while [`MAX_UNWRITTEN`] bytes of answers wait for
//! the writer, and answers count as unread (not as work in flight) until
//! written, so the watchdog closes the connection, and scores the client,
//! when none is taken for `--write-timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::scored_client;
use super::message::{self, frame, Early};
use super::watchdog;
use crate::guard::{ConnTicket, Unread};
use crate::metrics::AcceptError;
use crate::pipeline::{App, Peer};
use crate::reject::{ProtocolError, Transport};

/// Queries read and not yet answered into the socket, on one connection;
/// reading pauses beyond.
const MAX_PENDING: usize = 32;
/// Bytes of answers waiting for the writer, on one connection; reading
/// pauses beyond.
const MAX_UNWRITTEN: usize = 64 * 1024;

#[derive(Clone)]
pub struct DotListener {
    pub app: Arc<App>,
    pub tls: TlsAcceptor,
}

impl DotListener {
    /// As [`super::tcp::Listener::run`]: one worker's accept loop.
    pub async fn run(
        self,
        listener: std::net::TcpListener,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let Some(listener) = super::tcp::register(listener) else {
            return;
        };
        loop {
            let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        let kind = AcceptError::of(&e);
                        self.app.metrics.wire.accept_error(kind);
                        tracing::warn!(error = %e, kind = kind.label(), "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let Ok(ticket) = self.app.guard.admit(peer.ip()) else {
                continue;
            };
            let this = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { this.serve(ticket, stream, shutdown).await });
        }
    }

    async fn serve(self, ticket: ConnTicket, stream: TcpStream, shutdown: CancellationToken) {
        let _ = stream.set_nodelay(true);
        super::tcp::bound_send_buffer(&stream);
        let app = &self.app;
        let peer = Peer::new(ticket.conn().clone(), None);
        let deadline = Instant::now() + app.conn.load().handshake_timeout;
        let Some((tls, _)) = super::handshake::tls(app, &self.tls, stream, deadline, &peer).await
        else {
            return;
        };
        let watch = watchdog::watch(app, &peer);
        tokio::pin!(watch);
        tokio::select! {
            end = session(app.clone(), peer.clone(), tls) => {
                if let Some(kind) = end {
                    app.metrics.wire.protocol_error(kind);
                    app.guard.penalize(scored_client(&peer), kind);
                }
            }
            why = &mut watch => watchdog::account(app, &peer, why),
            _ = peer.conn.closing() => {}
            _ = shutdown.cancelled() => {}
        }
        drop(ticket);
    }
}

/// One answer on its way to the client: its frame, the query's place, and
/// the mark that the client has not taken it, all given back once it is
/// written into the socket.
struct Outgoing {
    frame: Vec<u8>,
    _place: OwnedSemaphorePermit,
    _unread: Unread,
}

/// Bytes of answers waiting for the writer.
struct Backlog {
    bytes: std::sync::atomic::AtomicUsize,
    drained: Notify,
}

impl Backlog {
    fn add(&self, n: usize) {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.bytes
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        self.drained.notify_one();
    }

    /// Waits until fewer than [`MAX_UNWRITTEN`] bytes wait.
    async fn room(&self) {
        loop {
            let drained = self.drained.notified();
            if self.bytes.load(std::sync::atomic::Ordering::Relaxed) < MAX_UNWRITTEN {
                return;
            }
            drained.await;
        }
    }
}

/// Reads queries and writes answers until the client goes, a message is
/// malformed (returned as the protocol error), or the connection is to be
/// closed (a banned client).
async fn session<S>(app: Arc<App>, peer: Peer, stream: S) -> Option<ProtocolError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, w) = tokio::io::split(stream);
    // Unbounded in type, bounded by the places: one entry per place.
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let backlog = Arc::new(Backlog {
        bytes: Default::default(),
        drained: Notify::new(),
    });
    let writer = write_answers(w, rx, backlog.clone());
    tokio::pin!(writer);
    let places = Arc::new(Semaphore::new(MAX_PENDING));
    let client = scored_client(&peer);
    let send = {
        let (tx, backlog, conn) = (tx.clone(), backlog.clone(), peer.conn.clone());
        move |frame: Vec<u8>, place: OwnedSemaphorePermit| {
            backlog.add(frame.len());
            let _ = tx.send(Outgoing {
                frame,
                _place: place,
                _unread: conn.queued(),
            });
        }
    };
    let reader = async {
        loop {
            backlog.room().await;
            let Ok(place) = places.clone().acquire_owned().await else {
                return None;
            };
            let len = match r.read_u16().await {
                Ok(n) => usize::from(n),
                Err(_) => return None,
            };
            let mut msg = vec![0u8; len];
            if r.read_exact(&mut msg).await.is_err() {
                return None;
            }
            let (_, inflight) = peer.conn.begin();
            match message::admit(&app, client, Transport::Dot, &msg) {
                Ok(()) => {}
                // Banned: close. Over budget: REFUSED, and go on.
                Err(Early::Refused { answer, closes }) => {
                    send(frame(&answer), place);
                    if closes {
                        return None;
                    }
                    continue;
                }
                Err(Early::Malformed(answer)) => {
                    send(frame(&answer), place);
                    return Some(ProtocolError::DotMalformed);
                }
            }
            let (app, send) = (app.clone(), send.clone());
            let tasks = app.tasks.clone();
            tasks.spawn(async move {
                let answer = message::answer(&app, client, Transport::Dot, &msg).await;
                // Unread from here on, no longer in flight.
                send(frame(&answer), place);
                drop(inflight);
            });
        }
    };
    tokio::select! {
        end = reader => {
            // Let the answers already queued go out.
            drop(tx);
            drop(send);
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            end
        }
        _ = &mut writer => None,
    }
}

/// Writes answers as they come, everything ready in one flush; an answer
/// is given back (its place, its unread mark, its bytes in the backlog)
/// once flushed into the socket. A client that does not read leaves the
/// writer waiting here, and the watchdog ends the connection.
async fn write_answers<W: AsyncWrite>(
    w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    backlog: Arc<Backlog>,
) {
    tokio::pin!(w);
    let mut batch: Vec<Outgoing> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        for out in &batch {
            if w.write_all(&out.frame).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
        for out in batch.drain(..) {
            backlog.sub(out.frame.len());
        }
        if batch.capacity() > MAX_PENDING {
            batch.shrink_to(MAX_PENDING);
        }
    }
    let _ = w.shutdown().await;
}
