//! The HTTP side of a DoH request: its head checked and its budget spent
//! at once, then a GET's query or a POST's body (plain or sealed), and the
//! response each outcome gets.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};

use super::{App, Peer, HEALTH_PATH};
use crate::doh::{self, Limits, Wanted};
use crate::guard::{Conn, InFlight};
use crate::metrics::OdohResult;
use crate::reject::{Reject, Transport};

/// A DoH answer for the transport to write out.
pub struct Reply {
    pub response: Response<Bytes>,
    /// A DNS answer (counted `answered` once delivered, `undelivered` if the
    /// client never takes it), as opposed to a refusal (already counted).
    pub answer: bool,
    /// Close the connection after this response (gracefully).
    pub close: bool,
}

/// What a request's future holds the app by: the app itself, or whatever
/// one connection keeps it in for all its requests. A request then clones
/// the connection's own counter, which only that connection's thread
/// writes, and not the app's, which every worker thread writes for every
/// request (a counter written from two cores moves between their caches
/// at each write).
pub trait AppHandle: Clone + Send + Sync + 'static {
    fn app(&self) -> &Arc<App>;
}

impl AppHandle for Arc<App> {
    fn app(&self) -> &Arc<App> {
        self
    }
}

impl App {
    /// `GET /healthz` from a trusted proxy itself: 200 or 503 with why,
    /// never limited nor counted as a client's request.
    fn health_reply(&self) -> Reply {
        let (status, text) = match self.health() {
            Ok(()) => (StatusCode::OK, "ok\n".to_string()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        };
        let mut response = Response::new(Bytes::from(text));
        *response.status_mut() = status;
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Reply {
            response,
            answer: false,
            close: false,
        }
    }

    /// Opens a sealed Oblivious DoH query.
    fn open(&self, body: &[u8]) -> Result<crate::odoh::Opened, Reject> {
        let Some(odoh) = &self.odoh else {
            return Err(Reject::MediaType);
        };
        odoh.open(body).map_err(|e| match e {
            crate::odoh::OpenError::UnknownKey => {
                self.metrics.requests.odoh(OdohResult::UnknownKey);
                Reject::OdohUnknownKey
            }
            crate::odoh::OpenError::Malformed => {
                self.metrics.requests.odoh(OdohResult::Malformed);
                Reject::OdohMalformed
            }
        })
    }

    /// `GET /.well-known/odohconfigs`: cacheable for the key's remaining life.
    fn odoh_configs(&self) -> Reply {
        let Some(odoh) = &self.odoh else {
            return Reply {
                response: refusal(Reject::NotFound, None),
                answer: false,
                close: false,
            };
        };
        self.metrics.requests.odoh(OdohResult::Configs);
        let (configs, max_age) = odoh.configs();
        let mut resp = Response::new(configs);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("max-age={max_age}")) {
            h.insert(header::CACHE_CONTROL, v);
        }
        Reply {
            response: resp,
            answer: false,
            close: false,
        }
    }

    /// One DoH request: HTTP validation and the budget at once, from the
    /// request's head; then, in the returned future, the body of a POST
    /// and the DNS message. The future holds none of the request's
    /// headers: it is what hyper moves into the task of every HTTP/2
    /// stream, so its size is paid on every request.
    pub fn doh<B, H: AppHandle>(
        handle: &H,
        peer: &Peer,
        transport: Transport,
        req: Request<B>,
    ) -> impl Future<Output = Reply>
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let this = handle.app();
        let (n, inflight) = peer.conn.begin();
        let head_only = req.method() == http::Method::HEAD;
        let from = Origin::of(peer);
        let front = this.front(peer, from, transport, req);
        let close_after = n >= this.conn.load().max_requests_per_conn;
        let handle = handle.clone();
        async move {
            let app = handle.app();
            let mut reply = match front {
                Front::Done(reply) => reply,
                Front::Linger(reply, body, within) => {
                    Box::pin(doh::discard(body, doh::LINGER_BYTES, within)).await;
                    reply
                }
                Front::Query(client, bytes) => {
                    let asker = Asker::new(from, client, transport, &inflight);
                    app.plain(asker, &bytes).await
                }
                Front::Body(client, body, limits, oblivious) => {
                    let asker = Asker::new(from, client, transport, &inflight);
                    Box::pin(app.posted(asker, body, limits, oblivious)).await
                }
            };
            if head_only {
                // A response to HEAD carries no body.
                *reply.response.body_mut() = Bytes::new();
            }
            reply.close |= close_after;
            if reply.close && transport == Transport::H1 {
                reply
                    .response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            reply
        }
    }

