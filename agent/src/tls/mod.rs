//! Mutual TLS for HBONE: the rustls configurations both ends of a tunnel
//! use, and where workload certificates come from. The certificates
//! themselves, the roots and the checks of a peer are `warren_pki::tls`'s.
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
//! (`ca::CsrSource`), or for labs the development CA ([`DevCa`]).

mod config;
mod dev_ca;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

use std::{future::Future, pin::Pin};

pub use config::{
    client_config, client_still_trusted, negotiated_h2, peer_identity, peer_not_after,
    server_config,
};
pub use dev_ca::DevCa;
use warren_pki::{
    identity::SpiffeId,
    tls::{TlsError, WorkloadCertificate},
};

/// Where workload certificates come from. The rest of the agent uses only
/// this, so the development CA can be swapped for a real CA client.
pub trait CertificateSource: Send + Sync + 'static {
    /// A fresh certificate for `id`, with its private key.
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>>;
}
