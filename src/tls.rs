//! TLS: loading a certificate chain and key, or generating a self-signed
//! certificate for `localhost` when none is given; one certificate store
//! that every TLS and QUIC listener resolves through, so that a new
//! certificate is served everywhere by swapping one value.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("the certificate does not match its key: {0}")]
    Mismatch(String),
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// A certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 fingerprint of the leaf certificate, as `AA:BB:…`.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.chain[0].as_ref());
        digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// Reads a PEM chain and key and checks that they belong together.
pub fn load_pair(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.display().to_string(),
        });
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoKey {
            path: key.display().to_string(),
        })?;
    let signer = signing_key(&key_der)?;
    rustls::sign::CertifiedKey::new(chain.clone(), signer)
        .keys_match()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    Ok(Identity {
        chain,
        key: key_der,
    })
}

/// A fresh self-signed certificate for `localhost`, 127.0.0.1 and ::1.
pub fn self_signed() -> Result<Identity, TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let ck =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Setup(e.to_string()))?;
    Ok(Identity {
        chain: vec![ck.cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
    })
}

impl Identity {
    fn certified(self) -> Result<Arc<CertifiedKey>, TlsError> {
        let signer = signing_key(&self.key)?;
        Ok(Arc::new(CertifiedKey::new(self.chain, signer)))
    }
}

/// The private key loaded by the listeners' provider, which then makes
/// every handshake's signature.
fn signing_key(key: &PrivateKeyDer<'_>) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
    server_provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Mismatch(e.to_string()))
}

/// ALPN of the TLS-ALPN-01 ACME challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The certificate every listener serves, swappable at run time, and the
/// ACME challenge certificates answered to `acme-tls/1` handshakes.
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    /// Unix seconds of the served leaf's notAfter.
    not_after: AtomicI64,
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

/// The notAfter of a DER certificate, in Unix seconds.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    pub fn new(id: Identity) -> Result<Arc<CertStore>, TlsError> {
        let expiry = id.chain.first().and_then(not_after).unwrap_or(0);
        Ok(Arc::new(CertStore {
            current: ArcSwap::new(id.certified()?),
            not_after: AtomicI64::new(expiry),
            challenges: RwLock::default(),
        }))
    }

    /// Serves `id` to every handshake from now on.
    pub fn set(&self, id: Identity) -> Result<(), TlsError> {
        let expiry = id.chain.first().and_then(not_after).unwrap_or(0);
        self.current.store(id.certified()?);
        self.not_after.store(expiry, Ordering::Relaxed);
        Ok(())
    }

    /// Seconds until the served certificate expires (negative once it has).
    pub fn expires_in(&self) -> i64 {
        let now = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
        self.not_after.load(Ordering::Relaxed).saturating_sub(now)
    }

    /// Answers `acme-tls/1` handshakes for `name` with `id` (RFC 8737).
    pub fn set_challenge(&self, name: &str, id: Identity) -> Result<(), TlsError> {
        let key = id.certified()?;
        if let Ok(mut c) = self.challenges.write() {
            c.insert(name.to_ascii_lowercase(), key);
        }
        Ok(())
    }

    pub fn clear_challenges(&self) {
        if let Ok(mut c) = self.challenges.write() {
            c.clear();
        }
    }

    /// The chain served now.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // Only the challenge certificate, and only for its name.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.read().ok()?.get(&name).cloned();
        }
        Some(self.current.load_full())
    }
}

/// Which listener a server configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// DoH over TLS: h2, then http/1.1.
    Https,
    /// DNS over TLS (RFC 7858): `dot` when the client offers ALPN at all.
    Dot,
    /// HTTP/3 over QUIC: `h3`, TLS 1.3 only, no 0-RTT.
    H3,
    /// DNS over QUIC (RFC 9250): `doq` only, TLS 1.3 only, no 0-RTT.
    Doq,
    /// DoH over TLS, also answering ACME's TLS-ALPN-01 challenges.
    HttpsAcme,
}

