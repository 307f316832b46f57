//! Certificates from an ACME CA (RFC 8555), obtained and renewed with the
//! TLS-ALPN-01 challenge (RFC 8737) on the TLS listener itself, with
//! instant-acme as the protocol client.
//!
//! The certificate, its key and the account are kept in `--acme-cache`; a
//! cached certificate is served at start, before anything is asked of the
//! CA. A new one is ordered when none is cached or fewer than
//! `--acme-renew-days` remain, and served through the certificate store
//! on every TLS and QUIC listener at once, without a restart. A failure
//! is logged and counted; the certificate in service stays, and the order
//! is tried again with backoff (1 minute, doubling, at most an hour).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::tls::{self, CertStore, Identity};

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Shortest time between two successful orders, whatever the renewal
/// threshold says (a threshold longer than the CA's validity would
/// otherwise order without pause).
const MIN_GAP: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest sleep between two looks at the certificate's expiry.
const MAX_SLEEP: Duration = Duration::from_secs(86400);

/// What ACME runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeSettings {
    pub domains: Vec<String>,
    pub contact: Option<String>,
    pub directory: String,
    /// Trust anchors for the directory (a test CA such as pebble's).
    pub ca: Option<PathBuf>,
    pub cache: PathBuf,
    /// Renew when less than this is left.
    pub renew_before: Duration,
}

impl AcmeSettings {
    fn cert_path(&self) -> PathBuf {
        self.cache.join("cert.pem")
    }
    fn key_path(&self) -> PathBuf {
        self.cache.join("key.pem")
    }
    fn account_path(&self) -> PathBuf {
        self.cache.join("account.json")
    }
}

/// The cached certificate, if it is there, loads and covers every domain.
fn cached(s: &AcmeSettings) -> Option<Identity> {
    let id = tls::load_pair(&s.cert_path(), &s.key_path()).ok()?;
    let leaf = id.chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    s.domains
        .iter()
        .all(|d| names.contains(&d.to_ascii_lowercase()))
        .then_some(id)
}

