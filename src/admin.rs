//! The admin listener: `/metrics`, `/healthz`, `/bans`.
//!
//! With `--admin-token`, every request must carry `Authorization: Bearer
//! TOKEN` (401 otherwise); without one, the configuration checker refuses
//! any address but loopback.

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
use tokio::sync::watch;

use crate::config::Cidr;
use crate::pipeline::App;

/// Health needs an accepted upstream answer within this window (idle
/// upstreams are probed every 2 s, so a healthy one is never this quiet).
pub const HEALTH_WINDOW: Duration = Duration::from_secs(30);

pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&app, req)) }
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

fn authorized<B>(app: &App, req: &Request<B>) -> bool {
    let Some(token) = &app.cfg.admin_token else {
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
/// upstream is up (not 3 failures in a row), and one answered within
/// [`HEALTH_WINDOW`].
pub fn health(app: &App) -> Result<(), String> {
    let status = app.upstream.status();
    if !status.iter().any(|(_, up)| *up) {
        let names: Vec<String> = status.iter().map(|(a, _)| a.to_string()).collect();
        return Err(format!("every upstream is down: {}", names.join(", ")));
    }
    match app.upstream.since_last_answer() {
        Some(d) if d <= HEALTH_WINDOW => Ok(()),
        Some(d) => Err(format!("no upstream answered for {} s", d.as_secs())),
        None => Err("no upstream has answered yet".into()),
    }
}

fn route<B>(app: &App, req: Request<B>) -> Response<Full<Bytes>> {
    if !authorized(app, &req) {
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
            app.metrics.unique_clients.set(app.unique.estimate() as i64);
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