/// The crypto provider of the listeners: aws-lc-rs's (feature `aws-lc`,
/// on by default: a quarter less CPU in handshake cryptography than ring
/// where we measured) or ring's, with the suites that hash with
/// SHA-256 first (AES-128-GCM, then ChaCha20-Poly1305, then AES-256-GCM
/// with SHA-384). A handshake runs a dozen HKDF and HMAC operations on its
/// transcript; SHA-256 has instructions on current x86 and ARM CPUs where
/// SHA-512 (behind SHA-384) has none, which made SHA-512 the largest
/// single cost of a resumed handshake when clients' preference for
/// AES-256 was followed.
pub fn server_provider() -> rustls::crypto::CryptoProvider {
    #[cfg(feature = "aws-lc")]
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(not(feature = "aws-lc"))]
    let mut p = rustls::crypto::ring::default_provider();
    use rustls::CipherSuite as C;
    p.cipher_suites.sort_by_key(|s| {
        matches!(
            s.suite(),
            C::TLS13_AES_256_GCM_SHA384
                | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    p
}

/// The server configuration of one kind of listener, resolving its
/// certificate through `store`, issuing session tickets with `tickets`.
pub fn server_config(
    store: Arc<CertStore>,
    alpn: Alpn,
    tickets: Option<Arc<crate::tickets::Tickets>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(server_provider());
    // The provider's generator seeds itself on first use; aws-lc's gathers
    // CPU-jitter entropy for ~70 ms of CPU. Paid here, before the listener
    // opens, instead of by the first client's handshake.
    provider
        .secure_random
        .fill(&mut [0u8; 16])
        .map_err(|_| TlsError::Setup("the random generator failed".into()))?;
    let builder = ServerConfig::builder_with_provider(provider);
    let builder = if matches!(alpn, Alpn::H3 | Alpn::Doq) {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|e| TlsError::Setup(e.to_string()))?;
    let mut cfg = builder.with_no_client_auth().with_cert_resolver(store);
    cfg.alpn_protocols = match alpn {
        Alpn::Https => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Alpn::HttpsAcme => vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()],
        Alpn::Dot => vec![b"dot".to_vec()],
        Alpn::H3 => vec![b"h3".to_vec()],
        Alpn::Doq => vec![b"doq".to_vec()],
    };
    // Our order, not the client's: see `server_provider`.
    cfg.ignore_client_order = true;
    // No 0-RTT: early data can be replayed.
    cfg.max_early_data_size = 0;
    // Resumption saves a full handshake (a signature) for returning
    // clients: stateless tickets when enabled, which serve any number of
    // clients and any instance; the session cache for clients that do not
    // take tickets.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    if let Some(t) = tickets {
        cfg.ticketer = t;
    }
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_hashing_with_sha256_come_first() {
        let suites: Vec<_> = server_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            suites[1],
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert!(suites.contains(&rustls::CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert!(suites.len() >= 3);
    }

    #[test]
    fn self_signed_round_trip_and_mismatch() {
        let dir = std::env::temp_dir().join(format!("doh-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("a.pem"), a.cert.pem()).unwrap();
        std::fs::write(dir.join("a.key"), a.signing_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("b.key"), b.signing_key.serialize_pem()).unwrap();
        let id = load_pair(&dir.join("a.pem"), &dir.join("a.key")).unwrap();
        assert_eq!(id.fingerprint().len(), 32 * 3 - 1);
        let e = load_pair(&dir.join("a.pem"), &dir.join("b.key"))
            .err()
            .unwrap();
        assert!(matches!(e, TlsError::Mismatch(_)), "{e}");
        let e = load_pair(&dir.join("a.key"), &dir.join("a.key"))
            .err()
            .unwrap();
        assert!(matches!(e, TlsError::NoCert { .. }), "{e}");
        let store = CertStore::new(self_signed().unwrap()).unwrap();
        for alpn in [Alpn::Https, Alpn::Dot, Alpn::H3, Alpn::Doq] {
            assert!(server_config(store.clone(), alpn, None).is_ok());
        }
        let before = store.chain();
        store.set(self_signed().unwrap()).unwrap();
        assert_ne!(before, store.chain());
        // rcgen's default validity ends in 4096.
        assert!(store.expires_in() > 365 * 86400);
    }
}
