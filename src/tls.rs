//! TLS: loading a certificate chain and key, or generating a self-signed
//! certificate for `localhost` when none is given.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
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

/// The server configuration: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(id: Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Resumption saves a full handshake for returning clients.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(server_config(self_signed().unwrap()).is_ok());
    }
}
