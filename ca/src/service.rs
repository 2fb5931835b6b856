//! `warren-ca serve`: the CA as a gRPC service speaking Istio's certificate
//! API (`istio.v1.auth.IstioCertificateService/CreateCertificate`), over
//! mutual TLS where each client is a node.
//!
//! Node authorization: a node may obtain the identity of a workload only if
//! the CA's view of the cluster ([`Placements`], e.g. from the workloads
//! file) places a workload with that identity on that node. A compromised
//! node can then mint only the identities it already runs.
//!
//! The returned chain ends with the root, as istiod's does: Istio's clients
//! take the last certificate of `cert_chain` as the root. warren's client
//! drops a trailing self-signed certificate before presenting the chain
//! (peers have the roots already).

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{ServerConfig, pki_types::CertificateDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::{Request, Response, Status, transport::server::Connected};
use tracing::{info, warn};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use warren_pki::{
    api::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
    ca::{Authority, CaError},
    identity::{NodeId, SpiffeId, TrustDomain, ca_service_id},
    tls::{handshake_error, validity_of},
    transport::{self, TransportError},
};

/// A client that does not finish its handshake in this time is dropped, so
/// that stalled connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections are closed (gracefully) after this long.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(15 * 60);
/// Requests larger than this are refused before they are decoded; the
/// policy's CSR limit (16 KiB by default) refuses smaller ones with a reason.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the workloads config is for trust domain {config}, but the CA signs for {ca}")]
    TrustDomainMismatch { config: String, ca: String },
    #[error("gRPC server: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// A workload identity placed on a node: that node may obtain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub identity: SpiffeId,
    /// The node's name, as its node credential names it.
    pub node: String,
}

/// The CA service, ready to serve.
pub struct CaServer {
    tls: Arc<ServerConfig>,
    handler: Handler,
}

impl CaServer {
    /// Issues the service's own TLS certificate (identity
    /// `spiffe://<td>/warren/ca`, key generated here and kept in memory only;
    /// valid as long as the signing certificate) and learns from `placements`
    /// (of `trust_domain`) which node runs which identities.
    pub fn new(
        authority: Authority,
        trust_domain: &TrustDomain,
        placements: &[Placement],
    ) -> Result<Self, ServiceError> {
        let ca_domain = authority.policy().trust_domain.clone();
        let view = Placements {
            trust_domain: ca_domain.clone(),
            current: Arc::new(RwLock::new(Arc::new(HashMap::new()))),
        };
        view.update(trust_domain, placements)?;

        let lifetime = authority
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let own = authority.issue_credential(&ca_service_id(&ca_domain), lifetime)?;
        let tls = transport::server_config(&own, authority.roots(), ca_domain)?;
        let root = root_above(authority.chain(), authority.roots().roots());
        Ok(Self {
            tls,
            handler: Handler {
                authority: Arc::new(authority),
                placements: view,
                root,
            },
        })
    }

    /// A handle to replace the CA's view of the cluster while it serves.
    pub fn placements(&self) -> Placements {
        self.handler.placements.clone()
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServiceError> {
        let (streams, accepted) = mpsc::channel(64);
        let accept = tokio::spawn(accept_loop(listener, TlsAcceptor::from(self.tls), streams));
        let incoming = futures_util::stream::unfold(accepted, |mut accepted| async move {
            let stream = accepted.recv().await?;
            Some((Ok::<_, io::Error>(stream), accepted))
        });
        let result = tonic::transport::Server::builder()
            // Clients reconnect now and then, so that a renewed node
            // credential or a rotated root comes into use.
            .max_connection_age(MAX_CONNECTION_AGE)
            .add_service(
                IstioCertificateServiceServer::new(self.handler)
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        accept.abort();
        Ok(result?)
    }
}

/// Accepts TCP connections and hands each, once its TLS handshake is done and
/// its node known, to the gRPC server. Handshakes run concurrently, so a slow
/// client holds up nobody.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    streams: mpsc::Sender<NodeStream>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!(%error, "CA service cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    warn!(%peer, error = handshake_error(&error), "CA client refused at TLS handshake");
                    return;
                }
                Err(_) => {
                    warn!(%peer, "CA client did not finish its TLS handshake in time");
                    return;
                }
            };
            // The verifier accepted exactly one node identity; read it back,
            // and when its credential expires.
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first());
            let node = leaf.map(|leaf| (transport::node_of(leaf), validity_of(leaf)));
            match node {
                Some((Ok(node), Ok((_, not_after)))) => {
                    let peer = Peer { node, not_after };
                    let _ = streams.send(NodeStream { tls, peer }).await;
                }
                _ => warn!(%peer, "CA client without a node identity after its handshake"),
            }
        });
    }
}

/// A client's TLS connection, with the node it authenticated as: tonic puts
/// the node into each request's extensions.
struct NodeStream {
    tls: TlsStream<TcpStream>,
    peer: Peer,
}

/// The node a connection authenticated as. Its credential is checked at the
/// handshake, but connections last: each request checks it is still valid.
#[derive(Clone)]
struct Peer {
    node: NodeId,
    not_after: SystemTime,
}