    /// What the head of a request decides: a refusal (or the ODoH
    /// configurations), a GET's query, or a body still to read.
    fn front<B: http_body::Body>(
        self: &Arc<Self>,
        peer: &Peer,
        from: Origin,
        transport: Transport,
        req: Request<B>,
    ) -> Front<B> {
        let (parts, body) = req.into_parts();
        if parts.uri.path() == HEALTH_PATH
            && parts.method == http::Method::GET
            && peer.proxied.is_none()
            && self.guard.is_own_probe(peer.conn.peer(), &parts.headers)
        {
            return Front::Done(self.health_reply());
        }
        let client = self.client_of(peer, &parts.headers);
        let limits = self.limits.load();
        let head = doh::check_head(&parts, &limits);
        // A named relay's sealed queries spend the relay's budget;
        // everything else, sealed queries from anybody else included, the
        // client's own. Either way before any HPKE work.
        let oblivious = matches!(head, Ok(Wanted::Oblivious));
        let relayed = oblivious && self.guard.is_odoh_relay(client);
        if let Err((reason, retry)) = self.admit(client, Some(&peer.conn), transport, relayed) {
            let reply = self.refused(from, reason, retry);
            return early(reply, reason, body, transport, &limits);
        }
        match head {
            Ok(Wanted::Get(v)) => Front::Query(client, Bytes::from(v)),
            Ok(Wanted::Post | Wanted::Oblivious) => {
                Front::Body(client, body, arc_swap::Guard::into_inner(limits), oblivious)
            }
            Ok(Wanted::OdohConfigs) => Front::Done(self.odoh_configs()),
            Err(r) => {
                self.refuse(client, r, transport);
                let reply = self.refused(from, r, None);
                early(reply, r, body, transport, &limits)
            }
        }
    }

    /// The reply to a refused request. A banned client loses its
    /// connection too, unless the connection is a trusted proxy's carrying
    /// other clients.
    fn refused(&self, from: Origin, reason: Reject, retry_after: Option<u64>) -> Reply {
        let close = reason.closes() && (from.proxied || !self.guard.is_trusted_proxy(from.peer));
        Reply {
            response: refusal(reason, retry_after),
            answer: false,
            close,
        }
    }

    /// A POST: its body, then a plain or an oblivious query.
    async fn posted<B>(
        self: &Arc<Self>,
        asker: Asker<'_>,
        body: B,
        limits: Arc<Limits>,
        oblivious: bool,
    ) -> Reply
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let Asker {
            from,
            client,
            transport,
            ..
        } = asker;
        let linger = matches!(transport, Transport::H1 | Transport::H2);
        let bytes = match doh::read_body(body, &limits, linger).await {
            Ok(b) => b,
            Err(r) => {
                self.refuse(client, r, transport);
                return self.refused(from, r, None);
            }
        };
        if !oblivious {
            return self.plain(asker, &bytes).await;
        }
        let opened = match self.open(&bytes) {
            Ok(opened) => opened,
            Err(r) => {
                self.refuse(client, r, transport);
                return self.refused(from, r, None);
            }
        };
        match self.answer_message(client, None, &opened.query()).await {
            Ok(served) => match self.odoh.as_ref().map(|o| o.seal(&opened, &served.wire)) {
                Some(Ok(sealed)) => {
                    self.metrics.requests.odoh(OdohResult::Ok);
                    Reply {
                        response: sealed_response(sealed),
                        answer: true,
                        close: false,
                    }
                }
                _ => {
                    self.metrics.requests.odoh(OdohResult::Rejected);
                    self.refuse(client, Reject::OdohMalformed, transport);
                    self.refused(from, Reject::OdohMalformed, None)
                }
            },
            Err(r) => {
                self.metrics.requests.odoh(OdohResult::Rejected);
                self.refuse(client, r, transport);
                self.refused(from, r, None)
            }
        }
    }

    /// A DNS query in the clear, to its DoH reply.
    async fn plain(self: &Arc<Self>, asker: Asker<'_>, bytes: &[u8]) -> Reply {
        let Asker {
            from,
            client,
            transport,
            conn,
        } = asker;
        match self.answer_message(client, Some(conn), bytes).await {
            Ok(served) => Reply {
                response: dns_response(served.wire, served.max_age),
                answer: true,
                close: false,
            },
            Err(r) => {
                self.refuse(client, r, transport);
                self.refused(from, r, None)
            }
        }
    }
}

