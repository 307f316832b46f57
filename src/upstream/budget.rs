//! The global upstream budget (`--upstream-qps`): one token per packet
//! sent upstream, whatever sends it — a first attempt, a hedge, a
//! retransmission, the TCP retry after a truncated UDP answer.
//!
//! The TCP retry is the second half of a query already paid for: under a
//! flood, new queries take each token the moment it comes back, so a retry
//! that merely asked would almost never find one, and every truncated
//! answer would have cost a token for nothing. A retry waits for its token
//! instead ([`Spend::spend_retry`], at most [`RETRY_WAIT`]), and while one
//! waits, new clients' first attempts are refused: retries come before
//! new queries, but never before the known clients' share. The upstream
//! still receives no packet the budget does not hold.
//!
//! The budget protects the upstream; it must never switch it off. So the
//! bucket is as plain as it can be: a token count refilled from the
//! elapsed time, under one short lock, on tokio's monotonic clock. No
//! calibrated cycle counter, no lock-free retry loop whose outcome depends
//! on how many threads race for it: under any flood, a request that finds
//! a whole token takes it, and the tokens come back at exactly
//! `qps` a second. Tokio's clock also lets the tests pause time and prove
//! the rate without waiting for it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::clock::Clock;

use crate::metrics::Metrics;

/// Who a resolution is for: a known client (`--known-after-secs`) may
/// spend the share of the budget kept for known clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Known,
    New,
}

/// Takes one token per packet sent upstream; false when the budget is
/// spent (for `who`). Local ([`LocalBudget`]) or leased from the fleet's.
pub trait Spend: Send + Sync {
    fn spend(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool>;

    /// The answer of [`Spend::spend`] when it needs no waiting (a local
    /// budget): spares a boxed future on every query sent.
    fn spend_now(&self, _who: Who) -> Option<bool> {
        None
    }

    /// Takes the token of a TCP retry after a truncated answer: ahead of
    /// new queries where the budget can order them, else like any packet.
    fn spend_retry(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool> {
        self.spend(who)
    }
}

/// Takes one token: at once when the budget can say, else by waiting.
pub async fn spend(budget: &dyn Spend, who: Who) -> bool {
    match budget.spend_now(who) {
        Some(got) => got,
        None => budget.spend(who).await,
    }
}

/// `--upstream-qps` for one instance (a burst of one second's worth),
/// with the share kept for known clients (`--known-share`).
///
/// Two buckets under one lock: the budget itself, and the *reserve*, which
/// fills at the known clients' share of the rate (a burst of one second of
/// it). Every token comes out of the budget; a known client's also drains
/// the reserve. A new client may take a token only while the budget holds
/// more than the reserve does. So, under a flood of new clients:
/// - when known clients ask for nothing, the reserve stays full and the
///   new clients take every token above it — the whole rate;
/// - when known clients ask for up to their share, the reserve keeps up and
///   they get all they ask for; new clients the rest;
/// - past their share, the reserve is empty and both compete for what
///   comes, known clients still getting at least their share.
///
/// The upstream never sees more than the rate and its burst: no token is
/// ever taken that the budget does not hold. Both buckets are kept as time
/// in whole nanoseconds (one token is `1 s / rate` of it), so no rounding
/// ever loses or makes a token.
pub struct LocalBudget {
    /// The time one token of the budget takes to come back, and the most
    /// saved up.
    period: Duration,
    cap: Duration,
    /// Likewise for the reserve; `None` when `--known-share` is 0.
    reserve: Option<(Duration, Duration)>,
    /// `--dry-run`: new clients are never held back, what would have been
    /// is counted.
    dry_run: bool,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<Saved>,
    /// Retries waiting for a token: new clients' first attempts wait
    /// behind them.
    retries_waiting: AtomicUsize,
    /// What the budget refills by.
    clock: Clock,
    last_log: AtomicU64,
}

/// What a [`LocalBudget`] holds, as of `last`.
struct Saved {
    /// The budget saved up.
    budget: Duration,
    /// The known clients' reserve saved up.
    reserve: Duration,
    last: Instant,
}

/// The longest a retry waits for its token.
pub const RETRY_WAIT: Duration = Duration::from_secs(1);

/// Counts a retry as waiting while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Waiting<'a> {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl LocalBudget {
    /// The whole budget, no share kept.
    #[cfg(test)]
    pub fn new(qps: u32) -> LocalBudget {
        LocalBudget::with_share(qps, 0, false, None)
    }

    /// The budget of an instance on its own: `--upstream-qps`, the share
    /// kept for known clients, `--dry-run`.
    /// It refills by `clock`.
    pub fn of(s: &super::UpstreamSettings, metrics: &Arc<Metrics>, clock: Clock) -> LocalBudget {
        let metrics = Some(metrics.clone());
        LocalBudget::build(s.qps, s.known_share, s.dry_run, metrics, clock)
    }

    /// `qps` a second of which `share` percent is kept for known clients.
    pub fn with_share(
        qps: u32,
        share: u8,
        dry_run: bool,
        metrics: Option<Arc<Metrics>>,
    ) -> LocalBudget {
        LocalBudget::build(qps, share, dry_run, metrics, Clock::default())
    }

    fn build(
        qps: u32,
        share: u8,
        dry_run: bool,
        metrics: Option<Arc<Metrics>>,
        clock: Clock,
    ) -> LocalBudget {
        let qps = u64::from(qps.max(1));
        let period = Duration::from_nanos(1_000_000_000 / qps);
        let cap = period.saturating_mul(u32::try_from(qps).unwrap_or(u32::MAX));
        // share × qps / 100 tokens a second; a bucket of one second of it,
        // below the budget's own by at least one token (else new clients,
        // who need the budget to hold more than the reserve, could never
        // take one). With a budget of one a second there is no room for a
        // share.
        let per_sec_x100 = qps * u64::from(share.min(100));
        let burst = (per_sec_x100 / 100).max(1).min(qps - 1);
        let reserve = (per_sec_x100 > 0 && burst > 0).then(|| {
            let rperiod = Duration::from_nanos(100_000_000_000 / per_sec_x100);
            (
                rperiod,
                rperiod.saturating_mul(u32::try_from(burst).unwrap_or(u32::MAX)),
            )
        });
        LocalBudget {
            period,
            cap,
            reserve,
            dry_run,
            metrics,
            state: Mutex::new(Saved {
                budget: cap,
                reserve: reserve.map_or(Duration::ZERO, |r| r.1),
                last: clock.now(),
            }),
            retries_waiting: AtomicUsize::new(0),
            clock,
            last_log: AtomicU64::new(0),
        }
    }

    /// The state, refilled to this instant.
    fn refilled(&self) -> std::sync::MutexGuard<'_, Saved> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: an instant read before it could be older
        // than `last`, and moving `last` back would count time twice.
        let now = self.clock.now();
        if now > s.last {
            let dt = now - s.last;
            s.budget = (s.budget + dt).min(self.cap);
            if let Some((_, rcap)) = self.reserve {
                s.reserve = (s.reserve + dt).min(rcap);
            }
            s.last = now;
        }
        s
    }

