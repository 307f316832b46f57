//! The clock every listener closes slow, idle and stuck connections by. It
//! looks at requests and answers only ([`Conn::deadline`]): a connection
//! must complete its first request within `--handshake-timeout` of accept;
//! one with no request in flight and none started for `--idle-timeout` is
//! closed, whatever control frames or stray bytes it sends meanwhile; one
//! whose client leaves answers unread for `--write-timeout` is closed too.

use std::time::Duration;

use tokio::time::Instant;

use crate::guard::{Conn, Expiry};
use crate::pipeline::{App, Peer};
use crate::reject::ConnReject;

/// Resolves when `conn` must be closed, and says why.
///
/// One timer per connection, woken rarely: a request only ever moves the
/// deadline later, except the first one, after which the deadline is at
/// least `idle` away, and the first unread answer, after which it is at
/// least `write` away; so sleeping until the earlier of the deadline and
/// `now + min(idle, write)` and looking again never misses one by more
/// than `write`.
///
/// Not an `async fn`, and one sleep in one place: every idle connection
/// holds this future, which an `async fn` would make keep its arguments
/// twice and each of its two sleeps in a slot of its own.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn expired(
    conn: &Conn,
    first: Duration,
    idle: Duration,
    write: Duration,
) -> impl std::future::Future<Output = Expiry> + Send + '_ {
    async move {
        let nap = idle.min(write);
        loop {
            let now = Instant::now();
            let wake = match conn.deadline(first, idle, write) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => at.min(now + nap),
                // A request is in flight: look again once it may have ended.
                None => now + nap.min(Duration::from_secs(1)),
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// [`expired`] for a connection of `peer` with the deadlines in force
/// (`--handshake-timeout`, `--idle-timeout`, `--write-timeout`).
pub async fn watch(app: &App, peer: &Peer) -> Expiry {
    let s = app.conn.load_full();
    let (first, idle, write) = (s.handshake_timeout, s.idle_timeout, s.write_timeout);
    drop(s);
    expired(&peer.conn, first, idle, write).await
}

/// Counts and scores a connection the watchdog closes: a client that
/// never completed a first request or left its answers unread is scored;
/// an idle one is not (it did nothing wrong).
pub fn account(app: &App, peer: &Peer, why: Expiry) {
    let reason = match why {
        Expiry::FirstRequest => ConnReject::FirstRequestTimeout,
        Expiry::Stuck => ConnReject::WriteTimeout,
        Expiry::Idle => return,
    };
    app.metrics.guard.conn_rejected(reason, false);
    app.guard.penalize(super::http::scored_client(peer), reason);
    if why == Expiry::Stuck {
        tracing::debug!(peer = %peer.conn.peer(), unread = peer.conn.unread(), "answers left unread: closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn first_request_then_idle() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let t = Instant::now();
        let why = expired(
            &c,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(why, Expiry::FirstRequest);
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let (_, req) = c.begin();
        let watch = expired(
            &c,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(10),
        );
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
        let why = expired(
            &c,
            Duration::from_secs(5),
            Duration::from_secs(1),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(why, Expiry::Idle);
        assert!(
            t.elapsed() <= Duration::from_millis(1100),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn answers_left_unread_expire_at_the_write_timeout() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let (_, req) = c.begin();
        let unread = c.queued();
        drop(req);
        let t = Instant::now();
        let why = expired(
            &c,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(why, Expiry::Stuck);
        assert_eq!(t.elapsed(), Duration::from_secs(10));
        drop(unread);
    }
}
