//! An HTTP/2 connection's streams run inside the connection's own task.
//!
//! hyper hands each HTTP/2 request (its `H2Stream`: our answer, then the
//! response written into the stream) to an executor. Spawning a task for
//! each costs an allocation sized for the whole future, a lock on the
//! runtime's task list, a scheduling round and a wake-up of the
//! connection's task when the answer is queued; most DoH answers are cache
//! hits, ready the first time they are polled. [`StreamExec`] queues the
//! streams instead, and [`WithStreams`] polls them right after the
//! connection that accepted them: a hit is answered within the poll that
//! read its request, and only streams that wait (a miss, a response
//! waiting for flow-control window) are kept, in a `FuturesUnordered`
//! that exists only while some do.
//!
//! The streams run on the connection's worker thread either way (each
//! worker is a single-threaded runtime). They end with their connection:
//! when it closes, nothing is left running to write answers nobody can
//! read.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};

type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one connection: queues each stream for
/// [`WithStreams`] to run.
#[derive(Clone, Default)]
pub(super) struct StreamExec {
    queued: Arc<Mutex<Vec<Stream>>>,
}

impl StreamExec {
    fn take(&self) -> Vec<Stream> {
        // Never poisoned: nothing runs while it is held but a push.
        match self.queued.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let fut: Stream = Box::pin(fut);
        match self.queued.lock() {
            Ok(mut q) => q.push(fut),
            Err(p) => p.into_inner().push(fut),
        }
    }
}

/// A connection and the streams it started, polled together.
pub(super) struct WithStreams<C> {
    conn: C,
    exec: StreamExec,
    waiting: Option<FuturesUnordered<Stream>>,
}

impl<C> WithStreams<C> {
    pub(super) fn new(conn: C, exec: StreamExec) -> Self {
        WithStreams {
            conn,
            exec,
            waiting: None,
        }
    }

    pub(super) fn conn(&mut self) -> &mut C {
        &mut self.conn
    }

    /// Runs the streams the connection just started, once each, keeping
    /// those that wait; then the waiting ones that were woken.
    fn run_streams(&mut self, cx: &mut Context<'_>) {
        for mut s in self.exec.take() {
            if s.as_mut().poll(cx).is_pending() {
                self.waiting
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(s);
            }
        }
        if let Some(w) = &mut self.waiting {
            while let Poll::Ready(Some(())) = w.poll_next_unpin(cx) {}
            if w.is_empty() {
                self.waiting = None;
            }
        }
    }
}

impl<C> Future for WithStreams<C>
where
    C: Future + Unpin,
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        // The connection first: it reads requests and starts their
        // streams; a stream that answers queues its frames and wakes this
        // task, whose next poll writes them out.
        if let Poll::Ready(r) = Pin::new(&mut this.conn).poll(cx) {
            return Poll::Ready(r);
        }
        this.run_streams(cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn poll_once<F: Future + Unpin>(f: &mut F) -> impl Future<Output = Poll<F::Output>> + '_ {
        std::future::poll_fn(move |cx| Poll::Ready(Pin::new(&mut *f).poll(cx)))
    }

    /// A connection that starts one stream that is ready at once and one
    /// that waits for a notification, then ends when told.
    #[tokio::test]
    async fn streams_run_in_the_connection_task_and_wait_when_they_must() {
        let exec = StreamExec::default();
        let done = Arc::new(AtomicUsize::new(0));
        let go = Arc::new(tokio::sync::Notify::new());
        let end = Arc::new(tokio::sync::Notify::new());
        let (e, d, g, end2) = (exec.clone(), done.clone(), go.clone(), end.clone());
        let conn = Box::pin(async move {
            let d1 = d.clone();
            e.execute(async move {
                d1.fetch_add(1, Ordering::Relaxed);
            });
            e.execute(async move {
                g.notified().await;
                d.fetch_add(1, Ordering::Relaxed);
            });
            end2.notified().await;
        });
        let mut both = WithStreams::new(conn, exec);
        // One poll: the ready stream has run, the other waits.
        assert!(poll_once(&mut both).await.is_pending());
        assert_eq!(done.load(Ordering::Relaxed), 1);
        assert!(both.waiting.as_ref().is_some_and(|w| w.len() == 1));
        go.notify_one();
        assert!(poll_once(&mut both).await.is_pending());
        assert_eq!(done.load(Ordering::Relaxed), 2);
        assert!(
            both.waiting.is_none(),
            "nothing kept once every stream ended"
        );
        end.notify_one();
        both.await;
    }
}
