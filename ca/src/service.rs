//! `warren-ca serve`: the CA as a gRPC service speaking Istio's certificate
//! API (`istio.v1.auth.IstioCertificateService/CreateCertificate`) over TLS,
//! to callers that are nodes, authenticated one of two ways ([`Callers`]):
//!
//! - without Kubernetes, by their node credential (mutual TLS), placed on
//!   nodes by the workloads file ([`Placements`]);
//! - on Kubernetes, by the projected service-account token of the agent's
//!   Pod (`authorization: Bearer`, as Istio's agents send it), placed by the
//!   CA's own watch of Pods ([`crate::kubernetes`]).
//!
//! Node authorization: a node may obtain the identity of a workload only if
//! the CA's view of the cluster places a workload with that identity on that
//! node. A compromised node can then mint only the identities it already
//! runs.
//!
//! What it signs and refuses, and why, is counted in [`crate::metrics`]
//! (the reasons there, never the callers' words).
//!
//! The returned chain ends with the root, as istiod's does: Istio's clients
//! take the last certificate of `cert_chain` as the root. warren's client
//! drops a trailing self-signed certificate before presenting the chain
//! (peers have the roots already).

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{ServerConfig, pki_types::CertificateDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::{Request, Response, Status, transport::server::Connected};
use tracing::{info, warn};
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    kubernetes::{Authenticator, Caller, Refusal},
    metrics::{Authentication, ConnectionRefusal, Metrics, RefusalReason},
};
use warren_daemon::{
    limits::{AddressSlot, PerAddress},
    metrics::Live,
};
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
/// Request bodies are read before the caller is authenticated, so this, the
/// flow-control windows and the limits below bound what anyone who reaches
/// the CA can make it hold.
const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// HTTP/2 flow-control windows: what one stream, and one connection, may
/// have in flight to the CA.
const STREAM_WINDOW: u32 = 32 * 1024;
const CONNECTION_WINDOW: u32 = 64 * 1024;
/// How many connections the service holds open: in all, and from one
/// address. An agent needs one; on Kubernetes anyone who can reach the CA can
/// connect (tokens are checked per request), so neither may pile up without
/// bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_address: usize,
}

impl Default for ConnectionLimits {
    /// Room for the nodes of a large cluster (an agent needs one), and a
    /// share per address that a few agents behind one NAT fit in. With the
    /// windows above, all of them together hold at most about 128 MiB of
    /// requests in flight: half the Deployment's memory limit.
    fn default() -> Self {
        Self {
            total: 2048,
            per_address: 16,
        }
    }
}
/// Requests in flight on one connection; an agent renews a few at a time
/// (more wait their turn).
const MAX_STREAMS_PER_CONNECTION: u32 = 4;
/// A request (its token's review included) takes at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections are probed, and dropped when the peer is gone.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Who may ask, and how the CA knows which node they are.
pub enum Callers {
    /// Node credentials (mutual TLS) and the placements of the workloads file.
    NodeCredentials(Placements),
    /// Agents' service-account tokens, and the CA's watch of Pods.
    Kubernetes(Arc<Authenticator>),
}

