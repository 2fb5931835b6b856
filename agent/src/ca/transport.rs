//! TLS between the CA service and its clients, the node agents.
//!
//! Both ends use certificates of the mesh CA. A client presents its node
//! credential (URI SAN `spiffe://<td>/warren/node/<node>`); the server its
//! own (`spiffe://<td>/warren/ca`), made at start. Each side checks the chain
//! against the roots with rustls' webpki code, then the identity: there are no
//! DNS names to check, as with workload certificates.

use std::{
    error::Error,
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    version::TLS13,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use super::Credential;
use crate::{
    identity::{NodeId, TrustDomain, ca_service_id},
    tls::TrustBundle,
};

/// File names of a node credential, as `warren ca node-credential` writes them.
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node-key.pem";
pub const NODE_ROOTS: &str = "ca-roots.pem";

const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node credential: {0}")]
    Credential(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A node's credential towards the CA: its certificate chain and key.
/// Debug output leaves the key out.
pub struct NodeCredential {
    node: NodeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl NodeCredential {
    /// Reads a PEM chain (leaf first) and its PEM private key; the leaf must
    /// name exactly one node.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Credential(format!("certificate chain: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TransportError::Credential("no PEM certificate in the chain".into()))?;
        let node = node_of(leaf).map_err(TransportError::Credential)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TransportError::Credential(format!("private key: {e}")))?;
        Ok(Self { node, chain, key })
    }

    /// Reads `node.pem` and `node-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read(&path).map_err(|source| TransportError::Read { path, source })
        };
        Self::from_pem(&read(NODE_CERT)?, &read(NODE_KEY)?)
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }
}

impl fmt::Debug for NodeCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCredential")
            .field("node", &self.node.to_string())
            .finish_non_exhaustive()
    }
}

/// ring, TLS 1.3 only. Explicit rather than the process-wide default, which
/// another crate could install differently.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The CA service's side: presents `own` and requires a node credential
/// chained to `roots`, of `trust_domain`.
pub(super) fn server_config(
    own: &Credential,
    roots: &TrustBundle,
    trust_domain: TrustDomain,
) -> Result<Arc<ServerConfig>, TransportError> {
    let chain = WebPkiClientVerifier::builder_with_provider(roots.store(), provider()).build()?;
    let verifier = ExpectNode {
        chain,
        trust_domain,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(own.chain.clone(), own.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A node agent's side: presents its node credential; the server must chain
/// to `roots` and be the CA service of the credential's trust domain.
pub(super) fn client_config(
    credential: &NodeCredential,
    roots: &TrustBundle,
) -> Result<Arc<ClientConfig>, TransportError> {
    let provider = provider();
    let verifier = ExpectCaService {
        roots: roots.store(),
        expected: ca_service_id(credential.node.trust_domain()),
        provider: Arc::clone(&provider),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(credential.chain.clone(), credential.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The URI SANs of a certificate.
fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let (_, parsed) = X509Certificate::from_der(cert)
        .map_err(|e| format!("certificate cannot be parsed: {e}"))?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|e| format!("certificate's SANs cannot be parsed: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// The node a certificate names: exactly one URI SAN, a node SPIFFE ID.
pub(super) fn node_of(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    match uri_sans(cert)?.as_slice() {
        [one] => one.parse().map_err(|e| format!("{e}")),
        [] => Err("certificate has no URI SAN; a node credential names its node".into()),
        more => Err(format!(
            "certificate has {} URI SANs; a node credential has exactly one",
            more.len()
        )),
    }
}

/// Server side: webpki's client checks (chain, expiry, clientAuth), then the
/// client must be a node of our trust domain.
#[derive(Debug)]
struct ExpectNode {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for ExpectNode {
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
        let node = node_of(end_entity).map_err(refuse)?;
        if node.trust_domain() != &self.trust_domain {
            return Err(refuse(format!(
                "{node} is not of this CA's trust domain {}",
                self.trust_domain
            )));
        }
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

/// Client side: the server must chain to our roots and carry the CA
/// service's identity.
#[derive(Debug)]
struct ExpectCaService {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ExpectCaService {
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
            self.provider.signature_verification_algorithms.all,
        )?;
        let uris = uri_sans(end_entity).map_err(refuse)?;
        if uris != [self.expected.as_str()] {
            return Err(refuse(format!(
                "server presented {uris:?}, but the CA service is {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Carries our reason through rustls as a certificate error (a
/// certificate_unknown alert to the peer), readable in rustls' message.
fn refuse(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(why)))))
}

struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Refusal {}

/// A client that presents `certificate` (chain and key), or none at all,
/// without the checks `NodeCredential` makes: for tests of the server's
/// refusals.
#[cfg(test)]
pub(super) fn test_client_config(
    roots: &TrustBundle,
    trust_domain: &TrustDomain,
    certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = ExpectCaService {
        roots: roots.store(),
        expected: ca_service_id(trust_domain),
        provider: Arc::clone(&provider),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match certificate {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("a valid test certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}
