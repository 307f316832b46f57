//! The answer cache: bounded, with a TTL floor and ceiling, negative
//! caching (RFC 2308), serve-stale (RFC 8767) and request coalescing.
//!
//! Entries hold the upstream answer as bytes with the TTLs already floored
//! and capped, plus the offset of every TTL, so serving a hit is one copy
//! and a few stores: the client's ID, the client's question bytes (its 0x20
//! case), and each TTL counted down by the entry's age.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moka::sync::Cache as Moka;
use moka::Expiry;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::clock::Clock;

use crate::dns::{self, AnswerInfo, Key, KeyHasher, RCODE_NOERROR, RCODE_NXDOMAIN};

mod admission;
use admission::Doorkeeper;

/// TTL of an answer served stale, as RFC 8767 recommends.
pub const STALE_TTL: u32 = 30;

/// Memory one entry costs beyond its key and message: the entry itself,
/// its `Arc`, and moka's node and indexes (measured with
/// `examples/cache_memory`).
pub const ENTRY_OVERHEAD: usize = 520;

/// What the cache runs with.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub policy: TtlPolicy,
    /// `--cache-size`: entries at most.
    pub max_entries: u64,
    /// `--cache-memory`: bytes at most, each entry weighed by its real size.
    pub max_bytes: u64,
    /// Answers larger than this are served but never cached.
    pub max_answer: usize,
}

/// How TTLs are floored, capped and how long entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub err_ttl: u32,
    pub stale_secs: u32,
}

impl TtlPolicy {
    fn clamp(&self, ttl: u32) -> u32 {
        ttl.clamp(self.min_ttl, self.max_ttl)
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    wire: Box<[u8]>,
    ttl_offsets: Box<[u16]>,
    created: Instant,
    /// Seconds the entry is fresh.
    lifetime: u32,
    /// Seconds past `lifetime` it may be served stale (0 for failures).
    stale_secs: u32,
    /// SERVFAIL, REFUSED and the like, or a synthesized failure.
    is_error: bool,
    /// Milliseconds after `created` before which no new refresh may start.
    next_refresh_ms: AtomicU64,
    hits: AtomicU32,
    /// What this entry costs in memory, key and bookkeeping included.
    size: u32,
    /// The cache's count of bytes held, when the cache took this entry:
    /// its size comes off when the entry is freed.
    tally: Option<Arc<AtomicI64>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(t) = &self.tally {
            t.fetch_sub(i64::from(self.size), Ordering::Relaxed);
        }
    }
}

/// Whether an entry is within its TTL or past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    Stale,
}

