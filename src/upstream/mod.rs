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

mod budget;
mod https;
pub mod spec;
mod stream;
mod tls;
mod udp;

pub use budget::{LocalBudget, Spend, Unlimited, Who};
pub use tls::read_ca;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
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

/// Reconnection backoff, and a log line when an upstream starts failing
/// and when it recovers (not one per failure).
#[derive(Default)]
struct Backoff {
    state: Mutex<(Option<Instant>, Duration)>,
    failing: AtomicBool,
}

impl Backoff {
    fn check(&self) -> Result<(), ExchangeError> {
        let s = self.state.lock().map_err(|_| ExchangeError::Backoff)?;
        match s.0 {
            Some(until) if Instant::now() < until => Err(ExchangeError::Backoff),
            _ => Ok(()),
        }
    }

    fn failed(&self, label: &str, e: &std::io::Error) {
        if let Ok(mut s) = self.state.lock() {
            let delay = (s.1 * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
            *s = (Some(Instant::now() + delay), delay);
        }
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = label, error = %e, "cannot connect to the upstream (logged once until it recovers)");
        }
    }

    fn succeeded(&self, label: &str) {
        if let Ok(mut s) = self.state.lock() {
            *s = (None, Duration::ZERO);
        }
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(upstream = label, "connected to the upstream again");
        }
    }
}

/// Checks an answer and strips what a client must not get.
fn accept(wire: &[u8], id: u16, key: &Key) -> Result<(Vec<u8>, AnswerInfo), dns::AnswerError> {
    let info = dns::check_answer(wire, id, key)?;
    let mut out = match dns::strip_extras(wire, key.flags.dnssec_ok()) {
        None => wire.to_vec(),
        Some(stripped) => stripped,
    };
    let before = out.len();
    dns::clear_options(&mut out);
    if out.len() == wire.len() && before == wire.len() {
        return Ok((out, info));
    }
    // Offsets moved: locate the TTLs again.
    let info = dns::check_answer(&out, id, key)?;
    Ok((out, info))
}

enum Link {
    /// UDP, and a pool for TCP after truncation.
    Udp(udp::UdpPool, stream::StreamPool),
    Stream(stream::StreamPool),
    Https(https::HttpsLink),
}

/// Smoothed RTT and its deviation (RFC 6298), in microseconds.
#[derive(Default)]
struct Rtt {
    srtt: AtomicU64,
    rttvar: AtomicU64,
}

impl Rtt {
    fn sample(&self, took: Duration) {
        let r = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let srtt = self.srtt.load(Ordering::Relaxed);
        if srtt == 0 {
            self.srtt.store(r.max(1), Ordering::Relaxed);
            self.rttvar.store(r / 2, Ordering::Relaxed);
            return;
        }
        let var = self.rttvar.load(Ordering::Relaxed);
        let diff = srtt.abs_diff(r);
        self.rttvar.store((3 * var + diff) / 4, Ordering::Relaxed);
        self.srtt
            .store(((7 * srtt + r) / 8).max(1), Ordering::Relaxed);
    }

    fn srtt(&self) -> Option<Duration> {
        let s = self.srtt.load(Ordering::Relaxed);
        (s > 0).then(|| Duration::from_micros(s))
    }

    fn rto(&self) -> Duration {
        match self.srtt() {
            None => INITIAL_RTO,
            Some(s) => s + Duration::from_micros(4 * self.rttvar.load(Ordering::Relaxed)),
        }
    }
}

struct Server {
    spec: UpstreamSpec,
    link: Link,
    rtt: Rtt,
    failures: AtomicU32,
    up: AtomicBool,
    /// Milliseconds since `Upstream::epoch` of the last answered probe.
    last_probe_ok_ms: AtomicU64,
    metrics: UpstreamMetrics,
}