/// The CA service, ready to serve.
pub struct CaServer {
    tls: Arc<ServerConfig>,
    handler: Handler,
    limits: ConnectionLimits,
    /// When the signing chain, up to its root, expires.
    not_after: SystemTime,
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
        let view = Placements {
            trust_domain: authority.policy().trust_domain.clone(),
            current: Arc::new(RwLock::new(Arc::new(HashMap::new()))),
        };
        view.update(trust_domain, placements)?;
        Self::serving(authority, Callers::NodeCredentials(view))
    }

    /// The same service for agents on Kubernetes: no client certificate,
    /// a service-account token in each request instead.
    pub fn with_tokens(
        authority: Authority,
        authenticator: Arc<Authenticator>,
    ) -> Result<Self, ServiceError> {
        Self::serving(authority, Callers::Kubernetes(authenticator))
    }

    fn serving(authority: Authority, callers: Callers) -> Result<Self, ServiceError> {
        let ca_domain = authority.policy().trust_domain.clone();
        let lifetime = authority
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let own = authority.issue_credential(&ca_service_id(&ca_domain), lifetime)?;
        let tls = match &callers {
            Callers::NodeCredentials(_) => {
                transport::server_config(&own, authority.roots(), ca_domain)?
            }
            Callers::Kubernetes(_) => transport::token_server_config(&own)?,
        };
        let root = root_above(authority.chain(), authority.roots().roots());
        // The root may expire before the certificates under it: X.509 does
        // not nest validities.
        let not_after = root
            .and_then(|root| validity_of(root).ok())
            .map_or(authority.not_after(), |(_, end)| {
                end.min(authority.not_after())
            });
        let root = root.map(|root| {
            pem::encode_config(
                &pem::Pem::new("CERTIFICATE", root.to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        });
        Ok(Self {
            tls,
            limits: ConnectionLimits::default(),
            not_after,
            handler: Handler {
                authority: Arc::new(authority),
                callers,
                root,
                metrics: Metrics::default(),
            },
        })
    }

    /// Counting into `metrics` instead of nowhere; also tells them when
    /// the signing chain expires.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        metrics.serving(self.handler.authentication(), self.not_after);
        self.handler.metrics = metrics;
        self
    }

    /// With these connection limits instead of the defaults.
    pub fn with_limits(self, limits: ConnectionLimits) -> Self {
        Self { limits, ..self }
    }

    /// A handle to replace the CA's view of the cluster while it serves:
    /// with node credentials only (on Kubernetes, the Pod watch keeps it).
    pub fn placements(&self) -> Option<Placements> {
        match &self.handler.callers {
            Callers::NodeCredentials(placements) => Some(placements.clone()),
            Callers::Kubernetes(_) => None,
        }
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServiceError> {
        let (streams, accepted) = mpsc::channel(64);
        let tokens = matches!(self.handler.callers, Callers::Kubernetes(_));
        let accept = tokio::spawn(accept_loop(
            listener,
            TlsAcceptor::from(self.tls),
            streams,
            tokens,
            self.limits,
            self.handler.metrics.clone(),
        ));
        let incoming = futures_util::stream::unfold(accepted, |mut accepted| async move {
            let stream = accepted.recv().await?;
            Some((Ok::<_, io::Error>(stream), accepted))
        });
        let result = tonic::transport::Server::builder()
            // Clients reconnect now and then, so that a renewed node
            // credential or a rotated root comes into use.
            .max_connection_age(MAX_CONNECTION_AGE)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
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
    tokens: bool,
    limits: ConnectionLimits,
    metrics: Metrics,
) {
    let open = Arc::new(Semaphore::new(limits.total));
    let per_address = PerAddress::new(limits.per_address);
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
        let Ok(permit) = open.clone().try_acquire_owned() else {
            warn!(%peer, limit = limits.total, "CA client refused: too many connections");
            metrics.connection_refused(ConnectionRefusal::TooManyConnections);
            continue;
        };
        let Some(slot) = per_address.take(peer.ip()) else {
            warn!(
                %peer,
                limit = limits.per_address,
                "CA client refused: too many connections from its address"
            );
            metrics.connection_refused(ConnectionRefusal::TooManyFromAddress);
            continue;
        };
        let limits = (permit, slot, metrics.connection_opened());
        let acceptor = acceptor.clone();
        let streams = streams.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    warn!(%peer, error = handshake_error(&error), "CA client refused at TLS handshake");
                    metrics.connection_refused(ConnectionRefusal::HandshakeFailed);
                    return;
                }
                Err(_) => {
                    warn!(%peer, "CA client did not finish its TLS handshake in time");
                    metrics.connection_refused(ConnectionRefusal::HandshakeTimeout);
                    return;
                }
            };
            // With node credentials, the verifier accepted exactly one node
            // identity: read it back, and when its credential expires. With
            // tokens there is no client certificate; each request carries
            // its token instead.
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first());
            let node = leaf.map(|leaf| (transport::node_of(leaf), validity_of(leaf)));
            let node = match node {
                Some((Ok(node), Ok((_, not_after)))) => Some(Peer { node, not_after }),
                None if tokens => None,
                _ => {
                    warn!(%peer, "CA client without a node identity after its handshake");
                    metrics.connection_refused(ConnectionRefusal::HandshakeFailed);
                    return;
                }
            };
            let connection = Connection { addr: peer, node };
            let _ = streams
                .send(NodeStream {
                    tls,
                    connection,
                    _limits: limits,
                })
                .await;
        });
    }
}

