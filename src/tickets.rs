//! Stateless TLS session tickets: a returning client resumes without a
//! signature, whatever the number of clients (nothing is stored per
//! session) and on any instance of a fleet (the keys are shared through
//! Redis with `--redis`).
//!
//! A ticket is `key id (8) | nonce (12) | ChaCha20-Poly1305 sealed session`.
//! Keys belong to wall-clock periods of `--tls-ticket-lifetime`: a key
//! issues tickets during its period and opens them for one more, then it
//! is erased, which is what bounds the damage a stolen key can do to
//! forward secrecy (RFC 8446 §4.6.1 asks for at most 7 days). No 0-RTT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::unix_now;
use arc_swap::ArcSwap;
use ring::aead::{self, LessSafeKey, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const ID_LEN: usize = 8;
/// A key's secret: its id, then the AEAD key.
pub const SECRET_LEN: usize = ID_LEN + 32;

/// One period's key.
struct TicketKey {
    period: u64,
    id: [u8; ID_LEN],
    key: LessSafeKey,
    /// What it was made of, to copy it (ring's keys are not `Clone`).
    secret: [u8; SECRET_LEN],
}

impl TicketKey {
    fn from_secret(period: u64, secret: &[u8; SECRET_LEN]) -> Option<TicketKey> {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&secret[..ID_LEN]);
        let key = UnboundKey::new(&CHACHA20_POLY1305, &secret[ID_LEN..]).ok()?;
        Some(TicketKey {
            period,
            id,
            key: LessSafeKey::new(key),
            secret: *secret,
        })
    }

    fn copy(&self) -> Option<TicketKey> {
        TicketKey::from_secret(self.period, &self.secret)
    }
}

#[derive(Default)]
struct Ring {
    current: Option<TicketKey>,
    previous: Option<TicketKey>,
}

/// The ticket keys of this process, for every TLS listener.
pub struct Tickets {
    lifetime: u32,
    ring: ArcSwap<Ring>,
    rng: SystemRandom,
    /// Nonces: a random 4-byte prefix and a 64-bit counter from a random
    /// start, both drawn once per process. No system call per ticket, and
    /// no repeat under a key the fleet shares: two instances would need
    /// the same prefix and overlapping counter ranges.
    nonce_prefix: [u8; 4],
    nonce_counter: AtomicU64,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Tickets {
    /// Tickets valid for `lifetime` (at least a second, at most 7 days),
    /// with a fresh local key for the current period.
    pub fn new(lifetime: Duration) -> Arc<Tickets> {
        let lifetime = lifetime.as_secs().clamp(1, 7 * 86400) as u32;
        let rng = SystemRandom::new();
        let mut start = [0u8; 12];
        // Without a random source tickets could not be issued safely
        // anyway; a zero start still gives distinct nonces in-process.
        let _ = rng.fill(&mut start);
        let mut nonce_prefix = [0u8; 4];
        nonce_prefix.copy_from_slice(&start[..4]);
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&start[4..]);
        let t = Tickets {
            lifetime,
            ring: ArcSwap::from_pointee(Ring::default()),
            rng,
            nonce_prefix,
            nonce_counter: AtomicU64::new(u64::from_be_bytes(counter)),
        };
        t.rotate_if_due();
        Arc::new(t)
    }

    /// The lifetime announced to clients, in seconds.
    pub fn lifetime_secs(&self) -> u64 {
        u64::from(self.lifetime)
    }

    /// The period `unix` falls in.
    pub fn period_at(&self, unix: u64) -> u64 {
        unix / u64::from(self.lifetime)
    }

    /// The current period.
    pub fn period(&self) -> u64 {
        self.period_at(unix_now())
    }

    /// A fresh random secret.
    pub fn generate(&self) -> Option<[u8; SECRET_LEN]> {
        let mut s = [0u8; SECRET_LEN];
        self.rng.fill(&mut s).ok()?;
        Some(s)
    }

    /// Installs a local key when a new period has begun (without Redis).
    pub fn rotate_if_due(&self) {
        let period = self.period();
        let has = self
            .ring
            .load()
            .current
            .as_ref()
            .is_some_and(|k| k.period >= period);
        if !has {
            if let Some(s) = self.generate() {
                self.install(period, &s);
            }
        }
    }

