//! One request, start to finish, whatever the transport, cheapest check
//! first: ban → DoH request validation → client budget → DNS validation →
//! cache → coalescing → upstream budget → upstream.
//!
//! A transport hands over a transport-neutral request — an [`http::Request`]
//! whose body implements `http_body::Body` for DoH ([`App::doh`], in
//! `http.rs`), the bytes of one DNS message for DNS over TLS and QUIC
//! ([`App::answer_message`]) — with the [`Peer`] it came from, and gets
//! back a transport-neutral answer to write out. Every refusal goes
//! through [`App::refuse`], which counts it, scores it against the client
//! and says whether the connection closes.
//!
//! The pipeline is built by the composition root (`app`); it knows nothing
//! of the configuration nor of the listeners above it.

mod http;

pub use http::AppHandle;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;

use crate::cache::{Admit, Cache, Entry, Inflight, Lookup, STALE_TTL};
use crate::clock::Clock;
use crate::dns::{self, Key};
use crate::doh::Limits;
use crate::fleet::Fleet;
use crate::guard::{Budget, Conn, Guard, Screen, Verdict};
use crate::hll::UniqueClients;
use crate::metrics::Metrics;
use crate::reject::{Outcome, Reject, Transport};
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
    /// Timeouts and per-connection limits.
    pub conn: ArcSwap<ConnLimits>,
    pub guard: Arc<Guard>,
    pub cache: Cache,
    pub inflight: Inflight<Resolution>,
    pub upstream: ArcSwap<Upstream>,
    pub(crate) upstream_settings: ArcSwap<UpstreamSettings>,
    /// The upstream budget: local, or the fleet's.
    pub(crate) budget: ArcSwap<Arc<dyn Spend>>,
    /// State shared with other instances, with `--redis`.
    pub fleet: Option<Arc<Fleet>>,
    pub metrics: Arc<Metrics>,
    /// The clock the cache and the upstream budget age by.
    pub clock: Clock,
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

/// What every connection is held to, whatever its transport (reloadable).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    /// From accept to the first complete request.
    pub handshake_timeout: Duration,
    /// With nothing in flight and nothing started.
    pub idle_timeout: Duration,
    /// With answers queued and none taken by the client.
    pub write_timeout: Duration,
    pub max_requests_per_conn: u64,
    /// A PROXY header is expected from trusted proxies.
    pub proxy_protocol: bool,
}

impl App {
    /// Applies reloaded upstream settings: new upstreams (and a new local
    /// budget when its rate changed) for the queries that start from now.
    /// Fails, changing nothing, if the new upstreams cannot be set up.
    pub fn reload_upstream(&self, s: &UpstreamSettings) -> Result<(), String> {
        if **self.upstream_settings.load() == *s {
            return Ok(());
        }
        let budget = match &self.fleet {
            Some(f) => {
                f.set_qps(s.qps, s.known_share);
                self.budget.load_full()
            }
            None if !self.upstream_settings.load().same_budget(s) => {
                let b: Arc<dyn Spend> =
                    Arc::new(LocalBudget::of(s, &self.metrics, self.clock.clone()));
                self.budget.store(Arc::new(b.clone()));
                Arc::new(b)
            }
            None => self.budget.load_full(),
        };
        let fresh = Upstream::new(
            s,
            (*budget).clone(),
            self.metrics.clone(),
            self.tasks.clone(),
        )?;
        let old = self.upstream.swap(Arc::new(fresh));
        // Queries in flight on the old upstreams finish; their
        // connections close when the last one is done.
        old.close_when_idle();
        self.upstream_settings.store(Arc::new(s.clone()));
        Ok(())
    }

    /// Whether requests are logged one line each (`-v`).
    pub fn verbose(&self) -> bool {
        self.verbose.load(Ordering::Relaxed) > 0
    }

