//! DNS over TLS listeners (RFC 7858, with RFC 7766's pipelining): many
//! queries per connection, each answered as soon as it is ready, out of
//! order. The same guard and pipeline as DoH: a banned or over-cap peer is
//! closed at accept; a client over its budget gets `REFUSED`; a message
//! that is not one valid query gets `FORMERR` and the connection is closed
//! (and scored); first-request and idle deadlines as for HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::scored_client;
use super::watchdog;
use crate::dns;
use crate::guard::{ConnTicket, Expiry};
use crate::metrics::{AcceptError, Handshake};
use crate::pipeline::{App, Peer};
use crate::reject::{ConnReject, Outcome, ProtocolError, Reject, Transport};

/// Queries in flight on one connection at most; reading pauses beyond.
const MAX_INFLIGHT: usize = 100;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

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
                        self.app.metrics.accept_error(kind);
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
        let app = &self.app;
        let peer = Peer::new(ticket.conn().clone(), None);
        let settings = app.server.load_full();
        let (first, idle) = (settings.handshake_timeout, settings.idle_timeout);
        let deadline = Instant::now() + first;
        let accepted = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.tls.accept(stream)) => r,
            _ = peer.conn.closing() => return,
        };
        let tls = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                app.metrics.handshake(Handshake::Failed);
                app.metrics
                    .conn_rejected(ConnReject::HandshakeFailed, false);
                app.guard
                    .penalize(scored_client(&peer), ConnReject::HandshakeFailed);
                tracing::debug!(peer = %peer.conn.peer(), error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                app.metrics.handshake(Handshake::Timeout);
                app.metrics
                    .conn_rejected(ConnReject::HandshakeTimeout, false);
                app.guard
                    .penalize(scored_client(&peer), ConnReject::HandshakeTimeout);
                return;
            }
        };
        app.metrics.handshake(Handshake::of(tls.get_ref().1));
        let watch = watchdog::expired(&peer.conn, first, idle);
        tokio::pin!(watch);
        tokio::select! {
            end = session(app.clone(), peer.clone(), tls) => {
                if let Some(kind) = end {
                    app.metrics.protocol_error(kind);
                    app.guard.penalize(scored_client(&peer), kind);
                }
            }
            why = &mut watch => {
                if why == Expiry::FirstRequest {
                    app.metrics.conn_rejected(ConnReject::FirstRequestTimeout, false);
                    app.guard.penalize(scored_client(&peer), ConnReject::FirstRequestTimeout);
                }
            }
            _ = peer.conn.closing() => {}
            _ = shutdown.cancelled() => {}
        }
        drop(ticket);
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
    let (tx, rx) = mpsc::channel::<Vec<u8>>(MAX_INFLIGHT);
    let writer = write_answers(w, rx);
    tokio::pin!(writer);
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let client = scored_client(&peer);
    let reader = async {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
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
            if let Err((reason, _)) = app.admit_request(client, Transport::Dot) {
                // Banned: close. Over budget: REFUSED, and go on.
                let _ = tx.send(frame(&refusal(&msg, RCODE_REFUSED))).await;
                if reason.closes() {
                    return None;
                }
                continue;
            }
            if let Err(e) = dns::parse_query(&msg) {
                let reason = Reject::from(e);
                app.refuse(client, reason, Transport::Dot);
                let _ = tx.send(frame(&refusal(&msg, RCODE_FORMERR))).await;
                return Some(ProtocolError::DotMalformed);
            }
            let (app, tx) = (app.clone(), tx.clone());
            let tasks = app.tasks.clone();
            tasks.spawn(async move {
                let _slot = slot;
                let _inflight = inflight;
                let answer = match app.answer_message(client, &msg).await {
                    Ok(served) => {
                        app.metrics
                            .request(Outcome::Answered, Transport::Dot, false);
                        served.wire
                    }
                    Err(reason) => {
                        app.refuse(client, reason, Transport::Dot);
                        refusal(&msg, RCODE_SERVFAIL)
                    }
                };
                let _ = tx.send(frame(&answer)).await;
            });
        }
    };
    tokio::select! {
        end = reader => {
            // Let the answers already queued go out.
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            end
        }
        _ = &mut writer => None,
    }
}

async fn write_answers<W: AsyncWrite>(w: W, mut rx: mpsc::Receiver<Vec<u8>>) {
    tokio::pin!(w);
    while let Some(first) = rx.recv().await {
        if w.write_all(&first).await.is_err() {
            return;
        }
        // Everything ready goes out in one flush.
        while let Ok(more) = rx.try_recv() {
            if w.write_all(&more).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// A message with its two-byte length prefix.
fn frame(msg: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(msg.len() + 2);
    f.extend_from_slice(&(msg.len().min(65535) as u16).to_be_bytes());
    f.extend_from_slice(&msg[..msg.len().min(65535)]);
    f
}

/// An answer with `rcode` to `query`: its ID, opcode and RD, and its
/// question when it has one that parses.
fn refusal(query: &[u8], rcode: u8) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    if query.len() >= 4 {
        out[..2].copy_from_slice(&query[..2]);
        out[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD
    } else {
        out[2] = 0x80;
    }
    out[3] = 0x80 | rcode; // RA
    if let Ok(q) = dns::parse_query(query) {
        out[5] = 1;
        out.extend_from_slice(q.question);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_echo_id_and_question() {
        let q = dns::query_message("a.test", 1, 0x4242, true).unwrap();
        let r = refusal(&q, RCODE_REFUSED);
        let m = hickory_proto::op::Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(
            m.metadata.response_code,
            hickory_proto::op::ResponseCode::Refused
        );
        assert_eq!(m.queries.len(), 1);
        let r = refusal(b"\x12\x34garbage", RCODE_FORMERR);
        let m = hickory_proto::op::Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.queries.is_empty());
    }
}
