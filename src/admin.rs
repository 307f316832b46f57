//! The admin listener: `/metrics`, `/healthz`, `/bans`.
//!
//! With `--admin-token`, every request must carry `Authorization: Bearer
//! TOKEN` (401 otherwise); without one, the configuration checker refuses
//! any address but loopback, reads stay open there, and requests that
//! change state (`DELETE /bans/…`) are refused with 403: any local process
//! can read metrics, none can lift a ban without the token.
//!
//! One local process must not be able to starve `/healthz` (a load
//! balancer would pull a healthy node). So the listener serves a few
//! connections at a time ([`AdminSettings::max_conns`], so it cannot take
//! the descriptors the DoH listeners need), at most [`PER_ADDRESS`] per
//! address; a connection must send its request head within
//! [`HEADER_DEADLINE`] and lives at most [`LIFETIME`]; and when every
//! place is taken, a new connection closes the one held the longest
//! instead of being refused: a probe takes milliseconds, a hoarder loses
//! its oldest connection to every newcomer.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::Cidr;
use crate::pipeline::App;

/// Admin connections per client address at most.
pub const PER_ADDRESS: usize = 4;
/// Time for a request head, on a new connection and between requests.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(2);
/// Longest an admin connection stays open.
pub const LIFETIME: Duration = Duration::from_secs(10);

/// What the admin listener runs with.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: Option<String>,
    /// Connections served at once; more are closed at accept.
    pub max_conns: usize,
}

pub async fn serve(
    app: Arc<App>,
    settings: AdminSettings,
    listener: TcpListener,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let places = Arc::new(Places::new(settings.max_conns.max(1)));
    let token: Arc<Option<String>> = Arc::new(settings.token);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(place) = places.take(peer.ip()) else {
            continue;
        };
        let app = app.clone();
        let token = token.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                let token = token.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&app, token.as_deref(), req)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = tokio::time::timeout(LIFETIME, conn) => {}
                _ = place.closed.cancelled() => {}
            }
            drop(place);
        });
    }
}

/// The admin listener's places: at most `max` connections, at most
/// [`PER_ADDRESS`] from one address, the oldest closed to make room.
struct Places {
    max: usize,
    /// The last id given, and each open connection, oldest first.
    open: Mutex<(u64, VecDeque<Held>)>,
}

/// An open admin connection: its id, its address, how to close it.
type Held = (u64, IpAddr, CancellationToken);

/// One admin connection's place; given back when dropped.
struct Place {
    places: Arc<Places>,
    id: u64,
    closed: CancellationToken,
}