impl Entry {
    /// Builds an entry from an accepted upstream answer, flooring and
    /// capping every TTL.
    pub fn from_answer(
        mut wire: Vec<u8>,
        info: &AnswerInfo,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Entry {
        let is_error = !matches!(info.rcode, RCODE_NOERROR | RCODE_NXDOMAIN);
        let ceiling = if is_error {
            Some(policy.err_ttl)
        } else if info.is_negative() {
            Some(policy.clamp(info.negative_ttl.unwrap_or(policy.err_ttl)))
        } else {
            None
        };
        let mut min = u32::MAX;
        for &off in &info.ttl_offsets {
            let at = off as usize;
            let mut ttl = policy.clamp(dns::read_ttl(&wire, at));
            if let Some(c) = ceiling {
                ttl = ttl.min(c);
            }
            dns::write_ttl(&mut wire, at, ttl);
            min = min.min(ttl);
        }
        let lifetime = match ceiling {
            Some(c) => c,
            None if min == u32::MAX => policy.clamp(0),
            None => min,
        };
        Entry {
            wire: wire.into(),
            ttl_offsets: info.ttl_offsets.clone().into(),
            created: now,
            lifetime,
            stale_secs: if is_error { 0 } else { policy.stale_secs },
            is_error,
            next_refresh_ms: AtomicU64::new(0),
            hits: AtomicU32::new(0),
            size: 0,
            tally: None,
        }
        .sized()
    }

    fn sized(mut self) -> Entry {
        // The key holds the question once more, moka's indexes once again.
        let question = dns::question_len(&self.wire).unwrap_or(0);
        let bytes = self.wire.len() + 2 * self.ttl_offsets.len() + 2 * question + ENTRY_OVERHEAD;
        self.size = u32::try_from(bytes).unwrap_or(u32::MAX);
        self
    }

    /// Bytes of the message as stored.
    pub fn wire_len(&self) -> usize {
        self.wire.len()
    }

    /// What this entry costs in the cache, in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Whether the cache took this entry when it was stored.
    pub fn stored(&self) -> bool {
        self.tally.is_some()
    }

    /// A synthesized SERVFAIL for an upstream that did not answer.
    pub fn failure(key: &Key, policy: &TtlPolicy, now: Instant) -> Entry {
        let wire = dns::servfail(key);
        let info = AnswerInfo {
            rcode: dns::RCODE_SERVFAIL,
            truncated: false,
            answers: 0,
            ttl_offsets: Vec::new(),
            negative_ttl: None,
        };
        Entry::from_answer(wire, &info, policy, now)
    }

    pub fn is_error(&self) -> bool {
        self.is_error
    }

    pub fn rcode(&self) -> u8 {
        dns::rcode(&self.wire)
    }

    pub fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn freshness(&self, now: Instant) -> Option<Freshness> {
        let age = now.saturating_duration_since(self.created);
        let life = Duration::from_secs(self.lifetime.into());
        if age < life {
            Some(Freshness::Fresh)
        } else if age < life + Duration::from_secs(self.stale_secs.into()) {
            Some(Freshness::Stale)
        } else {
            None
        }
    }

    fn total_life(&self) -> Duration {
        Duration::from_secs(u64::from(self.lifetime) + u64::from(self.stale_secs))
    }

    /// Claims the right to refresh this entry now; at most one claim
    /// succeeds per `every`. Returns false if someone else holds it.
    pub fn claim_refresh(&self, every: Duration, now: Instant) -> bool {
        let now = now.saturating_duration_since(self.created).as_millis() as u64;
        let next = self.next_refresh_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_refresh_ms
                .compare_exchange(
                    next,
                    now + every.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether a fresh entry is popular and close enough to expiry to be
    /// refreshed ahead of time: used at least twice and in the last tenth
    /// of a lifetime of 10 s or more.
    pub fn wants_prefetch(&self, now: Instant) -> bool {
        let hits = self.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if self.is_error || self.lifetime < 10 || hits < 2 {
            return false;
        }
        let age = now.saturating_duration_since(self.created).as_secs();
        age * 10 >= u64::from(self.lifetime) * 9
    }

    /// The answer for one client: its ID and question bytes, TTLs counted
    /// down by age (never below the floor), or set to [`STALE_TTL`] when
    /// stale. Returns the message and the `Cache-Control: max-age` to send.
    pub fn serve(
        &self,
        id: u16,
        question: &[u8],
        policy: &TtlPolicy,
        now: Instant,
    ) -> (Vec<u8>, u32) {
        let age = now.saturating_duration_since(self.created).as_secs();
        let age = age.min(u64::from(u32::MAX)) as u32;
        let stale = age >= self.lifetime;
        // Even stale, never above the ceiling (a ceiling of 0 means 0).
        let stale_ttl = STALE_TTL.min(policy.max_ttl);
        let floor = if self.is_error { 0 } else { policy.min_ttl };
        let (wire, min) =
            dns::rewrite_for_client(&self.wire, &self.ttl_offsets, id, question, |t| {
                if stale {
                    stale_ttl
                } else {
                    t.saturating_sub(age).max(floor)
                }
            });
        let max_age = min.unwrap_or(if stale {
            stale_ttl
        } else {
            self.lifetime.saturating_sub(age).max(floor)
        });
        (wire, max_age)
    }
}

/// What a lookup found.
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Past its TTL but within `--stale-secs`.
    Stale(Arc<Entry>),
    /// Nothing to serve; whether the answer fetched is to be kept.
    Miss(Admit),
}

/// Whether the answer to a miss is to be stored: always while the cache
/// has room, and once it is full only for a name asked before (see
/// `admission.rs`). Decided by [`Cache::lookup`], obeyed by
/// [`Cache::store_if`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The cache is full and this name was not asked recently: its answer
    /// is served, not kept.
    No,
}

struct EntryExpiry;

impl Expiry<Key, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _: &Key,
        e: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(e.total_life())
    }
    fn expire_after_update(
        &self,
        _: &Key,
        e: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.total_life())
    }
}

