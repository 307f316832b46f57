//! Wall-clock time, read in one place.
//!
//! Monotonic time is tokio's `Instant` everywhere (pausable in tests);
//! wall time is only needed where it leaves the process: ban expiries in
//! the state file and in Redis, ticket-key periods, ODoH key birth.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is before it.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
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
/// relaxed atomic load beside tokio's `Instant::now`.
#[derive(Debug, Clone, Default)]
pub struct Clock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Clock {
    pub fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.skew()
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
