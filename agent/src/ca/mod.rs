//! The agent's side of the CA API: [`CsrSource`], a [`CertificateSource`]
//! that gets each workload certificate from a CA service (warren's CA or
//! istiod) through `warren_pki::client::CaClient`, authenticated as its node.
//!
//! Private keys are made here, one per certificate, and never leave the
//! process: the CA sees only the CSR.

#[cfg(test)]
mod tests;

use std::{future::Future, pin::Pin, time::Duration};

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    string::Ia5String,
};
use rustls::pki_types::PrivateKeyDer;
use warren_pki::{
    client::CaClient,
    identity::SpiffeId,
    tls::{TlsError, WorkloadCertificate, certificates_from_pem},
};

use crate::tls::CertificateSource;

/// Workload certificates from a CA: a fresh ECDSA P-256 key per certificate,
/// a CSR with only the workload's URI SAN, the chain the CA returns.
#[derive(Debug, Clone)]
pub struct CsrSource {
    client: CaClient,
    ttl: Duration,
}

impl CsrSource {
    /// Certificates from `client`'s CA, asked to live `ttl`.
    pub fn new(client: CaClient, ttl: Duration) -> Self {
        Self { client, ttl }
    }

    async fn issue(&self, id: &SpiffeId) -> Result<WorkloadCertificate, TlsError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let chain = self
            .client
            .create_certificate(&csr, self.ttl)
            .await
            .map_err(|e| TlsError::CertificateAuthority(e.to_string()))?;
        let chain = certificates_from_pem(chain.concat().as_bytes(), "certificate chain")?;
        // Istio's CAs end the chain with the root; peers have it already.
        let certificate = WorkloadCertificate::from_issued(
            chain,
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        if certificate.identity() != id {
            return Err(TlsError::CertificateAuthority(format!(
                "asked for {id}, got a certificate for {}",
                certificate.identity()
            )));
        }
        Ok(certificate)
    }
}

impl CertificateSource for CsrSource {
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move { self.issue(&id).await })
    }
}