impl Server {
    /// One exchange with this upstream. A truncated UDP answer is asked
    /// again over TCP, which is a second packet: it spends a second token
    /// of `budget`.
    async fn exchange(
        &self,
        key: &Key,
        budget: &dyn Spend,
        who: Who,
    ) -> Result<(Vec<u8>, AnswerInfo), ExchangeError> {
        let r = match &self.link {
            Link::Udp(udp, tcp) => {
                match udp_exchange(udp, self.spec.addr, key, &self.metrics).await? {
                    Exchanged::Truncated => {
                        if !budget.spend(who).await {
                            return Err(ExchangeError::Budget);
                        }
                        tcp.exchange(key).await?
                    }
                    answered => answered,
                }
            }
            Link::Stream(pool) => pool.exchange(key).await?,
            Link::Https(h) => h.exchange(key).await?,
        };
        match r {
            Exchanged::Answer(a) => Ok(a),
            Exchanged::Truncated => Err(ExchangeError::Closed),
        }
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
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
            let m = metrics.upstream_handles(&label);
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
    fn order(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.servers.len()).collect();
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
        let deadline = Instant::now() + self.timeout;
        let order = self.order();
        // Each upstream once, then each once more: a retransmission over
        // UDP, a new attempt over a stream only if the first one failed.
        let plan: Vec<(usize, bool)> = order
            .iter()
            .map(|&i| (i, false))
            .chain(order.iter().map(|&i| (i, true)))
            .collect();
        let mut next = 0;
        let mut next_at = Instant::now();
        let mut sent = 0u32;
        let mut pending = vec![0u32; n];
        let mut failed = vec![false; n];
        let mut answered = vec![false; n];
        let mut fallback = None;
        let mut out_of_budget = false;
        let mut attempts = FuturesUnordered::new();
        loop {
            // Send the next attempt if it is due.
            while next < plan.len() && Instant::now() >= next_at {
                let (i, second) = plan[next];
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
                if !self.budget.spend(who).await {
                    self.metrics.upstream_budget_exhausted.inc();
                    out_of_budget = true;
                    next = plan.len();
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
                attempts.push(async move {
                    let started = Instant::now();
                    (i, hedge, started, s.exchange(key, budget, who).await)
                });
                next_at = Instant::now() + self.hedge_after(i);
            }
            if sent == 0 {
                return Err(UpstreamError::Budget);
            }
            if attempts.is_empty() && next >= plan.len() {
                break;
            }
            let wake = if next < plan.len() {
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
                            next_at = Instant::now();
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
                            self.metrics.upstream_budget_exhausted.inc();
                            out_of_budget = true;
                            next = plan.len();
                        }
                        Err(e) => {
                            tracing::debug!(upstream = s.spec.label(), error = %e, "upstream attempt failed");
                            s.metrics.result(UpstreamResult::Error, None);
                            failed[i] = true;
                            next_at = Instant::now();
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                }
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

/// One query over UDP from the pool ([`udp`]) with a random ID. Answers
/// that do not match are dropped and the wait goes on; a truncated answer,
/// or one larger than the payload size we advertised, means TCP.
async fn udp_exchange(
    pool: &udp::UdpPool,
    addr: SocketAddr,
    key: &Key,
    metrics: &UpstreamMetrics,
) -> Result<Exchanged, ExchangeError> {
    let mut taken = pool.take().await?;
    let r = udp_query(&mut taken, addr, key, metrics).await;
    if r.is_ok() {
        // Its answer is taken: nothing more can arrive for this query.
        taken.keep();
    }
    r
}

async fn udp_query(
    taken: &mut udp::Taken<'_>,
    addr: SocketAddr,
    key: &Key,
    metrics: &UpstreamMetrics,
) -> Result<Exchanged, ExchangeError> {
    let (sock, buf) = taken.parts().ok_or(ExchangeError::Closed)?;
    let id: u16 = rand::random();
    sock.send(&dns::upstream_query(id, key)).await?;
    let limit = if key.flags.edns() {
        usize::from(dns::EDNS_PAYLOAD)
    } else {
        512
    };
    loop {
        let n = sock.recv(buf).await?;
        if n > limit {
            metrics.dropped();
            tracing::debug!(upstream = %addr, "answer larger than advertised: retrying over TCP");
            return Ok(Exchanged::Truncated);
        }
        match accept(&buf[..n], id, key) {
            Ok((_, info)) if info.truncated => return Ok(Exchanged::Truncated),
            Ok(a) => return Ok(Exchanged::Answer(a)),
            Err(e) => {
                metrics.dropped();
                tracing::debug!(upstream = %addr, error = %e, "dropped an answer");
            }
        }
    }
}
