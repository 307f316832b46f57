//! The TLS handshake of a TCP listener, and how every listener counts and
//! scores a handshake that fails or runs out of time.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::http::scored_client;
use crate::metrics::Handshake;
use crate::pipeline::{App, Peer};
use crate::reject::ConnReject;

/// Counts a handshake that failed (`ConnReject::HandshakeFailed`) or ran
/// out of time (`HandshakeTimeout`), and scores the client when `scored`
/// (not for a QUIC source that never proved its address).
pub fn refused(app: &App, peer: &Peer, why: ConnReject, scored: bool) {
    let kind = if why == ConnReject::HandshakeTimeout {
        Handshake::Timeout
    } else {
        Handshake::Failed
    };
    app.metrics.wire.handshake(kind);
    app.metrics.guard.conn_rejected(why, false);
    if scored {
        app.guard.penalize(scored_client(peer), why);
    }
}

/// The TLS handshake within `deadline`, counted (full or resumed) and, when
/// it fails or times out, scored: the stream and whether ALPN chose h2, or
/// `None` then, or when the guard closes the connection meanwhile.
///
/// The stream is only looked at here: a caller that borrowed it before
/// moving it on would keep a second copy of it (1.2 KiB) in its future for
/// the connection's whole life.
pub async fn tls<IO>(
    app: &App,
    acceptor: &TlsAcceptor,
    io: IO,
    deadline: Instant,
    peer: &Peer,
) -> Option<(TlsStream<IO>, bool)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let accepted = tokio::select! {
        r = tokio::time::timeout_at(deadline, acceptor.accept(io)) => r,
        _ = peer.conn.closing() => return None,
    };
    match accepted {
        Ok(Ok(tls)) => {
            app.metrics.wire.handshake(Handshake::of(tls.get_ref().1));
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Some((tls, h2))
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer.conn.peer(), error = %e, "TLS handshake failed");
            refused(app, peer, ConnReject::HandshakeFailed, true);
            None
        }
        Err(_) => {
            refused(app, peer, ConnReject::HandshakeTimeout, true);
            None
        }
    }
}
