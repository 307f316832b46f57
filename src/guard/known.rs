//! Known clients (`--known-after-secs`): a bounded memory of the clients
//! the proxy answered, so that the upstream budget can keep a share for
//! its regular users when a crowd of new addresses arrives (incident 1).
//!
//! A client (the key of its per-client budget: its address) answered once,
//! and answered again at least `after` seconds later without being banned
//! in between, is *known*, and stays known until it is forgotten or
//! banned (a reload that raises `after` demotes nobody). A client not seen
//! for `forget` seconds starts over. A ban forgets the client.
//!
//! Memory is bounded by `max` whatever an attacker sends: 16 shards, each
//! holding at most its part of `max` entries in an [`IndexMap`] of 32-byte
//! entries (a 16-byte key, first-answered and last-seen as `u32` unix
//! seconds) grown by an eighth at a time, plus its hash index (at most
//! ~21 bytes an entry just after it doubles) and the shards: at most 60
//! bytes a client, 57 MiB for the default million (`benches/known_mem.rs`
//! measures 51–56).
//! When a shard is full, the oldest-seen of 8 entries sampled at random
//! goes — a client not yet known before a known one, so that a flood of
//! new addresses pushes out other new addresses, not the regular users.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use indexmap::IndexMap;
use ipnet::IpNet;

/// Entries sampled to pick one to forget when a shard is full.
const SAMPLE: usize = 8;
const MAX_SHARDS: usize = 16;

/// Bytes one remembered client costs at most (entries grown by an eighth,
/// the hash index just after it doubled); the README and the memory
/// benchmark state it.
pub const MAX_BYTES_PER_CLIENT: usize = 60;

type Key = [u8; 16];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// Unix seconds of the first answer; 0 once known (here, from the
    /// state file or from another instance).
    first: u32,
    /// Unix seconds of the last answer.
    last: u32,
}

impl Entry {
    fn is_known(&self, after: u32) -> bool {
        self.first == 0 || self.last.saturating_sub(self.first) >= after
    }
}

#[derive(Default)]
struct Shard {
    map: IndexMap<Key, Entry>,
}

/// What the proxy remembers of one client (`GET /known/ADDR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    pub known: bool,
    /// Unix seconds of the first answer (0 when known from elsewhere:
    /// the state file or another instance).
    pub first: u64,
    /// Unix seconds of the last answer.
    pub last: u64,
}

/// The bounded memory of clients.
pub struct Known {
    shards: Box<[Mutex<Shard>]>,
    /// Entries a shard may hold.
    per_shard: AtomicU64,
    after: AtomicU32,
    forget: AtomicU32,
    /// Known clients, kept up to date on every change and recounted by
    /// [`Known::sweep`] (a reload that changes `after` changes who is known).
    known: AtomicI64,
}

