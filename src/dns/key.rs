//! The cache key: a question normalised, hashed once.

use super::QueryFlags;

/// A question normalised for the cache and the upstream: name lowercased,
/// type, class and the flags that change the answer.
///
/// Hashed once, when built, with a keyed hash (SipHash under a key drawn
/// at start, like `HashMap`'s): a miss looks its key up in the cache, the
/// coalescing map and moka's key locks, six hashes of the whole question
/// that cost more than the maps themselves. The maps keyed by it hash
/// that digest alone ([`KeyHasher`]); names an attacker picks collide no
/// more than under any `HashMap`.
#[derive(Debug, Clone)]
pub struct Key {
    /// Wire-format name (lowercase), type and class.
    question: Box<[u8]>,
    flags: QueryFlags,
    digest: u64,
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.digest == other.digest && self.flags == other.flags && self.question == other.question
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.digest);
    }
}

/// The hasher of maps keyed by [`Key`]: its digest, already keyed and
/// uniform, is the hash.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher;

impl std::hash::BuildHasher for KeyHasher {
    type Hasher = KeyDigest;

    fn build_hasher(&self) -> KeyDigest {
        KeyDigest(0)
    }
}

/// See [`KeyHasher`].
#[derive(Debug)]
pub struct KeyDigest(u64);

impl std::hash::Hasher for KeyDigest {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, digest: u64) {
        self.0 = self.0.rotate_left(5) ^ digest;
    }

    /// Only [`Key`]'s digest is meant to come here; anything else is
    /// mixed in by a keyed hash, never trusted as it is.
    fn write(&mut self, bytes: &[u8]) {
        self.write_u64(keyed_digest(bytes));
    }
}

/// SipHash under a key drawn once per process.
fn keyed_digest<T: std::hash::Hash + ?Sized>(v: &T) -> u64 {
    static SEED: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    std::hash::BuildHasher::hash_one(SEED.get_or_init(std::hash::RandomState::new), v)
}

impl Key {
    pub(super) fn from_parts(question: Box<[u8]>, flags: QueryFlags) -> Key {
        let digest = keyed_digest(&(&*question, flags));
        Key {
            question,
            flags,
            digest,
        }
    }

    /// Wire-format name (lowercase), type and class.
    pub fn question(&self) -> &[u8] {
        &self.question
    }

    /// The keyed hash of the whole key, uniform over its 64 bits.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn flags(&self) -> QueryFlags {
        self.flags
    }

    /// Builds a key from parts (for tests and tools).
    pub fn new(name: &str, qtype: u16, edns: bool) -> Option<Key> {
        let mut q = Vec::with_capacity(name.len() + 6);
        for label in name
            .trim_end_matches('.')
            .split('.')
            .filter(|l| !l.is_empty())
        {
            if label.len() > 63 {
                return None;
            }
            q.push(label.len() as u8);
            q.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
        q.push(0);
        if q.len() > 255 {
            return None;
        }
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        let mut f = QueryFlags::RD;
        if edns {
            f |= QueryFlags::EDNS;
        }
        Some(Key::from_parts(q.into(), QueryFlags(f)))
    }

    pub fn qtype(&self) -> u16 {
        let n = self.question.len();
        u16::from_be_bytes([self.question[n - 4], self.question[n - 3]])
    }

    /// The name in presentation form, for logs.
    pub fn name(&self) -> String {
        let mut out = String::new();
        let q = &self.question;
        let mut i = 0;
        while i < q.len() && q[i] != 0 {
            let l = q[i] as usize;
            let label = q.get(i + 1..i + 1 + l).unwrap_or_default();
            out.extend(
                label
                    .iter()
                    .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' }),
            );
            out.push('.');
            i += 1 + l;
        }
        if out.is_empty() {
            out.push('.');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{parse_query, query_message};

    /// Keys built from a client's query and from parts agree, whatever the
    /// case the client sent; the flags are part of the key; the digest
    /// maps use spreads names that differ in one letter.
    #[test]
    fn keys_hash_once_and_compare_whole() {
        use std::hash::BuildHasher;
        let q = query_message("WwW.Example.TEST", 1, 0x1234, true).unwrap();
        let from_wire = parse_query(&q).unwrap().key;
        let from_parts = Key::new("www.example.test", 1, true).unwrap();
        assert_eq!(from_wire, from_parts);
        assert_eq!(
            KeyHasher.hash_one(&from_wire),
            KeyHasher.hash_one(&from_parts)
        );
        assert_ne!(from_parts, Key::new("www.example.test", 1, false).unwrap());
        assert_ne!(from_parts, Key::new("www.example.test", 28, true).unwrap());
        let mut seen = std::collections::HashSet::new();
        for c in b'a'..=b'z' {
            let name = format!("www{}.example.test", c as char);
            let k = Key::new(&name, 1, true).unwrap();
            // Top 7 bits (hashbrown's tags) and low bits (its buckets).
            let h = KeyHasher.hash_one(&k);
            seen.insert((h >> 57, h & 0xff));
        }
        assert!(seen.len() >= 24, "{} distinct of 26", seen.len());
        // A map keyed by keys finds them by content, not by identity.
        let mut m = std::collections::HashMap::with_hasher(KeyHasher);
        m.insert(from_wire, 1);
        assert_eq!(m.get(&from_parts), Some(&1));
    }
}
