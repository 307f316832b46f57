//! A counter's value spread over a few cache lines, so that threads
//! counting at once do not write the same one.
//!
//! One `AtomicU64` counted by every connection worker moves from one
//! core's cache to the other's at every request (each core must own the
//! line to write it); a request writes a few such counters. Here each
//! thread adds to its own line among [`SLOTS`] (threads beyond share them,
//! which costs contention, never a count), and a read adds the lines up:
//! reads are scrapes, rare.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::metrics::counter::Atomic;

/// Lines per counter: one per connection worker on the small machines
/// this runs on, 512 bytes per counter.
pub const SLOTS: usize = 4;

/// 128 bytes: Intel cores fetch lines in pairs, so two counters 64 bytes
/// apart would still be written as one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line(AtomicU64);

#[derive(Debug, Default)]
pub struct Spread([Line; SLOTS]);

thread_local! {
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The next slot for a thread that has not claimed one.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Makes this thread count on line `i` (mod [`SLOTS`]): connection worker
/// `i` claims `i`, so that the workers never share one while there are
/// lines enough. Other threads take the next line in turn.
pub fn count_on(i: usize) {
    SLOT.with(|s| s.set(Some(i % SLOTS)));
}

fn slot() -> usize {
    SLOT.with(|s| match s.get() {
        Some(i) => i,
        None => {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            s.set(Some(i));
            i
        }
    })
}

impl Atomic<u64> for Spread {
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.0[slot()].0.fetch_add(v, Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, l| sum.wrapping_add(l.0.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = Spread::default();
        std::thread::scope(|s| {
            for t in 0..SLOTS + 3 {
                let c = &c;
                s.spawn(move || {
                    if t % 2 == 0 {
                        count_on(t);
                    }
                    for _ in 0..1000 {
                        c.inc();
                    }
                    c.inc_by(5);
                });
            }
        });
        assert_eq!(c.get(), (SLOTS as u64 + 3) * 1005);
    }

    #[test]
    fn workers_count_on_lines_of_their_own() {
        let c = Spread::default();
        std::thread::scope(|s| {
            for w in 0..SLOTS {
                let c = &c;
                s.spawn(move || {
                    count_on(w);
                    c.inc_by(w as u64 + 1);
                });
            }
        });
        let lines: Vec<u64> = c.0.iter().map(|l| l.0.load(Ordering::Relaxed)).collect();
        assert_eq!(lines, (1..=SLOTS as u64).collect::<Vec<_>>());
        assert_eq!(std::mem::size_of::<Spread>(), 128 * SLOTS);
    }
}