fn key(ip: IpAddr) -> Key {
    match crate::net::canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn addr(k: &Key) -> IpAddr {
    crate::net::canonical(IpAddr::V6(Ipv6Addr::from(*k)))
}

fn secs(unix: u64) -> u32 {
    u32::try_from(unix).unwrap_or(u32::MAX)
}

impl Known {
    /// A memory of at most `max` clients (at least one).
    pub fn new(max: u64, after_secs: u64, forget_secs: u64) -> Known {
        let shards = (max.max(1) as usize).min(MAX_SHARDS);
        let k = Known {
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            per_shard: AtomicU64::new(1),
            after: AtomicU32::new(0),
            forget: AtomicU32::new(0),
            known: AtomicI64::new(0),
        };
        k.configure(max, after_secs, forget_secs);
        k
    }

    /// Takes new bounds (reload). A smaller `max` takes effect as clients
    /// come: each new one then makes room first.
    pub fn configure(&self, max: u64, after_secs: u64, forget_secs: u64) {
        let per = (max / self.shards.len() as u64).max(1);
        self.per_shard.store(per, Ordering::Relaxed);
        self.after.store(secs(after_secs), Ordering::Relaxed);
        self.forget
            .store(secs(forget_secs.max(1)), Ordering::Relaxed);
    }

    fn shard(&self, k: &Key) -> std::sync::MutexGuard<'_, Shard> {
        // FNV-1a over the key: the shard only spreads the locks; an
        // attacker who piles its addresses into one shard only pushes out
        // its own (new clients go before known ones).
        let mut h: u32 = 0x811c_9dc5;
        for b in k {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        let i = h as usize % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clients remembered (known or not).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Known clients.
    pub fn known_count(&self) -> u64 {
        self.known.load(Ordering::Relaxed).max(0) as u64
    }

    /// A request from `ip` was answered at `now` (unix seconds).
    pub fn answered(&self, ip: IpAddr, now: u64) {
        let now = secs(now);
        let (after, forget) = (
            self.after.load(Ordering::Relaxed),
            self.forget.load(Ordering::Relaxed),
        );
        let k = key(ip);
        let mut s = self.shard(&k);
        if let Some(e) = s.map.get_mut(&k) {
            if e.last >= now {
                return;
            }
            let was = e.is_known(after);
            if now - e.last > forget {
                // Gone for longer than `forget`: starts over.
                *e = Entry {
                    first: now,
                    last: now,
                };
            } else {
                e.last = now;
            }
            let is = e.is_known(after);
            if is {
                // Known for good (until forgotten or banned), whatever
                // `after` a reload brings.
                e.first = 0;
            }
            self.count(was, is);
            return;
        }
        self.insert(
            &mut s,
            k,
            Entry {
                first: now,
                last: now,
            },
            after,
        );
    }

    /// Adds a client not remembered yet, making room first when the shard
    /// is full, and growing it by an eighth at a time, never by doubling:
    /// what keeps [`MAX_BYTES_PER_CLIENT`] true however the client came.
    fn insert(&self, s: &mut Shard, k: Key, e: Entry, after: u32) {
        let cap = self.per_shard.load(Ordering::Relaxed) as usize;
        while s.map.len() >= cap {
            let gone = forget_one(&mut s.map, after);
            self.count(gone.is_known(after), false);
        }
        if s.map.len() == s.map.capacity() {
            let more = (s.map.len() / 8).max(16).min(cap - s.map.len());
            s.map.reserve_exact(more);
        }
        s.map.insert(k, e);
        self.count(false, e.is_known(after));
    }

    fn count(&self, was: bool, is: bool) {
        match (was, is) {
            (false, true) => self.known.fetch_add(1, Ordering::Relaxed),
            (true, false) => self.known.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Whether `ip` is known at `now`.
    pub fn is_known(&self, ip: IpAddr, now: u64) -> bool {
        self.lookup(ip, now).is_some_and(|r| r.known)
    }

    /// What is remembered of `ip` at `now` (nothing once forgotten).
    pub fn lookup(&self, ip: IpAddr, now: u64) -> Option<Remembered> {
        let (after, forget) = (
            self.after.load(Ordering::Relaxed),
            self.forget.load(Ordering::Relaxed),
        );
        let k = key(ip);
        let e = *self.shard(&k).map.get(&k)?;
        if secs(now).saturating_sub(e.last) > forget {
            return None;
        }
        Some(Remembered {
            known: e.is_known(after),
            first: u64::from(e.first),
            last: u64::from(e.last),
        })
    }

    /// Makes `ip` known (restored from the state file, or known to another
    /// instance), last seen at `last` unless seen here since. A client
    /// known here already stays ours (and shared from here).
    pub fn make_known(&self, ip: IpAddr, last: u64) {
        let after = self.after.load(Ordering::Relaxed);
        let last = secs(last);
        let k = key(ip);
        let mut s = self.shard(&k);
        if let Some(e) = s.map.get_mut(&k) {
            let was = e.is_known(after);
            if !was {
                e.first = 0;
            }
            e.last = e.last.max(last);
            self.count(was, e.is_known(after));
            return;
        }
        self.insert(&mut s, k, Entry { first: 0, last }, after);
    }

    /// Forgets every client in `net` (a ban: an address or a prefix).
    pub fn forget(&self, net: &IpNet) {
        let after = self.after.load(Ordering::Relaxed);
        if crate::net::is_host(net) {
            let k = key(net.addr());
            let mut s = self.shard(&k);
            if let Some(e) = s.map.swap_remove(&k) {
                self.count(e.is_known(after), false);
            }
            return;
        }
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            s.map.retain(|k, e| {
                let keep = !net.contains(&addr(k));
                if !keep {
                    self.count(e.is_known(after), false);
                }
                keep
            });
        }
    }

    /// Drops the clients not seen for `forget` seconds and recounts the
    /// known ones (run now and then, off the request path).
    pub fn sweep(&self, now: u64) -> u64 {
        let now = secs(now);
        let (after, forget) = (
            self.after.load(Ordering::Relaxed),
            self.forget.load(Ordering::Relaxed),
        );
        let mut known = 0;
        for shard in self.shards.iter() {
            let mut s = shard.lock().unwrap_or_else(|p| p.into_inner());
            s.map.retain(|_, e| now.saturating_sub(e.last) <= forget);
            known += s.map.values().filter(|e| e.is_known(after)).count() as i64;
        }
        self.known.store(known, Ordering::Relaxed);
        known as u64
    }

    /// The known clients and when each was last seen, at most `limit`
    /// (for the state file).
    pub fn export(&self, now: u64, limit: usize) -> Vec<(IpAddr, u64)> {
        let forget = self.forget.load(Ordering::Relaxed);
        let oldest = secs(now).saturating_sub(forget);
        self.known_seen_since(oldest, limit)
    }

    /// The known clients seen at `since` (unix seconds) or later, and
    /// when each was last seen, at most `limit` (for the fleet).
    pub fn known_since(&self, since: u64, limit: usize) -> Vec<(IpAddr, u64)> {
        self.known_seen_since(secs(since), limit)
    }

    fn known_seen_since(&self, since: u32, limit: usize) -> Vec<(IpAddr, u64)> {
        let after = self.after.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let s = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(
                s.map
                    .iter()
                    .filter(|(_, e)| e.last >= since && e.is_known(after))
                    .map(|(k, e)| (addr(k), u64::from(e.last)))
                    .take(limit.saturating_sub(out.len())),
            );
        }
        out
    }
}

/// Removes one entry of a full shard: among [`SAMPLE`] picked at random,
/// the least recently seen client that is not known, else the least
/// recently seen known one.
fn forget_one(map: &mut IndexMap<Key, Entry>, after: u32) -> Entry {
    let n = map.len();
    let mut victim: Option<(bool, u32, usize)> = None;
    for _ in 0..SAMPLE.min(n) {
        let i = rand::random_range(0..n);
        let e = map[i];
        let rank = (e.is_known(after), e.last, i);
        if victim.is_none_or(|v| rank < v) {
            victim = Some(rank);
        }
    }
    let i = victim.map_or(0, |v| v.2);
    map.swap_remove_index(i)
        .map_or(Entry { first: 0, last: 0 }, |(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn known_once_answered_again_after_the_delay() {
        let k = Known::new(1000, 60, 3600);
        let a = ip("192.0.2.1");
        k.answered(a, 1_000);
        assert!(!k.is_known(a, 1_000));
        k.answered(a, 1_059);
        assert!(!k.is_known(a, 1_059), "59 s is not 60");
        k.answered(a, 1_060);
        assert!(k.is_known(a, 1_060));
        assert_eq!(k.known_count(), 1);
        // Asked once, never again: never known.
        let b = ip("192.0.2.2");
        k.answered(b, 1_000);
        assert!(!k.is_known(b, 5_000));
    }

    #[test]
    fn forgotten_after_forget_secs_and_starting_over() {
        let k = Known::new(1000, 60, 3600);
        let a = ip("2001:db8::1");
        k.answered(a, 1_000);
        k.answered(a, 1_100);
        assert!(k.is_known(a, 1_100));
        assert!(
            !k.is_known(a, 1_100 + 3601),
            "not seen for longer than forget"
        );
        k.answered(a, 1_100 + 3601);
        assert!(!k.is_known(a, 1_100 + 3601), "starts over");
        assert_eq!(k.known_count(), 0);
        assert_eq!(k.sweep(1_100 + 3601), 0);
    }

    #[test]
    fn a_ban_forgets_a_host_or_a_whole_prefix() {
        let k = Known::new(1000, 10, 3600);
        for i in 1..=4 {
            let a = ip(&format!("198.51.100.{i}"));
            k.answered(a, 100);
            k.answered(a, 200);
        }
        assert_eq!(k.known_count(), 4);
        k.forget(&"198.51.100.1/32".parse().unwrap());
        assert!(!k.is_known(ip("198.51.100.1"), 200));
        assert_eq!(k.known_count(), 3);
        k.forget(&"198.51.100.0/24".parse().unwrap());
        assert_eq!(k.known_count(), 0);
        assert!(k.is_empty());
    }

    #[test]
    fn bounded_and_new_clients_go_first() {
        let k = Known::new(1_600, 10, 1_000_000);
        // 100 regular clients, known.
        let regular: Vec<IpAddr> = (0..100).map(|i| ip(&format!("10.0.0.{i}"))).collect();
        for &a in &regular {
            k.answered(a, 1_000);
            k.answered(a, 1_100);
        }
        // A crowd of 30,000 new addresses, each seen later than the
        // regular ones.
        for i in 0..30_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            k.answered(a, 2_000 + u64::from(i / 1000));
        }
        assert!(k.len() <= 1_600, "{}", k.len());
        let kept = regular.iter().filter(|a| k.is_known(**a, 2_100)).count();
        assert_eq!(kept, 100, "the known clients stay");
        assert_eq!(k.sweep(2_100), 100);
    }

    #[test]
    fn made_known_from_elsewhere_and_exported() {
        let k = Known::new(100, 86_400, 3600);
        let a = ip("::ffff:192.0.2.9");
        k.make_known(a, 5_000);
        assert!(k.is_known(ip("192.0.2.9"), 5_100));
        assert_eq!(k.export(5_100, 10), vec![(ip("192.0.2.9"), 5_000)]);
        assert_eq!(k.lookup(a, 5_100).map(|r| r.first), Some(0));
        // Clients made known from elsewhere meet the same bound.
        for i in 0..500u32 {
            k.make_known(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 5_000);
        }
        assert!(k.len() <= 100, "{}", k.len());
    }
}
