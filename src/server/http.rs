//! HTTP/1.1 and HTTP/2 (over TLS, or plain with h2c) with hyper: the one
//! place that knows hyper. Requests go to [`App::doh`]; answers go out in
//! a body that counts whether the client took them.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioTimer;
use hyper_util::server::conn::auto;
use tokio_util::sync::CancellationToken;

use super::streams::{StreamExec, WithStreams};
use super::watchdog;
use crate::pipeline::{App, AppHandle, Peer};
use crate::reject::{Outcome, ProtocolError, Transport};

/// How long in-flight requests get to finish when a connection closes.
pub const DRAIN: Duration = Duration::from_secs(5);
/// HTTP/2 header list limit; HTTP/1.1 headers are limited to 16 KiB by the
/// pipeline, inside a 64 KiB read buffer so that a long target gets its 414.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
const H1_MAX_BUF: usize = 64 * 1024;
pub const H2_MAX_STREAMS: u32 = 100;

/// What a connection's HTTP layer needs to know.
pub struct HttpConn {
    pub app: Arc<App>,
    pub peer: Peer,
    /// ALPN's choice: `Some(true)` h2, `Some(false)` HTTP/1.1, `None` to
    /// detect (plain listeners: HTTP/1.1 or h2c with prior knowledge).
    pub h2: Option<bool>,
    pub tls: bool,
    pub first_request: Duration,
    pub idle: Duration,
    /// `--write-timeout`: answers left unread this long close the connection.
    pub write: Duration,
    /// Added to every response (Alt-Svc).
    pub extra_headers: Arc<http::HeaderMap>,
}

/// Serves HTTP on one connection until it ends, is closed by the
/// watchdog, or the server shuts down.
///
/// Not an `async fn`: the connection (which owns `io`) is built here and
/// moved into the future, so that the future an idle connection keeps holds
/// the TLS stream once, not once more as an argument beside it.
pub fn serve<I>(
    c: HttpConn,
    io: I,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let HttpConn {
        app,
        peer,
        h2,
        tls,
        first_request,
        idle,
        write,
        extra_headers,
    } = c;
    let shared = Arc::new(Shared {
        app,
        peer,
        extra: extra_headers,
    });
    let own = shared.clone();
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let transport = if req.version() == http::Version::HTTP_2 {
            Transport::H2
        } else {
            Transport::H1
        };
        // Decided here, before the task: the future hyper spawns holds
        // only what the answer still needs, never the request's head.
        let reply = App::doh(&shared, &shared.peer, transport, req);
        let shared = shared.clone();
        // A map, not an `async` block awaiting `reply`: that block would
        // keep the captured future and the one it awaits in two slots,
        // twice the bytes to write and move for every request.
        reply.map(move |reply| {
            if reply.close {
                shared.peer.conn.close();
            }
            let track = reply.answer.then_some(transport);
            let mut resp = reply.response.map(|b| AnswerBody::new(b, track, &shared));
            // hyper would add it, reading the precise clock for it.
            resp.headers_mut()
                .insert(http::header::DATE, crate::clock::http_date());
            for (k, v) in shared.extra.iter() {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
            Ok::<_, Infallible>(resp)
        })
    });
    // Boxed: pinning it inside the future would move it into a second
    // place there, and an idle connection would keep both. When ALPN
    // already chose HTTP/2, hyper's HTTP/2 connection alone: the automatic
    // one is an enum as large as its HTTP/1.1 side, which an idle HTTP/2
    // connection would carry for nothing.
    // HTTP/2 streams run in this task ([`super::streams`]).
    let exec = StreamExec::default();
    let conn: Pin<Box<dyn Served>> = match h2 {
        Some(true) => Box::pin(h2_builder(exec.clone()).serve_connection(io, svc)),
        Some(false) => Box::pin(
            auto_builder(first_request, exec.clone())
                .http1_only()
                .serve_connection(io, svc)
                .into_owned(),
        ),
        None => Box::pin(
            auto_builder(first_request, exec.clone())
                .serve_connection(io, svc)
                .into_owned(),
        ),
    };
    let mut conn = WithStreams::new(conn, exec);
    async move {
        let (app, peer) = (&own.app, &own.peer);
        let watch = watchdog::expired(&peer.conn, first_request, idle, write);
        tokio::pin!(watch);
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    if let Some(kind) = classify(&*e, tls) {
                        app.metrics.wire.protocol_error(kind);
                        app.guard.penalize(scored_client(peer), kind);
                        tracing::debug!(peer = %peer.conn.peer(), kind = kind.label(), error = %e, "protocol error");
                    }
                }
            }
            _ = shutdown.cancelled() => {
                conn.conn().as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, &mut conn).await;
            }
            _ = peer.conn.closing() => {
                conn.conn().as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DRAIN, &mut conn).await;
            }
            why = &mut watch => {
                // Nothing in flight, or answers nobody reads: close at once,
                // without waiting for a client that sends or takes nothing.
                watchdog::account(app, peer, why);
            }
        }
    }
}

/// What the requests of one connection share, behind one `Arc` of the
/// connection's own ([`AppHandle`]).
struct Shared {
    app: Arc<App>,
    peer: Peer,
    /// Added to every response (Alt-Svc).
    extra: Arc<http::HeaderMap>,
}

impl AppHandle for Arc<Shared> {
    fn app(&self) -> &Arc<App> {
        &self.app
    }
}

