//! Distinct-client estimate over a rolling 24 hours, in bounded memory.
//!
//! A HyperLogLog per hour (2^14 one-byte registers, 16 KiB, standard error
//! about 0.8 %), 24 of them in a ring: the estimate is the union of the
//! ring, so an address seen 25 hours ago is forgotten. Memory is 384 KiB
//! whatever the number of clients.
//!
//! The hash is fixed and the same in every build, and the registers have
//! the layout of Redis's own HyperLogLog (2^14 registers, ranks up to 51):
//! instances of a fleet export their sketch as a Redis dense HLL and Redis
//! merges them (`PFCOUNT` over several keys), each client counted once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const P: u32 = 14;
const M: usize = 1 << P;
const SLOTS: usize = 24;

pub struct UniqueClients {
    slots: Vec<Box<[AtomicU8]>>,
    /// Which hour each slot holds, and when the ring started.
    start: Instant,
    ring: Mutex<Ring>,
    /// Lock-free fast path: the current slot, valid until `next_roll_ns`.
    current: AtomicUsize,
    next_roll_ns: AtomicU64,
    slot_len: Duration,
}

struct Ring {
    current: usize,
    hour: u64,
}

fn registers() -> Box<[AtomicU8]> {
    (0..M).map(|_| AtomicU8::new(0)).collect()
}

impl Default for UniqueClients {
    fn default() -> Self {
        Self::with_slot_len(Duration::from_secs(3600))
    }
}

impl UniqueClients {
    /// A ring of 24 slots of `slot_len` each (one hour in production).
    pub fn with_slot_len(slot_len: Duration) -> Self {
        UniqueClients {
            slots: (0..SLOTS).map(|_| registers()).collect(),
            start: crate::clock::coarse(),
            ring: Mutex::new(Ring {
                current: 0,
                hour: 0,
            }),
            current: AtomicUsize::new(0),
            next_roll_ns: AtomicU64::new(slot_len.as_nanos() as u64),
            slot_len,
        }
    }

    /// Moves the ring forward to the current slot, clearing the slots that
    /// fell out of the window. Cheap when nothing changes.
    fn current_slot(&self) -> usize {
        let now = crate::clock::coarse()
            .saturating_duration_since(self.start)
            .as_nanos() as u64;
        if now < self.next_roll_ns.load(Ordering::Acquire) {
            return self.current.load(Ordering::Acquire);
        }
        let Ok(mut ring) = self.ring.lock() else {
            return 0;
        };
        let len = (self.slot_len.as_nanos() as u64).max(1);
        let hour = now / len;
        if hour > ring.hour {
            let steps = (hour - ring.hour).min(SLOTS as u64) as usize;
            for _ in 0..steps {
                ring.current = (ring.current + 1) % SLOTS;
                for r in self.slots[ring.current].iter() {
                    r.store(0, Ordering::Relaxed);
                }
            }
            ring.hour = hour;
        }
        self.current.store(ring.current, Ordering::Release);
        self.next_roll_ns
            .store((ring.hour + 1) * len, Ordering::Release);
        ring.current
    }

    /// Records one client address.
    pub fn insert(&self, ip: IpAddr) {
        let h = hash(ip);
        let idx = (h >> (64 - P)) as usize;
        let rank = ((h << P) | (1 << (P - 1))).leading_zeros() as u8 + 1;
        let slot = &self.slots[self.current_slot()][idx];
        slot.fetch_max(rank, Ordering::Relaxed);
    }

    /// Register `i` of the union of the ring.
    fn register(&self, i: usize) -> u8 {
        self.slots
            .iter()
            .map(|s| s[i].load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// The union of the ring as a Redis dense HyperLogLog: the 16-byte
    /// header (`HYLL`, dense, cached cardinality marked stale) and 2^14
    /// six-bit registers, least significant bits first.
    pub fn redis_dense(&self) -> Vec<u8> {
        self.current_slot();
        let mut out = vec![0u8; 16 + M * 6 / 8];
        out[..4].copy_from_slice(b"HYLL");
        out[15] = 0x80;
        let regs = &mut out[16..];
        for i in 0..M {
            let v = u16::from(self.register(i).min(63)) << ((i * 6) % 8);
            let byte = i * 6 / 8;
            regs[byte] |= v as u8;
            if let Some(next) = regs.get_mut(byte + 1) {
                *next |= (v >> 8) as u8;
            }
        }
        out
    }

    /// Estimated number of distinct items over the window.
    pub fn estimate(&self) -> u64 {
        self.current_slot();
        let mut sum = 0.0f64;
        let mut zeros = 0usize;
        for i in 0..M {
            let r = self.register(i);
            if r == 0 {
                zeros += 1;
            }
            sum += 2f64.powi(-(r as i32));
        }
        let m = M as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let est = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        est.round() as u64
    }
}

/// A fixed 64-bit hash of an address (IPv4-mapped IPv6 as IPv4): the
/// murmur3 finaliser over its two halves, so that every instance and build
/// puts a client in the same register. Unkeyed: a crafted collision can
/// only skew a statistic, never an enforcement.
fn hash(ip: IpAddr) -> u64 {
    let bytes = match crate::net::canonical(ip) {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) | (1 << 127),
        IpAddr::V6(v6) => u128::from(v6),
    };
    fmix64(fmix64((bytes >> 64) as u64) ^ bytes as u64)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn within_two_percent_for_100k_addresses() {
        let u = UniqueClients::default();
        for i in 0..100_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i));
            u.insert(ip);
            u.insert(ip); // repeats do not count
        }
        let e = u.estimate() as f64;
        let err = (e - 100_000.0).abs() / 100_000.0;
        assert!(err < 0.02, "estimate {e}, error {err}");
    }

    #[test]
    fn small_counts_are_exact_enough() {
        let u = UniqueClients::default();
        for i in 0..50u32 {
            u.insert(IpAddr::V4(Ipv4Addr::from(0x7F00_0001 + i)));
        }
        // Linear counting: exact unless two addresses share a register.
        assert!((49..=50).contains(&u.estimate()), "{}", u.estimate());
    }

    #[test]
    fn old_slots_are_forgotten() {
        let u = UniqueClients::with_slot_len(Duration::from_millis(5));
        for i in 0..1000u32 {
            u.insert(IpAddr::V4(Ipv4Addr::from(i)));
        }
        assert!(u.estimate() > 900);
        std::thread::sleep(Duration::from_millis(5 * 25 + 20));
        assert_eq!(u.estimate(), 0);
    }

    #[test]
    fn the_hash_is_fixed_and_mapped_addresses_are_the_same_client() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(hash(v4), hash(mapped));
        assert_ne!(hash(v4), hash("192.0.2.2".parse().unwrap()));
        assert_ne!(hash(v4), hash("::c000:201".parse().unwrap()));
        // Any change here splits a fleet's count across versions.
        assert_eq!(hash(v4), 0x900d_4674_b2ba_e953, "{:#x}", hash(v4));
    }

    #[test]
    fn the_redis_export_holds_every_register() {
        let u = UniqueClients::default();
        for i in 0..20_000u32 {
            u.insert(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + i)));
        }
        let d = u.redis_dense();
        assert_eq!(d.len(), 12_304);
        assert_eq!(&d[..4], b"HYLL");
        for i in 0..M {
            let (byte, fb) = (16 + i * 6 / 8, (i * 6) % 8);
            let b1 = d.get(byte + 1).copied().unwrap_or(0);
            let got = ((u16::from(d[byte]) | (u16::from(b1) << 8)) >> fb) & 63;
            assert_eq!(got as u8, u.register(i), "register {i}");
        }
    }
}
