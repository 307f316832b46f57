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

/// How long after a connection went quiet the watchdog looks at it (and
/// so polls it), twice. HTTP/2 and TLS keep their read and write buffers
/// and stream slots from one burst of requests to the next, and give them
/// back at the first poll 250 ms after a poll found them quiet
/// (`patches/README.md`): these two wakes are those polls for a
/// connection whose client has gone quiet.
const RELEASE_TICK: Duration = Duration::from_millis(400);

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
        // The request count at the last wake that found the connection
        // quiet for twice RELEASE_TICK (its buffers given back then); none
        // yet.
        let mut settled = None;
        loop {
            let now = Instant::now();
            let mut wake = match conn.deadline(first, idle, write) {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => at.min(now + nap),
                // A request is in flight: look again once it may have ended.
                None => now + nap.min(Duration::from_secs(1)),
            };
            // Until a wake finds the connection quiet for twice
            // RELEASE_TICK since its last request, look again soon: this
            // task's connection is polled at each wake, and gives its
            // buffers back at the second one after it went quiet.
            let requests = conn.requests();
            match conn.quiet_since() {
                Some(t) if now >= t + 2 * RELEASE_TICK => settled = Some(requests),
                Some(t) if now >= t + RELEASE_TICK => wake = wake.min(t + 2 * RELEASE_TICK),
                Some(t) => wake = wake.min(t + RELEASE_TICK),
                None => {}
            }
            if settled != Some(requests) {
                wake = wake.min(now + RELEASE_TICK);
            }
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
    use std::future::Future;

    /// The watchdog with a 5 s first-request deadline, a 30 s idle timeout
    /// and a 10 s write timeout.
    fn usual(c: &Conn) -> impl Future<Output = Expiry> + Send + '_ {
        expired(
            c,
            Duration::from_secs(5),
            Duration::from_secs(30),
            Duration::from_secs(10),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn first_request_then_idle() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let t = Instant::now();
        let why = usual(&c).await;
        assert_eq!(why, Expiry::FirstRequest);
        assert_eq!(t.elapsed(), Duration::from_secs(5));
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        let (_, req) = c.begin();
        let watch = usual(&c);
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
        let why = usual(&c).await;
        assert_eq!(why, Expiry::Stuck);
        assert_eq!(t.elapsed(), Duration::from_secs(10));
        drop(unread);
    }

    /// Counts the wakes of the task it is the waker of.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_gone_quiet_is_looked_at_twice_soon_after() {
        let c = Conn::detached("192.0.2.1".parse().unwrap());
        drop(c.begin());
        let wakes = std::sync::Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let watch = usual(&c);
        tokio::pin!(watch);
        let woken = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        // The connection's task is woken (and the connection polled) once
        // it has been quiet for RELEASE_TICK, well before the idle timeout,
        // and once more RELEASE_TICK later...
        tokio::time::advance(RELEASE_TICK).await;
        assert_eq!(woken(), 1, "woken once quiet for RELEASE_TICK");
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        tokio::time::advance(RELEASE_TICK).await;
        assert_eq!(woken(), 2, "woken again RELEASE_TICK later");
        assert!(watch.as_mut().poll(&mut cx).is_pending());
        // ...and then left alone: the next wake is the usual one, after
        // min(idle, write).
        let ms = Duration::from_millis(1);
        tokio::time::advance(Duration::from_secs(10) - ms).await;
        assert_eq!(woken(), 2, "no more wakes once released");
        tokio::time::advance(ms).await;
        assert_eq!(woken(), 3, "the usual look after min(idle, write)");
    }
}
