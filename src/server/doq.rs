//! DNS over QUIC (RFC 9250): on a QUIC connection with ALPN `doq`, one
//! query per client-initiated bidirectional stream — a 2-byte length, the
//! message with ID 0, then the stream's end — answered on the same stream
//! (length, message with ID 0, end). The QUIC side (the guard at the
//! first packet, Retry, anti-amplification, no 0-RTT, the handshake and
//! the address's caps) is [`super::quic`]'s; a message is admitted, parsed
//! and answered as over DNS over TLS ([`super::message`]).
//!
//! What a client can hold: at most 100 open streams (as HTTP/2), none
//! unidirectional (opening one is a QUIC stream-limit error that closes
//! the connection), each with at most one message of 64 KiB read; a stream
//! whose query is not complete within the first-request deadline is reset,
//! and a connection with nothing in flight is closed at the idle (or
//! first-request) deadline, half-open streams or not. Breaking the
//! protocol — a length that does not match what the stream carried, a
//! message ID other than 0, a second message on a stream — closes the
//! connection with `DOQ_PROTOCOL_ERROR` and scores the client.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::scored_client;
use super::message::{self, Early};
use super::quic::QuicService;
use super::watchdog;
use crate::guard::Expiry;
use crate::pipeline::{App, Peer};
use crate::reject::{Outcome, ProtocolError, Transport};

/// RFC 9250 §4.3 error codes.
const DOQ_NO_ERROR: u32 = 0x0;
const DOQ_PROTOCOL_ERROR: u32 = 0x2;
const DOQ_REQUEST_CANCELLED: u32 = 0x3;

/// The largest stream a query may take: the length prefix and a message
/// of the most it can say.
const MAX_STREAM: usize = 2 + 65_535;

/// DNS over QUIC on an admitted QUIC connection.
pub struct Doq;

impl QuicService for Doq {
    /// None: DNS over QUIC uses bidirectional streams only.
    const UNI_STREAMS: u32 = 0;

    async fn serve(
        &self,
        app: &Arc<App>,
        conn: quinn::Connection,
        peer: Peer,
        _deadline: Instant,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let first = app.conn.load().handshake_timeout;
        let watch = watchdog::watch(app, &peer);
        tokio::pin!(watch);
        loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let (app, peer, conn) = (app.clone(), peer.clone(), conn.clone());
                        tasks.spawn(async move { stream(app, peer, conn, send, recv, first).await });
                    }
                    // Closed: by the client, by a stream below, or by quinn
                    // for a transport error (a unidirectional stream, too
                    // many streams).
                    Err(e) => {
                        if let quinn::ConnectionError::TransportError(t) = &e {
                            tracing::debug!(peer = %peer.conn.peer(), error = %t, "DoQ connection closed for a transport error");
                            protocol_error(app, &peer);
                        }
                        break;
                    }
                },
                why = &mut watch => {
                    watchdog::account(app, &peer, why);
                    let reason: &[u8] = if why == Expiry::Idle { b"idle" } else { b"timeout" };
                    conn.close(DOQ_NO_ERROR.into(), reason);
                    break;
                }
                _ = peer.conn.closing() => {
                    conn.close(DOQ_NO_ERROR.into(), b"");
                    break;
                }
                _ = shutdown.cancelled() => {
                    conn.close(DOQ_NO_ERROR.into(), b"shutting down");
                    break;
                }
            }
        }
    }
}

fn protocol_error(app: &App, peer: &Peer) {
    app.metrics.wire.protocol_error(ProtocolError::DoqProtocol);
    app.guard
        .penalize(scored_client(peer), ProtocolError::DoqProtocol);
}