impl Places {
    fn new(max: usize) -> Places {
        Places {
            max,
            open: Mutex::default(),
        }
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Place> {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (next, open) = &mut *g;
        if open.iter().filter(|(_, a, _)| *a == ip).count() >= PER_ADDRESS {
            return None;
        }
        if open.len() >= self.max {
            if let Some((_, _, oldest)) = open.pop_front() {
                oldest.cancel();
            }
        }
        *next += 1;
        let closed = CancellationToken::new();
        open.push_back((*next, ip, closed.clone()));
        Some(Place {
            places: self.clone(),
            id: *next,
            closed,
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut g = self.places.open.lock().unwrap_or_else(|p| p.into_inner());
        g.1.retain(|(id, _, _)| *id != self.id);
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn authorized<B>(token: Option<&str>, req: &Request<B>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Constant-time comparison: the token is a secret.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Bans listed by default, and at most, per `GET /bans`.
pub const BANS_PAGE: usize = 10_000;

/// `GET /bans?limit=N&after=TARGET`: at most `limit` bans (default and
/// cap [`BANS_PAGE`]), soonest to expire first, after the ban on `after`
/// (the last `target` of the previous page). When more remain, a `Link`
/// header gives the next page. 410 when `after` is no longer banned.
/// `GET /known/ADDR`: whether the client at ADDR is known, as JSON
/// (`remembered` false once it is forgotten or was never answered).
fn known(app: &App, raw: &str) -> Response<Full<Bytes>> {
    let raw = raw.replace("%3A", ":").replace("%3a", ":");
    let Ok(ip) = raw.parse::<std::net::IpAddr>() else {
        return reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!(
                "`{}` is not an address\n",
                raw.chars().take(64).collect::<String>()
            ),
        );
    };
    let ip = crate::net::canonical(ip);
    let body = match app.guard.known().lookup(ip, crate::clock::unix_now()) {
        Some(r) => serde_json::json!({
            "address": ip.to_string(),
            "known": r.known,
            "remembered": true,
            "first_answered": (r.first > 0).then_some(r.first),
            "last_seen": r.last,
        }),
        None => serde_json::json!({
            "address": ip.to_string(),
            "known": false,
            "remembered": false,
        }),
    };
    reply(StatusCode::OK, "application/json", format!("{body}\n"))
}

fn bans_page(app: &App, query: &str) -> Response<Full<Bytes>> {
    let mut limit = BANS_PAGE;
    let mut after = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = v
            .replace("%2F", "/")
            .replace("%2f", "/")
            .replace("%3A", ":")
            .replace("%3a", ":");
        match k {
            "limit" => match v.parse::<usize>() {
                Ok(n) if n > 0 => limit = n.min(BANS_PAGE),
                _ => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("limit `{v}` is not a positive number\n"),
                    )
                }
            },
            "after" => match crate::guard::bans::parse_target(&v) {
                Some(net) => after = Some(net),
                None => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        format!("after `{v}` is not a ban's target\n"),
                    )
                }
            },
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    format!("unknown parameter `{k}`\n"),
                )
            }
        }
    }
    // One more than asked, to know whether a next page exists.
    let Some(mut page) = app.guard.bans_page(after.as_ref(), limit.saturating_add(1)) else {
        return reply(
            StatusCode::GONE,
            "text/plain",
            "no ban on `after` any more: start again without it\n".into(),
        );
    };
    let more = page.len() > limit;
    page.truncate(limit);
    let mut r = reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&page).unwrap_or_else(|_| "[]".into()),
    );
    if let (true, Some(last)) = (more, page.last()) {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "</bans?limit={limit}&after={}>; rel=\"next\"",
            last.target
        )) {
            r.headers_mut().insert(header::LINK, v);
        }
    }
    r
}

fn route<B>(app: &App, token: Option<&str>, req: Request<B>) -> Response<Full<Bytes>> {
    if !authorized(token, &req) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "unauthorized\n".into(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"doh-proxy\""),
        );
        return r;
    }
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            // Scrapes are rare: let moka settle so the count is exact.
            app.cache.sync();
            app.metrics.cache.entries.set(app.cache.len() as i64);
            app.metrics.cache.bytes.set(app.cache.bytes() as i64);
            let local = app.unique.estimate();
            app.metrics.requests.unique_clients_local.set(local as i64);
            let fleet = app.fleet.as_ref().and_then(|f| f.unique_clients());
            app.metrics
                .requests
                .unique_clients
                .set(fleet.unwrap_or(local) as i64);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                app.metrics.encode(),
            )
        }
        (&Method::GET, "/healthz") => match app.health() {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&Method::GET, "/bans") => bans_page(app, req.uri().query().unwrap_or("")),
        (&Method::DELETE, p) if p.starts_with("/bans/") && token.is_none() => reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "changing state needs --admin-token\n".into(),
        ),
        (&Method::DELETE, p) if p.starts_with("/bans/") => {
            // Accept `1.2.3.4`, `1.2.3.0/24`, or the slash percent-encoded.
            let raw = p["/bans/".len()..].replace("%2F", "/").replace("%2f", "/");
            match raw.parse::<Cidr>() {
                Ok(Cidr(net)) => {
                    let net: IpNet = net;
                    if app.guard.unban(net) {
                        reply(StatusCode::OK, "text/plain", format!("lifted {net}\n"))
                    } else {
                        reply(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            format!("no ban on {net}\n"),
                        )
                    }
                }
                Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
            }
        }
        (&Method::GET, p) if p.starts_with("/known/") => known(app, &p["/known/".len()..]),
        (_, p) if p.starts_with("/known/") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        (_, "/metrics" | "/healthz" | "/bans") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