/// Obtains and renews the certificate until shutdown.
pub async fn run(
    s: AcmeSettings,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    if let Err(e) = std::fs::create_dir_all(&s.cache) {
        tracing::error!(error = %e, dir = %s.cache.display(), "cannot create the ACME cache directory");
    }
    let mut have = false;
    if let Some(id) = cached(&s) {
        match store.set(id) {
            Ok(()) => {
                have = true;
                tracing::info!(dir = %s.cache.display(), "serving the cached ACME certificate");
            }
            Err(e) => tracing::warn!(error = %e, "the cached ACME certificate does not load"),
        }
    }
    let mut backoff = FIRST_BACKOFF;
    let mut last_order: Option<tokio::time::Instant> = None;
    loop {
        let mut wait = if have {
            let left = Duration::from_secs(store.expires_in().max(0) as u64);
            left.saturating_sub(s.renew_before).min(MAX_SLEEP)
        } else {
            Duration::ZERO
        };
        if let Some(at) = last_order {
            wait = wait.max(MIN_GAP.saturating_sub(at.elapsed()));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        if have && store.expires_in() > s.renew_before.as_secs() as i64 {
            // Woke up to look again; not due yet.
            continue;
        }
        let result = tokio::select! {
            r = order(&s, &store) => r,
            _ = shutdown.cancelled() => return,
        };
        store.clear_challenges();
        match result {
            Ok(id) => {
                if let Err(e) =
                    save(&s, &id).and_then(|()| store.set(id).map_err(|e| e.to_string()))
                {
                    tracing::error!("the new ACME certificate cannot be kept: {e}");
                    metrics.ops.acme(false);
                } else {
                    tracing::info!(domains = %s.domains.join(","), "ACME certificate obtained and served");
                    metrics.ops.acme(true);
                    metrics.ops.tls_cert_expiry.set(store.expires_in());
                    have = true;
                    backoff = FIRST_BACKOFF;
                    last_order = Some(tokio::time::Instant::now());
                }
            }
            Err(e) => {
                tracing::error!(
                    retry_in = backoff.as_secs(),
                    "ACME order failed, the certificate in service stays: {e}"
                );
                metrics.ops.acme(false);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn account(s: &AcmeSettings) -> Result<Account, String> {
    let builder = || match &s.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = s.account_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(creds) = serde_json::from_str::<AccountCredentials>(&text) {
            match builder()
                .map_err(|e| e.to_string())?
                .from_credentials(creds)
                .await
            {
                Ok(a) => return Ok(a),
                Err(e) => {
                    tracing::warn!(error = %e, "the cached ACME account is refused: creating one")
                }
            }
        }
    }
    let contact: Vec<&str> = s.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()
        .map_err(|e| e.to_string())?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            s.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("cannot create an ACME account at {}: {e}", s.directory))?;
    let text = serde_json::to_string_pretty(&creds).map_err(|e| e.to_string())?;
    crate::guard::nft::write_atomically(&path, &text).map_err(|e| e.to_string())?;
    Ok(account)
}

/// One order: authorizations by TLS-ALPN-01, a CSR for a fresh key, the
/// issued chain.
async fn order(s: &AcmeSettings, store: &CertStore) -> Result<Identity, String> {
    let account = account(s).await?;
    let ids: Vec<Identifier> = s.domains.iter().cloned().map(Identifier::Dns).collect();
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    {
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(|e| format!("authorization: {e}"))?;
            match a.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => return Err(format!("authorization is {other:?}")),
            }
            let mut ch = a
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or("the CA offers no tls-alpn-01 challenge")?;
            let name = ch.identifier().to_string();
            let digest = ch.key_authorization().digest();
            store
                .set_challenge(&name, challenge_identity(&name, digest.as_ref())?)
                .map_err(|e| e.to_string())?;
            ch.set_ready()
                .await
                .map_err(|e| format!("challenge: {e}"))?;
        }
    }
    let retries = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .timeout(Duration::from_secs(60));
    let status = order
        .poll_ready(&retries)
        .await
        .map_err(|e| format!("waiting for validation: {e}"))?;
    if status != OrderStatus::Ready {
        return Err(format!("the order is {status:?}, not ready"));
    }
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let params = rcgen::CertificateParams::new(s.domains.clone()).map_err(|e| e.to_string())?;
    let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
    order
        .finalize_csr(csr.der())
        .await
        .map_err(|e| format!("finalize: {e}"))?;
    let pem = order
        .poll_certificate(&retries)
        .await
        .map_err(|e| format!("certificate: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the issued chain: {e}"))?;
    if chain.is_empty() {
        return Err("the CA returned no certificate".into());
    }
    Ok(Identity {
        chain,
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    })
}

/// The self-signed certificate RFC 8737 answers a challenge with: the
/// name, and the digest of the key authorization in `acmeIdentifier`.
fn challenge_identity(name: &str, digest: &[u8]) -> Result<Identity, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    })
}

/// Keeps the certificate and key in the cache (key first, each atomically).
fn save(s: &AcmeSettings, id: &Identity) -> Result<(), String> {
    let key_pem = pem("PRIVATE KEY", id.key.secret_der());
    let chain_pem: String = id
        .chain
        .iter()
        .map(|c| pem("CERTIFICATE", c.as_ref()))
        .collect();
    write_private(&s.key_path(), &key_pem)?;
    crate::guard::nft::write_atomically(&s.cert_path(), &chain_pem).map_err(|e| e.to_string())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    crate::guard::nft::write_atomically(path, text).map_err(|e| e.to_string())?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_certificates_carry_the_digest() {
        let digest = [7u8; 32];
        let id = challenge_identity("acme.example.test", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(id.chain[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        assert!(ext.value.ends_with(&digest));
    }

    #[test]
    fn pem_round_trip() {
        let id = tls::self_signed().unwrap();
        let text = pem("CERTIFICATE", id.chain[0].as_ref());
        let back: Vec<_> = rustls_pemfile::certs(&mut text.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back[0], id.chain[0]);
    }
}
