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

/// The atomic lease of upstream tokens: a windowed counter per second
/// (`KEYS[1]`), granting at most what is left of the fleet's budget. Tokens
/// an instance spent on its own while a lease was late (`ARGV[3]`) are
/// charged first, and what the second cannot hold is carried into the
/// next one (`KEYS[2]`), so that the fleet's spending over time stays
/// within the budget.
///
/// The known clients' share (`--known-share`): `KEYS[3]` counts what leases
/// for known clients took this second. A lease for new clients (`ARGV[5]`
/// 0) leaves room for what the known clients have not leased of their
/// share this second (`ARGV[4]` tokens), until the last tenth of the
/// second (`ARGV[6]` ms of it gone), over which it is released: known
/// clients asking all at once find their share most of the second, and a
/// crowd alone still gets the whole budget of every second.
/// Returns the tokens granted, or -1 when the second's budget is spent.
const LEASE_SCRIPT: &str = r#"
local limit = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[1]) or '0') + tonumber(ARGV[3])
local total = limit - used
local room = total
if ARGV[5] == '0' then
  local share = tonumber(ARGV[4])
  local held = math.min(math.ceil(share * math.min(1, (1000 - tonumber(ARGV[6])) / 100)),
    share - tonumber(redis.call('GET', KEYS[3]) or '0'))
  if held > 0 then room = room - held end
end
local grant = math.min(tonumber(ARGV[1]), math.max(0, room))
used = used + grant
if used > limit then
  redis.call('INCRBY', KEYS[2], used - limit)
  redis.call('PEXPIRE', KEYS[2], 3000)
  used = limit
end
redis.call('SET', KEYS[1], used, 'PX', 2000)
if ARGV[5] == '1' and grant > 0 then
  redis.call('INCRBY', KEYS[3], grant)
  redis.call('PEXPIRE', KEYS[3], 2000)
end
if grant == 0 and total <= 0 then return -1 end
return grant
"#;

/// Raises a repeat count to ours, never lowers it.
const MAX_SCRIPT: &str = r#"
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > c then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"#;

/// Replaces the ODoH key only if it is still the one we saw.
const SWAP_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

#[derive(Debug, Serialize, Deserialize)]
struct BanRecord {
    reason: String,
    /// Unix seconds.
    expires: u64,
    offences: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct BanMessage {
    op: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    expires: u64,
    #[serde(default)]
    offences: u32,
    origin: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone)]
