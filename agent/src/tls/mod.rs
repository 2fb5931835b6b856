//! Mutual TLS for HBONE: workload certificates, the roots they chain to, and
//! the rustls configurations both ends of a tunnel use.
//!
//! What must match Istio's ztunnel on the wire (see the HBONE notes): TLS 1.3
//! only, the two AES-GCM suites, ALPN `h2`, no SNI, no resumption, and
//! identities carried only as `spiffe://` URI SANs. The client presents the
//! *source* workload's certificate and checks that the server is one of the
//! identities expected for the destination; the server presents the
//! *destination* workload's certificate and accepts clients of its own trust
//! domain. Authorization beyond that happens above TLS, on `peer_identity`.
//!
//! Certificates come from a [`CertificateSource`]: the CA service's client
//! (`ca::client::CsrSource`), or for labs the development CA ([`DevCa`]).

mod certs;
mod config;
mod dev_ca;
mod provider;
pub mod testing;
pub(crate) mod verify;
pub(crate) mod x509_time;

#[cfg(test)]
mod tests;

use std::{future::Future, io, path::PathBuf, pin::Pin};

pub(crate) use certs::validity_of;
pub use certs::{TrustBundle, WorkloadCertificate, spiffe_id_of};
pub use config::{client_config, peer_identity, peer_not_after, server_config};
pub use dev_ca::{DEFAULT_VALIDITY, DevCa};

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
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: Box<TlsError>,
    },
    #[error(
        "development CA root {} expired; delete it and its key to make a new one",
        path.display()
    )]
    RootExpired { path: PathBuf },
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
    #[error("invalid certificate validity: {0}")]
    Validity(&'static str),
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

/// Where workload certificates come from. The rest of the agent uses only
/// this, so the development CA can be swapped for a real CA client.
pub trait CertificateSource: Send + Sync + 'static {
    /// A fresh certificate for `id`, with its private key.
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>>;
}
