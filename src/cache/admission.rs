//! Which answers a full cache takes.
//!
//! Once the cache is at its bound, every answer it stores pushes another
//! out, and a flood of names asked once each (random subdomains) would
//! churn it for nothing: each such answer would be inserted, weighed
//! against the oldest entry by moka's admission policy (which refuses
//! most of them: a name seen once is not worth an entry seen before), and
//! taken out again, each step touching memory long gone cold. On a cache
//! of 100,000 entries that made a miss about a sixth dearer. So a full
//! cache stores an answer only for a name it has been asked before,
//! recently: the first time a name misses, the [`Doorkeeper`] notes it
//! and its answer is served without being kept; the second time, the
//! answer goes to moka, whose policy still decides between it and the
//! entry it would replace. Names a crowd asks are cached from their
//! second resolution on (concurrent queries share the first, and its
//! fate); a refreshed entry (prefetch, serve-stale) is always stored. A
//! cache with room stores every answer, as before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Names seen missing recently, in two generations of a Bloom filter: a
/// name is "seen" if either generation holds it; sightings go into the
/// current one; after `per_gen` sightings the older one is cleared and
/// becomes current. A name is remembered for between one and two
/// generations of sightings (at least as many as the cache holds
/// entries), whatever the rate at which they come.
///
/// Each name sets three bits in one 64-bit word (one cache line read per
/// generation), with 16 bits per sighting: about 1 % of new names pass
/// for seen (both generations counted). Allocated the first time the
/// cache fills: 4 to 8 bytes per entry of `--cache-size` (512 KiB for
/// the default 100,000), 64 MiB at most; bounded whatever the names.
pub struct Doorkeeper {
    gens: [Box<[AtomicU64]>; 2],
    current: AtomicUsize,
    sightings: AtomicU64,
    per_gen: u64,
}

impl Doorkeeper {
    /// A doorkeeper for a cache of `entries` entries at most.
    pub fn new(entries: u64) -> Doorkeeper {
        let per_gen = entries.clamp(64, 1 << 24);
        // 16 bits per sighting, in whole words, a power of two of them.
        let words = (per_gen / 4).next_power_of_two() as usize;
        let generation = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Doorkeeper {
            gens: [generation(), generation()],
            current: AtomicUsize::new(0),
            sightings: AtomicU64::new(0),
            per_gen,
        }
    }

    /// Whether `digest` (a key's uniform hash) was seen before; if not, it
    /// is now.
    pub fn seen_before(&self, digest: u64) -> bool {
        let cur = self.current.load(Ordering::Relaxed) & 1;
        let word = digest as usize & (self.gens[cur].len() - 1);
        let bits = (1u64 << (digest >> 46 & 63))
            | (1u64 << (digest >> 52 & 63))
            | (1u64 << (digest >> 58));
        let held = |g: usize| self.gens[g][word].load(Ordering::Relaxed) & bits == bits;
        if held(cur) || held(cur ^ 1) {
            return true;
        }
        self.gens[cur][word].fetch_or(bits, Ordering::Relaxed);
        if self.sightings.fetch_add(1, Ordering::Relaxed) + 1 == self.per_gen {
            // The older generation is emptied and becomes the current one.
            // Sightings other threads note meanwhile may land in either:
            // at worst one is forgotten a generation early.
            for w in self.gens[cur ^ 1].iter() {
                w.store(0, Ordering::Relaxed);
            }
            self.current.store(cur ^ 1, Ordering::Relaxed);
            self.sightings.store(0, Ordering::Relaxed);
        }
        false
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        2 * self.gens[0].len() * std::mem::size_of::<AtomicU64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform digests, as keys carry.
    fn digest(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn a_name_is_seen_the_second_time() {
        let d = Doorkeeper::new(1000);
        assert!(!d.seen_before(digest(1)));
        assert!(d.seen_before(digest(1)));
        assert!(!d.seen_before(digest(2)));
    }

    #[test]
    fn few_new_names_pass_for_seen() {
        let d = Doorkeeper::new(10_000);
        // A whole generation of sightings, then as many names never seen.
        let passed = (0..10_000u64).filter(|&i| d.seen_before(digest(i))).count();
        assert!(passed < 100, "{passed} of 10,000 new names taken for seen");
        let passed = (10_000..20_000u64)
            .filter(|&i| d.seen_before(digest(i)))
            .count();
        assert!(passed < 400, "{passed} of 10,000 new names taken for seen");
    }

    #[test]
    fn names_are_remembered_for_a_generation_and_forgotten_after_two() {
        let d = Doorkeeper::new(1000);
        assert!(!d.seen_before(digest(0)));
        // 1,999 other names: the first generation ends, the second fills.
        for i in 1..2000u64 {
            d.seen_before(digest(1_000_000 + i));
        }
        assert!(d.seen_before(digest(0)), "forgotten within two generations");
        // Another generation: the one that held it is cleared.
        for i in 0..1000u64 {
            d.seen_before(digest(2_000_000 + i));
        }
        assert!(!d.seen_before(digest(0)), "still remembered after two");
    }

    #[test]
    fn memory_is_bounded_by_the_cache_size() {
        assert_eq!(Doorkeeper::new(100_000).bytes(), 2 * 32_768 * 8);
        assert_eq!(Doorkeeper::new(u64::MAX).bytes(), 2 * (1 << 22) * 8);
        assert_eq!(Doorkeeper::new(0).bytes(), 2 * 16 * 8);
    }
}
