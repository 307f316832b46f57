//! The test CA and certificates for localhost, made once per test binary.

use super::*;

pub struct Pki {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub ca_der: CertificateDer<'static>,
    issuer: Mutex<rcgen::CertifiedIssuer<'static, rcgen::KeyPair>>,
}

/// A new leaf for localhost / 127.0.0.1 signed by the test CA: (cert PEM,
/// key PEM, cert DER).
pub fn new_leaf() -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = pki().issuer.lock().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &*ca)
        .unwrap();
    (leaf.pem(), key.serialize_pem(), leaf.der().clone())
}

/// A CA and a leaf for localhost / 127.0.0.1 / ::1, made once per test binary.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(format!("doh-test-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".into(),
            "::1".into(),
        ])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
        let pki = Pki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            ca_der: ca.der().clone(),
            issuer: Mutex::new(ca),
        };
        std::fs::write(&pki.cert, leaf.pem()).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&pki.ca, pki.issuer.lock().unwrap().pem()).unwrap();
        pki
    })
}
