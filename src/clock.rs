//! Wall-clock time, read in one place.
//!
//! Monotonic time is tokio's `Instant` everywhere (pausable in tests);
//! wall time is only needed where it leaves the process: ban expiries in
//! the state file and in Redis, ticket-key periods, ODoH key birth.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch; 0 if the system clock is before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
