//! Oblivious DoH target (RFC 9230), with the odoh-rs crate.
//!
//! A relay forwards clients' sealed queries: it sees who asks but not
//! what; this target opens them, answers them exactly as plain queries
//! (same validation, cache and upstream budget) and seals the answers, so
//! it sees what is asked but only the relay's address. Keys (X25519,
//! HKDF-SHA256, AES-128-GCM) rotate every `--odoh-rotate-secs`; the
//! previous key is still accepted for one more lifetime, so that clients
//! holding a config fetched just before a rotation are served. A query
//! under any other key gets 401: the client then fetches
//! `/.well-known/odohconfigs` again.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use odoh_rs::{
    ObliviousDoHConfig, ObliviousDoHConfigs, ObliviousDoHKeyPair, ObliviousDoHMessage,
    ObliviousDoHMessagePlaintext, OdohSecret, ResponseNonce,
};
use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 9230's one cipher suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
/// AES-128-GCM.
const KEM_X25519: u16 = 0x0020;
const KDF_SHA256: u16 = 0x0001;
const AEAD_AES128GCM: u16 = 0x0001;

/// The media type of sealed queries and answers.
pub const MEDIA_TYPE: &str = odoh_rs::ODOH_HTTP_HEADER;
/// Where the target's configs are published.
pub const CONFIGS_PATH: &str = "/.well-known/odohconfigs";

/// What ODoH runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OdohSettings {
    pub enabled: bool,
    pub rotate: Duration,
    /// Requests per second per relay address (burst 5 s' worth).
    pub relay_qps: u32,
}

/// One key: the seed it derives from (so that instances can share it), the
/// pair, its id, when it was made.
#[derive(Clone)]
pub struct Key {
    pub seed: [u8; 32],
    pair: ObliviousDoHKeyPair,
    id: Vec<u8>,
    /// When the key was made (wall clock, for instances to agree on it).
    born: SystemTime,
}

impl Key {
    /// The key derived from `seed`, made now.
    pub fn from_seed(seed: [u8; 32]) -> Result<Key, String> {
        let pair =
            ObliviousDoHKeyPair::from_parameters(KEM_X25519, KDF_SHA256, AEAD_AES128GCM, &seed);
        let id = pair.public().identifier().map_err(|e| e.to_string())?;
        Ok(Key {
            seed,
            pair,
            id,
            born: SystemTime::now(),
        })
    }

    /// The key another instance made at `born` (Unix seconds).
    pub fn from_shared(seed: [u8; 32], born: u64) -> Result<Key, String> {
        let mut k = Key::from_seed(seed)?;
        // Another instance's word: a time that does not fit is now.
        if let Some(t) = UNIX_EPOCH.checked_add(Duration::from_secs(born)) {
            k.born = t.min(SystemTime::now());
        }
        Ok(k)
    }

    pub fn generate() -> Result<Key, String> {
        Key::from_seed(rand::random())
    }

    pub fn born_unix(&self) -> u64 {
        self.born
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.born)
            .unwrap_or_default()
    }
}

struct KeySet {
    current: Key,
    previous: Option<Key>,
    /// The current key's config, as published.
    configs: Bytes,
}

impl KeySet {
    fn new(current: Key, previous: Option<Key>) -> Result<KeySet, String> {
        let configs = ObliviousDoHConfigs::from(vec![ObliviousDoHConfig::from(
            current.pair.public().clone(),
        )]);
        let configs = odoh_rs::compose(&configs)
            .map_err(|e| e.to_string())?
            .freeze();
        Ok(KeySet {
            current,
            previous,
            configs,
        })
    }
}

/// Why a sealed query cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Not under the current or the previous key: 401, fetch the configs.
    UnknownKey,
    /// Not an ODoH query at all, or it does not decrypt: 400.
    Malformed,
}

/// An opened query, with what sealing its answer needs.
pub struct Opened {
    plaintext: ObliviousDoHMessagePlaintext,
    secret: OdohSecret,
}

impl Opened {
    /// The DNS query inside.
    pub fn query(&self) -> Bytes {
        self.plaintext.clone().into_msg()
    }
}

