//! Token buckets keyed by client address or prefix: request budgets and
//! new-connection rates.
//!
//! Memory stays bounded whatever the number of clients: a key whose bucket
//! is full again is forgotten at the next prune (every second) unless a
//! connection holds it, and above [`MAX_TRACKED`] keys the limiter starts
//! afresh.
//!
//! The buckets are governor's (its GCRA and its atomic state), kept in a
//! map of our own so that a connection can hold its client's bucket
//! ([`Memo`]): its next request spends from it directly, without the map's
//! hashing and shard lock or the limiter's lock, each of them an atomic
//! write to a cache line every worker thread writes for every request.
//! A held bucket is the one in the map (never pruned while held), so every
//! connection of a client spends from the same bucket, as before.

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

/// Keys kept at most per limiter; above it the limiter starts afresh.
pub const MAX_TRACKED: usize = 1_000_000;

pub fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

/// `rate` per second with a burst of `burst`.
pub fn quota(rate: u32, burst: u32) -> Quota {
    Quota::per_second(nz(rate)).allow_burst(nz(burst))
}

/// The budgets' clock: the kernel's coarse one (`crate::clock`). A budget
/// only needs to be right to a few milliseconds; the precise clock reads
/// the time-stamp counter, and a request read it once per bucket.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseClock;

impl Clock for CoarseClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        crate::clock::coarse().into_std()
    }
}

/// One key's bucket: governor's GCRA state, shared by the map and by the
/// connections that hold it. Compared and hashed by identity (governor
/// asks it of a key; nothing else uses it).
#[derive(Clone, Default)]
pub struct Bucket(Arc<InMemoryState>);

impl PartialEq for Bucket {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Bucket {}

impl Hash for Bucket {
    fn hash<H: Hasher>(&self, h: &mut H) {
        Arc::as_ptr(&self.0).hash(h)
    }
}

impl Bucket {
    /// Whether the bucket is full again at `t`: its theoretical arrival
    /// time, read without changing it, is not after `t`.
    fn full_at(&self, t: Nanos) -> bool {
        let tat = self
            .0
            .measure_and_replace(&NotKeyed::NonKey, Err::<((), Nanos), _>);
        match tat {
            Err(Some(tat)) => tat <= t,
            _ => true,
        }
    }

    /// Held by something besides the map (a connection's [`Memo`]).
    fn held(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

/// The buckets of one limiter, by key. As governor's state store its key
/// is the bucket itself: the map is only looked in to find the bucket.
struct Buckets<K>(Arc<DashMap<K, Bucket>>);

impl<K> StateStore for Buckets<K> {
    type Key = Bucket;

    fn measure_and_replace<T, F, E>(&self, key: &Bucket, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        key.0.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq> ShrinkableKeyedStateStore<Bucket> for Buckets<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain(|_, b| b.held() || !b.full_at(drop_below));
    }

    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One limiter's life: its quota, its buckets. A new quota, or too many
/// keys, starts a new one.
struct Generation<K> {
    id: u64,
    quota: Quota,
    map: Arc<DashMap<K, Bucket>>,
    limiter: RateLimiter<Bucket, Buckets<K>, CoarseClock, NoOpMiddleware<std::time::Instant>>,
}

impl<K: Hash + Eq + Clone> Generation<K> {
    fn new(id: u64, quota: Quota) -> Self {
        let map = Arc::new(DashMap::new());
        let limiter = RateLimiter::new(quota, Buckets(map.clone()), CoarseClock);
        Generation {
            id,
            quota,
            map,
            limiter,
        }
    }

    fn bucket(&self, key: &K) -> Bucket {
        if let Some(b) = self.map.get(key) {
            return b.clone();
        }
        self.map.entry(key.clone()).or_default().clone()
    }

    fn spend(&self, bucket: &Bucket) -> Result<(), Duration> {
        self.limiter
            .check_key(bucket)
            .map_err(|e| e.wait_time_from(CoarseClock.now()))
    }
}

/// A connection's hold on its client's bucket in one limiter: the key it
/// was for and the limiter's generation, so that another client (behind a
/// proxy), a new quota or a fresh start is looked up again.
pub struct Memo<K>(Mutex<Option<Held<K>>>);

struct Held<K> {
    key: K,
    generation: Arc<Generation<K>>,
    bucket: Bucket,
}

/// A connection's holds on its client's request budgets.
#[derive(Default)]
pub struct ConnBudgets {
    pub(super) ip: Memo<std::net::IpAddr>,
    pub(super) prefix: Memo<ipnet::IpNet>,
}

impl std::fmt::Debug for ConnBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnBudgets")
    }
}

impl<K> Default for Memo<K> {
    fn default() -> Self {
        Memo(Mutex::new(None))
    }
}

/// One keyed token bucket. The lock is only taken for writing when the
/// limiter starts afresh (too many keys, or a new quota).
pub struct KeyedRate<K: Hash + Eq + Clone> {
    what: &'static str,
    current: RwLock<Arc<Generation<K>>>,
    /// The current generation's id, read by held buckets without the lock.
    id: AtomicU64,
}

/// Generation ids, unique in the process, so that a memo filled by one
/// limiter is never taken as current by another.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    pub fn new(what: &'static str, q: Quota) -> Self {
        let id = next_id();
        KeyedRate {
            what,
            current: RwLock::new(Arc::new(Generation::new(id, q))),
            id: AtomicU64::new(id),
        }
    }