/// A refusal decided on a request's head, and whether it waits for the
/// request's body (read and thrown away, at most
/// [`doh::LINGER_BYTES`], within the returned time) before it goes out:
///
/// - over HTTP/1.1, a body too large (see [`doh::read_body`]);
/// - over HTTP/2, any refusal of a request whose body is still to come,
///   unless the connection closes anyway. A response that ends a stream
///   before the request did is followed by RST_STREAM(NO_ERROR) (RFC 9113,
///   8.1), legal but taken by some clients (curl 7.88) for a failed
///   transfer, so that they never see the refusal. The body is what an
///   accepted POST may send, in the time it is given
///   (`--handshake-timeout`): a refused client holds its stream no longer
///   than an accepted one, and the cap on streams per connection and the
///   connection caps bound them all.
fn early<B: http_body::Body>(
    reply: Reply,
    reason: Reject,
    body: B,
    transport: Transport,
    limits: &Limits,
) -> Front<B> {
    match transport {
        Transport::H1 if reason.lingers() => Front::Linger(reply, body, doh::LINGER_TIME),
        Transport::H2 if !reply.close && !body.is_end_stream() => {
            Front::Linger(reply, body, limits.body_timeout)
        }
        _ => Front::Done(reply),
    }
}

/// What [`App::front`] decided from a request's head.
enum Front<B> {
    Done(Reply),
    /// A refusal sent once the request's body was read (and thrown away)
    /// for as long as [`early`] says.
    Linger(Reply, B, std::time::Duration),
    Query(IpAddr, Bytes),
    /// The client, the body to read, the limits it is read under, and
    /// whether it is a sealed (Oblivious DoH) query.
    Body(IpAddr, B, Arc<Limits>, bool),
}

/// The connection a request came on, as much as a refusal needs.
#[derive(Clone, Copy)]
struct Origin {
    peer: IpAddr,
    /// A PROXY header named the client.
    proxied: bool,
}

/// Who asks a query that got past the request's head: where it came
/// from, the client it is counted for, over what, and on which
/// connection.
#[derive(Clone, Copy)]
struct Asker<'a> {
    from: Origin,
    client: IpAddr,
    transport: Transport,
    conn: &'a Conn,
}

impl<'a> Asker<'a> {
    fn new(from: Origin, client: IpAddr, transport: Transport, on: &'a InFlight) -> Self {
        Asker {
            from,
            client,
            transport,
            conn: on.conn(),
        }
    }
}

impl Origin {
    fn of(peer: &Peer) -> Origin {
        Origin {
            peer: peer.conn.peer(),
            proxied: peer.proxied.is_some(),
        }
    }
}

/// The response to a refused request, from its reason's row: the status,
/// no body (on HTTP/2 a single HEADERS frame), `Allow` and `Retry-After`
/// where the row names them (`retry_after`, the budget's own wait, in
/// place of the row's).
pub fn refusal(reason: Reject, retry_after: Option<u64>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(allow) = reason.allow() {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(secs) = retry_after.or(reason.retry_after()) {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// A sealed Oblivious DoH answer: never cached by anyone on the way.
fn sealed_response(sealed: Vec<u8>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(sealed));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::odoh::MEDIA_TYPE),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn dns_response(wire: Vec<u8>, max_age: u32) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(wire));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(doh::DNS_MESSAGE),
    );
    h.insert(header::CACHE_CONTROL, max_age_value(max_age));
    resp
}

/// `max-age=N`, written on the stack and copied once into the value
/// (`format!` would allocate a string first and go through `fmt`).
fn max_age_value(max_age: u32) -> HeaderValue {
    const PREFIX: &[u8] = b"max-age=";
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(max_age).as_bytes();
    let mut buf = [0u8; PREFIX.len() + 10];
    let len = PREFIX.len() + digits.len();
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    buf[PREFIX.len()..len].copy_from_slice(digits);
    HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("max-age=0"))
}

#[cfg(test)]
mod tests {
    use super::max_age_value;

    #[test]
    fn max_age_is_written_whole_at_every_width() {
        for (n, want) in [
            (0, "max-age=0"),
            (9, "max-age=9"),
            (1800, "max-age=1800"),
            (u32::MAX, "max-age=4294967295"),
        ] {
            assert_eq!(max_age_value(n), want);
        }
    }
}
