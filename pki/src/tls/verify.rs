//! Peer certificate checks. Chains are verified by rustls' webpki code
//! (signatures, expiry, key usage); a [`PeerCheck`] then says what the leaf
//! must be, in place of the hostname check that SPIFFE certificates have
//! nothing for. HBONE uses [`OneOf`] and [`InTrustDomain`]; the CA's
//! transport has its own checks.

use std::{error::Error, fmt, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{TlsError, spiffe_id_of};
use crate::identity::{SpiffeId, TrustDomain};

/// Why a peer's leaf certificate is refused, in words for the logs.
pub type Refused = Box<dyn Error + Send + Sync>;

/// What a peer's leaf certificate must be, once its chain is verified.
pub trait PeerCheck: fmt::Debug + Send + Sync {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), Refused>;
}

/// Client side: the server must chain to `roots` (no hostname check), then
/// pass `check`.
#[derive(Debug)]
pub struct CheckedServer<C> {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    check: C,
}

impl<C> CheckedServer<C> {
    pub fn new(roots: Arc<RootCertStore>, algorithms: WebPkiSupportedAlgorithms, check: C) -> Self {
        Self {
            roots,
            algorithms,
            check,
        }
    }
}

impl<C: PeerCheck> ServerCertVerifier for CheckedServer<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        self.check.check(end_entity).map_err(refuse)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Server side: rustls' client verifier (chain, expiry, clientAuth usage),
/// then `check`. A client certificate is mandatory.
#[derive(Debug)]
pub struct CheckedClient<C> {
    chain: Arc<dyn ClientCertVerifier>,
    check: C,
}

impl<C> CheckedClient<C> {
    pub fn new(chain: Arc<dyn ClientCertVerifier>, check: C) -> Self {
        Self { chain, check }
    }
}

impl<C: PeerCheck> ClientCertVerifier for CheckedClient<C> {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        self.check.check(end_entity).map_err(refuse)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// HBONE client: the server is one of the identities expected for the
/// destination.
#[derive(Debug)]
pub struct OneOf(pub Vec<SpiffeId>);

impl PeerCheck for OneOf {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), Refused> {
        let presented = spiffe_id_of(leaf)?;
        if self.0.contains(&presented) {
            Ok(())
        } else {
            Err(Box::new(TlsError::UnexpectedPeer {
                presented,
                expected: self.0.clone(),
            }))
        }
    }
}

/// HBONE server: the client is a workload of our own trust domain.
#[derive(Debug)]
pub struct InTrustDomain(pub TrustDomain);

impl PeerCheck for InTrustDomain {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), Refused> {
        let presented = spiffe_id_of(leaf)?;
        if presented.trust_domain() == &self.0 {
            Ok(())
        } else {
            Err(Box::new(TlsError::ForeignTrustDomain {
                presented,
                expected: self.0.clone(),
            }))
        }
    }
}

/// Carries our reason through rustls as a certificate error, which makes
/// rustls send a certificate_unknown alert, as ztunnel does.
fn refuse(why: Refused) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(why)))))
}

/// rustls shows a certificate error's payload with `Debug`; this makes that
/// the readable message.
struct Refusal(Refused);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for Refusal {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(self.0.as_ref())
    }
}
