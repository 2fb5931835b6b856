//! The per-pod HBONE listener: `<pod IP>:15008` inside the pod's namespace.
//!
//! The server presents the pod's own certificate and requires a client
//! certificate from the mesh (same roots, same trust domain). Each CONNECT
//! stream is checked (method, authority, that it is for this very pod, not
//! for a proxy port) and then delivered to the application, which sees the
//! client pod's address as its peer.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::{PodProxy, transparent};
use warren_daemon::logging::Chain;
use warren_pki::{
    identity::SpiffeId,
    tls::{TlsError, TrustBundle, WorkloadCertificate, handshake_error},
};

use crate::{
    hbone::{self, Refusal, Trace, copy::relay, server},
    mesh::policy::MtlsMode,
    metrics::traffic::{Connection, Outcome, Path, Reporter, ResponseFlag},
    tls,
};
use warren_common::INBOUND_PLAINTEXT_PORT;

/// Concurrent HBONE connections one pod accepts (each carries up to 200
/// streams, so this is far above what a healthy mesh needs).
pub const MAX_CONNECTIONS_PER_POD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot listen on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Transparent(#[from] transparent::TransparentError),
}

/// A certificate valid for less than this from now is refused: it would be
/// due for renewal at once.
const MIN_USABLE_LIFETIME: Duration = Duration::from_secs(1);

/// Everything the inbound side of one pod needs: the pod, and the TLS server
/// configuration made from its current certificate and roots.
pub struct PodInbound {
    pub pod: Arc<PodProxy>,
    acceptor: Mutex<Option<Acceptor>>,
}

/// A TLS acceptor and what it was made from, to tell when it is stale.
struct Acceptor {
    certificate: Arc<WorkloadCertificate>,
    trust: Arc<TrustBundle>,
    tls: TlsAcceptor,
}

impl PodInbound {
    pub async fn new(pod: Arc<PodProxy>) -> Result<Self, InboundError> {
        transparent::prepare_pod(&pod.netns).await?;
        Ok(Self {
            pod,
            acceptor: Mutex::new(None),
        })
    }

    /// Switches the pod, both ways, to a new certificate. A certificate that
    /// cannot make a server configuration is refused, and the old one stays
    /// in use.
    pub async fn renew(&self, certificate: WorkloadCertificate) -> Result<(), TlsError> {
        // A clock far off the CA's, or a CA whose own certificate is about
        // to expire, can hand out a certificate that is useless here; the
        // current one is better kept.
        let now = SystemTime::now();
        if !certificate.is_valid_at(now) || certificate.lifetime() < MIN_USABLE_LIFETIME {
            return Err(TlsError::Unusable {
                not_before: humantime::format_rfc3339_seconds(certificate.not_before()).to_string(),
                not_after: humantime::format_rfc3339_seconds(certificate.not_after()).to_string(),
            });
        }
        let certificate = Arc::new(certificate);
        self.acceptor(&certificate, &self.pod.trust())?;
        self.pod.renew(certificate).await;
        Ok(())
    }

    /// The TLS acceptor for `certificate` and `trust`, made once and reused
    /// until either changes.
    fn acceptor(
        &self,
        certificate: &Arc<WorkloadCertificate>,
        trust: &Arc<TrustBundle>,
    ) -> Result<TlsAcceptor, TlsError> {
        let mut cached = self.acceptor.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(current) = &*cached
            && Arc::ptr_eq(&current.certificate, certificate)
            && Arc::ptr_eq(&current.trust, trust)
        {
            return Ok(current.tls.clone());
        }
        let tls = TlsAcceptor::from(tls::server_config(certificate, trust)?);
        *cached = Some(Acceptor {
            certificate: certificate.clone(),
            trust: trust.clone(),
            tls: tls.clone(),
        });
        Ok(tls)
    }

    pub async fn bind(&self) -> Result<TcpListener, InboundError> {
        self.listen(self.pod.hbone_addr()).await
    }

    /// The listener the pod's ingress program hands plaintext connections
    /// to, when the pod is PERMISSIVE. It is on loopback: nothing reaches it
    /// but what the kernel program assigns to it (and the pod itself).
    pub async fn bind_plaintext(&self) -> Result<TcpListener, InboundError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT));
        self.listen(addr).await
    }

    async fn listen(&self, addr: SocketAddr) -> Result<TcpListener, InboundError> {
        self.pod
            .netns
            .listen(addr)
            .await
            .map_err(|source| InboundError::Listen {
                addr,
                netns: self.pod.netns.path().display().to_string(),
                source,
            })
    }
}