/// A client's TLS connection, with who it is: tonic puts that into each
/// request's extensions. Holds its places under the connection limits (and
/// is counted open) until it closes.
struct NodeStream {
    tls: TlsStream<TcpStream>,
    connection: Connection,
    _limits: (OwnedSemaphorePermit, AddressSlot, Live),
}

/// Who is at the other end of a connection.
#[derive(Clone)]
struct Connection {
    addr: SocketAddr,
    /// The node its credential names (none when callers present tokens).
    node: Option<Peer>,
}

/// The node a connection authenticated as. Its credential is checked at the
/// handshake, but connections last: each request checks it is still valid.
#[derive(Clone)]
struct Peer {
    node: NodeId,
    not_after: SystemTime,
}

impl Connected for NodeStream {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        self.connection.clone()
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
    callers: Callers,
    /// The root the signing chain ends at, appended to every response
    /// (None when the signing certificate is itself the root).
    root: Option<String>,
    metrics: Metrics,
}

/// Who a request came from, once authenticated.
enum Requester {
    Node(NodeId),
    Agent(Caller),
}

impl Requester {
    fn node(&self) -> &str {
        match self {
            Self::Node(node) => node.name(),
            Self::Agent(caller) => &caller.node,
        }
    }
}

impl Handler {
    fn authentication(&self) -> Authentication {
        match self.callers {
            Callers::NodeCredentials(_) => Authentication::NodeCredential,
            Callers::Kubernetes(_) => Authentication::Token,
        }
    }

    /// Counts a refusal for `reason`, answered with `status`.
    fn refuse(&self, reason: RefusalReason, status: Status) -> Status {
        self.metrics.refused(reason);
        status
    }

    /// Who sent `request`: the node of its connection's credential, or the
    /// agent whose token it carries. Refusals are logged and counted here.
    async fn requester<T>(&self, request: &Request<T>) -> Result<Requester, Status> {
        match &self.callers {
            Callers::NodeCredentials(_) => {
                let Some(Connection {
                    node: Some(Peer { node, not_after }),
                    ..
                }) = request.extensions().get::<Connection>().cloned()
                else {
                    // Every connection comes through `accept_loop`, which sets it.
                    return Err(self.refuse(
                        RefusalReason::InternalError,
                        Status::unauthenticated("no node identity on this connection"),
                    ));
                };
                if SystemTime::now() >= not_after {
                    warn!(
                        node = node.name(),
                        "refused: the node credential has expired"
                    );
                    return Err(self.refuse(
                        RefusalReason::NodeCredentialExpired,
                        Status::unauthenticated(format!(
                            "the node credential of {node} expired at {}",
                            humantime::format_rfc3339_seconds(not_after)
                        )),
                    ));
                }
                Ok(Requester::Node(node))
            }
            Callers::Kubernetes(authenticator) => {
                let peer = request
                    .extensions()
                    .get::<Connection>()
                    .map(|c| c.addr.to_string())
                    .unwrap_or_default();
                let token = match bearer_token(request) {
                    Ok(token) => token,
                    Err(why) => {
                        warn!(%peer, reason = why, "refused: not authenticated");
                        return Err(
                            self.refuse(RefusalReason::TokenMissing, Status::unauthenticated(why))
                        );
                    }
                };
                match authenticator.authenticate(token).await {
                    Ok(caller) => Ok(Requester::Agent(caller)),
                    Err(refusal) => {
                        // The reason names the token's holder, never the token.
                        warn!(%peer, reason = %refusal, "refused: not authenticated");
                        self.metrics.refused(RefusalReason::of_refusal(&refusal));
                        Err(match refusal {
                            Refusal::Unauthenticated(why) => Status::unauthenticated(why),
                            Refusal::Denied(why) => Status::permission_denied(why),
                            Refusal::Unavailable(why) => Status::unavailable(why),
                        })
                    }
                }
            }
        }
    }

