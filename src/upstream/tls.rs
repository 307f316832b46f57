//! The TLS client side of DoT and DoH upstreams: the system's roots (read
//! once with rustls-native-certs) plus `--upstream-ca`, TLS 1.2 and 1.3,
//! the name of the `#NAME` suffix as SNI and as the name checked.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The system's trust anchors, read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            tracing::warn!(
                errors = found.errors.len(),
                "no system trust anchors found: TLS and HTTPS upstreams need --upstream-ca"
            );
        }
        found.certs
    })
}

/// Reads the certificates of a PEM file (`--upstream-ca`).
pub fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("upstream_ca {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("upstream_ca {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "upstream_ca {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

/// A client configuration trusting the system's roots and `extra`, with
/// these ALPN protocols.
pub fn client_config(
    extra: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    let (_, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    if ignored > 0 {
        tracing::debug!(ignored, "unusable system trust anchors skipped");
    }
    for c in extra {
        if let Err(e) = roots.add(c.clone()) {
            tracing::warn!(error = %e, "an --upstream-ca certificate is not a usable trust anchor");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(64);
    Ok(Arc::new(cfg))
}
