//! The development CA: a self-signed root kept on disk and shared by every
//! agent pointed at the same directory, so their workloads trust each other
//! without a real CA. The root and the certificates are made by the CA's own
//! signing core ([`Authority::self_signed`]), so a lab's certificates are
//! exactly what the CA service would issue.

use std::{
    fmt,
    future::{self, Future},
    path::Path,
    pin::Pin,
    time::Duration,
};

use rustls::pki_types::CertificateDer;
use warren_pki::{
    ca::{Authority, CaError, DEFAULT_TTL, Policy},
    identity::{SpiffeId, TrustDomain},
    tls::{TlsError, TrustBundle, WorkloadCertificate},
};

use super::CertificateSource;

/// The development CA. Issues ECDSA P-256 workload certificates whose only
/// SAN is the workload's SPIFFE ID.
pub struct DevCa {
    authority: Authority,
    validity: Duration,
}

impl DevCa {
    /// Loads the root in `dir` (`root.pem`, `root-key.pem`), creating it first
    /// if there is none. Agents starting together may race to create it;
    /// they end up sharing one root (see [`Authority::self_signed`]). A key
    /// that group or others can read is refused.
    pub fn load_or_create(dir: &Path, trust_domain: &TrustDomain) -> Result<Self, CaError> {
        let authority = Authority::self_signed(dir, Policy::new(trust_domain.clone()))?;
        Ok(Self {
            authority,
            validity: DEFAULT_TTL,
        })
    }

    /// How long issued certificates are valid (default: 24 hours).
    pub fn with_validity(self, validity: Duration) -> Self {
        Self { validity, ..self }
    }

    /// A fresh certificate and key for `id`, valid from shortly before now.
    pub fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, TlsError> {
        let credential = self
            .authority
            .issue_credential(&id.to_string(), self.validity)
            .map_err(|e| TlsError::CertificateAuthority(e.to_string()))?;
        let key = credential.key();
        WorkloadCertificate::from_issued(credential.chain, key)
    }

    /// The CA's root, as a bundle.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.authority.roots().clone()
    }

    pub fn root(&self) -> CertificateDer<'static> {
        self.authority.roots().roots()[0].clone()
    }

    /// The signing core underneath, e.g. for tests that need certificates
    /// no CA would issue.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

impl CertificateSource for DevCa {
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>> {
        // Signing takes well under a millisecond: not worth a blocking thread.
        Box::pin(future::ready(self.issue(id)))
    }
}