    /// Whether `requester` may obtain `id`; if not, why, in words that name
    /// the node.
    fn authorize(&self, requester: &Requester, id: &SpiffeId) -> Result<(), String> {
        match (&self.callers, requester) {
            (Callers::NodeCredentials(placements), Requester::Node(node)) => {
                Self::placed(placements, node, id)
            }
            (Callers::Kubernetes(authenticator), Requester::Agent(caller)) => {
                authenticator.authorize(caller, id.namespace(), id.service_account())
            }
            // `requester` authenticated the way `callers` asks.
            _ => Err("the request was authenticated another way than this CA's".into()),
        }
    }

    /// Whether the workloads file places `id` on `node`.
    fn placed(placements: &Placements, node: &NodeId, id: &SpiffeId) -> Result<(), String> {
        let here = node.name();
        match placements.get().get(id) {
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
        let requester = self.requester(&request).await?;
        let node = requester.node();
        // The metadata field is accepted, for Istio's clients, and ignored.
        let request = request.into_inner();
        let Ok(seconds) = u64::try_from(request.validity_duration) else {
            warn!(
                node,
                requested = request.validity_duration,
                "refused: negative validity"
            );
            return Err(self.refuse(
                RefusalReason::InvalidValidity,
                Status::invalid_argument(
                    "validity_duration must not be negative (0 asks for the default)",
                ),
            ));
        };
        let requested = Duration::from_secs(seconds);
        let mut asked = None;
        let signed = self.authority.sign(&request.csr, requested, |id| {
            asked = Some(id.clone());
            self.authorize(&requester, id)
        });
        let identity = asked.as_ref().map(ToString::to_string);
        match signed {
            Ok(mut chain) => {
                info!(
                    node,
                    identity,
                    requested_seconds = seconds,
                    "signed a workload certificate"
                );
                self.metrics.signed(self.authentication());
                chain.extend(self.root.clone());
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
            Err(error) => {
                let reason = RefusalReason::of_ca_error(&error);
                let status = match &error {
                    CaError::Unauthorized { .. } => {
                        warn!(node, identity, reason = %error, "refused: not authorized");
                        Status::permission_denied(error.to_string())
                    }
                    _ if error.is_bad_request() => {
                        warn!(node, identity, reason = %error, "refused: bad request");
                        Status::invalid_argument(error.to_string())
                    }
                    _ => {
                        warn!(node, identity, %error, "cannot sign");
                        Status::internal(format!("the CA cannot sign: {error}"))
                    }
                };
                Err(self.refuse(reason, status))
            }
        }
    }
}

/// The root of `roots` that the top of `chain` was issued by; None if the
/// top is itself self-signed (it is then the root) or none matches by name
/// and key identifier.
fn root_above<'r>(
    chain: &[CertificateDer<'_>],
    roots: &'r [CertificateDer<'r>],
) -> Option<&'r CertificateDer<'r>> {
    let top = X509Certificate::from_der(chain.last()?).ok()?.1;
    if top.issuer().as_raw() == top.subject().as_raw() {
        return None;
    }
    let top_aki = key_identifier(&top, true);
    roots.iter().find(|root| {
        let Ok((_, root_cert)) = X509Certificate::from_der(root) else {
            return false;
        };
        let ski = key_identifier(&root_cert, false);
        root_cert.subject().as_raw() == top.issuer().as_raw()
            && (top_aki.is_none() || ski.is_none() || top_aki == ski)
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

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token<T>(request: &Request<T>) -> Result<&str, &'static str> {
    let Some(value) = request.metadata().get("authorization") else {
        return Err("no service-account token: send `authorization: Bearer <token>`");
    };
    let value = value
        .to_str()
        .map_err(|_| "the authorization header is not text")?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
        _ => Err("the authorization header is not `Bearer <token>`"),
    }
}
