//! TLS between the CA service and its clients, the node agents.
//!
//! Both ends use certificates of the mesh CA. A client presents its node
//! credential (URI SAN `spiffe://<td>/warren/node/<node>`); the server its
//! own (`spiffe://<td>/warren/ca`), made at start. Each side checks the chain
//! against the roots with rustls' webpki code, then the identity: there are no
//! DNS names to check, as with workload certificates.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rustls::{
    ClientConfig, ServerConfig,
    client::Resumption,
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    version::TLS13,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::{
    ca::Credential,
    identity::{NodeId, TrustDomain, ca_service_id},
    tls::{
        TrustBundle, validity_of,
        verify::{CheckedClient, CheckedServer, PeerCheck, Refused},
    },
};

/// File names of a node credential, as `warren-ca node-credential` writes them.
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
    not_after: SystemTime,
}

impl NodeCredential {
    /// Reads a PEM chain (leaf first) and its PEM private key; the leaf must
    /// name exactly one node.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TransportError> {
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TransportError::Credential(format!("private key: {e}")))?;
        Self::new(chain_pem, key)
    }

    fn new(chain_pem: &[u8], key: PrivateKeyDer<'static>) -> Result<Self, TransportError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Credential(format!("certificate chain: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| TransportError::Credential("no PEM certificate in the chain".into()))?;
        let node = node_of(leaf).map_err(TransportError::Credential)?;
        let (_, not_after) =
            validity_of(leaf).map_err(|e| TransportError::Credential(e.to_string()))?;
        if not_after <= SystemTime::now() {
            return Err(TransportError::Credential(format!(
                "it expired at {}; make a new one with `warren-ca node-credential --replace`",
                humantime::format_rfc3339_seconds(not_after)
            )));
        }
        Ok(Self {
            node,
            chain,
            key,
            not_after,
        })
    }

    /// Reads `node.pem` and `node-key.pem` from `dir`, refusing a key that
    /// group or others can read.
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let path = dir.join(NODE_CERT);
        let chain = fs::read(&path).map_err(|source| TransportError::Read { path, source })?;
        let key = crate::ca::files::read_private_key(
            &dir.join(NODE_KEY),
            crate::ca::files::KeyReaders::Owner,
        )
        .map_err(|e| TransportError::Credential(e.to_string()))?;
        Self::new(&chain, key)
    }

    /// Like [`load`](Self::load), and checks that the credential is `node`'s.
    pub fn load_for(dir: &Path, node: &NodeId) -> Result<Self, TransportError> {
        let credential = Self::load(dir)?;
        if credential.node != *node {
            return Err(TransportError::Credential(format!(
                "it is for {}, but this agent is {node}",
                credential.node
            )));
        }
        Ok(credential)
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
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
pub fn server_config(
    own: &Credential,
    roots: &TrustBundle,
    trust_domain: TrustDomain,
) -> Result<Arc<ServerConfig>, TransportError> {
    let chain = WebPkiClientVerifier::builder_with_provider(roots.store(), provider()).build()?;
    let verifier = CheckedClient::new(chain, NodeOf(trust_domain));
    ca_server(own, Arc::new(verifier))
}

/// The CA service's side on Kubernetes: presents `own` and asks for no
/// client certificate; callers authenticate with the service-account token
/// in each request instead.
pub fn token_server_config(own: &Credential) -> Result<Arc<ServerConfig>, TransportError> {
    ca_server(own, WebPkiClientVerifier::no_client_auth())
}

/// The CA service's TLS: 1.3, `own` presented, clients checked by `clients`.
fn ca_server(
    own: &Credential,
    clients: Arc<dyn ClientCertVerifier>,
) -> Result<Arc<ServerConfig>, TransportError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(clients)
        .with_single_cert(own.chain.clone(), own.key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A node agent's side on Kubernetes: no client certificate (its token goes
/// in each request); the server must chain to `roots` and be the CA service
/// of `trust_domain`.
pub fn token_client_config(
    roots: &TrustBundle,
    trust_domain: &TrustDomain,
) -> Result<Arc<ClientConfig>, TransportError> {
    ca_client(roots, trust_domain, None)
}

/// A node agent's side: presents its node credential; the server must chain
/// to `roots` and be the CA service of the credential's trust domain.
pub fn client_config(
    credential: &NodeCredential,
    roots: &TrustBundle,
) -> Result<Arc<ClientConfig>, TransportError> {
    let certificate = (credential.chain.clone(), credential.key.clone_key());
    ca_client(roots, credential.node.trust_domain(), Some(certificate))
}

/// A client of the CA service: TLS 1.3, h2, no SNI (the server is checked by
/// its SPIFFE ID, chained to `roots`), no resumption; presenting
/// `certificate` (chain and key), if any.
fn ca_client(
    roots: &TrustBundle,
    trust_domain: &TrustDomain,
    certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TransportError> {
    let verifier = ca_service_verifier(roots, trust_domain);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match certificate {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
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
pub fn node_of(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    match uri_sans(cert)?.as_slice() {
        [one] => one.parse().map_err(|e| format!("{e}")),
        [] => Err("certificate has no URI SAN; a node credential names its node".into()),
        more => Err(format!(
            "certificate has {} URI SANs; a node credential has exactly one",
            more.len()
        )),
    }
}

/// Server side: the client must be a node of our trust domain.
#[derive(Debug)]
struct NodeOf(TrustDomain);

impl PeerCheck for NodeOf {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), Refused> {
        let node = node_of(leaf)?;
        if node.trust_domain() == &self.0 {
            Ok(())
        } else {
            Err(format!("{node} is not of this CA's trust domain {}", self.0).into())
        }
    }
}

/// Client side: the server must be the CA service (of our trust domain).
#[derive(Debug)]
struct IsCaService(String);

impl PeerCheck for IsCaService {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), Refused> {
        let uris = uri_sans(leaf)?;
        if uris == [self.0.as_str()] {
            Ok(())
        } else {
            Err(format!(
                "server presented {uris:?}, but the CA service is {}",
                self.0
            )
            .into())
        }
    }
}

/// Checks the CA service's certificate as a client (node agent) does.
fn ca_service_verifier(
    roots: &TrustBundle,
    trust_domain: &TrustDomain,
) -> CheckedServer<IsCaService> {
    CheckedServer::new(
        roots.store(),
        provider().signature_verification_algorithms,
        IsCaService(ca_service_id(trust_domain)),
    )
}

/// Tests only: a client that presents `certificate` (chain and key), or
/// none at all, without the checks `NodeCredential` makes: for tests of the
/// server's refusals.
#[cfg(feature = "testing")]
pub fn test_client_config(
    roots: &TrustBundle,
    trust_domain: &TrustDomain,
    certificate: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    ca_client(roots, trust_domain, certificate).expect("a valid test certificate")
}