impl Connected for NodeStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for NodeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The CA's view of the cluster: for each workload identity, the nodes that
/// run a workload with it. Cheap to clone; every clone sees updates.
#[derive(Clone)]
pub struct Placements {
    trust_domain: TrustDomain,
    current: Arc<RwLock<Arc<NodesById>>>,
}

type NodesById = HashMap<SpiffeId, BTreeSet<String>>;

impl Placements {
    /// Replaces the view with `placements` (which must be of the CA's trust
    /// domain). Requests under way finish with the view they started with.
    pub fn update(
        &self,
        trust_domain: &TrustDomain,
        placements: &[Placement],
    ) -> Result<(), ServiceError> {
        if *trust_domain != self.trust_domain {
            return Err(ServiceError::TrustDomainMismatch {
                config: trust_domain.to_string(),
                ca: self.trust_domain.to_string(),
            });
        }
        let mut nodes = NodesById::new();
        for placement in placements {
            nodes
                .entry(placement.identity.clone())
                .or_default()
                .insert(placement.node.clone());
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(nodes);
        Ok(())
    }

    fn get(&self) -> Arc<NodesById> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

struct Handler {
    authority: Arc<Authority>,
    placements: Placements,
    /// The root the signing chain ends at, appended to every response
    /// (None when the signing certificate is itself the root).
    root: Option<String>,
}

impl Handler {
    /// Whether `node` may obtain `id`; if not, why, in words that name both.
    fn authorize(&self, node: &NodeId, id: &SpiffeId) -> Result<(), String> {
        let here = node.name();
        match self.placements.get().get(id) {
            Some(nodes) if nodes.contains(here) => Ok(()),
            Some(nodes) => Err(format!(
                "node {here} runs no workload with this identity (it runs on {})",
                nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            )),
            None => Err(format!(
                "node {here} asked for it, but no workload in the CA's workloads config has it"
            )),
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Handler {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let Some(Peer { node, not_after }) = request.extensions().get::<Peer>().cloned() else {
            // Every connection comes through `accept_loop`, which sets it.
            return Err(Status::unauthenticated(
                "no node identity on this connection",
            ));
        };
        if SystemTime::now() >= not_after {
            warn!(
                node = node.name(),
                "refused: the node credential has expired"
            );
            return Err(Status::unauthenticated(format!(
                "the node credential of {node} expired at {}",
                humantime::format_rfc3339_seconds(not_after)
            )));
        }
        // The metadata field is accepted, for Istio's clients, and ignored.
        let request = request.into_inner();
        let Ok(seconds) = u64::try_from(request.validity_duration) else {
            warn!(
                node = node.name(),
                requested = request.validity_duration,
                "refused: negative validity"
            );
            return Err(Status::invalid_argument(
                "validity_duration must not be negative (0 asks for the default)",
            ));
        };
        let requested = Duration::from_secs(seconds);
        let mut asked = None;
        let signed = self.authority.sign(&request.csr, requested, |id| {
            asked = Some(id.clone());
            self.authorize(&node, id)
        });
        let identity = asked.as_ref().map(ToString::to_string);
        match signed {
            Ok(mut chain) => {
                info!(
                    node = node.name(),
                    identity,
                    requested_seconds = seconds,
                    "signed a workload certificate"
                );
                chain.extend(self.root.clone());
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
            Err(error @ CaError::Unauthorized { .. }) => {
                warn!(node = node.name(), identity, reason = %error, "refused: not authorized");
                Err(Status::permission_denied(error.to_string()))
            }
            Err(error) if error.is_bad_request() => {
                warn!(node = node.name(), identity, reason = %error, "refused: bad request");
                Err(Status::invalid_argument(error.to_string()))
            }
            Err(error) => {
                warn!(node = node.name(), identity, %error, "cannot sign");
                Err(Status::internal(format!("the CA cannot sign: {error}")))
            }
        }
    }
}

/// The root of `roots` that the top of `chain` was issued by, as PEM; None if
/// the top is itself self-signed (it is then the root) or none matches by
/// name and key identifier.
fn root_above(chain: &[CertificateDer<'_>], roots: &[CertificateDer<'_>]) -> Option<String> {
    let top = X509Certificate::from_der(chain.last()?).ok()?.1;
    if top.issuer().as_raw() == top.subject().as_raw() {
        return None;
    }
    let top_aki = key_identifier(&top, true);
    roots
        .iter()
        .find(|root| {
            let Ok((_, root_cert)) = X509Certificate::from_der(root) else {
                return false;
            };
            let ski = key_identifier(&root_cert, false);
            root_cert.subject().as_raw() == top.issuer().as_raw()
                && (top_aki.is_none() || ski.is_none() || top_aki == ski)
        })
        .map(|root| {
            pem::encode_config(
                &pem::Pem::new("CERTIFICATE", root.to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        })
}

/// A certificate's authority key identifier (`authority`) or its subject key
/// identifier.
fn key_identifier(cert: &X509Certificate<'_>, authority: bool) -> Option<Vec<u8>> {
    use x509_parser::extensions::ParsedExtension;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) if authority => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(ski) if !authority => Some(ski.0.to_vec()),
            _ => None,
        })
}