struct OdohRecord {
    seed: String,
    /// Unix seconds.
    born: u64,
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
        metrics.redis_up.set(0);
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
            self.metrics.redis_up.set(0);
            tracing::warn!("redis is unreachable or slow: going on with local state (logged once until it is back)");
        }
        was
    }

    /// Starts the fleet's background tasks.
    pub fn start(
        self: &Arc<Self>,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) {
        let events = self.guard.subscribe_events();
        tasks.spawn(self.clone().link(shutdown.clone()));
        tasks.spawn(self.clone().publisher(events, shutdown.clone()));
        tasks.spawn(self.clone().lease(shutdown.clone()));
        tasks.spawn(self.clone().ticker(shutdown));
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
                        self.metrics.redis_up.set(1);
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

    /// After a (re)connection: pushes this instance's bans and repeat
    /// counts, then loads everybody's.
    async fn resync(&self) {
        let (bans, offences) = self.guard.export_bans();
        let now = unix_now();
        let mut pushed = false;
        for b in bans {
            if b.expires <= now {
                continue;
            }
            let record = BanRecord {
                reason: b.reason,
                expires: b.expires,
                offences: 1,
            };
            self.put_ban(&b.target, &record).await;
            pushed = true;
        }
        for o in offences {
            let k = key(&["offence", &o.target]);
            let ttl = o.until.saturating_sub(now).max(1);
            let _: Option<i64> = self
                .script(redis::Script::new(MAX_SCRIPT).key(&k).arg(o.count).arg(ttl))
                .await;
        }
        if pushed {
            // The others load them (one message, whatever their number).
            self.publish(self.message("sync", String::new())).await;
        }
        self.load_bans().await;
    }

    async fn put_ban(&self, target: &str, record: &BanRecord) {
        let ms = record.expires.saturating_sub(unix_now()).max(1) * 1000;
        let Ok(json) = serde_json::to_string(record) else {
            return;
        };
        let _: Option<()> = self
            .run(
                redis::cmd("SET")
                    .arg(key(&["ban", target]))
                    .arg(json)
                    .arg("PX")
                    .arg(ms),
            )
            .await;
    }

    /// Loads every ban and repeat count the fleet holds.
    async fn load_bans(&self) {
        let now = unix_now();
        self.scan("ban", |target, value, _| {
            let Some(rec) = serde_json::from_str::<BanRecord>(value).ok() else {
                return;
            };
            if rec.expires > now {
                self.guard.apply_remote_ban(
                    target,
                    &rec.reason,
                    Duration::from_secs(rec.expires - now),
                    rec.offences,
                );
            }
        })
        .await;
        self.scan("offence", |target, value, ttl| {
            if let (Ok(count), Some(ttl)) = (value.parse::<u32>(), ttl) {
                self.guard.apply_remote_offence(target, count, ttl);
            }
        })
        .await;
    }

    /// Calls `each` with the target, value and time to live of every
    /// `<kind>:<target>` key.
    async fn scan(&self, kind: &str, mut each: impl FnMut(IpNet, &str, Option<Duration>)) {
        let pattern = key(&[kind, "*"]);
        let strip = format!("{PREFIX}:{kind}:");
        let mut cursor = 0u64;
        loop {
            let Some((next, keys)): Option<(u64, Vec<String>)> = self
                .run(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await
            else {
                return;
            };
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("GET").arg(k).cmd("PTTL").arg(k);
                }
                let Some(values): Option<Vec<(Option<String>, i64)>> = self.pipe(&pipe).await
                else {
                    return;
                };
                for (k, (v, ttl)) in keys.iter().zip(values) {
                    let (Some(target), Some(v)) =
                        (k.strip_prefix(&strip).and_then(parse_target), v)
                    else {
                        continue;
                    };
                    let ttl = u64::try_from(ttl).ok().map(Duration::from_millis);
                    each(target, &v, ttl);
                }
            }
            cursor = next;
            if cursor == 0 {
                return;
            }
        }
    }

    /// Applies a ban made or lifted by another instance; true when that
    /// instance has just pushed its bans after a reconnection and they are
    /// to be loaded.
    fn on_message(&self, msg: &redis::Msg) -> bool {
        let Ok(payload) = msg.get_payload::<String>() else {
            return false;
        };
        let Ok(m) = serde_json::from_str::<BanMessage>(&payload) else {
            return false;
        };
        if m.origin == self.id {
            return false;
        }
        if m.op == "sync" {
            return true;
        }
        let Some(target) = parse_target(&m.target) else {
            return false;
        };
        match m.op.as_str() {
            "ban" => {
                let left = m.expires.saturating_sub(unix_now());
                if left > 0 {
                    self.guard.apply_remote_ban(
                        target,
                        &m.reason,
                        Duration::from_secs(left),
                        m.offences,
                    );
                }
            }
            "unban" => self.guard.apply_remote_unban(target),
            _ => {}
        }
        false
    }

    /// A message from this instance, with no ban details.
    fn message(&self, op: &str, target: String) -> BanMessage {
        BanMessage {
            op: op.into(),
            target,
            reason: String::new(),
            expires: 0,
            offences: 0,
            origin: self.id.clone(),
        }
    }

    async fn publish(&self, msg: BanMessage) {
        if let Ok(json) = serde_json::to_string(&msg) {
            let _: Option<i64> = self
                .run(redis::cmd("PUBLISH").arg(key(&["bans"])).arg(json))
                .await;
        }
    }

    /// Publishes this instance's bans and lifts.
    async fn publisher(
        self: Arc<Self>,
        mut events: mpsc::Receiver<BanEvent>,
        shutdown: CancellationToken,
    ) {
        loop {
            let ev = tokio::select! {
                e = events.recv() => match e { Some(e) => e, None => return },
                _ = shutdown.cancelled() => return,
            };
            if !self.is_up() {
                // Pushed at the next resynchronisation.
                continue;
            }
            let msg = match ev {
                BanEvent::Ban {
                    target,
                    reason,
                    expires,
                    offences,
                } => {
                    let t = target_label(&target);
                    self.put_ban(
                        &t,
                        &BanRecord {
                            reason: reason.to_string(),
                            expires,
                            offences,
                        },
                    )
                    .await;
                    if crate::net::is_host(&target) {
                        // A ban makes the client unknown to the fleet too.
                        let _: Option<i64> = self
                            .run(
                                redis::cmd("ZREM")
                                    .arg(key(&["known"]))
                                    .arg(target.addr().to_string()),
                            )
                            .await;
                    }
                    let k = key(&["offence", &t]);
                    let _: Option<()> = self
                        .run(redis::cmd("SET").arg(&k).arg(offences).arg("EX").arg(86400))
                        .await;
                    BanMessage {
                        reason: reason.to_string(),
                        expires,
                        offences,
                        ..self.message("ban", t)
                    }
                }
                BanEvent::Unban { target } => {
                    let t = target_label(&target);
                    let _: Option<()> = self.run(redis::cmd("DEL").arg(key(&["ban", &t]))).await;
                    self.message("unban", t)
                }
            };
            self.publish(msg).await;
        }
    }

    /// Leases upstream tokens for the current second, in batches of 50 ms'
    /// worth, when the local supply runs low.
    async fn lease(self: Arc<Self>, shutdown: CancellationToken) {
        let script = redis::Script::new(LEASE_SCRIPT);
        loop {
            tokio::select! {
                _ = self.refill.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.is_up() {
                self.refilled.notify_waiters();
                continue;
            }
            let qps = self.qps.load(Ordering::Relaxed).max(1);
            let batch = i64::from((qps / 20).max(1));
            let owed = self.debt.swap(0, Ordering::Relaxed);
            let for_known = self.want_known.swap(false, Ordering::Relaxed);
            let share = self.share.load(Ordering::Relaxed);
            let reserve = u64::from(qps) * u64::from(share) / 100;
            let now = crate::clock::since_epoch();
            let (sec, ms) = (now.as_secs(), now.subsec_millis());
            let granted: Option<i64> = self
                .script(
                    script
                        .key(key(&["budget", &sec.to_string()]))
                        .key(key(&["budget", &(sec + 1).to_string()]))
                        .key(key(&["budget-known", &sec.to_string()]))
                        .arg(batch)
                        .arg(qps)
                        .arg(owed)
                        .arg(if self.dry_run { 0 } else { reserve })
                        .arg(u8::from(for_known))
                        .arg(ms),
                )
                .await;
            // None: Redis is down now, and the debt goes with the fleet's view.
            if let Some(g) = granted {
                let end_of_second = (sec + 1) * 1000;
                if g <= 0 && !for_known {
                    self.pressed
                        .store(sec * 1000 + u64::from(ms) + 1000, Ordering::Relaxed);
                }
                if g < 0 {
                    self.exhausted.store(end_of_second, Ordering::Relaxed);
                    self.exhausted_known.store(end_of_second, Ordering::Relaxed);
                } else if g == 0 && !for_known {
                    let later = sec * 1000 + u64::from(ms) + 50;
                    self.exhausted
                        .store(later.min(end_of_second), Ordering::Relaxed);
                }
                let g = g.max(0);
                let pool = if for_known {
                    &self.leased_known
                } else {
                    &self.leased
                };
                if self.window.swap(sec, Ordering::Relaxed) != sec {
                    // A new second: what is left of the last one is void.
                    self.leased.store(0, Ordering::Relaxed);
                    self.leased_known.store(0, Ordering::Relaxed);
                }
                pool.fetch_add(g, Ordering::Relaxed);
            }
            self.refilled.notify_waiters();
        }
    }

    /// Records local-share tokens the fleet's counter has not seen yet,
    /// at most [`MAX_DEBT_SECS`] of budget.
    fn owe(&self, n: i64) {
        let cap = i64::from(self.qps.load(Ordering::Relaxed)) * MAX_DEBT_SECS;
        let _ = self
            .debt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some((d + n).min(cap))
            });
    }

    /// Takes a leased token: a known client from the known clients'
    /// leases first, then from anybody's.
    fn take(&self, who: Who) -> bool {
        if self.window.load(Ordering::Relaxed) != unix_now() {
            return false;
        }
        let pools: &[&AtomicI64] = match who {
            Who::Known => &[&self.leased_known, &self.leased],
            Who::New => &[&self.leased],
        };
        for pool in pools {
            let left = pool.fetch_sub(1, Ordering::Relaxed);
            if left > 0 {
                let batch = i64::from((self.qps.load(Ordering::Relaxed) / 20).max(1));
                if left <= batch / 2 && std::ptr::eq(*pool, &self.leased) {
                    self.refill.notify_one();
                }
                return true;
            }
            pool.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Whether the fleet's budget for `who` ran out this second.
    fn spent(&self, who: Who) -> bool {
        let now = unix_ms();
        let until = match who {
            Who::Known => &self.exhausted_known,
            Who::New => &self.exhausted,
        };
        now < until.load(Ordering::Relaxed)
    }

    /// The local share of the budget, for when Redis cannot lease (with
    /// the known clients' part of it).
    fn local_share(&self, who: Who) -> bool {
        let qps = self.qps.load(Ordering::Relaxed) / self.peers.load(Ordering::Relaxed).max(1);
        let known = u8::try_from(self.share.load(Ordering::Relaxed)).unwrap_or(100);
        let Ok(mut f) = self.fallback.lock() else {
            return false;
        };
        if (f.0, f.1) != (qps, known) {
            *f = (qps, known, limiter(qps, known, self.dry_run));
        }
        f.2.take(who)
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

    /// Puts this instance's sketch of the last 24 hours in Redis (a dense
    /// HyperLogLog under its own key) and counts the union of the fleet's.
    /// Known clients, shared: those that became known or were answered
    /// here since the last push go into the sorted set `known` (scored by
    /// when last seen, never lowered), which is trimmed to `--known-max`
    /// and `--known-forget-secs`; those the others added since the last
    /// pull become known here (unless banned here). At most
    /// [`KNOWN_BATCH`] each way every 2 s.
    async fn share_known(&self) {
        let s = self.guard.settings();
        let now = unix_now();
        let set = key(&["known"]);
        let since = self.known_pushed.load(Ordering::Relaxed);
        let ours = self.guard.known().known_since(since, KNOWN_BATCH);
        if !ours.is_empty() {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&set).arg("GT");
            for (ip, last) in &ours {
                zadd.arg(*last).arg(ip.to_string());
            }
            let mut pipe = redis::pipe();
            pipe.add_command(zadd)
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(&set)
                .arg(0)
                .arg(now.saturating_sub(s.known_forget_secs))
                .ignore()
                .cmd("ZREMRANGEBYRANK")
                .arg(&set)
                .arg(0)
                .arg(
                    -(i64::try_from(s.known_max)
                        .unwrap_or(i64::MAX)
                        .saturating_add(1)),
                )
                .ignore();
            if self.pipe::<()>(&pipe).await.is_some() {
                // One second back: a client answered later in this second
                // is pushed again, never missed.
                self.known_pushed
                    .store(now.saturating_sub(1), Ordering::Relaxed);
            }
        }
        let from = self.known_pulled.load(Ordering::Relaxed);
        let Some(theirs): Option<Vec<(String, u64)>> = self
            .run(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&set)
                    .arg(from.max(now.saturating_sub(s.known_forget_secs)))
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(KNOWN_BATCH),
            )
            .await
        else {
            return;
        };
        let mut newest = from;
        for (member, last) in &theirs {
            newest = newest.max(*last);
            let Ok(ip) = member.parse::<std::net::IpAddr>() else {
                continue;
            };
            if self.guard.banned(ip) == crate::guard::Verdict::Pass {
                self.guard.known().make_known(ip, (*last).min(now));
            }
        }
        if theirs.len() == KNOWN_BATCH && newest == from {
            newest += 1; // a full page of one score: move on
        }
        // Two seconds back: what others pushed late is read again.
        self.known_pulled
            .store(newest.min(now).saturating_sub(2), Ordering::Relaxed);
    }

    async fn share_clients(&self) {
        let now = unix_now();
        let ours = key(&["clients", &self.id]);
        let index = key(&["clients"]);
        let _: Option<()> = self
            .run(
                redis::cmd("SET")
                    .arg(&ours)
                    .arg(self.unique.redis_dense())
                    .arg("EX")
                    .arg(SKETCH_TTL_SECS),
            )
            .await;
        let _: Option<i64> = self
            .run(redis::cmd("ZADD").arg(&index).arg(now).arg(&self.id))
            .await;
        let _: Option<i64> = self
            .run(
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(&index)
                    .arg(0)
                    .arg(now.saturating_sub(SKETCH_TTL_SECS)),
            )
            .await;
        let Some(ids): Option<Vec<String>> = self
            .run(
                redis::cmd("ZREVRANGE")
                    .arg(&index)
                    .arg(0)
                    .arg(MAX_SKETCHES - 1),
            )
            .await
        else {
            return;
        };
        let keys: Vec<String> = ids.iter().map(|id| key(&["clients", id])).collect();
        if let Some(n) = self.run::<u64>(redis::cmd("PFCOUNT").arg(keys)).await {
            self.fleet_unique.store(n, Ordering::Relaxed);
        }
    }

    /// Shares the TLS ticket keys: the key of each period is the first
    /// one an instance put in Redis; every instance installs the current
    /// and the previous period's, so that a client resumes on any of them.
    /// They expire from Redis when no instance may use them any more.
    async fn sync_tickets(&self) {
        let Some(t) = &self.tickets else { return };
        let period = t.period();
        let k = |p: u64| key(&["tls-ticket", &p.to_string()]);
        if let Some(fresh) = t.generate() {
            let _: Option<Option<String>> = self
                .run(
                    redis::cmd("SET")
                        .arg(k(period))
                        .arg(hex(&fresh))
                        .arg("NX")
                        .arg("EX")
                        .arg(3 * t.lifetime_secs()),
                )
                .await;
        }
        let Some(both): Option<Vec<Option<String>>> = self
            .run(
                redis::cmd("MGET")
                    .arg(k(period.saturating_sub(1)))
                    .arg(k(period)),
            )
            .await
        else {
            return;
        };
        for (p, secret) in [period.saturating_sub(1), period].into_iter().zip(both) {
            if let Some(s) = secret.as_deref().and_then(unhex::<SECRET_LEN>) {
                t.install(p, &s);
            }
        }
    }

    /// Shares the ODoH key: the one in Redis is installed; none there, ours
    /// is put there; when it is older than `rotate`, one instance replaces
    /// it (an atomic compare-and-swap) and every instance follows.
    pub async fn sync_odoh(&self, odoh: &crate::odoh::Odoh, rotate: Duration) {
        if !self.is_up() {
            return;
        }
        let k = key(&["odoh"]);
        let current: Option<Option<String>> = self.run(redis::cmd("GET").arg(&k)).await;
        let Some(current) = current else { return };
        let ours = odoh.current();
        let record = |key: &crate::odoh::Key| OdohRecord {
            seed: hex(&key.seed),
            born: key.born_unix(),
        };
        match current.and_then(|s| serde_json::from_str::<OdohRecord>(&s).ok().map(|r| (s, r))) {
            None => {
                if let Ok(json) = serde_json::to_string(&record(&ours)) {
                    let _: Option<Option<String>> = self
                        .run(redis::cmd("SET").arg(&k).arg(json).arg("NX"))
                        .await;
                }
            }
            Some((raw, shared)) => {
                if shared.born + rotate.as_secs() <= unix_now() {
                    let Ok(fresh) = crate::odoh::Key::generate() else {
                        return;
                    };
                    let Ok(json) = serde_json::to_string(&record(&fresh)) else {
                        return;
                    };
                    let swapped: Option<i64> = self
                        .script(redis::Script::new(SWAP_SCRIPT).key(&k).arg(&raw).arg(&json))
                        .await;
                    if swapped == Some(1) {
                        let _ = odoh.install(fresh);
                    }
                    return;
                }
                if shared != record(&ours) {
                    if let Some(key) = unhex(&shared.seed)
                        .and_then(|seed| crate::odoh::Key::from_shared(seed, shared.born).ok())
                    {
                        let _ = odoh.install(key);
                    }
                }
            }
        }
    }
}

impl Spend for Fleet {
    fn spend(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(async move {
            if !self.is_up() {
                return self.local_share(who);
            }
            if self.take(who) {
                return true;
            }
            if self.spent(who) {
                // The fleet has spent this second's budget: no need to ask.
                return false;
            }
            let waiting = self.refilled.notified();
            tokio::pin!(waiting);
            waiting.as_mut().enable();
            if who == Who::Known && self.share.load(Ordering::Relaxed) > 0 {
                self.want_known.store(true, Ordering::Relaxed);
            }
            self.refill.notify_one();
            let _ = tokio::time::timeout(LEASE_WAIT, waiting).await;
            if self.take(who) {
                return true;
            }
            if !self.is_up() {
                return self.local_share(who);
            }
            if self.spent(who) {
                // The fleet has spent this second's budget.
                return false;
            }
            // The lease is late (Redis slow, this instance busy) or went to
            // other queries before this one: the query does not wait longer
            // but spends the local share, which the next lease charges to
            // the fleet — unless new clients are being held back for the
            // known clients' share.
            if who == Who::New && unix_ms() < self.pressed.load(Ordering::Relaxed) {
                return false;
            }
            if self.local_share(who) {
                self.owe(1);
                return true;
            }
            false
        })
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
