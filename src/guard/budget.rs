//! Token buckets keyed by client address or prefix: request budgets and
//! new-connection rates.
//!
//! Memory stays bounded whatever the number of clients: a key whose bucket
//! is full again is forgotten at the next prune (every second), and above
//! [`MAX_TRACKED`] keys the limiter starts afresh.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::RwLock;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Keys kept at most per limiter; above it the limiter starts afresh.
pub const MAX_TRACKED: usize = 1_000_000;

pub fn nz(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN)
}

/// `rate` per second with a burst of `burst`.
pub fn quota(rate: u32, burst: u32) -> Quota {
    Quota::per_second(nz(rate)).allow_burst(nz(burst))
}

/// One keyed token bucket. The lock is only taken for writing when the
/// limiter is replaced (too many keys, or a new quota).
pub struct KeyedRate<K: Hash + Eq + Clone> {
    what: &'static str,
    limiter: RwLock<(Quota, DefaultKeyedRateLimiter<K>)>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    pub fn new(what: &'static str, q: Quota) -> Self {
        KeyedRate {
            what,
            limiter: RwLock::new((q, RateLimiter::keyed(q))),
            clock: DefaultClock::default(),
        }
    }

    /// Spends one token of `key`'s bucket; over budget, how long until one
    /// is back.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let l = self.limiter.read().unwrap_or_else(|p| p.into_inner());
        l.1.check_key(key)
            .map_err(|e| e.wait_time_from(self.clock.now()))
    }

    /// Uses `q` from now on; buckets start full again if it changed.
    pub fn set_quota(&self, q: Quota) {
        let mut l = self.limiter.write().unwrap_or_else(|p| p.into_inner());
        if l.0 != q {
            *l = (q, RateLimiter::keyed(q));
        }
    }

    /// Forgets keys whose bucket is full again; starts afresh if more than
    /// [`MAX_TRACKED`] remain.
    pub fn prune(&self) {
        let over = {
            let l = self.limiter.read().unwrap_or_else(|p| p.into_inner());
            l.1.retain_recent();
            l.1.shrink_to_fit();
            l.1.len() > MAX_TRACKED
        };
        if over {
            tracing::warn!(
                "more than {MAX_TRACKED} keys tracked: {} limits start afresh",
                self.what
            );
            let mut l = self.limiter.write().unwrap_or_else(|p| p.into_inner());
            let q = l.0;
            l.1 = RateLimiter::keyed(q);
        }
    }

    pub fn len(&self) -> usize {
        self.limiter.read().map(|l| l.1.len()).unwrap_or(0)
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
}