type Flight<T> = Arc<OnceCell<T>>;

/// The bounded cache. Bounded twice: by `--cache-memory` through moka's
/// weigher (each entry weighs its real size), and by `--cache-size`
/// because no entry weighs less than `max_bytes / max_entries`. The real
/// bytes held are tracked apart for `doh_cache_bytes`: added when an entry
/// is stored, taken off when it is freed (evicted, expired or replaced,
/// and no longer being served). Not with an eviction listener: moka then
/// takes a lock per key in a second concurrent map at every insert and
/// eviction, about 7 % of what a miss costs.
pub struct Cache {
    map: Moka<Key, Arc<Entry>, KeyHasher>,
    policy: arc_swap::ArcSwap<TtlPolicy>,
    max_answer: usize,
    /// (`--cache-size`, `--cache-memory`), fixed at start.
    bounds: (u64, u64),
    bytes: Arc<AtomicI64>,
    /// What entries age by.
    clock: Clock,
    /// The least an entry weighs: the cache is full when one more would
    /// not fit.
    floor: u32,
    /// Names that missed while the cache was full; made when it first is.
    door: std::sync::OnceLock<Doorkeeper>,
}

/// The most entries the cache's table is sized for at start (about 2 MiB
/// of bucket pointers); a larger `--cache-size` grows it as it fills.
const PRESIZE: u64 = 128 * 1024;

impl Cache {
    pub fn new(s: &CacheSettings, clock: Clock) -> Cache {
        let floor = (s.max_bytes / s.max_entries.max(1)).min(u64::from(u32::MAX)) as u32;
        Cache {
            // The table sized for `--cache-size` from the start (up to
            // PRESIZE entries): filling a cold cache, when every query is
            // a miss and the proxy is busiest, then never rehashes every
            // key already in it at each doubling.
            map: Moka::builder()
                .initial_capacity(s.max_entries.min(PRESIZE) as usize)
                .max_capacity(s.max_bytes)
                .weigher(move |_: &Key, e: &Arc<Entry>| e.size.max(floor))
                .expire_after(EntryExpiry)
                .build_with_hasher(KeyHasher),
            policy: arc_swap::ArcSwap::from_pointee(s.policy),
            max_answer: s.max_answer,
            bounds: (s.max_entries, s.max_bytes),
            bytes: Arc::new(AtomicI64::new(0)),
            clock,
            floor,
            door: std::sync::OnceLock::new(),
        }
    }

    /// Whether `s` has the same bounds as this cache (they cannot change
    /// without a new cache).
    pub fn same_bounds(&self, s: &CacheSettings) -> bool {
        self.bounds == (s.max_entries, s.max_bytes)
    }

    /// Uses `p` for answers stored and served from now on.
    pub fn set_policy(&self, p: TtlPolicy) {
        self.policy.store(Arc::new(p));
    }

    /// A cache of `entries` entries and a generous byte bound (tests, tools).
    pub fn with_entries(entries: u64, policy: TtlPolicy) -> Cache {
        Cache::new(
            &CacheSettings {
                policy,
                max_entries: entries,
                max_bytes: entries.saturating_mul(4096),
                max_answer: 16 * 1024,
            },
            Clock::default(),
        )
    }

