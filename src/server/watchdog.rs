//! The clock every listener closes slow and idle connections by. It looks
//! at requests only ([`Conn::deadline`]): a connection must complete its
//! first request within `--handshake-timeout` of accept, and one with no
//! request in flight and none started for `--idle-timeout` is closed,
//! whatever control frames or stray bytes it sends meanwhile.

use std::time::Duration;

use tokio::time::Instant;

use crate::guard::{Conn, Expiry};

/// Resolves when `conn` must be closed, and says why.
///
/// One timer per connection, woken rarely: a request only ever moves the
/// deadline later, except the first one, after which the deadline is at
/// least `idle` away; so sleeping until the earlier of the deadline and
/// `now + idle` and looking again never misses one.
pub async fn expired(conn: &Conn, first: Duration, idle: Duration) -> Expiry {
    loop {
        let now = Instant::now();
        match conn.deadline(first, idle) {
            Some((at, why)) if at <= now => return why,
            Some((at, _)) => tokio::time::sleep_until(at.min(now + idle)).await,
            // A request is in flight: look again once it may have ended.
            None => tokio::time::sleep(idle.min(Duration::from_secs(1))).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn first_request_then_idle() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let t = Instant::now();
        let why = expired(&c, Duration::from_secs(5), Duration::from_secs(30)).await;
        assert_eq!(why, Expiry::FirstRequest);
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let (_, req) = c.begin();
        let watch = expired(&c, Duration::from_secs(5), Duration::from_secs(30));
        tokio::pin!(watch);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut watch)
                .await
                .is_err(),
            "never while a request is in flight"
        );
        drop(req);
        let t = Instant::now();
        assert_eq!(watch.await, Expiry::Idle);
        assert!(t.elapsed() <= Duration::from_secs(31));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_shorter_than_the_first_deadline() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        drop(c.begin());
        let t = Instant::now();
        let why = expired(&c, Duration::from_secs(5), Duration::from_secs(1)).await;
        assert_eq!(why, Expiry::Idle);
        assert!(
            t.elapsed() <= Duration::from_millis(1100),
            "{:?}",
            t.elapsed()
        );
    }
}
