//! Several instances, one policy, through Redis (`--redis`): bans, the
//! upstream budget, the unique-client count and the Oblivious DoH keys are
//! shared by every instance that names the same Redis.
//!
//! Redis is never on a request's path for more than a few milliseconds:
//! bans are published and received by background tasks and enforced from
//! local state; the upstream budget is leased in batches (50 ms' worth) by
//! an atomic script and spent locally; each instance's unique-client
//! sketch is put in Redis as a HyperLogLog every 5 s, and Redis counts
//! their union. Nothing is added to a cache hit's path. When Redis is slow or gone, each instance
//! goes on with its own state and a conservative local share of the
//! upstream budget (the budget divided by the instances last seen), logs
//! it once, sets `doh_redis_up 0` and reconnects with backoff; on return it
//! pushes its bans and loads everybody else's.
//!
//! Keys, under the prefix `doh-proxy:`: `ban:<target>` (JSON, expiring
//! with the ban), channel `bans`, `offence:<target>` (repeat count, a
//! day), `budget:<unix second>`, `clients:<instance>` (its sketch of the
//! last 24 hours, kept 25 hours), `clients` (sorted set of sketches),
//! `instances` (sorted set of heartbeats), `odoh` (the current key's seed),
//! `known` (sorted set of known clients by when last seen),
//! `budget-known:<unix second>` (what known clients leased).

mod bans;
mod budget;
mod share;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use ipnet::IpNet;

use crate::clock::{unix_ms, unix_now};
use crate::guard::bans::{parse_target, target_label};
use crate::guard::{BanEvent, Guard};
use crate::hll::UniqueClients;
use crate::metrics::Metrics;
use crate::tickets::{Tickets, SECRET_LEN};
use crate::upstream::{LocalBudget, Spend, UpstreamSettings, Who};

/// A background service's future.
pub type Service = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

const PREFIX: &str = "doh-proxy";
/// Longest wait for any Redis command: past it Redis counts as down.
const OP_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a query waits for a lease before it falls back on the local
/// share.
const LEASE_WAIT: Duration = Duration::from_millis(5);
/// The most local-share tokens owed to the fleet, charged at the next
/// leases: in seconds of budget.
const MAX_DEBT_SECS: i64 = 1;
/// Known clients pushed to and pulled from Redis at a time.
const KNOWN_BATCH: usize = 10_000;
/// Instance sketches merged for the fleet's count, at most (the newest).
const MAX_SKETCHES: isize = 256;
/// How long an instance's sketch outlives its last update.
const SKETCH_TTL_SECS: u64 = 25 * 3600;

/// What the fleet runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `redis://HOST:PORT/DB` or `rediss://…`.
    pub url: String,
}

fn key(parts: &[&str]) -> String {
    let mut k = String::from(PREFIX);
    for p in parts {
        k.push(':');
        k.push_str(p);
    }
    k
}

pub struct Fleet {
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    up: AtomicBool,
    broken: Notify,
    id: String,
    metrics: Arc<Metrics>,
    guard: Arc<Guard>,
    // The upstream budget.
    qps: AtomicU32,
    /// `--known-share`, percent.
    share: AtomicU32,
    /// Tokens leased for anybody, and leased for known clients only.
    leased: AtomicI64,
    leased_known: AtomicI64,
    /// A known client waits for a lease: the next one is for known clients.
    want_known: AtomicBool,
    window: AtomicU64,
    refill: Notify,
    refilled: Notify,
    /// Tokens spent from the local share while a lease was late, charged
    /// to the fleet's counter by the next lease.
    debt: AtomicI64,
    /// Until when (unix ms) the fleet has nothing to lease to new clients,
    /// and to anybody: the end of a second whose budget is spent, or 50 ms
    /// while the rest is kept for known clients.
    exhausted: AtomicU64,
    exhausted_known: AtomicU64,
    /// Until when (unix ms) a new client whose lease is late is refused
    /// rather than served from the local share: set for a second whenever
    /// a lease for new clients was refused. Spending the local share then
    /// would be charged to the fleet later, out of the known clients'
    /// share.
    pressed: AtomicU64,

