//! Time, read in one place.
//!
//! Monotonic time is tokio's `Instant` everywhere (pausable in tests);
//! wall time is only needed where it leaves the process: ban expiries in
//! the state file and in Redis, ticket-key periods, ODoH key birth, the
//! days of known clients, the `Date` header.
//!
//! What is read on every request and only needs to be right to a few
//! milliseconds (the cache's and the budgets' ages, a connection's last
//! activity, the unique-client count's hour, a known client's day, the
//! `Date` header) comes from the kernel's coarse clocks, which it updates
//! at each of its ticks (every 1 to 10 ms): reading one costs about 4 ns,
//! where the precise clock reads the CPU's time-stamp counter, 30 ns or
//! more on a virtual machine, and a cache hit read it nine times.
//! Latencies (upstreams' round trips, hedging) and timers keep the
//! precise clock.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use rustix::time::{clock_gettime, ClockId};

/// Seconds since the Unix epoch, from the coarse clock; 0 if the system
/// clock is before it.
pub fn unix_now() -> u64 {
    u64::try_from(clock_gettime(ClockId::RealtimeCoarse).tv_sec).unwrap_or(0)
}

/// Now on tokio's timeline, from the kernel's coarse monotonic clock:
/// within one kernel tick (at most 10 ms) of `tokio::time::Instant::now()`.
/// In unit tests it is tokio's clock itself, so that a test can pause it.
pub fn coarse() -> tokio::time::Instant {
    #[cfg(test)]
    {
        tokio::time::Instant::now()
    }
    #[cfg(not(test))]
    {
        coarse_read()
    }
}

/// [`coarse`] as the kernel gives it: tokio's clock when first read, plus
/// the coarse clock's time since.
fn coarse_read() -> tokio::time::Instant {
    static ORIGIN: OnceLock<(tokio::time::Instant, Duration)> = OnceLock::new();
    let (base, at) = *ORIGIN.get_or_init(|| (tokio::time::Instant::now(), coarse_monotonic()));
    base + coarse_monotonic().saturating_sub(at)
}

fn coarse_monotonic() -> Duration {
    duration(clock_gettime(ClockId::MonotonicCoarse))
}

/// A kernel time as a `Duration` (nothing is before zero).
fn duration(t: rustix::time::Timespec) -> Duration {
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

thread_local! {
    /// The `Date` header of the current second on this thread.
    static DATE: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
}

/// The `Date` header for a response (RFC 9110, 6.6.1), formatted once a
/// second per thread. Responses carry it from here, so that hyper, which
/// adds one when it is missing, does not read the precise clock for it.
pub fn http_date() -> HeaderValue {
    let now = unix_now();
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != now {
            let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(now));
            if let Ok(v) = HeaderValue::from_str(&text) {
                *d = (now, v);
            }
        }
        d.1.clone()
    })
}

/// Milliseconds since the Unix epoch (the fleet's per-second budget
/// windows); 0 if the system clock is before it.
pub fn unix_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// Time since the Unix epoch; zero if the system clock is before it.
pub fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// The proxy's monotonic clock, shared by the components whose state ages
/// (the cache, the upstream budget). It is tokio's clock, which a test can
/// also move forward with [`Clock::advance`] to reach an expiry without
/// waiting for it; the proxy itself never moves it. Reading it costs one
/// relaxed atomic load beside [`coarse`].
#[derive(Debug, Clone, Default)]
pub struct Clock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Clock {
    pub fn now(&self) -> tokio::time::Instant {
        coarse() + self.skew()
    }

    /// Moves this clock (and every component reading it) forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn skew(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clock keeps to tokio's within a kernel tick, and never
    /// goes back.
    #[test]
    fn the_coarse_clock_keeps_to_the_precise_one() {
        let tick = duration(rustix::time::clock_getres(ClockId::MonotonicCoarse));
        assert!(tick <= Duration::from_millis(10), "{tick:?}");
        let mut last = coarse_read();
        for _ in 0..100_000 {
            let before = tokio::time::Instant::now();
            let c = coarse_read();
            let after = tokio::time::Instant::now();
            assert!(c >= last, "backwards");
            assert!(c + 2 * tick >= before, "{:?} behind", before - c);
            assert!(c <= after + 2 * tick, "{:?} ahead", c - after);
            last = c;
        }
    }

    #[test]
    fn unix_time_and_the_date_header_are_now() {
        let precise = since_epoch().as_secs();
        assert!(unix_now().abs_diff(precise) <= 1);
        let date = http_date();
        let parsed = httpdate::parse_http_date(date.to_str().unwrap()).unwrap();
        let secs = parsed.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert!(secs.abs_diff(precise) <= 1, "{date:?}");
        assert!(date.to_str().unwrap().ends_with(" GMT"));
    }
}
