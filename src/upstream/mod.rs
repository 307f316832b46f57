//! Forwarding to the upstream resolvers.
//!
//! `--upstream-timeout` is one deadline for the whole resolution. The
//! first attempt goes to the best upstream (by measured latency with
//! `--upstream-strategy fastest`, in the order given with `ordered`; those
//! the probes found down last). While it has not answered, it keeps
//! listening, and after a hedge interval learned from that upstream's
//! latency (its RTO: smoothed RTT plus four deviations, at least 100 ms) the
//! next attempt goes out: to the next upstream, or, after each was tried
//! once, a retransmission. An error, SERVFAIL or REFUSED moves on at once.
//! The first valid answer from any attempt wins; the rest are dropped.
//! Every packet sent spends one token of the global `--upstream-qps`
//! budget ([`budget`]) — first attempts, hedges, retransmissions and the
//! TCP retry after a truncated UDP answer alike — and is counted in
//! `doh_upstream_queries_total`.
//!
//! Transports ([`spec`]): UDP from a pool of connected sockets on random
//! ports with a random ID ([`udp`]), TCP after a truncated or oversized
//! answer; pipelined TCP and TLS ([`stream`]); HTTP/2 ([`https`]). Every answer is checked (ID,
//! question, size) and stripped of what a client must not get.
//!
//! Whether an upstream is up is decided by the proxy's own probes only
//! ([`Upstream::probe`]): queries for names a client chose can time out for
//! reasons of their own (a dead authoritative server), and must not let
//! clients mark a healthy upstream down.

mod attempts;
mod budget;
mod https;
mod server;
pub mod spec;
mod stream;
mod tls;
mod udp;

pub use budget::{LocalBudget, Spend, Unlimited, Who};
pub use tls::read_ca;

use server::{Link, Rtt, Server};

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dns::{self, AnswerInfo, Key, RCODE_REFUSED, RCODE_SERVFAIL};
use crate::metrics::{Metrics, UpstreamMetrics, UpstreamResult};
use spec::Transport;
pub use spec::UpstreamSpec;

/// Consecutive failed probes after which an upstream is reported down.
const DOWN_AFTER: u32 = 3;
/// Shortest hedge interval.
const MIN_HEDGE: Duration = Duration::from_millis(100);
/// RTO of an upstream never measured.
const INITIAL_RTO: Duration = Duration::from_millis(150);

/// How upstreams are ordered for each resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Upstreams that are up, by smoothed latency.
    Fastest,
    /// Upstreams that are up, as listed.
    Ordered,
}

/// What the upstream side runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub servers: Vec<UpstreamSpec>,
    /// `--upstream-timeout`: the whole resolution, retries included.
    pub timeout: Duration,
    /// `--upstream-qps`: queries sent per second, in all.
    pub qps: u32,
    /// `--known-share`: percent of `qps` kept for known clients.
    pub known_share: u8,
    /// `--dry-run`: the known clients' share only counts what it would do.
    pub dry_run: bool,
    pub strategy: Strategy,
    /// `--upstream-ca`: trust anchors beside the system's.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl UpstreamSettings {
    /// Whether a local budget built from `other` would be this one's.
    pub fn same_budget(&self, other: &UpstreamSettings) -> bool {
        (self.qps, self.known_share, self.dry_run) == (other.qps, other.known_share, other.dry_run)
    }

    /// Idle UDP sockets the pools may keep open beside the queries in
    /// flight: [`udp::POOL`] per UDP upstream.
    pub fn idle_sockets(&self) -> u64 {
        let udp = self
            .servers
            .iter()
            .filter(|s| matches!(s.transport, spec::Transport::Udp))
            .count();
        (udp * udp::POOL) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream answered in time")]
    Failed,
    #[error("upstream budget spent")]
    Budget,
}

/// What one exchange with one upstream gave.
pub enum Exchanged {
    Answer((Vec<u8>, AnswerInfo)),
    /// Truncated, or larger than we advertised: ask again over TCP.
    Truncated,
}

/// Why one exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection closed")]
    Closed,
    #[error("waiting before reconnecting")]
    Backoff,
    #[error("every connection is full")]
    Busy,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("answer dropped: {0}")]
    Answer(dns::AnswerError),
    #[error("upstream budget spent")]
    Budget,
}

pub struct Upstream {
    servers: Vec<Server>,
    timeout: Duration,
    strategy: Strategy,
    budget: Arc<dyn Spend>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    shutdown: CancellationToken,
    /// Replaced by a reload: no more probes.
    retired: AtomicBool,
}

