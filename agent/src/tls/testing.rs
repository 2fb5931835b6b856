//! Helpers for tests, in this crate and in others (the `testing` feature): a
//! development CA in a temporary directory, and certificates that peers must
//! refuse. They panic on failure, as test code may; production code has no
//! use for them.

use std::{
    ops::Deref,
    path::Path,
    time::{Duration, SystemTime},
};

use rcgen::{SanType, string::Ia5String};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tempfile::TempDir;
use warren_pki::{
    identity::{DEFAULT_TRUST_DOMAIN, SpiffeId, TrustDomain},
    tls::WorkloadCertificate,
};

use super::DevCa;

/// A [`DevCa`] whose directory is removed when this is dropped.
pub struct TempCa {
    ca: DevCa,
    dir: TempDir,
}

impl TempCa {
    /// A new CA (of trust domain `cluster.local`) with a root of its own, so
    /// two `TempCa`s do not trust each other's certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let ca = DevCa::load_or_create(dir.path(), &trust_domain())
            .expect("cannot create a development CA");
        Self { ca, dir }
    }

    /// Where `root.pem` and `root-key.pem` are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TempCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for TempCa {
    type Target = DevCa;

    fn deref(&self) -> &DevCa {
        &self.ca
    }
}

/// The trust domain of tests: `cluster.local`.
pub fn trust_domain() -> TrustDomain {
    TrustDomain::new(DEFAULT_TRUST_DOMAIN).expect("the default trust domain is valid")
}

/// Parses a SPIFFE ID written in a test.
pub fn spiffe_id(id: &str) -> SpiffeId {
    id.parse()
        .unwrap_or_else(|e| panic!("bad SPIFFE ID in test: {e}"))
}

/// A certificate for `id` that expired an hour ago (valid for the hour
/// before that).
pub fn expired(ca: &DevCa, id: &SpiffeId) -> WorkloadCertificate {
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let uri = SanType::URI(Ia5String::try_from(id.to_string()).expect("an ASCII URI"));
    let (leaf, key) = signed_leaf(ca, vec![uri], now - 2 * hour, now - hour);
    WorkloadCertificate::new(vec![leaf], key).expect("cannot use an expired certificate")
}

/// A leaf of `ca` with any SANs (none, several, not SPIFFE IDs), valid
/// exactly from `not_before` to `not_after`, and its key.
pub fn signed_leaf(
    ca: &DevCa,
    subject_alt_names: Vec<SanType>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let credential = ca
        .authority()
        .issue_unchecked(subject_alt_names, not_before, not_after)
        .expect("cannot sign a test certificate");
    let key = credential.key();
    let leaf = credential.chain.into_iter().next().expect("a leaf first");
    (leaf, key)
}

/// The certificate's chain and key as PEM, e.g. to hand to another process.
pub fn to_pem(cert: &WorkloadCertificate) -> (String, String) {
    let chain = cert
        .chain()
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect();
    let key = match cert.key() {
        PrivateKeyDer::Pkcs8(der) => pem::Pem::new("PRIVATE KEY", der.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(der) => pem::Pem::new("EC PRIVATE KEY", der.secret_sec1_der().to_vec()),
        PrivateKeyDer::Pkcs1(der) => {
            pem::Pem::new("RSA PRIVATE KEY", der.secret_pkcs1_der().to_vec())
        }
        _ => panic!("unknown private key format"),
    };
    (chain, pem::encode(&key))
}