    /// Installs `secret` as the key of `period`: a later period than the
    /// current one moves the current key to previous (and erases the one
    /// before); the same period replaces the current key (the fleet's
    /// wins over a local one); an older one becomes the previous key.
    pub fn install(&self, period: u64, secret: &[u8; SECRET_LEN]) {
        let Some(new) = TicketKey::from_secret(period, secret) else {
            return;
        };
        let old = self.ring.load();
        let same = |k: &Option<TicketKey>| k.as_ref().is_some_and(|k| k.id == new.id);
        if same(&old.current) || same(&old.previous) {
            return;
        }
        let copy = |k: &Option<TicketKey>| k.as_ref().and_then(TicketKey::copy);
        let ring = match old.current.as_ref().map(|k| k.period) {
            // A new period: the current key only opens tickets now, and
            // the one before is erased.
            Some(p) if period > p => Ring {
                previous: if p + 1 == period {
                    copy(&old.current)
                } else {
                    None
                },
                current: Some(new),
            },
            Some(p) if period == p => Ring {
                previous: copy(&old.previous),
                current: Some(new),
            },
            Some(p) if period + 1 == p => Ring {
                previous: Some(new),
                current: copy(&old.current),
            },
            Some(_) => return,
            None => Ring {
                previous: None,
                current: Some(new),
            },
        };
        self.ring.store(Arc::new(ring));
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let ring = self.ring.load();
        let key = ring.current.as_ref()?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..4].copy_from_slice(&self.nonce_prefix);
        let n = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        let head = ID_LEN + NONCE_LEN;
        let mut out = Vec::with_capacity(head + plain.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(key.id),
                out.get_mut(head..)?,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let id = cipher.get(..ID_LEN)?;
        let nonce: [u8; NONCE_LEN] = cipher.get(ID_LEN..ID_LEN + NONCE_LEN)?.try_into().ok()?;
        let sealed = cipher.get(ID_LEN + NONCE_LEN..)?;
        let ring = self.ring.load();
        let key = [&ring.current, &ring.previous]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)?;
        let mut buf = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(key.id),
                &mut buf,
            )
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn sealed_opened_and_forgotten_after_two_periods() {
        let t = Tickets::new(Duration::from_secs(3600));
        let p = t.period();
        let sealed = t.encrypt(b"session").unwrap();
        assert_eq!(t.decrypt(&sealed).unwrap(), b"session");
        // Tampered, truncated, empty: refused, no panic.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(t.decrypt(&bad).is_none());
        for n in 0..sealed.len() {
            assert!(t.decrypt(&sealed[..n]).is_none());
        }
        // Next period: still opened, no longer used to seal.
        t.install(p + 1, &t.generate().unwrap());
        assert_eq!(t.decrypt(&sealed).unwrap(), b"session");
        let newer = t.encrypt(b"x").unwrap();
        assert_ne!(newer[..ID_LEN], sealed[..ID_LEN]);
        // The one after: erased.
        t.install(p + 2, &t.generate().unwrap());
        assert!(t.decrypt(&sealed).is_none());
        assert_eq!(t.decrypt(&newer).unwrap(), b"x");
    }

    #[test]
    fn instances_with_the_same_secret_open_each_others_tickets() {
        let (a, b) = (
            Tickets::new(Duration::from_secs(60)),
            Tickets::new(Duration::from_secs(60)),
        );
        let secret = a.generate().unwrap();
        let p = a.period();
        let local = b.encrypt(b"before").unwrap();
        a.install(p, &secret);
        b.install(p, &secret);
        assert_eq!(b.decrypt(&a.encrypt(b"s").unwrap()).unwrap(), b"s");
        // The local key it replaced is gone: its tickets make a full handshake.
        assert!(b.decrypt(&local).is_none());
        // An older period's key joins as the previous one.
        let old = a.generate().unwrap();
        b.install(p - 1, &old);
        let c = Tickets::new(Duration::from_secs(60));
        c.ring.store(Arc::new(Ring {
            current: TicketKey::from_secret(p - 1, &old),
            previous: None,
        }));
        assert_eq!(b.decrypt(&c.encrypt(b"o").unwrap()).unwrap(), b"o");
    }

    #[test]
    fn nonces_never_repeat_in_a_process_or_across_instances_sharing_a_key() {
        let (a, b) = (
            Tickets::new(Duration::from_secs(60)),
            Tickets::new(Duration::from_secs(60)),
        );
        let secret = a.generate().unwrap();
        let p = a.period();
        a.install(p, &secret);
        b.install(p, &secret);
        let mut seen = std::collections::HashSet::new();
        for t in [&a, &b] {
            for _ in 0..10_000 {
                let sealed = t.encrypt(b"s").unwrap();
                assert!(seen.insert(sealed[ID_LEN..ID_LEN + NONCE_LEN].to_vec()));
                assert_eq!(a.decrypt(&sealed).unwrap(), b"s");
            }
        }
        assert_ne!(a.nonce_prefix, b.nonce_prefix);
    }
}
