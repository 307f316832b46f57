//! The global upstream budget (`--upstream-qps`): one token per packet
//! sent upstream, whatever sends it — a first attempt, a hedge, a
//! retransmission, the TCP retry after a truncated UDP answer.
//!
//! The budget protects the upstream; it must never switch it off. So the
//! bucket is as plain as it can be: a token count refilled from the
//! elapsed time, under one short lock, on tokio's monotonic clock. No
//! calibrated cycle counter, no lock-free retry loop whose outcome depends
//! on how many threads race for it: under any flood, a request that finds
//! a whole token takes it, and the tokens come back at exactly
//! `qps` a second. Tokio's clock also lets the tests pause time and prove
//! the rate without waiting for it.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Takes one token per packet sent upstream; false when the budget is
/// spent. Local ([`LocalBudget`]) or leased from the fleet's.
pub trait Spend: Send + Sync {
    fn spend(&self) -> futures_util::future::BoxFuture<'_, bool>;
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. Kept
/// as time in whole nanoseconds (one token is `1 s / rate` of it), so no
/// rounding ever loses or makes a token.
#[derive(Debug)]
pub struct TokenBucket {
    /// The time one token takes to come back.
    period: Duration,
    /// The most time saved up: `burst` tokens' worth.
    cap: Duration,
    /// Time saved up, as of the instant beside it.
    state: Mutex<(Duration, Instant)>,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens refilled at `rate` a second (a
    /// rate of 0 is taken as 1: a budget never stops the upstream for
    /// good).
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        let period = Duration::from_nanos(1_000_000_000 / u64::from(rate.max(1)));
        let cap = period.saturating_mul(burst.max(1));
        TokenBucket {
            period,
            cap,
            state: Mutex::new((cap, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (saved, last) = &mut *s;
        // Read under the lock: an instant read before it could be older
        // than `last`, and moving `last` back would count time twice.
        let now = Instant::now();
        if now > *last {
            *saved = (*saved + (now - *last)).min(self.cap);
            *last = now;
        }
        if *saved >= self.period {
            *saved -= self.period;
            true
        } else {
            false
        }
    }
}

/// `--upstream-qps` for one instance: a burst of one second's worth.
#[derive(Debug)]
pub struct LocalBudget(TokenBucket);

impl LocalBudget {
    pub fn new(qps: u32) -> LocalBudget {
        LocalBudget(TokenBucket::new(qps, qps))
    }
}

impl Spend for LocalBudget {
    fn spend(&self) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.0.take()))
    }
}

/// No budget at all: the proxy's own probes, which must find out whether
/// an upstream is there even when clients have spent everything.
pub struct Unlimited;

impl Spend for Unlimited {
    fn spend(&self) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_exactly_the_rate() {
        let b = TokenBucket::new(50, 50);
        assert_eq!((0..200).filter(|_| b.take()).count(), 50);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!((0..200).filter(|_| b.take()).count(), 5);
        }
        // Ten idle seconds save up one burst, no more.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!((0..200).filter(|_| b.take()).count(), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn fractions_of_a_token_are_kept() {
        let b = TokenBucket::new(3, 2);
        assert!(b.take() && b.take() && !b.take());
        let mut got = 0;
        for _ in 0..101 {
            tokio::time::advance(Duration::from_millis(10)).await;
            got += usize::from(b.take());
        }
        assert_eq!(got, 3, "three a second, asked every 10 ms");
    }

    /// Two threads asking as fast as they can (millions of times a second,
    /// far past any flood a network brings) for three seconds: the bucket
    /// grants its burst and its rate, never starved, never over. (The
    /// rate in every second under a real flood is measured by
    /// `benches/flood.sh`; here only totals, which a busy machine cannot
    /// blur.)
    #[test]
    fn a_flood_of_askers_gets_the_rate() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let b = Arc::new(TokenBucket::new(50, 50));
        let start = std::time::Instant::now();
        let granted = Arc::new(AtomicU64::new(0));
        let asked = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..2 {
                let (b, granted, asked) = (b.clone(), granted.clone(), asked.clone());
                let h = rt.handle().clone();
                s.spawn(move || {
                    let _g = h.enter();
                    while start.elapsed() < Duration::from_secs(3) {
                        asked.fetch_add(1, Ordering::Relaxed);
                        if b.take() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let elapsed = start.elapsed().as_secs_f64();
        let granted = granted.load(Ordering::Relaxed) as f64;
        assert!(asked.load(Ordering::Relaxed) > 100_000, "a flood");
        // At most the burst and the rate over the time taken; at least the
        // rate over two of the three seconds, however busy the machine.
        assert!(
            granted <= 50.0 + 50.0 * elapsed + 1.0,
            "{granted} in {elapsed} s"
        );
        assert!(granted >= 100.0, "{granted} in {elapsed} s");
    }
}