    /// Takes one token for `who` if there is one; a new client's first
    /// attempt only while no retry is waiting.
    pub fn take(&self, who: Who) -> bool {
        if who == Who::New && self.retries_waiting.load(Ordering::Relaxed) > 0 {
            return false;
        }
        self.take_or_wait(who).is_ok()
    }

    /// Takes one token for `who`, or says how long until one could be
    /// there for it (if nobody else takes it first).
    fn take_or_wait(&self, who: Who) -> Result<(), Duration> {
        let mut s = self.refilled();
        let Saved {
            budget: saved,
            reserve: reserved,
            ..
        } = &mut *s;
        if *saved < self.period {
            return Err(self.period - *saved);
        }
        let Some((rperiod, _)) = self.reserve else {
            *saved -= self.period;
            return Ok(());
        };
        if who == Who::Known {
            *saved -= self.period;
            *reserved = reserved.saturating_sub(rperiod);
            return Ok(());
        }
        // A new client: only while the budget holds more tokens than the
        // reserve, that is saved/period >= reserved/rperiod + 1.
        let (p, rp) = (self.period.as_nanos(), rperiod.as_nanos());
        if saved.as_nanos() * rp >= reserved.as_nanos() * p + p * rp {
            *saved -= self.period;
            return Ok(());
        }
        if !self.dry_run {
            let needed = (reserved.as_nanos() * p).div_ceil(rp) + p;
            let short = u64::try_from(needed.saturating_sub(saved.as_nanos())).unwrap_or(u64::MAX);
            return Err(Duration::from_nanos(short.max(1)));
        }
        *saved -= self.period;
        drop(s);
        if let Some(m) = &self.metrics {
            m.upstream.budget_refused(false, true);
        }
        let sec = crate::clock::unix_now();
        if self.last_log.swap(sec, Ordering::Relaxed) != sec {
            tracing::info!("dry run: the known clients' share would have refused a new client's miss (logged once a second)");
        }
        Ok(())
    }
}

