//! Penalty scores: refusals of one client within a one-minute window.
//!
//! A client whose score reaches `--ban-after` within the window is to be
//! banned; the score then starts again. Scores whose minute is over are
//! forgotten at the next prune, and above [`MAX_SCORED`] clients every
//! score starts afresh, so memory stays bounded.

use std::net::IpAddr;

use dashmap::DashMap;
use tokio::time::Instant;

/// Window over which refusals are counted, in seconds.
const WINDOW_SECS: u32 = 60;
/// Clients scored at most; above it scores start afresh.
pub const MAX_SCORED: usize = 1_000_000;

struct Score {
    window_start: u32,
    count: u32,
}

pub struct Penalty {
    scores: DashMap<IpAddr, Score>,
    epoch: Instant,
}

impl Penalty {
    pub fn new() -> Penalty {
        Penalty {
            scores: DashMap::new(),
            epoch: Instant::now(),
        }
    }

    fn now_secs(&self) -> u32 {
        self.epoch.elapsed().as_secs().min(u64::from(u32::MAX)) as u32
    }

    /// Adds one refusal to `client`'s score; true when it reaches
    /// `ban_after` (the score then starts again).
    pub fn score(&self, client: IpAddr, ban_after: u32) -> bool {
        let now = self.now_secs();
        let mut s = self.scores.entry(client).or_insert(Score {
            window_start: now,
            count: 0,
        });
        if now >= s.window_start.saturating_add(WINDOW_SECS) {
            s.window_start = now;
            s.count = 0;
        }
        s.count += 1;
        let full = s.count >= ban_after;
        if full {
            s.count = 0;
        }
        full
    }

    /// Forgets scores whose minute is over.
    pub fn prune(&self) {
        let now = self.now_secs();
        self.scores
            .retain(|_, s| now < s.window_start.saturating_add(WINDOW_SECS));
        if self.scores.len() > MAX_SCORED {
            tracing::warn!("more than {MAX_SCORED} clients scored: penalty scores start afresh");
            self.scores.clear();
        }
        self.scores.shrink_to_fit();
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }
}

impl Default for Penalty {
    fn default() -> Self {
        Penalty::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn window_then_ban_then_forget() {
        let p = Penalty::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(!p.score(ip, 3));
        assert!(!p.score(ip, 3));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!p.score(ip, 3), "a new minute starts again");
        assert!(!p.score(ip, 3));
        assert!(p.score(ip, 3));
        tokio::time::advance(Duration::from_secs(61)).await;
        p.prune();
        assert!(p.is_empty());
    }
}