impl Upstream {
    /// Sets up every upstream (no connection is opened yet). Fails when a
    /// TLS client configuration cannot be built.
    pub fn new(
        s: &UpstreamSettings,
        budget: Arc<dyn Spend>,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Result<Upstream, String> {
        let shutdown = CancellationToken::new();
        let dot = tls::client_config(&s.extra_roots, &[]).map_err(|e| e.to_string())?;
        let doh = tls::client_config(&s.extra_roots, &[b"h2"]).map_err(|e| e.to_string())?;
        let mut servers = Vec::new();
        for spec in &s.servers {
            let label = spec.label().to_string();
            let m = metrics.upstream.handles(&label);
            let name = |n: &str| {
                ServerName::try_from(n.to_string()).map_err(|e| format!("upstream {label}: {e}"))
            };
            let pool = |tls| {
                stream::StreamPool::new(
                    spec.addr,
                    label.clone(),
                    tls,
                    m.clone(),
                    tasks.clone(),
                    shutdown.clone(),
                )
            };
            let link = match &spec.transport {
                Transport::Udp => Link::Udp(
                    udp::UdpPool::new(spec.addr, usize::from(dns::EDNS_PAYLOAD) + 1),
                    pool(None),
                ),
                Transport::Tcp => Link::Stream(pool(None)),
                Transport::Tls { name: n } => {
                    Link::Stream(pool(Some((TlsConnector::from(dot.clone()), name(n)?))))
                }
                Transport::Https { path, name: n } => Link::Https(https::HttpsLink::new(
                    spec.addr,
                    label.clone(),
                    TlsConnector::from(doh.clone()),
                    name(n)?,
                    path,
                    m.clone(),
                    tasks.clone(),
                    shutdown.clone(),
                )?),
            };
            m.up.set(1);
            servers.push(Server {
                spec: spec.clone(),
                link,
                rtt: Rtt::default(),
                failures: AtomicU32::new(0),
                up: AtomicBool::new(true),
                last_probe_ok_ms: AtomicU64::new(0),
                metrics: m,
            });
        }
        Ok(Upstream {
            servers,
            timeout: s.timeout,
            strategy: s.strategy,
            budget,
            metrics,
            epoch: Instant::now(),
            shutdown,
            retired: AtomicBool::new(false),
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Closes every upstream connection.
    pub fn close(&self) {
        self.shutdown.cancel();
    }

    /// Stops probing; connections close when the last query in flight on
    /// them is done (when this is dropped).
    pub fn close_when_idle(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Time since any upstream last answered a probe.
    pub fn since_last_probe(&self) -> Option<Duration> {
        let last = self
            .servers
            .iter()
            .map(|s| s.last_probe_ok_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (last > 0).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last))
        })
    }

    /// (label, up) for each upstream.
    pub fn status(&self) -> Vec<(String, bool)> {
        self.servers
            .iter()
            .map(|s| (s.spec.label().to_string(), s.is_up()))
            .collect()
    }

    /// The order in which upstreams are tried now.
    fn order(&self) -> SmallVec<[usize; 4]> {
        let mut idx: SmallVec<[usize; 4]> = (0..self.servers.len()).collect();
        match self.strategy {
            Strategy::Ordered => idx.sort_by_key(|&i| !self.servers[i].is_up()),
            Strategy::Fastest => idx.sort_by_key(|&i| {
                let s = &self.servers[i];
                (!s.is_up(), s.rtt.srtt().unwrap_or(INITIAL_RTO))
            }),
        }
        idx
    }

    fn hedge_after(&self, i: usize) -> Duration {
        self.servers[i]
            .rtt
            .rto()
            .clamp(MIN_HEDGE, (self.timeout / 2).max(MIN_HEDGE))
    }

    /// Resolves `key` for `who` within the deadline: the first good answer
    /// of any attempt, else the last SERVFAIL or REFUSED received, else an
    /// error.
    pub async fn resolve(
        &self,
        key: &Key,
        who: Who,
    ) -> Result<(Vec<u8>, AnswerInfo), UpstreamError> {
        let n = self.servers.len();
        if n == 0 {
            return Err(UpstreamError::Failed);
        }
        // The clock is read once per turn of the loop and once per attempt.
        let mut now = Instant::now();
        let deadline = now + self.timeout;
        let order = self.order();
        // Each upstream once, then each once more: a retransmission over
        // UDP, a new attempt over a stream only if the first one failed.
        // (upstream, whether it is the second round): the plan's k-th step.
        let plan = |k: usize| (order[k % n], k >= n);
        let plan_len = 2 * n;
        let mut next = 0;
        let mut next_at = now;
        let mut sent = 0u32;
        // Inline for up to four upstreams: a miss allocates none of these.
        let mut pending: SmallVec<[u32; 4]> = smallvec![0; n];
        let mut failed: SmallVec<[bool; 4]> = smallvec![false; n];
        let mut answered: SmallVec<[bool; 4]> = smallvec![false; n];
        let mut fallback = None;
        let mut out_of_budget = false;
        let mut attempts = attempts::Attempts::new();
        loop {
            // Send the next attempt if it is due.
            while next < plan_len && now >= next_at {
                let (i, second) = plan(next);
                next += 1;
                if second && answered[i] {
                    continue; // it said SERVFAIL or REFUSED: no point asking again
                }
                if second && self.servers[i].spec.is_stream() && !failed[i] {
                    if pending[i] > 0 {
                        // Wait for the first attempt on this stream: a
                        // second one only goes out if it fails.
                        next -= 1;
                        next_at = deadline;
                        break;
                    }
                    continue;
                }
                if !budget::spend(&*self.budget, who).await {
                    self.metrics.upstream.budget_exhausted.inc();
                    out_of_budget = true;
                    next = plan_len;
                    break;
                }
                let s = &self.servers[i];
                if sent > 0 {
                    s.metrics.hedges.inc();
                }
                let hedge = sent > 0;
                sent += 1;
                pending[i] += 1;
                let budget = &*self.budget;
                // Spending may have waited: the attempt starts now.
                let started = Instant::now();
                attempts
                    .push(async move { (i, hedge, started, s.exchange(key, budget, who).await) });
                next_at = started + self.hedge_after(i);
            }
            if sent == 0 {
                return Err(UpstreamError::Budget);
            }
            if attempts.is_empty() && next >= plan_len {
                break;
            }
            let wake = if next < plan_len {
                next_at.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                Some((i, hedge, started, r)) = attempts.next() => {
                    pending[i] -= 1;
                    let s = &self.servers[i];
                    match r {
                        Ok((wire, info)) if info.rcode == RCODE_SERVFAIL || info.rcode == RCODE_REFUSED => {
                            s.metrics.result(UpstreamResult::Servfail, Some(started.elapsed()));
                            fallback = Some((wire, info));
                            answered[i] = true;
                            next_at = started;
                        }
                        Ok(answer) => {
                            let took = started.elapsed();
                            s.metrics.result(UpstreamResult::Ok, Some(took));
                            s.rtt.sample(took);
                            s.metrics.set_rtt(s.rtt.srtt());
                            if hedge {
                                s.metrics.hedges_won.inc();
                            }
                            for (j, &p) in pending.iter().enumerate() {
                                for _ in 0..p {
                                    self.servers[j].metrics.result(UpstreamResult::Abandoned, None);
                                }
                            }
                            return Ok(answer);
                        }
                        Err(ExchangeError::Budget) => {
                            // Truncated, and no token left for the TCP retry.
                            self.metrics.upstream.budget_exhausted.inc();
                            out_of_budget = true;
                            next = plan_len;
                        }
                        Err(e) => {
                            tracing::debug!(upstream = s.spec.label(), error = %e, "upstream attempt failed");
                            s.metrics.result(UpstreamResult::Error, None);
                            failed[i] = true;
                            next_at = started;
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            now = Instant::now();
            if now >= deadline {
                break;
            }
        }
        for (j, &p) in pending.iter().enumerate() {
            for _ in 0..p {
                self.servers[j]
                    .metrics
                    .result(UpstreamResult::Timeout, None);
            }
        }
        match fallback {
            Some(f) => Ok(f),
            // Nothing answered because the budget ran out on the way: the
            // caller may serve stale or refuse with 503, as for a spent
            // budget at the start.
            None if out_of_budget && pending.iter().all(|&p| p == 0) => Err(UpstreamError::Budget),
            None => Err(UpstreamError::Failed),
        }
    }

    /// Probes every upstream once, over its own transport (the root's NS,
    /// outside the budget: a spent budget must not make the proxy look
    /// dead); any answer, even REFUSED or SERVFAIL, shows the upstream is
    /// there.
    pub async fn probe(&self) {
        let Some(key) = Key::new(".", 2, false) else {
            return;
        };
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        let probes = self.servers.iter().map(|s| {
            let key = key.clone();
            async move {
                let started = Instant::now();
                let r = tokio::time::timeout(self.timeout, s.exchange(&key, &Unlimited, Who::New))
                    .await;
                let ok = matches!(r, Ok(Ok(_)));
                if ok {
                    s.rtt.sample(started.elapsed());
                    s.metrics.set_rtt(s.rtt.srtt());
                }
                self.mark(s, ok);
            }
        });
        futures_util::future::join_all(probes).await;
    }

    fn mark(&self, s: &Server, ok: bool) {
        if ok {
            s.failures.store(0, Ordering::Relaxed);
            s.last_probe_ok_ms.store(
                self.epoch.elapsed().as_millis().max(1) as u64,
                Ordering::Relaxed,
            );
            if !s.up.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = s.spec.label(), "upstream is up again");
            }
            s.metrics.up.set(1);
        } else {
            let f = s.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if f >= DOWN_AFTER && s.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    upstream = s.spec.label(),
                    failures = f,
                    "upstream is down (probes unanswered)"
                );
                s.metrics.up.set(0);
            }
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