    /// Now, as entries age.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    pub fn policy(&self) -> TtlPolicy {
        **self.policy.load()
    }

    /// Memory held by cached entries, in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed).max(0) as u64
    }

    /// The entry for `key` as it stands at `now` (read from [`Cache::now`]
    /// once per request).
    pub fn lookup(&self, key: &Key, now: Instant) -> Lookup {
        let Some(e) = self.map.get(key) else {
            return Lookup::Miss(self.admit_new(key));
        };
        match e.freshness(now) {
            Some(Freshness::Fresh) => Lookup::Fresh(e),
            Some(Freshness::Stale) if !e.is_error => Lookup::Stale(e),
            // An entry held but past serving: its answer replaces it.
            _ => Lookup::Miss(Admit::Yes),
        }
    }

    /// Whether the answer for `key`, which the cache does not hold, is to
    /// be kept: yes while there is room; once full, only if the name was
    /// asked before (and then noted as asked).
    fn admit_new(&self, key: &Key) -> Admit {
        if self.map.weighted_size() + u64::from(self.floor) <= self.bounds.1 {
            return Admit::Yes;
        }
        let door = self.door.get_or_init(|| Doorkeeper::new(self.bounds.0));
        if door.seen_before(key.digest()) {
            Admit::Yes
        } else {
            Admit::No
        }
    }

    /// Stores the answer to a miss as `admit` (from [`Cache::lookup`])
    /// says; returns the entry to serve either way.
    pub fn store_if(&self, key: Key, entry: Entry, admit: Admit) -> Arc<Entry> {
        match admit {
            Admit::Yes => self.store(key, entry),
            Admit::No => Arc::new(entry),
        }
    }

    /// Stores an entry, except that a failure never replaces a good answer
    /// that can still be served stale, and an answer over the size limit
    /// is not kept ([`Entry::stored`] says which). Returns the entry, to
    /// serve either way.
    pub fn store(&self, key: Key, mut entry: Entry) -> Arc<Entry> {
        if entry.wire.len() > self.max_answer {
            return Arc::new(entry);
        }
        if entry.is_error {
            if let Some(old) = self.map.get(&key) {
                if !old.is_error && old.freshness(self.clock.now()).is_some() {
                    return Arc::new(entry);
                }
            }
        }
        self.bytes
            .fetch_add(i64::from(entry.size), Ordering::Relaxed);
        entry.tally = Some(self.bytes.clone());
        let entry = Arc::new(entry);
        self.map.insert(key, entry.clone());
        entry
    }

    /// Approximate number of entries.
    pub fn len(&self) -> u64 {
        self.map.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs moka's pending housekeeping (evictions), so `len` is exact,
    /// and frees what it evicted from this thread, so `bytes` nearly is
    /// (moka's table frees an entry it dropped once no thread can still be
    /// reading it; other threads free theirs in batches of at most 64).
    pub fn sync(&self) {
        self.map.run_pending_tasks();
        for _ in 0..3 {
            crossbeam_epoch::pin().flush();
        }
    }
}

/// Coalescing: any number of concurrent calls for one key run the work
/// once and all get its result.
pub struct Inflight<T> {
    map: Mutex<HashMap<Key, Flight<T>, KeyHasher>>,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Inflight {
            map: Mutex::new(HashMap::default()),
        }
    }
}

impl<T: Clone> Inflight<T> {
    /// Runs `work` unless the same key is already in flight, in which case
    /// waits for that one. Returns the result and whether this call ran it.
    /// If the caller running the work is cancelled, a waiter takes over.
    pub async fn run<F, Fut>(&self, key: &Key, work: F) -> (T, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let cell = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let mut ran = false;
        let out = cell
            .get_or_init(|| {
                ran = true;
                work()
            })
            .await
            .clone();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            map.remove(key);
        }
        (out, ran)
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
