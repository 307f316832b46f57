//! The admin listener: `/metrics`, `/healthz`, `/bans`.
//!
//! With `--admin-token`, every request must carry `Authorization: Bearer
//! TOKEN` (401 otherwise); without one, the configuration checker refuses
//! any address but loopback. The listener serves a few connections at a
//! time ([`AdminSettings::max_conns`]); more are closed at accept, so it
//! cannot take the descriptors the DoH listeners need.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::net::Cidr;
use crate::pipeline::App;

/// Health needs an answered probe within this window (upstreams are
/// probed every 2 s, so a healthy one is never this quiet).
pub const HEALTH_WINDOW: Duration = Duration::from_secs(30);

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
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_conns.max(1)));
    let token: Arc<Option<String>> = Arc::new(settings.token);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let app = app.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let app = app.clone();
                let token = token.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&app, token.as_deref(), req)) }
            });
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), svc),
            )
            .await;
        });
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

/// Health: the listeners are up (this runs beside them), at least one
/// upstream is up by the proxy's own probes (not 3 failed probes in a
/// row), and one answered a probe within [`HEALTH_WINDOW`]. Client
/// queries play no part: clients asking dead names cannot mark an
/// upstream down.
pub fn health(app: &App) -> Result<(), String> {
    let upstream = app.upstream.load();
    let status = upstream.status();
    if !status.iter().any(|(_, up)| *up) {
        let names: Vec<String> = status.iter().map(|(a, _)| a.to_string()).collect();
        return Err(format!("every upstream is down: {}", names.join(", ")));
    }
    match upstream.since_last_probe() {
        Some(d) if d <= HEALTH_WINDOW => Ok(()),
        Some(d) => Err(format!(
            "no upstream answered a probe for {} s",
            d.as_secs()
        )),
        None => Err("no upstream has answered a probe yet".into()),
    }
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
            app.metrics.cache_entries.set(app.cache.len() as i64);
            app.metrics.cache_bytes.set(app.cache.bytes() as i64);
            let local = app.unique.estimate();
            app.metrics.unique_clients_local.set(local as i64);
            let fleet = app.fleet.as_ref().and_then(|f| f.unique_clients());
            app.metrics
                .unique_clients
                .set(fleet.unwrap_or(local) as i64);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                app.metrics.encode(),
            )
        }
        (&Method::GET, "/healthz") => match health(app) {
            Ok(()) => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
        },
        (&Method::GET, "/bans") => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&app.guard.bans()).unwrap_or_else(|_| "[]".into()),
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
        (_, "/metrics" | "/healthz" | "/bans") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