    /// Counts a refusal, scores it against the client, logs it at `-v`.
    pub fn refuse(&self, client: IpAddr, reason: Reject, transport: Transport) {
        self.metrics
            .requests
            .count(reason.outcome(), transport, false);
        self.metrics.requests.reject(reason, false);
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

    /// The client of a request on `peer` with these headers.
    pub fn client_of(&self, peer: &Peer, headers: &::http::HeaderMap) -> IpAddr {
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
        self.admit(client, None, transport, false)
    }

    /// Ban check, then the client's budget, or for a relay's sealed
    /// queries (`relayed`) the relay's own budget (`--odoh-relay-qps`).
    fn admit(
        &self,
        client: IpAddr,
        conn: Option<&Conn>,
        transport: Transport,
        relayed: bool,
    ) -> Result<(), (Reject, Option<u64>)> {
        self.unique.insert(client);
        let Screen { ban, budget } = self.guard.screen(client, conn, relayed);
        match ban {
            Verdict::Pass => {}
            Verdict::Refuse => {
                self.refuse(client, Reject::Banned, transport);
                return Err((Reject::Banned, None));
            }
            Verdict::DryRun => {
                self.metrics.requests.reject(Reject::Banned, true);
                self.metrics
                    .requests
                    .count(Outcome::Banned, transport, true);
            }
        }
        match budget {
            Budget::Ok => Ok(()),
            Budget::Over(secs) => {
                self.refuse(client, Reject::RateLimited, transport);
                Err((Reject::RateLimited, Some(secs)))
            }
            Budget::DryRun => {
                self.metrics.requests.reject(Reject::RateLimited, true);
                self.metrics
                    .requests
                    .count(Outcome::RateLimited, transport, true);
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
        conn: Option<&Conn>,
        msg: &[u8],
    ) -> Result<Served, Reject> {
        let query = dns::parse_query(msg).map_err(Reject::from)?;
        // One clock read for the request: lookup, prefetch and the TTLs
        // served all age the entry by it.
        let now = self.cache.now();
        let entry = self.answer(&query.key, client, now).await?;
        self.guard.answered(client, conn);
        let policy = self.cache.policy();
        let (mut wire, max_age) = entry.serve(query.id, query.question, &policy, now);
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
    async fn answer(
        self: &Arc<Self>,
        key: &Key,
        client: IpAddr,
        now: Instant,
    ) -> Result<Arc<Entry>, Reject> {
        match self.cache.lookup(key, now) {
            Lookup::Fresh(e) => {
                self.metrics.cache.hits.inc();
                if e.wants_prefetch(now) && e.claim_refresh(PREFETCH_EVERY, now) {
                    let app = self.clone();
                    let key = key.clone();
                    self.tasks
                        .spawn(async move { app.resolve(&key, Who::New, Admit::Yes).await });
                }
                Ok(e)
            }
            Lookup::Stale(e) => Box::pin(self.answer_stale(key, e, now)).await,
            Lookup::Miss(admit) => {
                self.metrics.cache.misses.inc();
                if admit == Admit::No {
                    self.metrics.cache.declined.inc();
                }
                // Only a miss asks who the client is: hits never pay for it.
                let who = if self.guard.is_known(client) {
                    Who::Known
                } else {
                    Who::New
                };
                match Box::pin(self.resolve(key, who, admit)).await {
                    Resolution::Answer(e) => Ok(e),
                    Resolution::Budget => {
                        self.metrics
                            .upstream
                            .budget_refused(who == Who::Known, false);
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
        now: Instant,
    ) -> Result<Arc<Entry>, Reject> {
        if e.claim_refresh(Duration::from_secs(STALE_TTL.into()), now) {
            let app = self.clone();
            let k = key.clone();
            // A refresh with a stale answer to fall back on: it never
            // draws on the known clients' share.
            let refresh = self
                .tasks
                .spawn(async move { app.resolve(&k, Who::New, Admit::Yes).await });
            let timer = CLIENT_TIMER.min(self.upstream.load().timeout());
            if let Ok(Ok(Resolution::Answer(new))) = tokio::time::timeout(timer, refresh).await {
                if !new.is_error() {
                    self.metrics.cache.misses.inc();
                    return Ok(new);
                }
            }
        }
        self.metrics.cache.stale.inc();
        Ok(e)
    }

    /// Asks the upstream, once for any number of concurrent callers, and
    /// caches the result (a failure as a short-lived SERVFAIL) as `admit`
    /// says. The first caller's `who` spends the budget, and its `admit`
    /// decides; a known client that joined a new client's query refused
    /// for the budget asks once more as itself.
    pub async fn resolve(&self, key: &Key, who: Who, admit: Admit) -> Resolution {
        let (res, ran) = self.resolve_once(key, who, admit).await;
        if matches!(res, Resolution::Budget) && !ran && who == Who::Known {
            return self.resolve_once(key, who, admit).await.0;
        }
        res
    }

    async fn resolve_once(&self, key: &Key, who: Who, admit: Admit) -> (Resolution, bool) {
        let (res, ran) = self
            .inflight
            .run(key, || async {
                let policy = self.cache.policy();
                let upstream = self.upstream.load_full();
                let resolved = upstream.resolve(key, who).await;
                let now = self.cache.now();
                let entry = match resolved {
                    Ok((wire, info)) => Entry::from_answer(wire, &info, &policy, now),
                    Err(UpstreamError::Budget) => return Resolution::Budget,
                    Err(UpstreamError::Failed) => Entry::failure(key, &policy, now),
                };
                Resolution::Answer(self.cache.store_if(key.clone(), entry, admit))
            })
            .await;
        if !ran {
            self.metrics.cache.coalesced.inc();
        }
        (res, ran)
    }
}
