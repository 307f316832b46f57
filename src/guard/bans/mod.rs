//! Bans in force, indexed by target and by expiry.
//!
//! Adding, lifting, expiring or evicting a ban is O(log n): the expiry
//! index (a B-tree of `(expires, target)`) gives the ban closest to expiry
//! at once, so neither the cap nor the once-a-second expiry ever scans the
//! table, and readers (every accept, every request of a proxied client)
//! never wait behind such a scan. Host bans are counted per prefix, so
//! that enough banned hosts in one prefix ban the prefix; every way a ban
//! leaves the table goes through [`Table::remove`], which keeps those
//! counts right.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::time::Instant;

use crate::net::{client_label, is_host, UNKNOWN_CLIENT};

/// Bans kept at most; above it the ban closest to expiry gives way.
pub const MAX_BANS: usize = 200_000;
/// The longest any ban lasts, whoever asks for it (the penalty box, a
/// restored state file, another instance): times further out are cut to
/// this, so that no input can overflow the clock.
pub const MAX_BAN: Duration = Duration::from_secs(366 * 86_400);
/// Banned addresses in one prefix that get the whole prefix banned.
pub const PREFIX_BAN_HOSTS: u32 = 8;

/// One ban in force.
#[derive(Debug)]
struct Ban {
    reason: &'static str,
    since: SystemTime,
    expires: Instant,
    /// For a host ban, the prefix it counts towards.
    prefix: Option<IpNet>,
    hits: AtomicU64,
}

/// How a ban's target is written: its range, or `unknown` for the shared
/// key of unnamed clients.
pub fn target_label(net: &IpNet) -> String {
    if *net == IpNet::from(UNKNOWN_CLIENT) {
        client_label(UNKNOWN_CLIENT)
    } else {
        net.to_string()
    }
}

/// Parses what [`target_label`] writes.
pub fn parse_target(s: &str) -> Option<IpNet> {
    if s == "unknown" {
        return Some(IpNet::from(UNKNOWN_CLIENT));
    }
    s.parse::<crate::net::Cidr>().ok().map(|c| c.0)
}

/// A ban as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BanView {
    pub target: String,
    pub reason: &'static str,
    /// Unix seconds.
    pub since: u64,
    /// Unix seconds.
    pub expires: u64,
    pub remaining_secs: u64,
    pub hits: u64,
}

#[derive(Default)]
struct Table {
    by_target: HashMap<IpNet, Ban>,
    by_expiry: BTreeSet<(Instant, IpNet)>,
    hosts_per_prefix: HashMap<IpNet, u32>,
    /// Prefix bans in force per (is IPv6, prefix length), so that a lookup
    /// tries only the lengths in use.
    prefix_lens: HashMap<(bool, u8), usize>,
}

impl Table {
    fn remove(&mut self, target: &IpNet) -> bool {
        let Some(ban) = self.by_target.remove(target) else {
            return false;
        };
        self.by_expiry.remove(&(ban.expires, *target));
        if let Some(p) = ban.prefix {
            if let Some(n) = self.hosts_per_prefix.get_mut(&p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.hosts_per_prefix.remove(&p);
                }
            }
        }
        if !is_host(target) {
            let k = (target.addr().is_ipv6(), target.prefix_len());
            if let Some(n) = self.prefix_lens.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.prefix_lens.remove(&k);
                }
            }
        }
        true
    }

    fn hit(&self, target: &IpNet, now: Instant) -> bool {
        self.by_target
            .get(target)
            .filter(|b| b.expires > now)
            .map(|b| b.hits.fetch_add(1, Ordering::Relaxed))
            .is_some()
    }
}

/// What adding a ban did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// The prefix whose banned hosts now reach [`PREFIX_BAN_HOSTS`].
    pub escalate: Option<IpNet>,
    /// The ban that gave way to stay within the cap.
    pub evicted: Option<IpNet>,
}

/// How many times a target was banned, and until when that is remembered.
#[derive(Debug, Clone, Copy)]
struct Offence {
    count: u32,
    until: Instant,
}