    fn current(&self) -> Arc<Generation<K>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Spends one token of `key`'s bucket; over budget, how long until one
    /// is back.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let g = self.current.read().unwrap_or_else(|p| p.into_inner());
        let spent = match g.map.get(key) {
            Some(b) => g.spend(&b),
            None => g.spend(&g.bucket(key)),
        };
        spent
    }

    /// [`KeyedRate::check`] through a connection's memo: the bucket it
    /// holds when it is still `key`'s in the current generation, else
    /// looked up and held from now on.
    pub fn check_held(&self, memo: &Memo<K>, key: &K) -> Result<(), Duration> {
        // Only the connection's own task takes it; never waited for.
        let Ok(mut held) = memo.0.try_lock() else {
            return self.check(key);
        };
        let id = self.id.load(Ordering::Acquire);
        if let Some(h) = &*held {
            if h.generation.id == id && h.key == *key {
                return h.generation.spend(&h.bucket);
            }
        }
        let generation = self.current();
        let bucket = generation.bucket(key);
        let spent = generation.spend(&bucket);
        *held = Some(Held {
            key: key.clone(),
            generation,
            bucket,
        });
        spent
    }

    /// Starts a new generation with `q`, forgetting every bucket (held
    /// ones are looked up again at their next use).
    fn start_afresh(&self, q: Quota) {
        let fresh = Arc::new(Generation::new(next_id(), q));
        let id = fresh.id;
        let old = {
            let mut g = self.current.write().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *g, fresh)
        };
        self.id.store(id, Ordering::Release);
        // A connection that says nothing more may keep the old generation
        // alive: not its map.
        old.map.clear();
        old.map.shrink_to_fit();
    }

    /// Uses `q` from now on; buckets start full again if it changed.
    pub fn set_quota(&self, q: Quota) {
        if self.current().quota != q {
            self.start_afresh(q);
        }
    }

    /// Forgets keys whose bucket is full again and that no connection
    /// holds; starts afresh if more than [`MAX_TRACKED`] remain.
    pub fn prune(&self) {
        let g = self.current();
        g.limiter.retain_recent();
        g.limiter.shrink_to_fit();
        if g.limiter.len() > MAX_TRACKED {
            tracing::warn!(
                "more than {MAX_TRACKED} keys tracked: {} limits start afresh",
                self.what
            );
            self.start_afresh(g.quota);
        }
    }

    pub fn len(&self) -> usize {
        self.current().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_then_wait_and_prune() {
        let r = KeyedRate::new("test", quota(1, 3));
        for _ in 0..3 {
            assert!(r.check(&1u32).is_ok());
        }
        assert!(r.check(&1u32).unwrap_err() > Duration::ZERO);
        assert!(r.check(&2u32).is_ok());
        assert_eq!(r.len(), 2);
        r.set_quota(quota(1, 3));
        assert!(r.check(&1u32).is_err(), "same quota keeps the state");
        r.set_quota(quota(2, 3));
        assert!(r.check(&1u32).is_ok(), "a new quota starts afresh");
    }

    /// A held bucket is the map's: connections of one client and lookups
    /// spend from the same budget, whichever way they come.
    #[test]
    fn held_buckets_share_the_budget() {
        let r = KeyedRate::new("test", quota(1, 4));
        let (a, b) = (Memo::default(), Memo::default());
        assert!(r.check_held(&a, &1u32).is_ok());
        assert!(r.check_held(&b, &1u32).is_ok());
        assert!(r.check(&1u32).is_ok());
        assert!(r.check_held(&a, &1u32).is_ok());
        assert!(r.check_held(&b, &1u32).is_err(), "four spent of four");
        assert!(r.check(&1u32).is_err());
        // Another key through the same memo: its own bucket.
        assert!(r.check_held(&a, &2u32).is_ok());
        assert!(r.check_held(&a, &1u32).is_err(), "back to the spent one");
    }

    /// A new quota reaches connections that hold a bucket: their next
    /// request spends from a fresh one.
    #[test]
    fn held_buckets_follow_a_new_quota() {
        let r = KeyedRate::new("test", quota(1, 1));
        let m = Memo::default();
        assert!(r.check_held(&m, &7u32).is_ok());
        assert!(r.check_held(&m, &7u32).is_err());
        r.set_quota(quota(1, 2));
        assert!(r.check_held(&m, &7u32).is_ok());
        assert!(r.check_held(&m, &7u32).is_ok());
        assert!(r.check_held(&m, &7u32).is_err());
    }

    /// A bucket a connection holds survives the prune even when it is
    /// full again (a new connection of the client must find the same
    /// one), and goes once nothing holds it.
    #[test]
    fn held_buckets_are_not_pruned() {
        let r = KeyedRate::new("test", quota(1_000_000, 1));
        let m = Memo::default();
        assert!(r.check_held(&m, &9u32).is_ok());
        assert!(r.check(&10u32).is_ok());
        let full_again = |r: &KeyedRate<u32>| {
            // Two millionths of a second refill a bucket of this quota:
            // wait until the budgets' clock has moved well past them.
            let t0 = CoarseClock.now();
            while CoarseClock.now() < t0 + Duration::from_millis(1) {
                std::thread::yield_now();
            }
            r.prune();
        };
        full_again(&r);
        assert_eq!(r.len(), 1, "the held bucket stays, the other goes");
        drop(m);
        full_again(&r);
        assert_eq!(r.len(), 0);
    }
}
