//! Workload certificates and the roots they chain to, parsed and checked once
//! when they arrive, and the checks of a peer's certificate that the agent's
//! HBONE configurations and the CA's transport build on.
//!
//! Identities are carried only as `spiffe://` URI SANs, as in Istio: a
//! workload certificate has exactly one, and nothing else in it (subject, DNS
//! names) counts.

mod certs;
pub mod provider;
pub mod verify;
pub mod x509_time;

use std::{io, path::PathBuf};

pub use certs::{
    TrustBundle, WorkloadCertificate, certificates_from_pem, serial_of, spiffe_id_of, subject_of,
    validity_of,
};

use crate::identity::{IdentityError, SpiffeId, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: &'static str },
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate has several spiffe:// URI SANs; a workload certificate has exactly one")]
    SeveralSpiffeIds,
    #[error("certificate's SPIFFE ID: {0}")]
    BadSpiffeId(#[from] IdentityError),
    #[error("private key does not suit the certificate: {0}")]
    Key(rustls::Error),
    #[error("trust bundle root #{index}: {source}")]
    BadRoot { index: usize, source: rustls::Error },
    #[error("trust bundle {}: {source}", path.display())]
    BundleFile {
        path: PathBuf,
        source: Box<TlsError>,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot make a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate authority: {0}")]
    CertificateAuthority(String),
    #[error(
        "certificate valid from {not_before} to {not_after} is not usable now (is this \
         machine's clock right?)"
    )]
    Unusable {
        not_before: String,
        not_after: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("no expected server identity given: every server would be refused")]
    NoExpectedIdentity,
    #[error("peer presented {presented}, but expected {}", one_of(expected))]
    UnexpectedPeer {
        presented: SpiffeId,
        expected: Vec<SpiffeId>,
    },
    #[error(
        "peer {presented} is from trust domain {}, not ours ({expected})",
        presented.trust_domain()
    )]
    ForeignTrustDomain {
        presented: SpiffeId,
        expected: TrustDomain,
    },
}

fn one_of(ids: &[SpiffeId]) -> String {
    match ids {
        [only] => only.to_string(),
        _ => {
            let names: Vec<String> = ids.iter().map(ToString::to_string).collect();
            format!("one of {}", names.join(", "))
        }
    }
}

/// Why a TLS handshake failed, in words. rustls displays our verifiers'
/// refusals as `Other(OtherError(..))` debug output; this shows the refusal
/// itself ("peer presented X, but expected Y").
pub fn handshake_error(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        Some(e) => e.to_string(),
        None => error.to_string(),
    }
}
