//! One request, start to finish, whatever the transport, cheapest check
//! first: ban → DoH request validation → client budget → DNS validation →
//! cache → coalescing → upstream budget → upstream.
//!
//! A transport hands over a transport-neutral request — an [`http::Request`]
//! whose body implements `http_body::Body` for DoH, the bytes of one DNS
//! message for DNS over TLS — with the [`Peer`] it came from, and gets back
//! a transport-neutral answer to write out. Every refusal goes through
//! [`App::refuse`], which counts it, scores it against the client and says
//! whether the connection closes.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};

use crate::cache::{Cache, Entry, Inflight, Lookup, STALE_TTL};
use crate::config::Settings;
use crate::dns::{self, Key};
use crate::doh::{self, Limits, Wanted};
use crate::fleet::Fleet;
use crate::guard::{Budget, Conn, Guard, Verdict};
use crate::hll::UniqueClients;
use crate::metrics::{Metrics, OdohResult};
use crate::reject::{Outcome, Reject, Transport};
use crate::server::ServerSettings;
use crate::tickets::Tickets;
use crate::upstream::{LocalBudget, Spend, Upstream, UpstreamError, UpstreamSettings, Who};

/// How long a request that found an expired entry waits for its refresh
/// before it gets the stale answer (RFC 8767 suggests 1.8 s).
const CLIENT_TIMER: Duration = Duration::from_millis(1800);

/// Health needs an answered probe within this window (upstreams are
/// probed every 2 s, so a healthy one is never this quiet).
pub const HEALTH_WINDOW: Duration = Duration::from_secs(30);

/// The path a trusted proxy's own health checks may ask on the DoH
/// listeners (without a forwarding header), as on the admin listener.
pub const HEALTH_PATH: &str = "/healthz";

/// How often a popular entry may be prefetched.
const PREFETCH_EVERY: Duration = Duration::from_secs(5);

/// What a coalesced resolution hands to every waiter.
#[derive(Clone)]
pub enum Resolution {
    Answer(Arc<Entry>),
    /// The upstream budget is spent.
    Budget,
}

/// Everything a request needs, shared by all connections and transports.
/// What a reload may change sits behind `ArcSwap`s (or atomics): requests
/// read the settings in force when they start.
pub struct App {
    pub limits: ArcSwap<Limits>,
    /// The Oblivious DoH target's keys, with `--odoh`.
    pub odoh: Option<crate::odoh::Odoh>,
    pub padding: ArcSwap<Padding>,
    pub verbose: AtomicU8,
    /// Timeouts and per-connection limits (the listener addresses in it
    /// are those of the start: listeners are not rebound).
    pub server: ArcSwap<ServerSettings>,
    pub guard: Arc<Guard>,
    pub cache: Cache,
    pub inflight: Inflight<Resolution>,
    pub upstream: ArcSwap<Upstream>,
    upstream_settings: ArcSwap<UpstreamSettings>,
    /// The upstream budget: local, or the fleet's.
    budget: ArcSwap<Arc<dyn Spend>>,
    /// State shared with other instances, with `--redis`.
    pub fleet: Option<Arc<Fleet>>,
    pub metrics: Arc<Metrics>,
    pub unique: Arc<UniqueClients>,
    /// TLS session ticket keys, for every TLS listener.
    pub tickets: Option<Arc<Tickets>>,
    /// The background work requests start (refreshes, prefetches), so that
    /// shutdown can wait for it.
    pub tasks: tokio_util::task::TaskTracker,
}

/// Where a request comes from: its connection, and the client a PROXY
/// header named on it (`Some(None)` for `UNKNOWN`/`LOCAL`).
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: Arc<Conn>,
    pub proxied: Option<Option<IpAddr>>,
}

impl Peer {
    pub fn new(conn: Arc<Conn>, proxied: Option<Option<IpAddr>>) -> Peer {
        Peer { conn, proxied }
    }
}