/// Accepts the plaintext connections that the ingress program hands over
/// (PERMISSIVE pods), until the task is aborted. They carry no identity:
/// authorization sees only their source address.
pub async fn serve_plaintext(listener: TcpListener, inbound: Arc<PodInbound>) {
    accept_loop(listener, inbound, "plaintext", |inbound, tcp, peer| {
        inbound.plaintext(tcp, peer)
    })
    .await
}

/// Accepts HBONE connections until the task is aborted.
pub async fn serve(listener: TcpListener, inbound: Arc<PodInbound>) {
    accept_loop(listener, inbound, "HBONE", |inbound, tcp, peer| {
        inbound.connection(tcp, peer)
    })
    .await
}

/// Accepts connections on one of a pod's listeners and has `handle` serve
/// each on a task of its own.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    inbound: Arc<PodInbound>,
    kind: &'static str,
    handle: F,
) where
    F: Fn(Arc<PodInbound>, TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // One peer opening connection after connection must not use up the
    // agent's file descriptors, which every pod shares.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_POD));
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(
                        workload = %inbound.pod.workload.qualified_name(),
                        %peer,
                        limit = MAX_CONNECTIONS_PER_POD,
                        "{kind} connection refused: too many connections to this pod"
                    );
                    continue;
                };
                let serving = handle(inbound.clone(), tcp, peer);
                tokio::spawn(async move {
                    serving.await;
                    drop(slot);
                });
            }
            Err(error) => {
                warn!(workload = %inbound.pod.workload.qualified_name(), error = %Chain(&error), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl PodInbound {
    /// A plaintext connection handed over by the ingress program: its local
    /// address is where the client was going.
    async fn plaintext(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let Ok(dst) = client.local_addr() else { return };
        let id = super::connection_id();
        let span = debug_span!("inbound", connection = id);
        self.plaintext_in_span(client, peer, dst, id)
            .instrument(span)
            .await
    }

    async fn plaintext_in_span(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        id: u64,
    ) {
        let workload = self.pod.workload.qualified_name();
        let refuse = |reason: &str| {
            warn!(%workload, src = %peer, %dst, %reason, connection = id, "plaintext connection refused");
        };
        // Only what the kernel handed over: connections to the pod's own
        // address, not to a proxy port, from a peer outside the pod.
        if dst.ip() != IpAddr::V4(self.pod.workload.ip) || hbone::PROXY_PORTS.contains(&dst.port())
        {
            return refuse("not a connection to the pod's application");
        }
        let IpAddr::V4(src_ip) = peer.ip() else {
            return refuse("only IPv4 clients are supported");
        };
        let mode = self
            .pod
            .with_policies(|policies, workload| policies.mtls_mode(workload, dst.port()));
        if mode == MtlsMode::Strict {
            // The kernel drops these; this is a mode change racing a SYN.
            return refuse("the pod's mTLS mode is STRICT");
        }
        // Plaintext proves no identity: the client is described by its
        // address alone (which the egress check of its own node vouches for,
        // if it is a pod of the mesh).
        let source = self.pod.state.borrow().workload_by_ip(src_ip).cloned();
        let me = self.pod.current();
        let tracked = self.pod.metrics.traffic.open(&Connection {
            reporter: Reporter::destination,
            path: Path::PlaintextInbound,
            id,
            trace: None,
            src: peer,
            dst,
            source: source.as_deref(),
            source_identity: None,
            destination: Some(&me),
            service: None,
        });
        let decision = self.pod.authorize(None, peer.ip(), dst);
        if !decision.allowed {
            let reason = format!("denied by policy: {}", decision.reason);
            refuse(&reason);
            return tracked.close(Outcome::failed(
                ResponseFlag::Denied,
                Some(decision.reason),
                reason,
            ));
        }
        // The delivery socket takes an ephemeral port of the client's
        // address; should it be the client's own port, the tuple is this very
        // connection's and the connect fails: a second try takes another.
        let connected = match transparent::connect(&self.pod.netns, src_ip, dst).await {
            Err(_) => transparent::connect(&self.pod.netns, src_ip, dst).await,
            ok => ok,
        };
        let app = match connected {
            Ok(app) => app,
            Err(e) => {
                let reason = format!("connecting to the application failed: {e}");
                refuse(&reason);
                return tracked.close(Outcome::failed(
                    ResponseFlag::ConnectFailed,
                    Some(decision.reason),
                    reason,
                ));
            }
        };
        debug!(
            %workload, src = %peer, %dst, %mode, policy = %decision.reason,
            "accepted plaintext connection"
        );
        let mut client = client;
        let mut app = tracked.server_side(app);
        match tokio::io::copy_bidirectional(&mut client, &mut app).await {
            Ok(_) => tracked.close(Outcome::completed(Some(decision.reason))),
            Err(error) => tracked.close(Outcome::failed(
                ResponseFlag::None,
                Some(decision.reason),
                Chain(&error).to_string(),
            )),
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let workload = self.pod.workload.qualified_name();
        // Subscribed before reading, so that a renewal or a root removal
        // from now on ends this connection.
        let mut renewed = self.pod.certificate_changes();
        let mut state = self.pod.state.clone();
        let certificate = renewed
            .borrow_and_update()
            .clone()
            .filter(|c| c.is_valid_at(SystemTime::now()));
        let Some(certificate) = certificate else {
            warn!(%workload, %peer, "HBONE connection refused: the workload has no valid certificate");
            return;
        };
        let trust = state.borrow_and_update().trust().clone();
        let acceptor = match self.acceptor(&certificate, &trust) {
            Ok(acceptor) => acceptor,
            Err(error) => {
                warn!(%workload, %peer, error = %Chain(&error), "HBONE connection refused: no TLS configuration");
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        // A client whose node vanished never closes its connections; TCP
        // keepalive finds out (in about 90 s) and frees them.
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let accepted = timeout(
            hbone::CONNECT_TIMEOUT,
            acceptor.accept(hbone::Transport::new(tcp)),
        );
        let mut tls = match accepted.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let error = handshake_error(&error);
                warn!(%workload, %peer, %error, "HBONE connection refused: TLS handshake failed");
                return;
            }
            Err(_) => {
                warn!(%workload, %peer, "HBONE connection refused: TLS handshake timed out");
                return;
            }
        };
        hbone::tune_tls(tls.get_mut().1);
        let Some(peer_identity) = tls::peer_identity(tls.get_ref().1) else {
            // The verifier demands one; this is a belt to those braces.
            warn!(%workload, %peer, "HBONE connection refused: no peer identity");
            return;
        };
        info!(%workload, %peer, %peer_identity, "HBONE connection accepted");
        let this = self.clone();
        let identity = peer_identity.clone();
        // No connection takes new streams after the certificates it was made
        // with, or the roots it was checked against: when either end's
        // certificate expires, ours is renewed, or a root is no longer
        // trusted, the client is asked to go away (its streams finish) and
        // reconnect.
        let not_after = tls::peer_not_after(tls.get_ref().1)
            .map_or(certificate.not_after(), |peer| {
                peer.min(certificate.not_after())
            });
        let expires_in = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let wind_down = async move {
            let root_removed = async {
                while state.changed().await.is_ok() {
                    if !state.borrow().trust().includes(&trust) {
                        return;
                    }
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                _ = renewed.changed() => {}
                () = tokio::time::sleep(expires_in) => {}
                () = root_removed => {}
            }
        };
        let result = server::serve(tls, wind_down, move |request, respond| {
            this.clone()
                .stream(identity.clone(), peer, request, respond)
        })
        .await;
        if let Err(error) = result {
            warn!(%workload, %peer, %peer_identity, error = %Chain(&error), "HBONE connection ended with an error");
        }
    }

    /// Serves one CONNECT stream, continuing the client's trace: its
    /// warnings and access line carry the connection's id and trace id, and
    /// its debug lines are in a span that does (see `outbound`).
    async fn stream(
        self: Arc<Self>,
        peer_identity: SpiffeId,
        peer: SocketAddr,
        request: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        let id = super::connection_id();
        let trace = Trace::of(&request);
        let span = debug_span!(
            "inbound",
            connection = id,
            trace_id = %trace,
        );
        self.stream_in_span(peer_identity, peer, request, respond, id, trace)
            .instrument(span)
            .await
    }

    async fn stream_in_span(
        &self,
        peer_identity: SpiffeId,
        peer: SocketAddr,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        id: u64,
        trace: Trace,
    ) {
        let workload = self.pod.workload.qualified_name();
        let pod_ip = IpAddr::V4(self.pod.workload.ip);
        let forwarded = hbone::forwarded_for(&request);
        let dst = match hbone::check_request(&request, pod_ip) {
            Ok(dst) => dst,
            Err(refusal) => {
                warn!(
                    %workload, %peer, %peer_identity,
                    authority = %request.uri(),
                    status = refusal.status().as_u16(),
                    reason = %refusal,
                    connection = id,
                    trace_id = %trace,
                    "HBONE stream refused"
                );
                server::refuse(&mut respond, &refusal);
                return;
            }
        };
        // The client is the workload at the tunnel's source address, if
        // that is the identity it authenticated as.
        let source = match peer.ip() {
            IpAddr::V4(ip) => self.pod.state.borrow().workload_by_ip(ip).cloned(),
            IpAddr::V6(_) => None,
        };
        let me = self.pod.current();
        let tracked = self.pod.metrics.traffic.open(&Connection {
            reporter: Reporter::destination,
            path: Path::Hbone,
            id,
            trace: Some(trace),
            src: peer,
            dst,
            source: source.as_deref(),
            source_identity: Some(&peer_identity),
            destination: Some(&me),
            service: None,
        });
        let refused =
            |respond: &mut SendResponse<Bytes>, refusal: Refusal, policy: Option<String>| {
                warn!(
                    %workload, %peer_identity, src = %peer, %dst,
                    status = refusal.status().as_u16(),
                    reason = %refusal,
                    connection = id,
                    trace_id = %trace,
                    "HBONE stream refused"
                );
                server::refuse(respond, &refusal);
                let flag = match refusal {
                    Refusal::Denied(_) => ResponseFlag::Denied,
                    _ => ResponseFlag::ConnectFailed,
                };
                Outcome::failed(flag, policy, refusal.to_string())
            };
        let decision = self.pod.authorize(Some(&peer_identity), peer.ip(), dst);
        if !decision.allowed {
            let refusal = Refusal::Denied(decision.reason.clone());
            return tracked.close(refused(&mut respond, refusal, Some(decision.reason)));
        }
        // The application sees the address the tunnel came from: the client
        // pod's own (its agent dials from inside the client pod).
        let IpAddr::V4(src_ip) = peer.ip() else {
            // Pods are IPv4 here; an IPv6 peer cannot be one of them.
            let refusal = Refusal::Unreachable {
                dst,
                reason: format!("cannot deliver as {peer}: only IPv4 clients are supported"),
            };
            return tracked.close(refused(&mut respond, refusal, Some(decision.reason)));
        };
        let app = match transparent::connect(&self.pod.netns, src_ip, dst).await {
            Ok(app) => app,
            Err(e) => {
                let refusal = Refusal::Unreachable {
                    dst,
                    reason: e.to_string(),
                };
                return tracked.close(refused(&mut respond, refusal, Some(decision.reason)));
            }
        };
        let send = match server::accept(&mut respond) {
            Ok(send) => send,
            Err(error) => {
                let error = Chain(&error).to_string();
                warn!(%workload, %peer_identity, %error, connection = id, trace_id = %trace, "HBONE stream lost before it started");
                return tracked.close(Outcome::failed(
                    ResponseFlag::None,
                    Some(decision.reason),
                    error,
                ));
            }
        };
        // `src` is the address the tunnel came from; what the client claims
        // in its `forwarded` header is logged apart, as a claim.
        debug!(
            %workload,
            %peer_identity,
            src = %peer,
            claimed_src = %forwarded.map_or_else(|| "-".to_owned(), |f| f.to_string()),
            %dst,
            policy = %decision.reason,
            "accepted HBONE stream"
        );
        let app = tracked.server_side(app);
        match relay(app, send, request.into_body()).await {
            Ok(_) => tracked.close(Outcome::completed(Some(decision.reason))),
            Err(error) => tracked.close(Outcome::failed(
                ResponseFlag::None,
                Some(decision.reason),
                Chain(&error).to_string(),
            )),
        }
    }
}
