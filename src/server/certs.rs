//! The certificate in service: loaded at start, re-read on SIGHUP, and
//! checked for change every 10 s so that a renewal (certbot writes new
//! files and renames them in place) needs no signal. A certificate that
//! fails to load is logged and refused; the one in service stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::TlsSource;
use crate::metrics::Metrics;
use crate::tls::{self, CertStore, Identity};

/// How often the certificate files are looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// What the files looked like when last loaded: modification time and
/// length of each.
type Stamp = Vec<(Option<SystemTime>, u64)>;

fn stamp(paths: &[&Path]) -> Stamp {
    paths
        .iter()
        .map(|p| match std::fs::metadata(p) {
            Ok(m) => (m.modified().ok(), m.len()),
            Err(_) => (None, 0),
        })
        .collect()
}

pub struct Certs {
    pub store: Arc<CertStore>,
    source: Mutex<(TlsSource, Stamp)>,
}

impl Certs {
    /// Loads the certificate of `source` (a self-signed one is made for
    /// `SelfSigned`).
    pub fn load(source: &TlsSource) -> anyhow::Result<Arc<Certs>> {
        let (id, stamp) = read(source)?;
        if matches!(source, TlsSource::SelfSigned) {
            tracing::warn!(
                fingerprint = %id.fingerprint(),
                "NO CERTIFICATE GIVEN: serving a self-signed certificate for localhost \
                 generated at start. Clients will not trust it; use --tls-cert/--tls-key \
                 or --acme-domain."
            );
        }
        Ok(Arc::new(Certs {
            store: CertStore::new(id)?,
            source: Mutex::new((source.clone(), stamp)),
        }))
    }

    /// Reads `source`'s files now (SIGHUP), without serving them yet.
    pub fn prepare(&self, source: &TlsSource) -> Result<Option<(Identity, Stamp)>, String> {
        let current = self.source.lock().map(|s| s.0.clone()).ok();
        match source {
            TlsSource::SelfSigned if current.as_ref() == Some(source) => Ok(None),
            TlsSource::Acme => Ok(None),
            _ => read(source).map(Some).map_err(|e| e.to_string()),
        }
    }

    /// Serves what [`Certs::prepare`] read.
    pub fn commit(&self, source: &TlsSource, prepared: Option<(Identity, Stamp)>) {
        if let Some((id, stamp)) = prepared {
            if let Err(e) = self.store.set(id) {
                tracing::error!(error = %e, "certificate refused");
                return;
            }
            if let Ok(mut s) = self.source.lock() {
                *s = (source.clone(), stamp);
            }
            tracing::info!("certificate reloaded");
        }
    }

    /// Reloads the files if they changed since last loaded. `Some(ok)` when
    /// a reload was tried.
    pub fn check(&self) -> Option<bool> {
        let (source, old) = self.source.lock().ok().map(|s| s.clone())?;
        let TlsSource::Files { cert, key } = &source else {
            return None;
        };
        if stamp(&[cert, key]) == old {
            return None;
        }
        match read(&source) {
            Ok(prepared) => {
                self.commit(&source, Some(prepared));
                Some(true)
            }
            Err(e) => {
                // Remember the broken files, so that they are not tried
                // again every 10 s; the next change is.
                if let Ok(mut s) = self.source.lock() {
                    s.1 = stamp(&[cert, key]);
                }
                tracing::error!(error = %e, "the certificate files changed but do not load: the old certificate stays");
                Some(false)
            }
        }
    }

    /// The paths served from, for logs.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self.source.lock().map(|s| s.0.clone()) {
            Ok(TlsSource::Files { cert, key }) => vec![cert, key],
            _ => Vec::new(),
        }
    }
}

fn read(source: &TlsSource) -> anyhow::Result<(Identity, Stamp)> {
    match source {
        TlsSource::Files { cert, key } => {
            let st = stamp(&[cert, key]);
            Ok((tls::load_pair(cert, key)?, st))
        }
        TlsSource::SelfSigned | TlsSource::Acme => Ok((tls::self_signed()?, Vec::new())),
    }
}

/// Checks the certificate files every [`CHECK_EVERY`] and keeps the expiry
/// gauge current.
pub async fn watch(certs: Arc<Certs>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(ok) = certs.check() {
            metrics.ops.reload(ok);
        }
        metrics.ops.tls_cert_expiry.set(certs.store.expires_in());
    }
}