/// An HTTP connection being served: runs to its end, or is asked to
/// finish what is in flight and stop.
trait Served: Send {
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn graceful_shutdown(self: Pin<&mut Self>);
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl std::future::Future for dyn Served {
    type Output = Result<(), BoxError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_serve(cx)
    }
}

impl<I, S, B> Served for hyper::server::conn::http2::Connection<I, S, StreamExec>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    StreamExec: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        std::future::Future::poll(self, cx).map_err(|e| Box::new(e) as BoxError)
    }
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

impl<I, S, B> Served for auto::Connection<'static, I, S, StreamExec>
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    StreamExec: auto::HttpServerConnExec<S::Future, B>,
{
    fn poll_serve(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        std::future::Future::poll(self, cx)
    }
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::Connection::graceful_shutdown(self);
    }
}

/// The HTTP/2 settings of every listener, for hyper's HTTP/2 builder and
/// the automatic one's HTTP/2 side alike (two types, the same methods).
macro_rules! http2_settings {
    ($b:expr) => {
        $b.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_pending_accept_reset_streams(Some(32))
            .max_local_error_reset_streams(Some(64))
            .max_send_buf_size(64 * 1024)
    };
}

/// HTTP/2 alone, once ALPN chose it.
fn h2_builder(exec: StreamExec) -> hyper::server::conn::http2::Builder<StreamExec> {
    let mut b = hyper::server::conn::http2::Builder::new(exec);
    http2_settings!(b);
    b
}

/// HTTP/1.1, and HTTP/2 where the first bytes say so (h2c, or TLS without
/// ALPN), with the same settings.
fn auto_builder(first_request: Duration, exec: StreamExec) -> auto::Builder<StreamExec> {
    let mut builder = auto::Builder::new(exec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(first_request)
        .max_buf_size(H1_MAX_BUF)
        .keep_alive(true);
    http2_settings!(builder.http2());
    builder
}

/// Who a connection-level offence is scored against: the client a PROXY
/// header named, else the peer.
pub fn scored_client(peer: &Peer) -> IpAddr {
    match peer.proxied {
        Some(Some(ip)) => ip,
        Some(None) => crate::net::UNKNOWN_CLIENT,
        None => peer.conn.peer(),
    }
}

/// Which protocol error, if any, ended a connection.
fn classify(err: &(dyn StdError + 'static), tls: bool) -> Option<ProtocolError> {
    let mut e: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(x) = e {
        if let Some(h) = x.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_too_large() || h.is_parse_version_h2() {
                return Some(ProtocolError::H1Parse);
            }
        }
        if let Some(h2e) = x.downcast_ref::<h2::Error>() {
            if !h2e.is_remote() && !h2e.is_io() {
                return match h2e.reason() {
                    Some(h2::Reason::ENHANCE_YOUR_CALM) => Some(ProtocolError::H2Calm),
                    Some(h2::Reason::NO_ERROR) | None => None,
                    Some(_) => Some(ProtocolError::H2Protocol),
                };
            }
        }
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            if tls && io.kind() == std::io::ErrorKind::InvalidData {
                return Some(ProtocolError::TlsAlert);
            }
        }
        e = x.source();
    }
    None
}

/// A response body of at most one chunk that, for a DNS answer, counts the
/// request `answered` once the answer is written out, or `undelivered` if
/// it is dropped first (the client never opened its flow-control window,
/// or went away). Until then the connection has an unread answer
/// ([`crate::guard::Unread`]): the watchdog closes it when the client
/// leaves answers unread for `--write-timeout`.
///
/// The body ends with its chunk, so that HTTP/2 sends one DATA frame with
/// END_STREAM. Over HTTP/2 hyper takes the chunk before it has send
/// capacity for it, so taking the chunk proves nothing: the chunk itself
/// ([`Answer`]) reports delivery when its last byte is consumed into the
/// connection's write buffer.
pub struct AnswerBody {
    data: Option<Answer>,
}

impl AnswerBody {
    fn new(data: Bytes, track: Option<Transport>, shared: &Arc<Shared>) -> AnswerBody {
        let unread = (!data.is_empty()).then(|| shared.peer.conn.queued());
        let mut answer = Answer {
            data,
            track: track.map(|t| (shared.clone(), t)),
            unread,
        };
        if answer.data.is_empty() {
            answer.delivered();
            return AnswerBody { data: None };
        }
        AnswerBody { data: Some(answer) }
    }
}

impl http_body::Body for AnswerBody {
    type Data = Answer;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Answer>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.data.len() as u64))
    }
}

/// The bytes of one answer, counted `answered` when the last of them is
/// consumed and `undelivered` when dropped before.
pub struct Answer {
    data: Bytes,
    track: Option<(Arc<Shared>, Transport)>,
    unread: Option<crate::guard::Unread>,
}

impl Answer {
    fn delivered(&mut self) {
        self.unread = None;
        if let Some((s, t)) = self.track.take() {
            s.app.metrics.requests.count(Outcome::Answered, t, false);
        }
    }
}

impl Buf for Answer {
    fn remaining(&self) -> usize {
        self.data.len()
    }

    fn chunk(&self) -> &[u8] {
        &self.data
    }

    fn advance(&mut self, cnt: usize) {
        self.data.advance(cnt.min(self.data.len()));
        if self.data.is_empty() {
            self.delivered();
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some((s, t)) = self.track.take() {
            s.app.metrics.requests.count(Outcome::Undelivered, t, false);
        }
    }
}