/// Offences are remembered for a day after the last one.
pub const OFFENCE_MEMORY: Duration = Duration::from_secs(86400);

struct OffenceExpiry;

impl moka::Expiry<IpNet, Offence> for OffenceExpiry {
    fn expire_after_create(
        &self,
        _: &IpNet,
        o: &Offence,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(o.until.saturating_duration_since(Instant::now()))
    }
    fn expire_after_update(
        &self,
        _: &IpNet,
        o: &Offence,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(o.until.saturating_duration_since(Instant::now()))
    }
}

/// A ban as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedBan {
    pub target: String,
    pub reason: String,
    /// Unix seconds.
    pub since: u64,
    /// Unix seconds.
    pub expires: u64,
    pub hits: u64,
}

/// One change to the bans, as the state file's journal keeps it. Each
/// says what is, not what happened ("this ban, until then"; "no ban on
/// that"; "this count"), so replaying one twice changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Ban(SavedBan),
    Unban { target: String },
    Offence(SavedOffence),
}

/// Bans copied per hold of the table's lock.
const CHUNK: usize = 1024;

/// Changes kept for the state file between two writes at most; past it
/// the next write is a whole snapshot.
const JOURNAL_CAP: usize = 65_536;

/// A repeat count as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedOffence {
    pub target: String,
    pub count: u32,
    /// Unix seconds until which it is remembered.
    pub until: u64,
}

