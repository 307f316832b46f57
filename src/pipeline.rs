//! One request, start to finish, cheapest check first:
//! ban → DoH request validation → client budget → DNS validation → cache →
//! coalescing → upstream budget → upstream.
//!
//! Every refusal goes through [`App::refuse`], which counts it, adds it to
//! the client's penalty score and builds the response its [`Reject`] maps to.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Notify;

use crate::cache::{Cache, Entry, Inflight, Lookup, TtlPolicy, STALE_TTL};
use crate::config::Config;
use crate::dns::{self, Key};
use crate::doh::{self, Limits, Wanted};
use crate::guard::{Budget, Guard};
use crate::hll::UniqueClients;
use crate::metrics::Metrics;
use crate::reject::{Outcome, Reject};
use crate::upstream::{Upstream, UpstreamError};

/// How long a request that found an expired entry waits for its refresh
/// before it gets the stale answer (RFC 8767 suggests 1.8 s).
const CLIENT_TIMER: Duration = Duration::from_millis(1800);

/// How often a popular entry may be prefetched.
const PREFETCH_EVERY: Duration = Duration::from_secs(5);

/// What a coalesced resolution hands to every waiter.
#[derive(Clone)]
pub enum Resolution {
    Answer(Arc<Entry>),
    /// The upstream budget is spent.
    Budget,
}

/// Everything a request needs, shared by all connections.
pub struct App {
    pub cfg: Config,
    pub limits: Limits,
    pub guard: Arc<Guard>,
    pub cache: Cache,
    pub inflight: Inflight<Resolution>,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub unique: UniqueClients,
}

/// What the pipeline knows of the connection a request came on.
pub struct ConnInfo {
    pub peer: IpAddr,
    /// The client named by a PROXY protocol header, if any.
    pub proxied: Option<IpAddr>,
    pub requests: AtomicU64,
    pub inflight: AtomicUsize,
    /// Asks the connection to close gracefully (GOAWAY / `Connection: close`).
    pub close: Notify,
}

impl ConnInfo {
    pub fn new(peer: IpAddr, proxied: Option<IpAddr>) -> ConnInfo {
        ConnInfo {
            peer,
            proxied,
            requests: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            close: Notify::new(),
        }
    }
}

struct InflightGuard<'a>(&'a AtomicUsize);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type Body = Full<Bytes>;

impl App {
    pub fn new(cfg: Config, upstreams: &[std::net::SocketAddr]) -> App {
        let metrics = Arc::new(Metrics::new(&Upstream::labels(upstreams)));
        let policy = TtlPolicy {
            min_ttl: cfg.min_ttl,
            max_ttl: cfg.max_ttl,
            err_ttl: cfg.err_ttl,
            stale_secs: cfg.stale_secs,
        };
        App {
            limits: Limits {
                path: cfg.path.clone(),
                max_uri: cfg.max_uri,
                max_body: cfg.max_body,
                body_timeout: Duration::from_secs(cfg.handshake_timeout),
            },
            guard: Arc::new(Guard::new(&cfg, metrics.clone())),
            cache: Cache::new(cfg.cache_size, policy),
            inflight: Inflight::default(),
            upstream: Upstream::new(
                upstreams,
                cfg.upstream_timeout(),
                cfg.upstream_qps,
                metrics.clone(),
            ),
            metrics,
            unique: UniqueClients::default(),
            cfg,
        }
    }

    /// Counts a refusal, scores it against the client, and builds its response.
    fn refuse(&self, client: IpAddr, reason: Reject, retry_after: Option<u64>) -> Response<Body> {
        self.metrics.request(reason.outcome(), false);
        self.metrics.reject(reason, false);
        self.guard.penalize(client, reason);
        if self.cfg.verbose > 0 {
            tracing::info!(client = %client, status = reason.status().as_u16(), reason = reason.label(), "refused");
        }
        refusal(reason, retry_after)
    }

    /// Finds or fetches the answer for `key`.
    async fn answer(self: &Arc<Self>, key: &Key) -> Result<Arc<Entry>, Reject> {
        match self.cache.lookup(key) {
            Lookup::Fresh(e) => {
                self.metrics.cache_hits.inc();
                if e.wants_prefetch() && e.claim_refresh(PREFETCH_EVERY) {
                    let app = self.clone();
                    let key = key.clone();
                    tokio::spawn(async move { app.resolve(&key).await });
                }
                Ok(e)
            }
            Lookup::Stale(e) => {
                // One request per STALE_TTL starts a refresh in the
                // background and waits for it at most CLIENT_TIMER (RFC
                // 8767's client response timer); everybody else, and that
                // one too if the refresh fails or is slow, gets the stale
                // answer at once.
                if e.claim_refresh(Duration::from_secs(STALE_TTL.into())) {
                    let app = self.clone();
                    let k = key.clone();
                    let refresh = tokio::spawn(async move { app.resolve(&k).await });
                    let timer = CLIENT_TIMER.min(self.cfg.upstream_timeout());
                    if let Ok(Ok(Resolution::Answer(new))) =
                        tokio::time::timeout(timer, refresh).await
                    {
                        if !new.is_error() {
                            self.metrics.cache_misses.inc();
                            return Ok(new);
                        }
                    }
                }
                self.metrics.cache_stale.inc();
                Ok(e)
            }
            Lookup::Miss => {
                self.metrics.cache_misses.inc();
                // Boxed: the upstream path is large and rare next to hits,
                // and the request future is moved whole on every spawn.
                match Box::pin(self.resolve(key)).await {
                    Resolution::Answer(e) => Ok(e),
                    Resolution::Budget => Err(Reject::UpstreamBudget),
                }
            }
        }
    }