pub struct Odoh {
    keys: ArcSwap<KeySet>,
    rotate: Duration,
}

impl Odoh {
    pub fn new(rotate: Duration) -> Result<Odoh, String> {
        Ok(Odoh {
            keys: ArcSwap::from_pointee(KeySet::new(Key::generate()?, None)?),
            rotate,
        })
    }

    /// A fresh current key; the current one becomes the previous one, and
    /// the one before is no longer accepted.
    pub fn rotate(&self) -> Result<(), String> {
        self.install(Key::generate()?)
    }

    /// Rotates when the current key is a lifetime old.
    pub fn rotate_if_due(&self) -> Result<(), String> {
        if self.keys.load().current.age() >= self.rotate {
            self.rotate()?;
        }
        Ok(())
    }

    pub fn lifetime(&self) -> Duration {
        self.rotate
    }

    /// Makes `key` current (a rotation made elsewhere: another instance).
    pub fn install(&self, key: Key) -> Result<(), String> {
        let old = self.keys.load();
        if old.current.id == key.id {
            return Ok(());
        }
        let set = KeySet::new(key, Some(old.current.clone()))?;
        self.keys.store(Arc::new(set));
        tracing::info!("ODoH key rotated");
        Ok(())
    }

    /// The current key (to share it).
    pub fn current(&self) -> Key {
        self.keys.load().current.clone()
    }

    /// The configs to publish, and how long they may be cached: the
    /// current key's remaining life.
    pub fn configs(&self) -> (Bytes, u64) {
        let k = self.keys.load();
        let left = self.rotate.saturating_sub(k.current.age());
        (k.configs.clone(), left.as_secs())
    }

    /// Opens a sealed query.
    pub fn open(&self, body: &[u8]) -> Result<Opened, OpenError> {
        let msg: ObliviousDoHMessage =
            odoh_rs::parse(&mut Bytes::copy_from_slice(body)).map_err(|_| OpenError::Malformed)?;
        let keys = self.keys.load();
        let key = [Some(&keys.current), keys.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id.as_slice() == msg.key_id())
            .ok_or(OpenError::UnknownKey)?;
        let (plaintext, secret) =
            odoh_rs::decrypt_query(&msg, &key.pair).map_err(|_| OpenError::Malformed)?;
        Ok(Opened { plaintext, secret })
    }

    /// Seals `answer` for the client that sent `opened`.
    pub fn seal(&self, opened: &Opened, answer: &[u8]) -> Result<Vec<u8>, String> {
        let nonce: ResponseNonce = rand::random();
        let response = ObliviousDoHMessagePlaintext::new(answer, 0);
        let msg = odoh_rs::encrypt_response(&opened.plaintext, &response, opened.secret, nonce)
            .map_err(|e| e.to_string())?;
        Ok(odoh_rs::compose(&msg).map_err(|e| e.to_string())?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_one_previous_key() {
        let o = Odoh::new(Duration::from_secs(60)).unwrap();
        let first = o.current();
        let (_, max_age) = o.configs();
        assert!((59..=60).contains(&max_age), "{max_age}");
        let old = Key::from_shared([3u8; 32], first.born_unix() - 20).unwrap();
        o.install(old).unwrap();
        // 40 s left, less the time this test has taken on a busy machine.
        let left = o.configs().1;
        assert!((30..=40).contains(&left), "{left}");
        o.rotate().unwrap();
        let second = o.current();
        assert_ne!(first.id, second.id);
        let keys = o.keys.load();
        assert_eq!(keys.previous.as_ref().unwrap().seed, [3u8; 32]);
        drop(keys);
        o.rotate().unwrap();
        let keys = o.keys.load();
        assert_eq!(
            keys.previous.as_ref().unwrap().id,
            second.id,
            "the first is gone"
        );
        // A key made from a shared seed is the same key.
        assert_eq!(Key::from_seed(first.seed).unwrap().id, first.id);
        assert_eq!(o.open(b"\\x01garbage").err(), Some(OpenError::Malformed));
    }
}
