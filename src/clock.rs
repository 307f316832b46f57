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