impl Spend for LocalBudget {
    fn spend(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.take(who)))
    }

    fn spend_now(&self, who: Who) -> Option<bool> {
        Some(self.take(who))
    }

    fn spend_retry(&self, who: Who) -> futures_util::future::BoxFuture<'_, bool> {
        let mut wait = match self.take_or_wait(who) {
            Ok(()) => return Box::pin(std::future::ready(true)),
            Err(wait) => wait,
        };
        Box::pin(async move {
            let _waiting = Waiting::new(&self.retries_waiting);
            let give_up = tokio::time::Instant::now() + RETRY_WAIT;
            loop {
                let at = tokio::time::Instant::now() + wait;
                if at > give_up {
                    return false;
                }
                tokio::time::sleep_until(at).await;
                match self.take_or_wait(who) {
                    Ok(()) => return true,
                    Err(w) => wait = w,
                }
            }
        })
    }
}

/// No budget at all: the proxy's own probes, which must find out whether
/// an upstream is there even when clients have spent everything.
pub struct Unlimited;

impl Spend for Unlimited {
    fn spend(&self, _: Who) -> futures_util::future::BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }

    fn spend_now(&self, _: Who) -> Option<bool> {
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asks for known and new clients every 10 ms over `secs` seconds; what it got.
    async fn ask(
        b: &LocalBudget,
        known_per_tick: usize,
        new_per_tick: usize,
        secs: u64,
    ) -> (usize, usize) {
        let (mut known, mut new) = (0, 0);
        for t in 0..secs * 100 {
            tokio::time::advance(Duration::from_millis(10)).await;
            // Interleaved as requests come, each first every other tick.
            for i in 0..known_per_tick.max(new_per_tick) {
                for who in if t % 2 == 0 {
                    [Who::New, Who::Known]
                } else {
                    [Who::Known, Who::New]
                } {
                    let (n, got) = match who {
                        Who::New => (new_per_tick, &mut new),
                        Who::Known => (known_per_tick, &mut known),
                    };
                    if i < n && b.take(who) {
                        *got += 1;
                    }
                }
            }
        }
        (known, new)
    }

    #[tokio::test(start_paused = true)]
    async fn new_clients_alone_get_the_whole_rate() {
        let b = LocalBudget::with_share(100, 50, false, None);
        // The first second: the burst above the reserve, then the rate.
        let _ = ask(&b, 0, 20, 1).await;
        let (_, new) = ask(&b, 0, 20, 10).await;
        assert!((990..=1010).contains(&new), "{new} of 1,000");
    }

    #[tokio::test(start_paused = true)]
    async fn a_crowd_alone_is_never_held_back_whatever_the_share() {
        for (qps, share) in [(1, 50), (2, 100), (20, 100), (1000, 99)] {
            let b = LocalBudget::with_share(qps, share, false, None);
            let _ = ask(&b, 0, 20, 3).await;
            let (_, new) = ask(&b, 0, 20, 10).await;
            let want = 10 * qps as usize;
            assert!(
                new.abs_diff(want) <= want / 50 + 1,
                "{qps}/s, {share} %: {new} of {want}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn known_clients_within_their_share_get_everything() {
        let b = LocalBudget::with_share(100, 50, false, None);
        let _ = ask(&b, 0, 20, 2).await; // a flood of new clients first
                                         // Known clients ask 40 a second (two ticks in five), within their
                                         // 50; new clients flood.
        let (mut known, mut new) = (0, 0);
        for t in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            for _ in 0..20 {
                new += usize::from(b.take(Who::New));
            }
            if t % 5 < 2 {
                known += usize::from(b.take(Who::Known));
            }
        }
        assert_eq!(known, 400, "every one of the known clients' 400");
        assert!((590..=610).contains(&new), "the rest: {new}");
    }

    #[tokio::test(start_paused = true)]
    async fn past_their_share_known_clients_still_get_it() {
        let b = LocalBudget::with_share(100, 50, false, None);
        let (known, new) = ask(&b, 20, 20, 10).await;
        assert!(known >= 500, "at least the share: {known}");
        assert!(
            known + new <= 1000 + 100,
            "never over rate and burst: {}",
            known + new
        );
        // No share: new and known alike.
        let b = LocalBudget::with_share(100, 0, false, None);
        let (known, new) = ask(&b, 20, 20, 10).await;
        assert!(known.abs_diff(new) <= 2, "{known} vs {new}");
    }

    #[tokio::test(start_paused = true)]
    async fn dry_run_holds_nobody_back_and_counts() {
        let m = Arc::new(Metrics::new());
        let b = LocalBudget::with_share(100, 50, true, Some(m.clone()));
        let (known, new) = ask(&b, 20, 20, 10).await;
        assert!(known.abs_diff(new) <= 2, "{known} vs {new}");
        let text = m.encode();
        assert!(
            text.lines().any(|l| l
                .starts_with("doh_upstream_budget_refused_total{client=\"new\",dry_run=\"true\"}")
                && !l.ends_with(" 0")),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_exactly_the_rate() {
        let b = LocalBudget::new(50);
        let take = || b.take(Who::New);
        assert_eq!((0..200).filter(|_| take()).count(), 50);
        for _ in 0..10 {
            tokio::time::advance(Duration::from_millis(100)).await;
            assert_eq!((0..200).filter(|_| take()).count(), 5);
        }
        // Ten idle seconds save up one burst, no more.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!((0..200).filter(|_| take()).count(), 50);
    }

    /// A retry for `who` on a task of its own: whether it got a token, and
    /// how long it waited.
    fn retry(b: &Arc<LocalBudget>, who: Who) -> tokio::task::JoinHandle<(bool, Duration)> {
        let b = b.clone();
        tokio::spawn(async move {
            let asked = Instant::now();
            (b.spend_retry(who).await, asked.elapsed())
        })
    }

    /// New queries asking every millisecond take each token as it comes
    /// back; retries take theirs ahead of them, waiting only for the
    /// retries asked before them, and the rate stays the budget's.
    #[tokio::test(start_paused = true)]
    async fn a_retry_takes_the_next_token_ahead_of_a_flood() {
        let b = Arc::new(LocalBudget::new(50));
        let (mut new, mut retries) = (0, Vec::new());
        for ms in 0..10_000u32 {
            tokio::time::advance(Duration::from_millis(1)).await;
            new += usize::from(b.take(Who::New));
            if ms % 100 == 50 {
                // Three at once: the third waits for three tokens.
                retries.extend((0..3).map(|_| retry(&b, Who::New)));
            }
        }
        let mut waits = Vec::new();
        for r in retries {
            let (got, waited) = r.await.unwrap();
            assert!(got, "every retry got its token");
            waits.push(waited);
        }
        // Past the first second's burst, a retry waits for the tokens
        // taken by the retries before it: one, two or three periods.
        assert!(
            waits[30..].iter().all(|w| *w <= Duration::from_millis(61)),
            "{waits:?}"
        );
        // Never over the rate: a burst of 50, then 50 a second, shared.
        assert!(
            (new + waits.len()).abs_diff(50 + 500) <= 1,
            "{new} new, {} retries",
            waits.len()
        );
    }

    /// Retries for new clients come before new clients' first attempts,
    /// not before the known clients' share: known clients asking within
    /// it still get everything while every new query is truncated.
    #[tokio::test(start_paused = true)]
    async fn new_clients_retries_leave_the_known_clients_share() {
        let b = Arc::new(LocalBudget::with_share(100, 50, false, None));
        let _ = ask(&b, 0, 20, 2).await; // a flood of new clients first
        let (mut known, mut new, mut retries) = (0, 0, Vec::new());
        for t in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            for _ in 0..20 {
                if b.take(Who::New) {
                    new += 1;
                    retries.push(retry(&b, Who::New));
                }
            }
            if t % 5 < 2 {
                known += usize::from(b.take(Who::Known));
            }
        }
        let mut retried = 0;
        for r in retries {
            retried += usize::from(r.await.unwrap().0);
        }
        assert_eq!(known, 400, "every one of the known clients' 400");
        assert!(
            known + new + retried <= 1000 + 100,
            "never over rate and burst: {known} + {new} + {retried}"
        );
        assert!(retried + 2 >= new, "{retried} of {new} retries served");
    }

    /// A retry gives up after [`RETRY_WAIT`]; new queries go on once no
    /// retry waits.
    #[tokio::test(start_paused = true)]
    async fn retries_wait_a_second_at_most() {
        let b = Arc::new(LocalBudget::new(10));
        assert_eq!((0..10).filter(|_| b.take(Who::New)).count(), 10);
        let retries: Vec<_> = (0..12).map(|_| retry(&b, Who::Known)).collect();
        let mut got = 0;
        for r in retries {
            let (ok, waited) = r.await.unwrap();
            assert!(waited <= RETRY_WAIT, "{waited:?}");
            got += usize::from(ok);
        }
        // Ten tokens come back within the second, one for each of ten.
        assert_eq!(got, 10);
        assert_eq!(b.retries_waiting.load(Ordering::Relaxed), 0);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(b.take(Who::New), "new queries go on");
    }

    #[tokio::test(start_paused = true)]
    async fn fractions_of_a_token_are_kept() {
        let b = LocalBudget::new(3);
        let take = || b.take(Who::New);
        assert!(take() && take() && take() && !take());
        let mut got = 0;
        for _ in 0..101 {
            tokio::time::advance(Duration::from_millis(10)).await;
            got += usize::from(take());
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
        let b = Arc::new(LocalBudget::new(50));
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
                        if b.take(Who::New) {
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
