//! Abuse protection: who may connect, how much each client may ask, and
//! the penalty box.
//!
//! - Admission at accept, before any TLS work: static deny ranges, bans
//!   (address or prefix), connection caps per address, per prefix and in
//!   all. A [`ConnTicket`] holds the connection's place and gives it back
//!   when dropped.
//! - Budgets per client address and per client prefix (token buckets).
//! - The penalty box: rejected and over-budget requests add to a client's
//!   score; `--ban-after` within a minute bans it for `--ban-secs`, doubled
//!   for each repeat within a day (at most 16 times). When 8 addresses of
//!   one prefix are banned at once, the prefix is banned. Bans expire by
//!   themselves.
//! - `--allow` ranges are exempt from all of the above; trusted proxies are
//!   never limited as clients. In `--dry-run`, everything is counted and
//!   logged, nothing enforced.
//!
//! Memory stays bounded whatever the number of clients: limiter state and
//! penalty scores are pruned every second (a key whose bucket is full
//! again, a score whose minute is over, is forgotten) and cleared outright
//! above a hard cap; repeat counts live in a bounded cache; bans are capped
//! in number.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use crate::config::{Cidr, Config};
use crate::metrics::{ConnReject, Metrics};
use crate::reject::Reject;

/// Limiter keys kept at most; above it the limiter starts afresh.
const MAX_TRACKED: usize = 1_000_000;
/// Bans kept at most; above it the ban closest to expiry gives way.
const MAX_BANS: usize = 200_000;
/// Banned addresses in one prefix that get the whole prefix banned.
const PREFIX_BAN_HOSTS: u32 = 8;
/// Longest ban, as a multiple of `--ban-secs`.
const MAX_BAN_FACTOR: u64 = 16;
/// Window over which rejected requests are counted.
const SCORE_WINDOW_SECS: u32 = 60;

/// Maps an IPv4-mapped IPv6 address to IPv4, so one client has one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The prefix an address belongs to, for budgets, caps and prefix bans.
pub fn prefix_of(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    let bits = if ip.is_ipv4() { v4 } else { v6 };
    IpNet::new(ip, bits)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(ip))
}

/// One ban in force.
#[derive(Debug)]
pub struct Ban {
    pub reason: &'static str,
    pub since: SystemTime,
    pub expires: Instant,
    pub expires_at: SystemTime,
    pub hits: AtomicU64,
}

/// A ban as the admin API shows it.
#[derive(Debug, serde::Serialize)]
pub struct BanView {
    pub target: String,
    pub reason: &'static str,
    pub since: u64,
    pub expires: u64,
    pub remaining_secs: u64,
    pub hits: u64,
}

#[derive(Default)]
struct BanTable {
    bans: HashMap<IpNet, Ban>,
    /// Banned host addresses per prefix, for prefix escalation.
    hosts_per_prefix: HashMap<IpNet, u32>,
    has_prefix_bans: bool,
}

/// Rejected requests of one client in the current one-minute window.
struct Score {
    window_start: u32,
    count: u32,
}

#[derive(Default)]
struct ConnCounts {
    per_ip: HashMap<IpAddr, u32>,
    per_prefix: HashMap<IpNet, u32>,
}

pub struct Guard {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    trusted: Vec<Cidr>,
    dry_run: bool,
    prefix_v4: u8,
    prefix_v6: u8,
    max_conns: usize,
    max_conns_per_ip: u32,
    max_conns_per_prefix: u32,
    ban_after: u32,
    ban_secs: u64,
    ban_file: Option<PathBuf>,
    /// Ports the ban file's nftables rule drops for banned sources.
    ports: Vec<u16>,
    open: AtomicUsize,
    conns: Mutex<ConnCounts>,
    ip_limiter: RwLock<DefaultKeyedRateLimiter<IpAddr>>,
    prefix_limiter: RwLock<DefaultKeyedRateLimiter<IpNet>>,
    ip_quota: Quota,
    prefix_quota: Quota,
    clock: DefaultClock,
    scores: DashMap<IpAddr, Score>,
    offences: moka::sync::Cache<IpNet, u32>,
    bans: RwLock<BanTable>,
    bans_dirty: AtomicBool,
    epoch: Instant,
    last_xff_warning: AtomicU64,
    metrics: Arc<Metrics>,
}

fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

/// Where a connection's place is held; dropping it frees the place.
pub struct ConnTicket {
    guard: Arc<Guard>,
    /// The address counted against the per-address and per-prefix caps.
    ip: Option<IpAddr>,
    /// Whether this ticket holds a place in the global count.
    open: bool,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        if self.open {
            self.guard.open.fetch_sub(1, Ordering::Relaxed);
            self.guard.metrics.connections_open.dec();
        }
        if let Some(ip) = self.ip {
            self.guard.release(ip);
        }
    }
}

/// The verdict on a client's request budget.
#[derive(Debug, PartialEq, Eq)]
pub enum Budget {
    Ok,
    /// Over budget: retry after this many seconds.
    Over(u64),
}

impl Guard {
    pub fn new(cfg: &Config, metrics: Arc<Metrics>) -> Guard {
        let mut ports: Vec<u16> = cfg
            .listen
            .iter()
            .chain(&cfg.listen_http)
            .map(|a| a.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let ip_quota = Quota::per_second(nz(cfg.per_ip_qps)).allow_burst(nz(cfg.per_ip_burst));
        let prefix_quota = Quota::per_second(nz(cfg.per_prefix_qps))
            .allow_burst(nz(cfg.per_prefix_qps.saturating_mul(5)));
        Guard {
            allow: cfg.allow.clone(),
            deny: cfg.deny.clone(),
            trusted: cfg.trusted_proxy.clone(),
            dry_run: cfg.dry_run,
            prefix_v4: cfg.prefix_v4,
            prefix_v6: cfg.prefix_v6,
            max_conns: cfg.max_conns as usize,
            max_conns_per_ip: cfg.max_conns_per_ip,
            max_conns_per_prefix: cfg.max_conns_per_ip.saturating_mul(8),
            ban_after: cfg.ban_after,
            ban_secs: cfg.ban_secs,
            ban_file: cfg.ban_file.clone(),
            ports,
            open: AtomicUsize::new(0),
            conns: Mutex::default(),
            ip_limiter: RwLock::new(RateLimiter::keyed(ip_quota)),
            prefix_limiter: RwLock::new(RateLimiter::keyed(prefix_quota)),
            ip_quota,
            prefix_quota,
            clock: DefaultClock::default(),
            scores: DashMap::new(),
            offences: moka::sync::Cache::builder()
                .max_capacity(MAX_BANS as u64)
                .time_to_live(Duration::from_secs(86400))
                .build(),
            bans: RwLock::default(),
            bans_dirty: AtomicBool::new(cfg.ban_file.is_some()),
            epoch: Instant::now(),
            last_xff_warning: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|c| c.contains(&ip))
    }

    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(&ip))
    }

    fn prefix(&self, ip: IpAddr) -> IpNet {
        prefix_of(ip, self.prefix_v4, self.prefix_v6)
    }

    /// Counts a mitigation; returns whether to enforce it.
    fn enforce_conn(&self, reason: ConnReject, ip: IpAddr) -> bool {
        self.metrics.conn_rejected(reason, self.dry_run);
        if self.dry_run {
            tracing::info!(client = %ip, reason = reason.label(), "dry run: would close connection");
        }
        !self.dry_run
    }

    /// Admission of a new connection from `peer`, before any TLS work.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<ConnTicket, ConnReject> {
        self.admit_as(peer, true)
    }

    /// Admission of the client that a trusted proxy's PROXY header names:
    /// its bans and its per-address and per-prefix caps. The connection
    /// itself already holds its place in the global count, as the proxy's.
    pub fn admit_proxied(self: &Arc<Self>, client: IpAddr) -> Result<ConnTicket, ConnReject> {
        self.admit_as(client, false)
    }

    fn admit_as(self: &Arc<Self>, peer: IpAddr, global: bool) -> Result<ConnTicket, ConnReject> {
        let ip = canonical(peer);
        let allowed = self.is_allowed(ip);
        if !allowed && self.deny.iter().any(|c| c.contains(&ip)) {
            self.metrics.conn_rejected(ConnReject::Denied, false);
            return Err(ConnReject::Denied);
        }
        let limited = !allowed && !self.is_trusted_proxy(ip);
        if limited && self.ban_of(ip).is_some() && self.enforce_conn(ConnReject::Banned, ip) {
            return Err(ConnReject::Banned);
        }
        if global
            && !allowed
            && self.open.load(Ordering::Relaxed) >= self.max_conns
            && self.enforce_conn(ConnReject::Global, ip)
        {
            return Err(ConnReject::Global);
        }
        let mut counted = None;
        if limited {
            let prefix = self.prefix(ip);
            let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            let n_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
            let n_prefix = c.per_prefix.get(&prefix).copied().unwrap_or(0);
            if n_ip >= self.max_conns_per_ip && self.enforce_conn(ConnReject::PerIp, ip) {
                return Err(ConnReject::PerIp);
            }
            if n_prefix >= self.max_conns_per_prefix && self.enforce_conn(ConnReject::PerPrefix, ip)
            {
                return Err(ConnReject::PerPrefix);
            }
            *c.per_ip.entry(ip).or_default() += 1;
            *c.per_prefix.entry(prefix).or_default() += 1;
            counted = Some(ip);
        }
        if global {
            self.open.fetch_add(1, Ordering::Relaxed);
            self.metrics.connections_open.inc();
        }
        Ok(ConnTicket {
            guard: self.clone(),
            ip: counted,
            open: global,
        })
    }

    fn release(&self, ip: IpAddr) {
        let prefix = self.prefix(ip);
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for_decrement(&mut c.per_ip, ip);
        for_decrement(&mut c.per_prefix, prefix);
    }

    /// Open connections in all.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The real client of a request: the peer itself, or, when the peer is
    /// a trusted proxy, the address its forwarding headers name.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        let has_headers = headers.contains_key("x-forwarded-for")
            || headers.contains_key(http::header::FORWARDED);
        if !self.is_trusted_proxy(peer) {
            if has_headers {
                self.warn_untrusted_forwarding(peer);
            }
            return peer;
        }
        let mut hops: Vec<Option<IpAddr>> = Vec::new();
        for v in headers.get_all("x-forwarded-for") {
            let s = v.to_str().unwrap_or("");
            hops.extend(s.split(',').map(parse_hop));
        }
        if hops.is_empty() {
            for v in headers.get_all(http::header::FORWARDED) {
                let s = v.to_str().unwrap_or("");
                for elem in s.split(',') {
                    let forwarded_for = elem.split(';').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
                    });
                    hops.push(forwarded_for.and_then(parse_hop));
                }
            }
        }
        // Right-most hop that is not itself a trusted proxy. A hop that
        // does not parse ends the walk: nothing to its left can be trusted.
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) => {
                    client = canonical(*ip);
                    if !self.is_trusted_proxy(client) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }

    fn warn_untrusted_forwarding(&self, peer: IpAddr) {
        let now = self.epoch.elapsed().as_secs() + 60;
        let last = self.last_xff_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_xff_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                peer = %peer,
                "forwarding headers from a peer that is not a --trusted-proxy: ignored \
                 (this warning repeats at most once a minute)"
            );
        }
    }

    /// Whether requests from `client` are exempt from budgets and bans.
    fn exempt(&self, client: IpAddr) -> bool {
        self.is_allowed(client) || self.is_trusted_proxy(client)
    }

    /// Whether a request from `client` must be refused as banned. Counts
    /// the refusal (request and reason) either way; in dry-run returns false.
    pub fn refuse_banned(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        if self.exempt(client) || self.ban_of(client).is_none() {
            return false;
        }
        self.metrics.reject(Reject::Banned, self.dry_run);
        self.metrics.request(Reject::Banned.outcome(), self.dry_run);
        !self.dry_run
    }

    /// The ban covering `ip` (address or prefix), counting the hit.
    fn ban_of(&self, ip: IpAddr) -> Option<()> {
        let t = self.bans.read().unwrap_or_else(|p| p.into_inner());
        if t.bans.is_empty() {
            return None;
        }
        let now = Instant::now();
        let host = IpNet::from(ip);
        let hit = |net: &IpNet| {
            t.bans
                .get(net)
                .filter(|b| b.expires > now)
                .map(|b| b.hits.fetch_add(1, Ordering::Relaxed))
        };
        if hit(&host).is_some() || (t.has_prefix_bans && hit(&self.prefix(ip)).is_some()) {
            Some(())
        } else {
            None
        }
    }

    /// Spends one request of the client's budgets (address, then prefix).
    pub fn check_budget(&self, client: IpAddr) -> Budget {
        let client = canonical(client);
        if self.exempt(client) {
            return Budget::Ok;
        }
        let ips = self.ip_limiter.read().unwrap_or_else(|p| p.into_inner());
        let prefixes = self
            .prefix_limiter
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let over = match ips.check_key(&client) {
            Err(e) => Some(e.wait_time_from(self.clock.now())),
            Ok(()) => prefixes
                .check_key(&self.prefix(client))
                .err()
                .map(|e| e.wait_time_from(self.clock.now())),
        };
        match over {
            None => Budget::Ok,
            Some(wait) => {
                if self.dry_run {
                    self.metrics.reject(Reject::RateLimited, true);
                    self.metrics.request(Reject::RateLimited.outcome(), true);
                    tracing::debug!(client = %client, "dry run: would rate-limit");
                    Budget::Ok
                } else {
                    Budget::Over(wait.as_secs() + 1)
                }
            }
        }
    }

    /// Adds a rejected request to the client's score; bans it when the
    /// score reaches `--ban-after` within a minute.
    pub fn penalize(&self, client: IpAddr, reason: Reject) {
        let client = canonical(client);
        if !reason.penalized() || self.exempt(client) {
            return;
        }
        let now = self.now_secs();
        let banned = {
            let mut s = self.scores.entry(client).or_insert(Score {
                window_start: now,
                count: 0,
            });
            if now >= s.window_start + SCORE_WINDOW_SECS {
                s.window_start = now;
                s.count = 0;
            }
            s.count += 1;
            let full = s.count >= self.ban_after;
            if full {
                s.count = 0;
            }
            full
        };
        if banned {
            self.ban(IpNet::from(client), reason.label());
        }
    }

    /// Bans `target` (an address or a prefix) for `--ban-secs`, longer for
    /// repeat offenders.
    pub fn ban(&self, target: IpNet, reason: &'static str) {
        let target = target.trunc();
        let is_host = target.prefix_len() == target.max_prefix_len();
        if self.dry_run {
            self.metrics.ban(!is_host, true);
            tracing::warn!(target = %target, reason, "dry run: would ban");
            return;
        }
        let offences = self.offences.get(&target).unwrap_or(0);
        self.offences.insert(target, offences + 1);
        let factor = (1u64 << offences.min(4)).min(MAX_BAN_FACTOR);
        let secs = self.ban_secs.saturating_mul(factor);
        let mut escalate = None;
        {
            let mut t = self.bans.write().unwrap_or_else(|p| p.into_inner());
            if t.bans.len() >= MAX_BANS {
                evict_soonest(&mut t);
            }
            let ban = Ban {
                reason,
                since: SystemTime::now(),
                expires: Instant::now() + Duration::from_secs(secs),
                expires_at: SystemTime::now() + Duration::from_secs(secs),
                hits: AtomicU64::new(0),
            };
            let fresh = t.bans.insert(target, ban).is_none();
            if is_host && fresh {
                let prefix = self.prefix(target.addr());
                let n = t.hosts_per_prefix.entry(prefix).or_default();
                *n += 1;
                if *n >= PREFIX_BAN_HOSTS && !t.bans.contains_key(&prefix) {
                    escalate = Some(prefix);
                }
            } else if !is_host {
                t.has_prefix_bans = true;
            }
            self.metrics.bans_active.set(t.bans.len() as i64);
        }
        self.metrics.ban(!is_host, false);
        self.bans_dirty.store(true, Ordering::Relaxed);
        tracing::warn!(target = %target, reason, secs, offences = offences + 1, "banned");
        if let Some(prefix) = escalate {
            if !self.allow.iter().any(|a| overlaps(&a.0, &prefix))
                && !self.trusted.iter().any(|a| overlaps(&a.0, &prefix))
            {
                self.ban(prefix, "prefix");
            }
        }
    }

    /// Lifts the ban on exactly `target`; returns whether there was one.
    pub fn unban(&self, target: IpNet) -> bool {
        let target = target.trunc();
        let removed = {
            let mut t = self.bans.write().unwrap_or_else(|p| p.into_inner());
            let removed = remove_ban(&mut t, &target, self.prefix_v4, self.prefix_v6);
            self.metrics.bans_active.set(t.bans.len() as i64);
            removed
        };
        if removed {
            self.bans_dirty.store(true, Ordering::Relaxed);
            tracing::info!(target = %target, "ban lifted by the operator");
        }
        removed
    }

    /// Active bans, soonest to expire first.
    pub fn bans(&self) -> Vec<BanView> {
        let t = self.bans.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let unix = |s: SystemTime| s.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut v: Vec<BanView> = t
            .bans
            .iter()
            .filter(|(_, b)| b.expires > now)
            .map(|(net, b)| BanView {
                target: net.to_string(),
                reason: b.reason,
                since: unix(b.since),
                expires: unix(b.expires_at),
                remaining_secs: b.expires.saturating_duration_since(now).as_secs(),
                hits: b.hits.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by_key(|b| b.remaining_secs);
        v
    }

    /// Housekeeping, run every second: expire bans, prune limiter state,
    /// rewrite the ban file when bans changed.
    pub fn tick(&self) {
        let now = Instant::now();
        let expired: Vec<IpNet> = {
            let t = self.bans.read().unwrap_or_else(|p| p.into_inner());
            t.bans
                .iter()
                .filter(|(_, b)| b.expires <= now)
                .map(|(n, _)| *n)
                .collect()
        };
        if !expired.is_empty() {
            let mut t = self.bans.write().unwrap_or_else(|p| p.into_inner());
            for net in &expired {
                if remove_ban(&mut t, net, self.prefix_v4, self.prefix_v6) {
                    tracing::info!(target = %net, "ban expired");
                }
            }
            self.metrics.bans_active.set(t.bans.len() as i64);
            self.bans_dirty.store(true, Ordering::Relaxed);
        }
        self.prune_limiters();
        if self.bans_dirty.swap(false, Ordering::Relaxed) {
            if let Err(e) = self.write_ban_file() {
                self.bans_dirty.store(true, Ordering::Relaxed);
                tracing::error!(error = %e, "cannot write the ban file");
            }
        }
    }

    fn now_secs(&self) -> u32 {
        self.epoch.elapsed().as_secs().min(u64::from(u32::MAX)) as u32
    }

    /// Forgets limiter keys whose bucket is full again and scores whose
    /// minute is over; clears everything if, even so, more than the hard
    /// cap remain.
    pub fn prune_limiters(&self) {
        let now = self.now_secs();
        self.scores
            .retain(|_, s| now < s.window_start + SCORE_WINDOW_SECS);
        if self.scores.len() > MAX_TRACKED {
            tracing::warn!("more than {MAX_TRACKED} clients scored: penalty scores start afresh");
            self.scores.clear();
        }
        self.scores.shrink_to_fit();
        prune(&self.ip_limiter, self.ip_quota, "address");
        prune(&self.prefix_limiter, self.prefix_quota, "prefix");
    }

    /// Number of client keys the limiters hold.
    pub fn tracked_clients(&self) -> usize {
        self.ip_limiter.read().map(|l| l.len()).unwrap_or(0)
            + self.prefix_limiter.read().map(|l| l.len()).unwrap_or(0)
    }

    fn write_ban_file(&self) -> std::io::Result<()> {
        let Some(path) = &self.ban_file else {
            return Ok(());
        };
        let text = {
            let t = self.bans.read().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            render_nft(
                t.bans
                    .iter()
                    .map(|(n, b)| (*n, b.expires.saturating_duration_since(now).as_secs())),
                &self.ports,
            )
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

fn prune<K: std::hash::Hash + Eq + Clone>(
    limiter: &RwLock<DefaultKeyedRateLimiter<K>>,
    quota: Quota,
    what: &str,
) {
    let over = {
        let l = limiter.read().unwrap_or_else(|p| p.into_inner());
        l.retain_recent();
        l.shrink_to_fit();
        l.len() > MAX_TRACKED
    };
    if over {
        tracing::warn!("more than {MAX_TRACKED} clients tracked: per-{what} budgets start afresh");
        *limiter.write().unwrap_or_else(|p| p.into_inner()) = RateLimiter::keyed(quota);
    }
}

fn for_decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

fn remove_ban(t: &mut BanTable, net: &IpNet, v4: u8, v6: u8) -> bool {
    if t.bans.remove(net).is_none() {
        return false;
    }
    if net.prefix_len() == net.max_prefix_len() {
        for_decrement(&mut t.hosts_per_prefix, prefix_of(net.addr(), v4, v6));
    } else {
        t.has_prefix_bans = t.bans.keys().any(|n| n.prefix_len() != n.max_prefix_len());
    }
    true
}

fn evict_soonest(t: &mut BanTable) {
    if let Some(net) = t
        .bans
        .iter()
        .min_by_key(|(_, b)| b.expires)
        .map(|(n, _)| *n)
    {
        t.bans.remove(&net);
    }
}

/// Whether two ranges share any address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Parses one forwarding hop: `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`,
/// `"[2001:db8::1]"` (Forwarded quotes IPv6).
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The nftables script for a set of bans: one table `inet doh_proxy` with
/// two interval sets whose elements carry their remaining time, and a rule
/// dropping banned sources on the proxy's ports. Declaring, deleting and
/// re-creating the table makes `nft -f` replace it atomically.
pub fn render_nft(bans: impl Iterator<Item = (IpNet, u64)>, ports: &[u16]) -> String {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for (net, secs) in bans {
        let secs = secs.max(1);
        match net {
            IpNet::V4(n) => v4.push(format!("{n} timeout {secs}s")),
            IpNet::V6(n) => v6.push(format!("{n} timeout {secs}s")),
        }
    }
    let mut s = String::from(
        "#!/usr/sbin/nft -f\n# Written by doh-proxy: active bans. Load with `nft -f FILE`.\n\
         table inet doh_proxy\ndelete table inet doh_proxy\n\ntable inet doh_proxy {\n",
    );
    for (name, ty, elems) in [
        ("banned_v4", "ipv4_addr", &v4),
        ("banned_v6", "ipv6_addr", &v6),
    ] {
        let _ = writeln!(
            s,
            "    set {name} {{\n        type {ty}\n        flags interval, timeout"
        );
        if !elems.is_empty() {
            let _ = writeln!(s, "        elements = {{ {} }}", elems.join(", "));
        }
        s.push_str("    }\n");
    }
    let ports = if ports.is_empty() {
        "443".to_string()
    } else {
        ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        s,
        "    chain input {{\n        type filter hook input priority filter - 10; policy accept;\n\
         \x20       ip saddr @banned_v4 tcp dport {{ {ports} }} drop\n\
         \x20       ip6 saddr @banned_v6 tcp dport {{ {ports} }} drop\n    }}\n}}\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(extra: &str) -> Arc<Guard> {
        let cfg = Config::from_toml(&format!("upstream=[\"127.0.0.1:53\"]\n{extra}")).unwrap();
        Arc::new(Guard::new(&cfg, Arc::new(Metrics::new(&[]))))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connection_caps_per_ip_and_release() {
        let g = guard("max_conns_per_ip = 2");
        let a = g.admit(ip("127.0.0.2")).unwrap();
        let _b = g.admit(ip("127.0.0.2")).unwrap();
        assert_eq!(g.admit(ip("127.0.0.2")).err(), Some(ConnReject::PerIp));
        assert!(g.admit(ip("127.0.1.2")).is_ok());
        drop(a);
        assert!(g.admit(ip("127.0.0.2")).is_ok());
    }

    #[test]
    fn prefix_cap_is_eight_times_the_address_cap() {
        let g = guard("max_conns_per_ip = 1");
        let held: Vec<_> = (1..=8)
            .map(|i| g.admit(ip(&format!("127.0.5.{i}"))).unwrap())
            .collect();
        assert_eq!(g.admit(ip("127.0.5.9")).err(), Some(ConnReject::PerPrefix));
        drop(held);
        assert!(g.admit(ip("127.0.5.9")).is_ok());
    }

    #[test]
    fn allowlist_is_never_capped_limited_or_banned() {
        let g = guard("max_conns_per_ip = 1\nper_ip_qps = 1\nper_ip_burst = 1\nban_after = 2\nallow = [\"127.0.0.9\"]");
        let _held: Vec<_> = (0..5).map(|_| g.admit(ip("127.0.0.9")).unwrap()).collect();
        for _ in 0..50 {
            assert_eq!(g.check_budget(ip("127.0.0.9")), Budget::Ok);
            g.penalize(ip("127.0.0.9"), Reject::ObsoleteDraft);
        }
        assert!(g.bans().is_empty());
        g.ban(IpNet::from(ip("127.0.0.9")), "manual");
        assert!(g.admit(ip("127.0.0.9")).is_ok());
        assert!(!g.refuse_banned(ip("127.0.0.9")));
    }

    #[test]
    fn budget_then_429() {
        let g = guard("per_ip_qps = 1\nper_ip_burst = 3");
        for _ in 0..3 {
            assert_eq!(g.check_budget(ip("127.0.0.3")), Budget::Ok);
        }
        assert!(matches!(g.check_budget(ip("127.0.0.3")), Budget::Over(s) if s >= 1));
        assert_eq!(g.check_budget(ip("127.0.0.4")), Budget::Ok);
    }

    #[test]
    fn penalty_box_bans_then_expires() {
        let g = guard("ban_after = 3\nban_secs = 1");
        for _ in 0..2 {
            g.penalize(ip("127.0.0.5"), Reject::ObsoleteDraft);
        }
        g.penalize(ip("127.0.0.5"), Reject::NotFound); // not penalized
        assert!(g.admit(ip("127.0.0.5")).is_ok());
        g.penalize(ip("127.0.0.5"), Reject::JsonApi);
        assert_eq!(g.admit(ip("127.0.0.5")).err(), Some(ConnReject::Banned));
        assert!(g.refuse_banned(ip("127.0.0.5")));
        assert_eq!(g.bans()[0].target, "127.0.0.5/32");
        std::thread::sleep(Duration::from_millis(1100));
        g.tick();
        assert!(g.admit(ip("127.0.0.5")).is_ok());
        assert!(g.bans().is_empty());
    }

    #[test]
    fn repeat_offenders_get_longer_bans() {
        let g = guard("ban_after = 1\nban_secs = 10");
        g.penalize(ip("127.0.0.6"), Reject::BadBase64);
        let first = g.bans()[0].remaining_secs;
        assert!(g.unban("127.0.0.6/32".parse().unwrap()));
        g.penalize(ip("127.0.0.6"), Reject::BadBase64);
        let second = g.bans()[0].remaining_secs;
        assert!(first <= 10 && second >= 19, "{first} {second}");
    }

    #[test]
    fn eight_banned_hosts_ban_their_prefix() {
        let g = guard("ban_after = 1");
        for i in 1..=8 {
            g.penalize(ip(&format!("127.9.9.{i}")), Reject::ObsoleteDraft);
        }
        assert!(g.bans().iter().any(|b| b.target == "127.9.9.0/24"));
        assert_eq!(g.admit(ip("127.9.9.200")).err(), Some(ConnReject::Banned));
        assert!(g.admit(ip("127.9.8.1")).is_ok());
    }

    #[test]
    fn dry_run_enforces_nothing() {
        let g = guard(
            "dry_run = true\nmax_conns_per_ip = 1\nper_ip_qps = 1\nper_ip_burst = 1\nban_after = 1",
        );
        let _a = g.admit(ip("127.0.0.7")).unwrap();
        assert!(g.admit(ip("127.0.0.7")).is_ok());
        assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::Ok);
        assert_eq!(g.check_budget(ip("127.0.0.7")), Budget::Ok);
        g.penalize(ip("127.0.0.7"), Reject::ObsoleteDraft);
        assert!(g.bans().is_empty());
        let text = g.metrics.encode();
        assert!(
            text.contains("doh_bans_total{kind=\"address\",dry_run=\"true\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("doh_connections_rejected_total{reason=\"per_ip\",dry_run=\"true\"} 1")
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let g = guard("trusted_proxy = [\"127.0.0.1\", \"10.0.0.0/8\"]");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.7, 10.1.1.1".parse().unwrap());
        assert_eq!(g.client_of(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        assert_eq!(g.client_of(ip("127.0.0.2"), &h), ip("127.0.0.2"));
        h.insert(
            "x-forwarded-for",
            "198.51.100.1, 203.0.113.7".parse().unwrap(),
        );
        assert_eq!(g.client_of(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        let mut f = HeaderMap::new();
        f.insert(
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=https".parse().unwrap(),
        );
        assert_eq!(g.client_of(ip("127.0.0.1"), &f), ip("2001:db8::1"));
        let mut junk = HeaderMap::new();
        junk.insert("x-forwarded-for", "nonsense".parse().unwrap());
        assert_eq!(g.client_of(ip("127.0.0.1"), &junk), ip("127.0.0.1"));
    }

    #[test]
    fn limiter_state_stays_bounded() {
        let g = guard("");
        for i in 0..200_000u32 {
            let a = IpAddr::V4(Ipv4Addr::from(0x7F00_0000 | i));
            g.check_budget(a);
        }
        assert!(g.tracked_clients() >= 200_000);
        std::thread::sleep(Duration::from_millis(100));
        g.prune_limiters();
        // What remains are the ~800 /24 prefixes, whose buckets refill slower.
        assert!(g.tracked_clients() < 1000, "{}", g.tracked_clients());
    }

    #[test]
    fn nft_script_shape() {
        let s = render_nft(
            [
                ("192.0.2.1/32".parse().unwrap(), 600),
                ("2001:db8::/56".parse().unwrap(), 30),
            ]
            .into_iter(),
            &[443, 8443],
        );
        assert!(s.contains("elements = { 192.0.2.1/32 timeout 600s }"));
        assert!(s.contains("elements = { 2001:db8::/56 timeout 30s }"));
        assert!(s.contains("tcp dport { 443, 8443 } drop"));
    }
}