/// A DoH answer for the transport to write out.
pub struct Reply {
    pub response: Response<Bytes>,
    /// A DNS answer (counted `answered` once delivered, `undelivered` if the
    /// client never takes it), as opposed to a refusal (already counted).
    pub answer: bool,
    /// Close the connection after this response (gracefully).
    pub close: bool,
}

/// An answer to one DNS message.
pub struct Served {
    pub wire: Vec<u8>,
    pub max_age: u32,
}

/// `--padding`: which answers get EDNS(0) padding (RFC 7830, RFC 8467).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Padding {
    /// Only answers to queries that carried a Padding option.
    PaddedQueries,
    /// Every answer to an EDNS query.
    Always,
    Never,
}

/// The budget of an instance on its own (`--upstream-qps`, the share kept
/// for known clients).
fn local_budget(s: &UpstreamSettings, metrics: &Arc<Metrics>) -> LocalBudget {
    LocalBudget::with_share(s.qps, s.known_share, s.dry_run, Some(metrics.clone()))
}

fn same_budget(a: &UpstreamSettings, b: &UpstreamSettings) -> bool {
    (a.qps, a.known_share, a.dry_run) == (b.qps, b.known_share, b.dry_run)
}

impl App {
    /// Everything a request needs. Fails when an upstream cannot be set up.
    pub fn new(s: &Settings, metrics: Arc<Metrics>) -> anyhow::Result<App> {
        let tasks = tokio_util::task::TaskTracker::new();
        let guard = Arc::new(Guard::new(s.guard.clone(), metrics.clone()));
        let unique = Arc::new(UniqueClients::default());
        let tickets = s.server.ticket_lifetime.map(Tickets::new);
        let fleet = match &s.fleet {
            Some(f) => Some(
                Fleet::new(
                    f,
                    &s.upstream,
                    guard.clone(),
                    unique.clone(),
                    tickets.clone(),
                    metrics.clone(),
                )
                .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let budget: Arc<dyn Spend> = match &fleet {
            Some(f) => f.clone(),
            None => Arc::new(local_budget(&s.upstream, &metrics)),
        };
        let upstream = Upstream::new(&s.upstream, budget.clone(), metrics.clone(), tasks.clone())
            .map_err(anyhow::Error::msg)?;
        metrics
            .cache_max_bytes
            .set(i64::try_from(s.cache.max_bytes).unwrap_or(i64::MAX));
        metrics.connections_max.set(i64::from(s.guard.max_conns));
        let odoh = if s.odoh.enabled {
            Some(crate::odoh::Odoh::new(s.odoh.rotate).map_err(anyhow::Error::msg)?)
        } else {
            None
        };
        Ok(App {
            odoh,
            limits: ArcSwap::from_pointee(s.doh.clone()),
            padding: ArcSwap::from_pointee(s.padding),
            verbose: AtomicU8::new(s.verbose),
            server: ArcSwap::from_pointee(s.server.clone()),
            guard,
            fleet,
            budget: ArcSwap::from_pointee(budget),
            cache: Cache::new(&s.cache),
            inflight: Inflight::default(),
            upstream: ArcSwap::from_pointee(upstream),
            upstream_settings: ArcSwap::from_pointee(s.upstream.clone()),
            metrics,
            unique,
            tickets,
            tasks,
        })
    }

    /// Applies reloaded settings: limits, budgets, allow and deny ranges,
    /// trusted proxies, ban settings, timeouts, TTL policy and upstreams,
    /// at once. The cache, bans, scores, unique-client sketches and open
    /// connections stay. Fails, changing nothing, if new upstreams cannot
    /// be set up. Returns what only a restart can change.
    pub fn reload(&self, s: &Settings) -> Result<Vec<&'static str>, String> {
        let mut restart = Vec::new();
        if **self.upstream_settings.load() != s.upstream {
            let budget = match &self.fleet {
                Some(f) => {
                    f.set_qps(s.upstream.qps, s.upstream.known_share);
                    self.budget.load_full()
                }
                None if !same_budget(&self.upstream_settings.load(), &s.upstream) => {
                    let b: Arc<dyn Spend> = Arc::new(local_budget(&s.upstream, &self.metrics));
                    self.budget.store(Arc::new(b.clone()));
                    Arc::new(b)
                }
                None => self.budget.load_full(),
            };
            let fresh = Upstream::new(
                &s.upstream,
                (*budget).clone(),
                self.metrics.clone(),
                self.tasks.clone(),
            )?;
            let old = self.upstream.swap(Arc::new(fresh));
            // Queries in flight on the old upstreams finish; their
            // connections close when the last one is done.
            old.close_when_idle();
            self.upstream_settings.store(Arc::new(s.upstream.clone()));
        }
        let old = self.server.load();
        for (changed, what) in [
            (old.tls_listen != s.server.tls_listen, "listen"),
            (old.http_listen != s.server.http_listen, "listen_http"),
            (old.dot_listen != s.server.dot_listen, "listen_dot"),
            (old.h3_listen != s.server.h3_listen, "listen_h3"),
            (old.doq_listen != s.server.doq_listen, "listen_doq"),
            (
                !self.cache.same_bounds(&s.cache),
                "cache_size and cache_memory",
            ),
        ] {
            if changed {
                restart.push(what);
            }
        }
        self.limits.store(Arc::new(s.doh.clone()));
        self.padding.store(Arc::new(s.padding));
        self.verbose.store(s.verbose, Ordering::Relaxed);
        self.server.store(Arc::new(s.server.clone()));
        self.cache.set_policy(s.cache.policy);
        self.guard.reconfigure(s.guard.clone());
        self.metrics
            .connections_max
            .set(i64::from(s.guard.max_conns));
        Ok(restart)
    }

    /// Whether requests are logged one line each (`-v`).
    pub fn verbose(&self) -> bool {
        self.verbose.load(Ordering::Relaxed) > 0
    }

    /// Counts a refusal, scores it against the client, logs it at `-v`.
    pub fn refuse(&self, client: IpAddr, reason: Reject, transport: Transport) {
        self.metrics.request(reason.outcome(), transport, false);
        self.metrics.reject(reason, false);
        self.guard.penalize(client, reason);
        if self.verbose() {
            tracing::info!(
                client = %crate::net::client_label(client),
                status = reason.status().as_u16(),
                reason = reason.label(),
                transport = transport.label(),
                "refused"
            );
        }
    }

    /// Health: the listeners are up (this runs beside them), at least one
    /// upstream is up by the proxy's own probes (not 3 failed probes in a
    /// row), and one answered a probe within [`HEALTH_WINDOW`]. Client
    /// queries play no part: clients asking dead names cannot mark an
    /// upstream down.
    pub fn health(&self) -> Result<(), String> {
        let upstream = self.upstream.load();
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

    /// The client of a request on `peer` with these headers.
    pub fn client_of(&self, peer: &Peer, headers: &http::HeaderMap) -> IpAddr {
        self.guard
            .client_of(peer.conn.peer(), peer.proxied, headers)
    }

    /// Ban check and client budget, for any transport: `Err` is the
    /// refusal (already counted and scored) with its `Retry-After`.
    pub fn admit_request(
        &self,
        client: IpAddr,
        transport: Transport,
    ) -> Result<(), (Reject, Option<u64>)> {
        self.admit(client, transport, false)
    }

    /// Opens a sealed Oblivious DoH query.
    fn open(&self, body: &[u8]) -> Result<crate::odoh::Opened, Reject> {
        let Some(odoh) = &self.odoh else {
            return Err(Reject::MediaType);
        };
        odoh.open(body).map_err(|e| match e {
            crate::odoh::OpenError::UnknownKey => {
                self.metrics.odoh(OdohResult::UnknownKey);
                Reject::OdohUnknownKey
            }
            crate::odoh::OpenError::Malformed => {
                self.metrics.odoh(OdohResult::Malformed);
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
        self.metrics.odoh(OdohResult::Configs);
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

    /// Ban check, then the client's budget, or for a relay's sealed
    /// queries (`relayed`) the relay's own budget (`--odoh-relay-qps`).
    fn admit(
        &self,
        client: IpAddr,
        transport: Transport,
        relayed: bool,
    ) -> Result<(), (Reject, Option<u64>)> {
        self.unique.insert(client);
        match self.guard.banned(client) {
            Verdict::Pass => {}
            Verdict::Refuse => {
                self.refuse(client, Reject::Banned, transport);
                return Err((Reject::Banned, None));
            }
            Verdict::DryRun => {
                self.metrics.reject(Reject::Banned, true);
                self.metrics.request(Outcome::Banned, transport, true);
            }
        }
        let budget = if relayed {
            self.guard.check_relay_budget(client)
        } else {
            self.guard.check_budget(client)
        };
        match budget {
            Budget::Ok => Ok(()),
            Budget::Over(secs) => {
                self.refuse(client, Reject::RateLimited, transport);
                Err((Reject::RateLimited, Some(secs)))
            }
            Budget::DryRun => {
                self.metrics.reject(Reject::RateLimited, true);
                self.metrics.request(Outcome::RateLimited, transport, true);
                tracing::debug!(client = %client, "dry run: would rate-limit");
                Ok(())
            }
        }
    }

    /// DNS validation, cache, coalescing, upstream: from the bytes of one
    /// message to its answer.
    pub async fn answer_message(
        self: &Arc<Self>,
        client: IpAddr,
        msg: &[u8],
    ) -> Result<Served, Reject> {
        let query = dns::parse_query(msg).map_err(Reject::from)?;
        let entry = self.answer(&query.key, client).await?;
        self.guard.answered(client);
        let (mut wire, max_age) = entry.serve(query.id, query.question, &self.cache.policy());
        // After the cache: stored answers are never padded.
        let padded = match **self.padding.load() {
            Padding::Always => true,
            Padding::PaddedQueries => query.padded,
            Padding::Never => false,
        };
        let padding = if padded && query.payload > 0 {
            dns::pad(&mut wire, usize::from(query.payload))
        } else {
            0
        };
        if self.verbose() {
            tracing::info!(
                client = %crate::net::client_label(client),
                name = %query.key.name(),
                qtype = query.key.qtype(),
                rcode = entry.rcode(),
                max_age,
                padding,
                "answered"
            );
        }
        Ok(Served { wire, max_age })
    }

    /// Finds or fetches the answer for `key`. A fresh hit is answered
    /// without awaiting anything; stale entries and misses go through a
    /// boxed future, so that the request future — moved whole into every
    /// task hyper spawns — stays as small as the hit path needs.
    async fn answer(self: &Arc<Self>, key: &Key, client: IpAddr) -> Result<Arc<Entry>, Reject> {
        match self.cache.lookup(key) {
            Lookup::Fresh(e) => {
                self.metrics.cache_hits.inc();
                if e.wants_prefetch() && e.claim_refresh(PREFETCH_EVERY) {
                    let app = self.clone();
                    let key = key.clone();
                    self.tasks
                        .spawn(async move { app.resolve(&key, Who::New).await });
                }
                Ok(e)
            }
            Lookup::Stale(e) => Box::pin(self.answer_stale(key, e)).await,
            Lookup::Miss => {
                self.metrics.cache_misses.inc();
                // Only a miss asks who the client is: hits never pay for it.
                let who = if self.guard.is_known(client) {
                    Who::Known
                } else {
                    Who::New
                };
                match Box::pin(self.resolve(key, who)).await {
                    Resolution::Answer(e) => Ok(e),
                    Resolution::Budget => {
                        self.metrics
                            .upstream_budget_refused(who == Who::Known, false);
                        Err(Reject::UpstreamBudget)
                    }
                }
            }
        }
    }

    /// One request per STALE_TTL starts a refresh in the background and
    /// waits for it at most CLIENT_TIMER (RFC 8767's client response
    /// timer); everybody else, and that one too if the refresh fails or is
    /// slow, gets the stale answer at once.
    async fn answer_stale(
        self: &Arc<Self>,
        key: &Key,
        e: Arc<Entry>,
    ) -> Result<Arc<Entry>, Reject> {
        if e.claim_refresh(Duration::from_secs(STALE_TTL.into())) {
            let app = self.clone();
            let k = key.clone();
            // A refresh with a stale answer to fall back on: it never
            // draws on the known clients' share.
            let refresh = self
                .tasks
                .spawn(async move { app.resolve(&k, Who::New).await });
            let timer = CLIENT_TIMER.min(self.upstream.load().timeout());
            if let Ok(Ok(Resolution::Answer(new))) = tokio::time::timeout(timer, refresh).await {
                if !new.is_error() {
                    self.metrics.cache_misses.inc();
                    return Ok(new);
                }
            }
        }
        self.metrics.cache_stale.inc();
        Ok(e)
    }

    /// Asks the upstream, once for any number of concurrent callers, and
    /// caches the result (a failure as a short-lived SERVFAIL). The first
    /// caller's `who` spends the budget; a known client that joined a new
    /// client's query refused for the budget asks once more as itself.
    pub async fn resolve(&self, key: &Key, who: Who) -> Resolution {
        let (res, ran) = self.resolve_once(key, who).await;
        if matches!(res, Resolution::Budget) && !ran && who == Who::Known {
            return self.resolve_once(key, who).await.0;
        }
        res
    }

    async fn resolve_once(&self, key: &Key, who: Who) -> (Resolution, bool) {
        let (res, ran) = self
            .inflight
            .run(key, || async {
                let policy = self.cache.policy();
                let upstream = self.upstream.load_full();
                let entry = match upstream.resolve(key, who).await {
                    Ok((wire, info)) => Entry::from_answer(wire, &info, &policy),
                    Err(UpstreamError::Budget) => return Resolution::Budget,
                    Err(UpstreamError::Failed) => Entry::failure(key, &policy),
                };
                let entry = Arc::new(entry);
                self.cache.store(key.clone(), entry.clone());
                Resolution::Answer(entry)
            })
            .await;
        if !ran {
            self.metrics.coalesced.inc();
        }
        (res, ran)
    }

    /// One DoH request: HTTP validation and the budget at once, from the
    /// request's head; then, in the returned future, the body of a POST
    /// and the DNS message. The future holds none of the request's
    /// headers: it is what hyper moves into the task of every HTTP/2
    /// stream, so its size is paid on every request.
    pub fn doh<B>(
        self: &Arc<Self>,
        peer: &Peer,
        transport: Transport,
        req: Request<B>,
    ) -> impl Future<Output = Reply>
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (n, inflight) = peer.conn.begin();
        let head_only = req.method() == http::Method::HEAD;
        let from = Origin::of(peer);
        let front = self.front(peer, from, transport, req);
        let close_after = n >= self.server.load().max_requests_per_conn;
        let app = self.clone();
        async move {
            let _inflight = inflight;
            let mut reply = match front {
                Front::Done(reply) => reply,
                Front::Linger(reply, body) => {
                    Box::pin(doh::discard(body, doh::LINGER_BYTES)).await;
                    reply
                }
                Front::Query(client, bytes) => app.plain(from, client, transport, &bytes).await,
                Front::Body(client, body, limits, oblivious) => {
                    Box::pin(app.posted(from, client, transport, body, limits, oblivious)).await
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
    fn front<B>(
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
        let limits = self.limits.load_full();
        let head = doh::check_head(&parts, &limits);
        // A named relay's sealed queries spend the relay's budget;
        // everything else, sealed queries from anybody else included, the
        // client's own. Either way before any HPKE work.
        let oblivious = matches!(head, Ok(Wanted::Oblivious));
        let relayed = oblivious && self.guard.is_odoh_relay(client);
        if let Err((reason, retry)) = self.admit(client, transport, relayed) {
            return Front::Done(self.refused(from, reason, retry));
        }
        match head {
            Ok(Wanted::Get(v)) => Front::Query(client, Bytes::from(v)),
            Ok(Wanted::Post | Wanted::Oblivious) => Front::Body(client, body, limits, oblivious),
            Ok(Wanted::OdohConfigs) => Front::Done(self.odoh_configs()),
            Err(r) => {
                self.refuse(client, r, transport);
                let reply = self.refused(from, r, None);
                if r == Reject::BodyTooLarge && transport == Transport::H1 {
                    // See doh::read_body: the body is read and thrown
                    // away before the 413 goes out.
                    return Front::Linger(reply, body);
                }
                Front::Done(reply)
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
        from: Origin,
        client: IpAddr,
        transport: Transport,
        body: B,
        limits: Arc<Limits>,
        oblivious: bool,
    ) -> Reply
    where
        B: http_body::Body,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let linger = transport == Transport::H1;
        let bytes = match doh::read_body(body, &limits, linger).await {
            Ok(b) => b,
            Err(r) => {
                self.refuse(client, r, transport);
                return self.refused(from, r, None);
            }
        };
        if !oblivious {
            return self.plain(from, client, transport, &bytes).await;
        }
        let opened = match self.open(&bytes) {
            Ok(opened) => opened,
            Err(r) => {
                self.refuse(client, r, transport);
                return self.refused(from, r, None);
            }
        };
        match self.answer_message(client, &opened.query()).await {
            Ok(served) => match self.odoh.as_ref().map(|o| o.seal(&opened, &served.wire)) {
                Some(Ok(sealed)) => {
                    self.metrics.odoh(OdohResult::Ok);
                    Reply {
                        response: sealed_response(sealed),
                        answer: true,
                        close: false,
                    }
                }
                _ => {
                    self.metrics.odoh(OdohResult::Rejected);
                    self.refuse(client, Reject::OdohMalformed, transport);
                    self.refused(from, Reject::OdohMalformed, None)
                }
            },
            Err(r) => {
                self.metrics.odoh(OdohResult::Rejected);
                self.refuse(client, r, transport);
                self.refused(from, r, (r == Reject::UpstreamBudget).then_some(1))
            }
        }
    }

    /// A DNS query in the clear, to its DoH reply.
    async fn plain(
        self: &Arc<Self>,
        from: Origin,
        client: IpAddr,
        transport: Transport,
        bytes: &[u8],
    ) -> Reply {
        match self.answer_message(client, bytes).await {
            Ok(served) => Reply {
                response: dns_response(served.wire, served.max_age),
                answer: true,
                close: false,
            },
            Err(r) => {
                self.refuse(client, r, transport);
                let retry = (r == Reject::UpstreamBudget).then_some(1);
                self.refused(from, r, retry)
            }
        }
    }
}

/// What [`App::front`] decided from a request's head.
enum Front<B> {
    Done(Reply),
    /// A refusal of a body too large, sent once the body was read (and
    /// thrown away) as far as HTTP/1.1 needs.
    Linger(Reply, B),
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

impl Origin {
    fn of(peer: &Peer) -> Origin {
        Origin {
            peer: peer.conn.peer(),
            proxied: peer.proxied.is_some(),
        }
    }
}

/// The response to a refused request: the status its reason maps to, no
/// body (on HTTP/2 a single HEADERS frame), `Allow` for 405 and
/// `Retry-After` for 429 and 503.
pub fn refusal(reason: Reject, retry_after: Option<u64>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
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
    let cc = format!("max-age={max_age}");
    if let Ok(v) = HeaderValue::from_str(&cc) {
        h.insert(header::CACHE_CONTROL, v);
    }
    resp
}
