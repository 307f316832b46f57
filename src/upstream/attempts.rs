//! The attempts of one resolution in flight.
//!
//! Each upstream is asked at most twice, so a resolution has a handful of
//! attempts at most, nearly always one. `FuturesUnordered` gives each
//! future its own waker and a shared ready queue — two allocations and
//! reference counting on every miss — to spare polling futures that are
//! not ready, which for one or two is no saving. [`Attempts`] keeps them
//! boxed in a small vector and polls those still running in turn when
//! the resolution is woken.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use smallvec::SmallVec;

pub(super) struct Attempts<F> {
    slots: SmallVec<[Option<Pin<Box<F>>>; 2]>,
    running: usize,
}

impl<F: Future> Attempts<F> {
    pub(super) fn new() -> Attempts<F> {
        Attempts {
            slots: SmallVec::new(),
            running: 0,
        }
    }

    pub(super) fn push(&mut self, attempt: F) {
        let attempt = Some(Box::pin(attempt));
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(free) => *free = attempt,
            None => self.slots.push(attempt),
        }
        self.running += 1;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.running == 0
    }

    /// The outcome of the next attempt to finish; `None` when none runs.
    pub(super) fn next(&mut self) -> impl Future<Output = Option<F::Output>> + '_ {
        std::future::poll_fn(move |cx| self.poll_next(cx))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        if self.running == 0 {
            return Poll::Ready(None);
        }
        for slot in self.slots.iter_mut() {
            if let Some(attempt) = slot {
                if let Poll::Ready(out) = attempt.as_mut().poll(cx) {
                    *slot = None;
                    self.running -= 1;
                    return Poll::Ready(Some(out));
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Attempts finish in the order they end, not the order they began;
    /// a finished one's slot is used again; `None` once all have ended.
    #[tokio::test(start_paused = true)]
    async fn attempts_end_in_their_own_order() {
        let mut a = Attempts::new();
        let after = |ms: u64, tag: u32| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            tag
        };
        a.push(after(30, 1));
        a.push(after(10, 2));
        assert_eq!(a.next().await, Some(2));
        a.push(after(5, 3));
        assert_eq!(a.slots.len(), 2, "the free slot is used again");
        assert_eq!(a.next().await, Some(3));
        assert_eq!(a.next().await, Some(1));
        assert!(a.is_empty());
        assert_eq!(a.next().await, None);
    }
}
