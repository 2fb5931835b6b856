//! Certificates and keys as the agent and the CA hold them, parsed and
//! checked once when they arrive.

use std::{
    fmt, fs,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use super::{TlsError, provider::provider, x509_time};
use crate::identity::SpiffeId;

/// A workload's certificate chain (leaf first) and private key.
///
/// Debug output leaves the key out, so logging one is safe.
pub struct WorkloadCertificate {
    identity: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// When this process got it, or `not_before` if that is later. CAs
    /// backdate `not_before` (minutes, against clock skew), so the lifetime
    /// that counts for renewal starts here.
    received: SystemTime,
}

impl WorkloadCertificate {
    /// Takes the identity and validity from the leaf, and checks that the key
    /// is the leaf's: a mismatch would otherwise surface only at the first
    /// handshake, far from its cause.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoCertificate {
            what: "certificate chain",
        })?;
        let identity = spiffe_id_of(leaf)?;
        let (not_before, not_after) = validity_of(leaf)?;
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(TlsError::Key)?;
        Ok(Self {
            identity,
            chain,
            key,
            not_before,
            not_after,
            received: SystemTime::now().max(not_before),
        })
    }

    /// A chain as a CA issued it (leaf first) and its key. Istio's CAs end
    /// the chain with the root, and a self-signed CA's chain is leaf and
    /// root: a trailing self-signed certificate is dropped, as peers have the
    /// roots already and need not be sent them at every handshake.
    pub fn from_issued(
        mut chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        if chain.len() > 1 && chain.last().is_some_and(is_self_signed) {
            chain.pop();
        }
        Self::new(chain, key)
    }

    /// Reads a PEM chain (leaf first) and its PEM private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        let chain = certificates_from_pem(chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
            what: "private key",
            source,
        })?;
        Self::new(chain, key)
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// Whether `time` is within the certificate's validity.
    pub fn is_valid_at(&self, time: SystemTime) -> bool {
        self.not_before <= time && time < self.not_after
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number in hex (it parsed when this was made).
    pub fn serial(&self) -> String {
        serial_of(&self.chain[0]).unwrap_or_default()
    }

    /// How long it was valid for when it was received (less than
    /// `not_after - not_before` if it was backdated).
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.received)
            .unwrap_or_default()
    }

    /// When to replace this certificate: half-way through its lifetime, as
    /// ztunnel does, which leaves the other half to ride out CA outages.
    pub fn refresh_at(&self) -> SystemTime {
        self.received + self.lifetime() / 2
    }

    /// The private key, for a TLS configuration that presents this
    /// certificate.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

impl Clone for WorkloadCertificate {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_before: self.not_before,
            not_after: self.not_after,
            received: self.received,
        }
    }
}

impl fmt::Debug for WorkloadCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity)
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Roots a workload trusts: peers' chains must end at one of them.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<[CertificateDer<'static>]>,
    // Built once and shared by every config made from this bundle.
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// One or more PEM certificates.
    pub fn from_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_roots(certificates_from_pem(pem, "trust bundle")?)
    }

    pub fn from_pem_file(path: &Path) -> Result<Self, TlsError> {
        let pem = fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&pem).map_err(|source| TlsError::BundleFile {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_roots(mut roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::NoCertificate {
                what: "trust bundle",
            });
        }
        dedup(&mut roots);
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|source| TlsError::BadRoot { index, source })?;
        }
        Ok(Self {
            roots: roots.into(),
            store: Arc::new(store),
        })
    }

    /// Both bundles' roots, e.g. the old and new root during a rotation.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let roots = self
            .roots
            .iter()
            .chain(other.roots.iter())
            .cloned()
            .collect();
        Self::from_roots(roots).expect("both bundles' roots were accepted when they were made")
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Whether every root of `other` is also in this bundle.
    pub fn includes(&self, other: &TrustBundle) -> bool {
        other.roots.iter().all(|root| self.roots.contains(root))
    }

    /// The roots as rustls verifiers take them.
    pub fn store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

fn dedup(roots: &mut Vec<CertificateDer<'static>>) {
    let mut seen = Vec::with_capacity(roots.len());
    roots.retain(|root| {
        let new = !seen.contains(root);
        if new {
            seen.push(root.clone());
        }
        new
    });
}

/// The certificate's one `spiffe://` URI SAN. Other SANs (DNS names, other
/// URIs) never carry identity, so they are ignored.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let x509 = parse(cert)?;
    let sans = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let mut ids = sans
        .iter()
        .flat_map(|ext| &ext.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(*uri),
            _ => None,
        });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id.parse()?),
        (None, _) => Err(TlsError::NoSpiffeId),
        (Some(_), Some(_)) => Err(TlsError::SeveralSpiffeIds),
    }
}

/// The certificate's serial number as a number in lower-case hex (what
/// `openssl x509 -serial` shows, bar the case and DER's sign byte).
pub fn serial_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    Ok(parse(cert)?.serial.to_str_radix(16))
}

/// The certificate's subject, as RFC 4514 writes names (`CN=root, O=org`;
/// empty for Istio's workload certificates, which have none).
pub fn subject_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    Ok(parse(cert)?.subject().to_string())
}

/// When the certificate starts and stops being valid.
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let x509 = parse(cert)?;
    let validity = x509.validity();
    let out_of_range = || TlsError::BadCertificate("validity out of range".into());
    Ok((
        x509_time::from_x509(validity.not_before.timestamp()).ok_or_else(out_of_range)?,
        x509_time::from_x509(validity.not_after.timestamp()).ok_or_else(out_of_range)?,
    ))
}

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_rest, x509)| x509)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))
}

/// Whether the certificate's issuer is its own subject: a root.
fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    parse(cert).is_ok_and(|x509| x509.issuer().as_raw() == x509.subject().as_raw())
}

/// Every `CERTIFICATE` block; other blocks (keys, parameters) are skipped.
/// `what` names the file's role in errors ("trust bundle").
pub fn certificates_from_pem(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SerialNumber};

    use super::*;

    #[test]
    fn subjects_and_serials_read_as_openssl_shows_them() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "warren");
        params
            .distinguished_name
            .push(DnType::CommonName, "root CA");
        // The top bit set: DER puts a zero byte before it, the number has none.
        params.serial_number = Some(SerialNumber::from_slice(&[0x00, 0x9f, 0x01]));
        let der = params.self_signed(&key).unwrap().der().clone();
        assert_eq!(subject_of(&der).unwrap(), "O=warren, CN=root CA");
        assert_eq!(serial_of(&der).unwrap(), "9f01");

        // Istio's workload certificates have no subject.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        let subjectless = params.self_signed(&key).unwrap().der().clone();
        assert_eq!(subject_of(&subjectless).unwrap(), "");

        let truncated = CertificateDer::from(der[..40].to_vec());
        assert!(subject_of(&truncated).is_err());
    }
}