    /// The local share while Redis is away: (qps, share, its budget).
    fallback: Mutex<(u32, u8, LocalBudget)>,
    dry_run: bool,
    peers: AtomicU32,
    // Unique clients.
    unique: Arc<UniqueClients>,
    tickets: Option<Arc<Tickets>>,
    fleet_unique: AtomicU64,
    /// Unix seconds: known clients seen since were not pushed yet; known
    /// clients others pushed since were not pulled yet.
    known_pushed: AtomicU64,
    known_pulled: AtomicU64,
}

fn limiter(qps: u32, share: u8, dry_run: bool) -> LocalBudget {
    LocalBudget::with_share(qps, share, dry_run, None)
}

impl Fleet {
    pub fn new(
        s: &FleetSettings,
        budget: &UpstreamSettings,
        guard: Arc<Guard>,
        unique: Arc<UniqueClients>,
        tickets: Option<Arc<Tickets>>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Fleet>, String> {
        let client =
            redis::Client::open(s.url.as_str()).map_err(|e| format!("redis `{}`: {e}", s.url))?;
        metrics.ops.redis_up.set(0);
        let (upstream_qps, known_share, dry_run) = (budget.qps, budget.known_share, budget.dry_run);
        Ok(Arc::new(Fleet {
            client,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            broken: Notify::new(),
            id: format!("{:016x}", rand::random::<u64>()),
            metrics,
            guard,
            qps: AtomicU32::new(upstream_qps),
            share: AtomicU32::new(u32::from(known_share)),
            leased: AtomicI64::new(0),
            leased_known: AtomicI64::new(0),
            want_known: AtomicBool::new(false),
            window: AtomicU64::new(0),
            refill: Notify::new(),
            refilled: Notify::new(),
            debt: AtomicI64::new(0),
            exhausted: AtomicU64::new(0),
            exhausted_known: AtomicU64::new(0),
            pressed: AtomicU64::new(0),

            fallback: Mutex::new((
                upstream_qps,
                known_share,
                limiter(upstream_qps, known_share, dry_run),
            )),
            dry_run,
            peers: AtomicU32::new(1),
            unique,
            tickets,
            fleet_unique: AtomicU64::new(0),
            known_pushed: AtomicU64::new(0),
            known_pulled: AtomicU64::new(0),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Takes a new `--upstream-qps` and `--known-share` (reload).
    pub fn set_qps(&self, qps: u32, share: u8) {
        self.qps.store(qps, Ordering::Relaxed);
        self.share.store(u32::from(share), Ordering::Relaxed);
    }

    /// The fleet's count of distinct clients (24 h), when Redis is up.
    pub fn unique_clients(&self) -> Option<u64> {
        self.is_up()
            .then(|| self.fleet_unique.load(Ordering::Relaxed))
    }

    /// Runs one Redis command on the current connection.
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut conn = (*self.conn.load_full()?).clone();
        self.within(cmd.query_async::<T>(&mut conn)).await
    }

    /// Runs a pipeline on the current connection.
    async fn pipe<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Option<T> {
        let mut conn = (*self.conn.load_full()?).clone();
        self.within(pipe.query_async::<T>(&mut conn)).await
    }

    /// Runs a script on the current connection.
    async fn script<T: redis::FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        let mut conn = (*self.conn.load_full()?).clone();
        self.within(inv.invoke_async::<T>(&mut conn)).await
    }

    /// Waits for a reply at most [`OP_TIMEOUT`]; a timeout or a lost
    /// link marks Redis down (an error reply does not).
    async fn within<T>(
        &self,
        reply: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(OP_TIMEOUT, reply).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis command failed");
                if lost(&e) {
                    self.fail();
                }
                None
            }
            Err(_) => {
                tracing::debug!("redis command timed out");
                self.fail();
                None
            }
        }
    }

    /// Redis failed a command: the link reconnects.
    fn fail(&self) {
        if self.mark_down() {
            self.broken.notify_one();
        }
    }

    /// Marks Redis down; true if it was up.
    fn mark_down(&self) -> bool {
        let was = self.up.swap(false, Ordering::Relaxed);
        if was {
            self.conn.store(None);
            self.metrics.ops.redis_up.set(0);
            tracing::warn!("redis is unreachable or slow: going on with local state (logged once until it is back)");
        }
        was
    }

    /// The fleet's background services, named, for the caller to run
    /// until `shutdown`.
    pub fn services(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
    ) -> Vec<(&'static str, Service)> {
        let events = self.guard.subscribe_events();
        vec![
            ("redis link", Box::pin(self.clone().link(shutdown.clone()))),
            (
                "ban publisher",
                Box::pin(self.clone().publisher(events, shutdown.clone())),
            ),
            (
                "budget lease",
                Box::pin(self.clone().lease(shutdown.clone())),
            ),
            (
                "fleet ticker",
                Box::pin(self.clone().ticker(shutdown.clone())),
            ),
        ]
    }

    /// Keeps the links to Redis: a command connection and a subscription
    /// to the ban channel. Redis counts as up only once both are there (so
    /// that no ban made elsewhere is missed), then this instance pushes its
    /// bans, loads everybody's and applies what is published, until a
    /// command fails or the subscription breaks; then it reconnects with
    /// backoff.
    async fn link(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(OP_TIMEOUT));
        let channel = key(&["bans"]);
        let mut ever = false;
        loop {
            let connect = async {
                let conn = self
                    .client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?;
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>((conn, pubsub))
            };
            let connected = tokio::select! {
                c = tokio::time::timeout(Duration::from_secs(2), connect) => c,
                _ = shutdown.cancelled() => return,
            };
            match connected {
                Ok(Ok((conn, pubsub))) => {
                    self.conn.store(Some(Arc::new(conn)));
                    self.up.store(true, Ordering::Relaxed);
                    if ever {
                        tracing::info!("redis is back: resynchronising bans");
                    } else {
                        tracing::info!("connected to redis: bans, upstream budget, unique clients and ODoH keys are shared");
                    }
                    ever = true;
                    backoff = Duration::from_millis(100);
                    self.resync().await;
                    self.sync_tickets().await;
                    // Up once the fleet's bans are loaded.
                    if self.is_up() {
                        self.metrics.ops.redis_up.set(1);
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(m) => {
                                    if self.on_message(&m) {
                                        self.load_bans().await;
                                    }
                                }
                                None => {
                                    self.mark_down();
                                    break;
                                }
                            },
                            // A command failed (while up: a leftover of the
                            // previous link, which the subscription saw end).
                            _ = self.broken.notified() => if !self.is_up() { break },
                            _ = shutdown.cancelled() => return,
                        }
                    }
                }
                failed => {
                    if !ever && backoff == Duration::from_millis(100) {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".to_string(),
                        };
                        tracing::warn!(%error, "cannot connect to redis: going on with local state, retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Once a second: heartbeat, unique clients, ODoH keys.
    async fn ticker(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            n += 1;
            if !self.is_up() {
                continue;
            }
            self.heartbeat().await;
            self.sync_tickets().await;
            if n % 2 == 0 {
                self.share_known().await;
            }
            if n % 5 == 1 {
                self.share_clients().await;
            }
        }
    }

    async fn heartbeat(&self) {
        let k = key(&["instances"]);
        let now = unix_now();
        let _: Option<i64> = self
            .run(redis::cmd("ZADD").arg(&k).arg(now).arg(&self.id))
            .await;
        let _: Option<i64> = self
            .run(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&k)
                    .arg(0)
                    .arg(now.saturating_sub(10)),
            )
            .await;
        if let Some(n) = self.run::<u32>(redis::cmd("ZCARD").arg(&k)).await {
            self.peers.store(n.max(1), Ordering::Relaxed);
        }
    }
}

/// Whether an error means the link to Redis is lost (rather than one
/// command refused).
fn lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_unrecoverable_error()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    if s.len() != 2 * N {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_round_trip_through_hex() {
        let seed = [9u8; 32];
        assert_eq!(unhex(&hex(&seed)), Some(seed));
        assert_eq!(unhex::<32>("zz"), None);
        assert_eq!(unhex::<32>(&"g".repeat(64)), None);
    }
}