    /// Asks the upstream, once for any number of concurrent callers, and
    /// caches the result (a failure as a short-lived SERVFAIL).
    pub async fn resolve(&self, key: &Key) -> Resolution {
        let (res, ran) = self
            .inflight
            .run(key, || async {
                let policy = self.cache.policy();
                let entry = match self.upstream.resolve(key).await {
                    Ok((wire, info)) => Entry::from_answer(wire, &info, policy),
                    Err(UpstreamError::Budget) => return Resolution::Budget,
                    Err(UpstreamError::Failed) => Entry::failure(key, policy),
                };
                let entry = Arc::new(entry);
                self.cache.store(key.clone(), entry.clone());
                Resolution::Answer(entry)
            })
            .await;
        if !ran {
            self.metrics.coalesced.inc();
        }
        res
    }
}

/// The response to a refused request: the status its reason maps to, no
/// body (on HTTP/2 a single HEADERS frame), `Allow` for 405 and
/// `Retry-After` for 429 and 503.
fn refusal(reason: Reject, retry_after: Option<u64>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = reason.status();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if reason == Reject::Method {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    }
    if let Some(secs) = retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

fn dns_response(wire: Vec<u8>, max_age: u32) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(wire)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(doh::DNS_MESSAGE),
    );
    let cc = format!("max-age={max_age}");
    if let Ok(v) = HeaderValue::from_str(&cc) {
        h.insert(header::CACHE_CONTROL, v);
    }
    resp
}

/// The hyper service: one request in, one response out, never an error.
pub async fn handle<B>(
    app: Arc<App>,
    conn: Arc<ConnInfo>,
    req: Request<B>,
) -> Result<Response<Body>, Infallible>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    conn.inflight.fetch_add(1, Ordering::Relaxed);
    let _inflight = InflightGuard(&conn.inflight);
    let n = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let version = req.version();
    let head = req.method() == http::Method::HEAD;
    let mut resp = process(&app, &conn, req).await;
    if head {
        // A response to HEAD carries no body (HTTP/2 peers reset the stream otherwise).
        *resp.body_mut() = Full::new(Bytes::new());
    }
    // A banned client loses its connection too, unless the connection is a
    // trusted proxy's that carries other clients' requests.
    let banned = resp.status() == StatusCode::FORBIDDEN
        && (conn.proxied.is_some() || !app.guard.is_trusted_proxy(conn.peer));
    if n >= app.cfg.max_requests_per_conn || banned {
        if version != http::Version::HTTP_2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        conn.close.notify_one();
    }
    Ok(resp)
}

async fn process<B>(app: &Arc<App>, conn: &ConnInfo, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    let client = conn
        .proxied
        .unwrap_or_else(|| app.guard.client_of(conn.peer, &parts.headers));
    app.unique.insert(&client);

    if app.guard.refuse_banned(client) {
        return refusal(Reject::Banned, None);
    }

    let bytes = match doh::check_head(&parts, &app.limits) {
        Ok(Wanted::Get(v)) => Bytes::from(v),
        Ok(Wanted::Post) => match Box::pin(doh::read_body(body, &app.limits)).await {
            Ok(b) => b,
            Err(r) => return app.refuse(client, r, None),
        },
        Err(r) => return app.refuse(client, r, None),
    };

    if let Budget::Over(secs) = app.guard.check_budget(client) {
        return app.refuse(client, Reject::RateLimited, Some(secs));
    }

    let query = match dns::parse_query(&bytes) {
        Ok(q) => q,
        Err(e) => return app.refuse(client, Reject::Dns(e), None),
    };

    match app.answer(&query.key).await {
        Ok(entry) => {
            let (wire, max_age) = entry.serve(query.id, query.question, app.cache.policy());
            app.metrics.request(Outcome::Answered, false);
            if app.cfg.verbose > 0 {
                tracing::info!(
                    client = %client,
                    name = %query.key.name(),
                    qtype = query.key.qtype(),
                    rcode = entry.rcode(),
                    max_age,
                    "answered"
                );
            }
            dns_response(wire, max_age)
        }
        Err(r) => app.refuse(client, r, Some(1)),
    }
}