pub struct Bans {
    table: RwLock<Table>,
    /// Bans per target within the last day, for escalation.
    offences: moka::sync::Cache<IpNet, Offence>,
    dirty: AtomicBool,
    max: usize,
    /// Changes not yet written to the state file.
    journal: std::sync::Mutex<Vec<Change>>,
    /// More changes than [`JOURNAL_CAP`] came between two writes.
    journal_overflowed: AtomicBool,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Bans {
    pub fn new(max: usize) -> Bans {
        Bans {
            table: RwLock::default(),
            offences: moka::sync::Cache::builder()
                .max_capacity(max as u64)
                .expire_after(OffenceExpiry)
                .build(),
            dirty: AtomicBool::new(true),
            max: max.max(1),
            journal: std::sync::Mutex::default(),
            journal_overflowed: AtomicBool::new(false),
        }
    }

    fn record(&self, change: Change) {
        let mut j = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if j.len() >= JOURNAL_CAP {
            j.clear();
            self.journal_overflowed.store(true, Ordering::Relaxed);
        }
        j.push(change);
    }

    /// The changes since the last call, and whether some were lost to the
    /// cap (then only a whole snapshot is right).
    pub fn take_changes(&self) -> (Vec<Change>, bool) {
        let changes = std::mem::take(&mut *self.journal.lock().unwrap_or_else(|p| p.into_inner()));
        (
            changes,
            self.journal_overflowed.swap(false, Ordering::Relaxed),
        )
    }

    /// Whether `ip`, or a banned prefix holding it, is banned; counts the hit.
    pub fn covers(&self, ip: IpAddr) -> bool {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        if t.by_target.is_empty() {
            return false;
        }
        let now = Instant::now();
        if t.hit(&IpNet::from(ip), now) {
            return true;
        }
        t.prefix_lens.keys().any(|&(v6, len)| {
            v6 == ip.is_ipv6()
                && IpNet::new(ip, len)
                    .map(|n| t.hit(&n.trunc(), now))
                    .unwrap_or(false)
        })
    }

    /// How many times `target` was banned within the last day.
    pub fn offences(&self, target: &IpNet) -> u32 {
        self.offences
            .get(target)
            .filter(|o| o.until > Instant::now())
            .map_or(0, |o| o.count)
    }

    /// Records one more offence of `target`; returns the count before.
    pub fn count_offence(&self, target: IpNet) -> u32 {
        let n = self.offences(&target);
        self.offences.insert(
            target,
            Offence {
                count: n.saturating_add(1),
                until: Instant::now() + OFFENCE_MEMORY,
            },
        );
        self.record(Change::Offence(SavedOffence {
            target: target_label(&target),
            count: n.saturating_add(1),
            until: unix(SystemTime::now() + OFFENCE_MEMORY),
        }));
        self.dirty.store(true, Ordering::Relaxed);
        n
    }

    /// Calls `each` with every ban in force, soonest to expire first,
    /// taking the table's lock for [`CHUNK`] bans at a time: a copy of
    /// 200,000 bans never holds up an accept or a ban for more than a few
    /// microseconds.
    fn for_each_chunked(&self, mut each: impl FnMut(&Instant, &IpNet, &Ban)) {
        use std::ops::Bound;
        let now = Instant::now();
        let mut from: Bound<(Instant, IpNet)> = Bound::Unbounded;
        loop {
            let t = self.table.read().unwrap_or_else(|p| p.into_inner());
            let mut last = None;
            for (at, net) in t.by_expiry.range((from, Bound::Unbounded)).take(CHUNK) {
                if *at > now {
                    if let Some(b) = t.by_target.get(net) {
                        each(at, net, b);
                    }
                }
                last = Some((*at, *net));
            }
            drop(t);
            match last {
                Some(k) => from = Bound::Excluded(k),
                None => return,
            }
        }
    }

    /// Everything the state file keeps: bans in force and repeat counts.
    pub fn export(&self) -> (Vec<SavedBan>, Vec<SavedOffence>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |i: Instant| unix(wall + i.saturating_duration_since(now));
        let mut bans = Vec::new();
        self.for_each_chunked(|e, net, b| {
            bans.push(SavedBan {
                target: target_label(net),
                reason: b.reason.to_string(),
                since: unix(b.since),
                expires: at(*e),
                hits: b.hits.load(Ordering::Relaxed),
            })
        });
        let offences = self
            .offences
            .iter()
            .filter(|(_, o)| o.until > now)
            .map(|(net, o)| SavedOffence {
                target: target_label(&net),
                count: o.count,
                until: at(o.until),
            })
            .collect();
        (bans, offences)
    }

    /// Puts back a ban from the state file, or another instance's
    /// (`journal`: to be written to the state file); `prefix` as for
    /// [`Bans::add`].
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &self,
        target: IpNet,
        reason: &'static str,
        since: SystemTime,
        remaining: Duration,
        hits: u64,
        prefix: Option<IpNet>,
        journal: bool,
    ) {
        let added = self.insert(target, reason, remaining.as_secs().max(1), prefix, journal);
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = t.by_target.get_mut(&target) {
            b.since = since;
            b.hits.store(hits, Ordering::Relaxed);
        }
        drop(t);
        let _ = added;
    }

    /// Puts back a repeat count from the state file.
    pub fn restore_offence(&self, target: IpNet, count: u32, remaining: Duration) {
        self.offences.insert(
            target,
            Offence {
                count,
                until: Instant::now() + remaining.min(OFFENCE_MEMORY),
            },
        );
    }

    /// Bans `target` for `secs` (at most [`MAX_BAN`]). `prefix` is, for a
    /// host, the prefix it counts towards.
    pub fn add(
        &self,
        target: IpNet,
        reason: &'static str,
        secs: u64,
        prefix: Option<IpNet>,
    ) -> Added {
        self.insert(target, reason, secs, prefix, true)
    }

