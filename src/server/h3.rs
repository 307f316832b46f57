//! DoH over HTTP/3 (RFC 9114) with quinn and h3: the same pipeline, the
//! same refusals and the same guard as over HTTP/2; the QUIC side (the
//! guard at the first packet, Retry, anti-amplification, the handshake) is
//! [`super::quic`]'s.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::Frame;
use http_body_util::StreamBody;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::scored_client;
use super::quic::QuicService;
use super::watchdog;
use crate::guard::Expiry;
use crate::pipeline::{App, Peer};
use crate::reject::{Outcome, ProtocolError, Transport};

/// Largest header section accepted (as HTTP/2's header list limit).
const MAX_FIELD_SECTION: u64 = 16 * 1024;
/// HTTP/3 on an admitted QUIC connection.
pub struct H3;

impl QuicService for H3 {
    /// The client's control stream and QPACK streams.
    const UNI_STREAMS: u32 = 3;

    async fn serve(
        &self,
        app: &Arc<App>,
        conn: quinn::Connection,
        peer: Peer,
        deadline: Instant,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) {
        let first = app.conn.load().handshake_timeout;
        let built = tokio::time::timeout_at(
            deadline,
            h3::server::builder()
                .max_field_section_size(MAX_FIELD_SECTION)
                .send_grease(false)
                .build::<_, Bytes>(h3_quinn::Connection::new(conn.clone())),
        )
        .await;
        let Ok(Ok(mut h3conn)) = built else {
            conn.close(0x100u32.into(), b"");
            return;
        };
        let watch = watchdog::watch(app, &peer);
        tokio::pin!(watch);
        loop {
            tokio::select! {
                r = h3conn.accept() => match r {
                    Ok(Some(resolver)) => {
                        let app = app.clone();
                        let peer = peer.clone();
                        tasks.spawn(async move { request(app, peer, resolver, first).await });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let h3::error::ConnectionError::Local { error: h3::error::LocalError::Application { code, .. }, .. } = &e {
                            if *code != h3::error::Code::H3_NO_ERROR {
                                app.metrics.wire.protocol_error(ProtocolError::H3Protocol);
                                app.guard.penalize(scored_client(&peer), ProtocolError::H3Protocol);
                            }
                        }
                        break;
                    }
                },
                why = &mut watch => {
                    watchdog::account(app, &peer, why);
                    let reason: &[u8] = if why == Expiry::Idle { b"idle" } else { b"timeout" };
                    conn.close(0x100u32.into(), reason);
                    break;
                }
                _ = peer.conn.closing() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), h3conn.shutdown(0)).await;
                    conn.close(0x100u32.into(), b"");
                    break;
                }
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(2), h3conn.shutdown(0)).await;
                    conn.close(0x100u32.into(), b"");
                    break;
                }
            }
        }
    }
}

/// One request stream: its head within the first-request deadline, then
/// the pipeline, then the answer.
async fn request(
    app: Arc<App>,
    peer: Peer,
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    first: Duration,
) {
    let Ok(Ok((req, stream))) = tokio::time::timeout(first, resolver.resolve_request()).await
    else {
        return;
    };
    let (mut send, recv) = stream.split();
    let body = StreamBody::new(futures_util::stream::unfold(
        Some(recv),
        |state| async move {
            let mut recv = state?;
            match recv.recv_data().await {
                Ok(Some(mut buf)) => {
                    let data = buf.copy_to_bytes(buf.remaining());
                    Some((Ok(Frame::data(data)), Some(recv)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        },
    ));
    let reply = App::doh(&app, &peer, Transport::H3, req.map(|()| body)).await;
    let (mut parts, bytes) = reply.response.into_parts();
    parts
        .headers
        .insert(http::header::DATE, crate::clock::http_date());
    // Unread until the answer is in quinn's send buffer, which holds at
    // most what the client's flow-control credit allows.
    let unread = peer.conn.queued();
    let mut delivered = send
        .send_response(http::Response::from_parts(parts, ()))
        .await
        .is_ok();
    if delivered && !bytes.is_empty() {
        delivered = send.send_data(bytes).await.is_ok();
    }
    delivered = delivered && send.finish().await.is_ok();
    drop(unread);
    if reply.answer {
        let outcome = if delivered {
            Outcome::Answered
        } else {
            Outcome::Undelivered
        };
        app.metrics.requests.count(outcome, Transport::H3, false);
    }
    if reply.close {
        peer.conn.close();
    }
}