/// What a stream carried, once it ended.
#[derive(Debug, PartialEq, Eq)]
enum Query<'a> {
    /// One message, framed as RFC 9250 says, with ID 0.
    Message(&'a [u8]),
    /// Anything else: a connection error.
    Broken(&'static str),
}

/// Checks one stream's bytes: a 2-byte length, exactly that many bytes of
/// message, message ID 0.
fn query(stream: &[u8]) -> Query<'_> {
    let Some((len, msg)) = stream.split_first_chunk::<2>() else {
        return Query::Broken("no length prefix");
    };
    let len = usize::from(u16::from_be_bytes(*len));
    if msg.len() < len {
        return Query::Broken("the stream ended inside the message");
    }
    if msg.len() > len {
        return Query::Broken("more than one message on the stream");
    }
    if msg.len() < 2 || msg[..2] != [0, 0] {
        return Query::Broken("a message ID other than 0");
    }
    Query::Message(msg)
}

/// One stream: the whole query within the first-request deadline, then
/// the answer on it.
async fn stream(
    app: Arc<App>,
    peer: Peer,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    first: Duration,
) {
    let read = tokio::time::timeout(first, recv.read_to_end(MAX_STREAM)).await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            broken(&app, &peer, &conn, "a stream longer than one message");
            return;
        }
        // Reset by the client, or the connection went.
        Ok(Err(_)) => return,
        Err(_) => {
            // Opened and never finished: given up (the connection's own
            // deadlines close it if nothing else comes).
            let _ = recv.stop(DOQ_REQUEST_CANCELLED.into());
            let _ = send.reset(DOQ_REQUEST_CANCELLED.into());
            return;
        }
    };
    let msg = match query(&bytes) {
        Query::Message(m) => m,
        Query::Broken(why) => {
            broken(&app, &peer, &conn, why);
            return;
        }
    };
    let client: IpAddr = scored_client(&peer);
    let (_, inflight) = peer.conn.begin();
    let (answer, closes) = match message::admit(&app, client, Transport::Doq, msg) {
        Ok(()) => (
            message::answer(&app, client, Transport::Doq, msg).await,
            false,
        ),
        Err(Early::Refused { answer, closes }) => (answer, closes),
        // FORMERR on this stream; the connection stays (the message was
        // framed right), the client is scored.
        Err(Early::Malformed(answer)) => (answer, false),
    };
    // Unread from here on, no longer in flight.
    let unread = peer.conn.queued();
    drop(inflight);
    let delivered = send.write_all(&message::frame(&answer)).await.is_ok() && send.finish().is_ok();
    drop(unread);
    if !delivered {
        app.metrics
            .requests
            .count(Outcome::Undelivered, Transport::Doq, false);
    }
    if closes {
        conn.close(DOQ_NO_ERROR.into(), b"refused");
    }
}

/// A protocol error on a stream: the connection is closed with
/// `DOQ_PROTOCOL_ERROR` and the client scored.
fn broken(app: &App, peer: &Peer, conn: &quinn::Connection, why: &'static str) {
    tracing::debug!(peer = %peer.conn.peer(), why, "DoQ protocol error");
    protocol_error(app, peer);
    conn.close(DOQ_PROTOCOL_ERROR.into(), why.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_one_message_framed_with_id_0() {
        let q = crate::dns::query_message("a.test", 1, 0, true).unwrap();
        let mut s = (q.len() as u16).to_be_bytes().to_vec();
        s.extend_from_slice(&q);
        assert_eq!(query(&s), Query::Message(&q[..]));
        assert!(matches!(query(&s[..s.len() - 1]), Query::Broken(_)));
        let mut two = s.clone();
        two.extend_from_slice(&s);
        assert!(matches!(query(&two), Query::Broken(_)));
        let q7 = crate::dns::query_message("a.test", 1, 7, true).unwrap();
        let mut s7 = (q7.len() as u16).to_be_bytes().to_vec();
        s7.extend_from_slice(&q7);
        assert_eq!(query(&s7), Query::Broken("a message ID other than 0"));
        assert!(matches!(query(b"\x00"), Query::Broken(_)));
        assert!(matches!(query(b""), Query::Broken(_)));
        assert!(matches!(query(b"\x00\x00"), Query::Broken(_)));
    }
}