    fn insert(
        &self,
        target: IpNet,
        reason: &'static str,
        secs: u64,
        prefix: Option<IpNet>,
        journal: bool,
    ) -> Added {
        let secs = Duration::from_secs(secs).min(MAX_BAN);
        let wall = SystemTime::now();
        if journal {
            self.record(Change::Ban(SavedBan {
                target: target_label(&target),
                reason: reason.to_string(),
                since: unix(wall),
                expires: unix(wall + secs),
                hits: 0,
            }));
        }
        let now = Instant::now();
        let ban = Ban {
            reason,
            since: wall,
            expires: now + secs,
            prefix: prefix.filter(|_| is_host(&target)),
            hits: AtomicU64::new(0),
        };
        let mut added = Added::default();
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        t.remove(&target);
        if t.by_target.len() >= self.max {
            if let Some(&(_, soonest)) = t.by_expiry.iter().next() {
                t.remove(&soonest);
                added.evicted = Some(soonest);
            }
        }
        if let Some(p) = ban.prefix {
            let n = t.hosts_per_prefix.entry(p).or_default();
            *n += 1;
            if *n >= PREFIX_BAN_HOSTS && !t.by_target.contains_key(&p) {
                added.escalate = Some(p);
            }
        }
        if !is_host(&target) {
            *t.prefix_lens
                .entry((target.addr().is_ipv6(), target.prefix_len()))
                .or_default() += 1;
        }
        t.by_expiry.insert((ban.expires, target));
        t.by_target.insert(target, ban);
        self.dirty.store(true, Ordering::Relaxed);
        added
    }

    /// Lifts the ban on exactly `target`; returns whether there was one.
    pub fn remove(&self, target: &IpNet) -> bool {
        let removed = self
            .table
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(target);
        if removed {
            self.record(Change::Unban {
                target: target_label(target),
            });
            self.dirty.store(true, Ordering::Relaxed);
        }
        removed
    }

    /// Removes the bans whose time is over; returns them.
    pub fn expire(&self) -> Vec<IpNet> {
        let now = Instant::now();
        {
            let t = self.table.read().unwrap_or_else(|p| p.into_inner());
            match t.by_expiry.iter().next() {
                Some(&(first, _)) if first <= now => {}
                _ => return Vec::new(),
            }
        }
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        while let Some(&(at, target)) = t.by_expiry.iter().next() {
            if at > now {
                break;
            }
            t.remove(&target);
            gone.push(target);
        }
        if !gone.is_empty() {
            self.dirty.store(true, Ordering::Relaxed);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.table
            .read()
            .map(|t| t.by_target.len())
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether bans changed since the last call.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Active bans, soonest to expire first.
    pub fn views(&self) -> Vec<BanView> {
        self.page(None, usize::MAX).unwrap_or_default()
    }

    /// At most `limit` active bans, soonest to expire first, starting
    /// after the ban on `after`; `None` when there is no ban on `after`
    /// (it expired or was lifted since the previous page).
    pub fn page(&self, after: Option<&IpNet>, limit: usize) -> Option<Vec<BanView>> {
        use std::ops::Bound;
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        let from = match after {
            None => Bound::Unbounded,
            Some(net) => Bound::Excluded((t.by_target.get(net)?.expires, *net)),
        };
        let now = Instant::now();
        let wall = SystemTime::now();
        Some(
            t.by_expiry
                .range((from, Bound::Unbounded))
                .filter(|(at, _)| *at > now)
                .take(limit)
                .filter_map(|(at, net)| {
                    let b = t.by_target.get(net)?;
                    let remaining = at.saturating_duration_since(now);
                    Some(BanView {
                        target: target_label(net),
                        reason: b.reason,
                        since: unix(b.since),
                        expires: unix(wall + remaining),
                        remaining_secs: remaining.as_secs(),
                        hits: b.hits.load(Ordering::Relaxed),
                    })
                })
                .collect(),
        )
    }

    /// (target, seconds left) of every ban that a firewall can hold: real
    /// addresses and prefixes, not the shared `unknown` key.
    pub fn for_firewall(&self) -> Vec<(IpNet, u64)> {
        let now = Instant::now();
        let mut out = Vec::new();
        self.for_each_chunked(|at, net, _| {
            if *net != IpNet::from(UNKNOWN_CLIENT) {
                out.push((*net, at.saturating_duration_since(now).as_secs()));
            }
        });
        out
    }

    /// Banned hosts counted towards `prefix` (for tests and checks).
    pub fn hosts_in(&self, prefix: &IpNet) -> u32 {
        self.table
            .read()
            .map(|t| t.hosts_per_prefix.get(prefix).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests;
