//! The per-pod HBONE listener: `<pod IP>:15008` inside the pod's namespace.
//!
//! The server presents the pod's own certificate and requires a client
//! certificate from the mesh (same roots, same trust domain). Each CONNECT
//! stream is checked (method, authority, that it is for this very pod, not
//! for a proxy port) and then delivered to the application, which sees the
//! client pod's address as its peer.
//!
//! Open connections answer to the policies in force, not only to those
//! that let them in: on every change of the mesh (policies, workloads,
//! roots) each open stream and plaintext connection is decided again, and
//! cut if it is now denied (or, plaintext, if its port is now STRICT). A
//! connection whose peer is no longer trusted (its certificate expired, its
//! root was removed) is asked to go away at once and its streams are cut
//! after the drain deadline (`limits.drainDeadline`, 10 s by default).
//!
//! Each accepted connection and each stream is charged to the pod's budget,
//! streams to their peer identity's too (`limits`): a peer opening streams
//! by the thousand gets 503s once over its share, and the pod's other peers
//! and the node's other pods are not affected.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use socket2::{SockRef, TcpKeepalive};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    time::{Instant, timeout},
};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::{PodProxy, transparent};
use warren_daemon::{limits::PerAddress, logging::Chain};
use warren_pki::{
    identity::SpiffeId,
    tls::{TlsError, TrustBundle, WorkloadCertificate, handshake_error},
};

use crate::{
    hbone::{self, Refusal, Trace, copy::relay, server},
    limits::{Direction, Peer, Permit},
    mesh::{Snapshot, policy::MtlsMode},
    metrics::traffic::{Connection, Counted, Outcome, Path, Reporter, ResponseFlag, Tracked},
    time::sleep_until,
    tls,
};
use warren_common::INBOUND_PLAINTEXT_PORT;

/// Concurrent HBONE connections one pod accepts (each carries up to 200
/// streams, so this is far above what a healthy mesh needs).
pub const MAX_CONNECTIONS_PER_POD: usize = 1024;
/// Of those, from one address (a client pod: its agent pools its streams,
/// 100 a connection): before the handshake the peer has no identity for
/// the limits to count, only an address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 128;

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

/// How an HBONE connection is coming to its end, as its streams see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Serving,
    /// The client was asked to go away (our certificate was renewed, say):
    /// streams in flight finish.
    WindDown,
    /// The peer is no longer trusted, for this reason: streams in flight
    /// are cut after the drain deadline.
    Revoked(Arc<str>),
}

/// Why an open connection is cut, for its log line and access line.
struct Cut {
    reason: String,
    flag: ResponseFlag,
    /// The policy that denies it, if one does.
    policy: Option<String>,
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    accept_loop(
        listener,
        inbound,
        "plaintext",
        None,
        |inbound, tcp, peer, permit| inbound.plaintext(tcp, peer, permit),
    )
    .await
}

/// Accepts HBONE connections until the task is aborted.
pub async fn serve(listener: TcpListener, inbound: Arc<PodInbound>) {
    let per_address = Some(MAX_CONNECTIONS_PER_ADDRESS);
    accept_loop(
        listener,
        inbound,
        "HBONE",
        per_address,
        |inbound, tcp, peer, permit| inbound.connection(tcp, peer, permit),
    )
    .await
}

/// Accepts connections on one of a pod's listeners and has `handle` serve
/// each on a task of its own.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    inbound: Arc<PodInbound>,
    kind: &'static str,
    per_address: Option<usize>,
    handle: F,
) where
    F: Fn(Arc<PodInbound>, TcpStream, SocketAddr, Permit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // One peer opening connection after connection must not use up the
    // agent's file descriptors, which every pod shares.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS_PER_POD));
    let addresses = per_address.map(PerAddress::new);
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let address = addresses.as_ref().map(|a| a.take(peer.ip()));
                let (Ok(slot), None | Some(Some(_))) =
                    (slots.clone().try_acquire_owned(), &address)
                else {
                    let _ = SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                    // An address's share, or the pod's: logged now and then.
                    if let Some(unlogged) = inbound.pod.budget.refusals.tick() {
                        warn!(
                            workload = %inbound.pod.workload.qualified_name(),
                            %peer,
                            per_pod = MAX_CONNECTIONS_PER_POD,
                            per_address = per_address.unwrap_or(MAX_CONNECTIONS_PER_POD),
                            refused_since_last_line = unlogged,
                            "{kind} connection refused: too many connections to this pod, or from this address"
                        );
                    }
                    continue;
                };
                let permit = match inbound.pod.budget.admit(Direction::Inbound, 1) {
                    Ok(permit) => permit,
                    Err(over) => {
                        let _ = SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                        inbound
                            .pod
                            .refused_over_limit(&format!("{kind} connection"), over);
                        continue;
                    }
                };
                let serving = handle(inbound.clone(), tcp, peer, permit);
                tokio::spawn(async move {
                    serving.await;
                    drop((slot, address));
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
    async fn plaintext(self: Arc<Self>, client: TcpStream, peer: SocketAddr, permit: Permit) {
        let Ok(dst) = client.local_addr() else { return };
        let id = super::connection_id();
        let span = debug_span!("inbound", connection = id);
        self.plaintext_in_span(client, peer, dst, id, permit)
            .instrument(span)
            .await
    }

    async fn plaintext_in_span(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
        id: u64,
        mut permit: Permit,
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
        if let Err(over) = permit.grow() {
            let reason = over.to_string();
            refuse(&reason);
            return tracked.close(Outcome::failed(
                ResponseFlag::ConnectFailed,
                Some(decision.reason),
                reason,
            ));
        }
        // The delivery socket takes a port of the client's address; should
        // it be the client's own port, the tuple is this very connection's
        // and the connect fails (EADDRNOTAVAIL): a second try takes another.
        // Only then: a refusal is not worth a second port search.
        let connected = match transparent::connect(&self.pod.netns, src_ip, dst).await {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
                transparent::connect(&self.pod.netns, src_ip, dst).await
            }
            other => other,
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
        let outcome = tokio::select! {
            relayed = tokio::io::copy_bidirectional(&mut client, &mut app) => match relayed {
                Ok(_) => Outcome::completed(Some(decision.reason)),
                Err(error) => Outcome::failed(
                    ResponseFlag::None,
                    Some(decision.reason),
                    Chain(&error).to_string(),
                ),
            },
            cut = self.revoked(None, peer, dst, None) => {
                warn!(%workload, src = %peer, %dst, reason = %cut.reason, connection = id, "plaintext connection closed: no longer allowed");
                Outcome::failed(cut.flag, cut.policy.or(Some(decision.reason)), cut.reason)
            }
        };
        tracked.close(outcome);
    }

    /// Resolves once an open connection from `source` (an identity, or none
    /// for plaintext) at `peer` to `dst` must be cut, saying why: the
    /// policies in force deny it now, its port turned STRICT (plaintext),
    /// or `ending` says its peer is no longer trusted and the drain deadline
    /// has passed.
    async fn revoked(
        &self,
        source: Option<&SpiffeId>,
        peer: SocketAddr,
        dst: SocketAddr,
        mut ending: Option<watch::Receiver<Ending>>,
    ) -> Cut {
        let mut state = self.pod.state.clone();
        let mut seen = state.borrow_and_update().clone();
        // A change may have come since the connection was let in.
        if let Some(cut) = self.no_longer_allowed(source, peer, dst) {
            return cut;
        }
        let pod_ip = self.pod.workload.ip;
        let mut revoked: Option<(Instant, Arc<str>)> = None;
        loop {
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        // The agent is stopping; nothing will change now.
                        std::future::pending::<()>().await;
                    }
                    // Most changes (workloads elsewhere, services) decide
                    // nothing here: the decision is made again only when
                    // the policies or this pod changed.
                    let now = state.borrow_and_update().clone();
                    if now.decides_alike(&seen, pod_ip) {
                        continue;
                    }
                    seen = now;
                    if let Some(cut) = self.no_longer_allowed(source, peer, dst) {
                        return cut;
                    }
                }
                changed = changed(&mut ending), if revoked.is_none() => match changed {
                    Some(Ending::Revoked(reason)) => {
                        let deadline = Instant::now() + self.pod.budget.limits().drain;
                        revoked = Some((deadline, reason));
                    }
                    Some(_) => {}
                    // The connection is over; its streams are on their own.
                    None => ending = None,
                },
                () = sleep_until(revoked.as_ref().map(|(at, _)| *at)) => {
                    let reason = revoked.map(|(_, reason)| reason).unwrap_or_default();
                    return Cut {
                        reason: reason.to_string(),
                        flag: ResponseFlag::ConnectFailed,
                        policy: None,
                    };
                }
            }
        }
    }

    /// Decides an open connection again: why it is no longer allowed, if it
    /// is not.
    fn no_longer_allowed(
        &self,
        source: Option<&SpiffeId>,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> Option<Cut> {
        if source.is_none()
            && self
                .pod
                .with_policies(|policies, workload| policies.mtls_mode(workload, dst.port()))
                == MtlsMode::Strict
        {
            return Some(Cut {
                reason: "the pod's mTLS mode is now STRICT".into(),
                flag: ResponseFlag::Denied,
                policy: None,
            });
        }
        let decision = self.pod.decide(source, peer.ip(), dst);
        if decision.allowed {
            return None;
        }
        self.pod.metrics.decided(&decision);
        Some(Cut {
            reason: format!("denied by policy: {}", decision.reason),
            flag: ResponseFlag::Denied,
            policy: Some(decision.reason),
        })
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, mut permit: Permit) {
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
        if !tls::negotiated_h2(tls.get_ref().1) {
            warn!(%workload, %peer, "HBONE connection refused: the client did not offer ALPN h2");
            return;
        }
        let Some(peer_identity) = tls::peer_identity(tls.get_ref().1) else {
            // The verifier demands one; this is a belt to those braces.
            warn!(%workload, %peer, "HBONE connection refused: no peer identity");
            return;
        };
        // Its socket counts for its peer from now on, too.
        if let Err(over) = permit.charge_peer(&Peer::of(&peer_identity)) {
            self.pod.refused_over_limit("HBONE connection", over);
            return;
        }
        info!(%workload, %peer, %peer_identity, "HBONE connection accepted");
        let this = self.clone();
        let identity = peer_identity.clone();
        let now = SystemTime::now();
        let until = |t: SystemTime| t.duration_since(now).unwrap_or_default();
        let watched = Watched {
            renewed,
            state,
            trust,
            peer_chain: tls
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            peer_expires_in: tls::peer_not_after(tls.get_ref().1).map_or(Duration::ZERO, until),
            ours_expires_in: until(certificate.not_after()),
        };
        let (ending_tx, ending) = watch::channel(Ending::Serving);
        let _watcher = AbortOnDrop(tokio::spawn(watch_ending(ending_tx, watched)));
        let wind_down = {
            let mut ending = ending.clone();
            async move {
                let _ = ending.wait_for(|e| *e != Ending::Serving).await;
            }
        };
        let result = server::serve(tls, wind_down, move |request, respond| {
            this.clone()
                .stream(identity.clone(), peer, ending.clone(), request, respond)
        })
        .await;
        if let Err(error) = result {
            warn!(%workload, %peer, %peer_identity, error = %Chain(&error), "HBONE connection ended with an error");
        }
    }

    /// Serves one CONNECT stream, continuing the client's trace: its
    /// warnings and access line carry the connection's id and trace id, and
    /// its debug lines are in a span that does (see `outbound`).
    ///
    /// Admission (the checks, the delivery socket's connect) runs boxed,
    /// with the request moved into it: its state is freed once it is done,
    /// and a stream held open keeps only what its relay needs in its task
    /// (memory per open connection: the task had been the size of both, the
    /// request's headers included: 3 552 bytes, now 2 096).
    fn stream(
        self: Arc<Self>,
        peer_identity: SpiffeId,
        peer: SocketAddr,
        ending: watch::Receiver<Ending>,
        request: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = super::connection_id();
        let trace = Trace::of(&request);
        let span = debug_span!(
            "inbound",
            connection = id,
            trace_id = %trace,
        );
        // Polled, and dropped, within the block below: in its span.
        let admission =
            Box::pin(
                self.clone()
                    .admit(peer_identity, peer, request, respond, id, trace),
            );
        // The relay's state is in this block itself: an async fn would hold
        // its arguments twice (as given, and moved to its locals).
        async move {
            let Some(admitted) = admission.await else {
                return;
            };
            let peer_identity = &admitted.peer_identity;
            let dst = admitted.dst;
            let outcome = tokio::select! {
                relayed = relay(admitted.app, admitted.send, admitted.body) => match relayed {
                    Ok(_) => Outcome::completed(Some(admitted.policy)),
                    Err(error) => Outcome::failed(
                        ResponseFlag::None,
                        Some(admitted.policy),
                        Chain(&error).to_string(),
                    ),
                },
                // Dropping the relay resets the stream and closes the
                // application's socket.
                cut = self.revoked(Some(peer_identity), peer, dst, Some(ending)) => {
                    warn!(
                        workload = %self.pod.workload.qualified_name(),
                        %peer_identity, src = %peer, %dst,
                        reason = %cut.reason,
                        connection = id,
                        trace_id = %trace,
                        "HBONE stream closed: no longer allowed"
                    );
                    Outcome::failed(cut.flag, cut.policy.or(Some(admitted.policy)), cut.reason)
                }
            };
            admitted.tracked.close(outcome);
        }
        .instrument(span)
    }

    /// Checks a CONNECT stream, connects to the application and answers
    /// 200; or refuses it, saying why, and closes its access record.
    async fn admit(
        self: Arc<Self>,
        peer_identity: SpiffeId,
        peer: SocketAddr,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        id: u64,
        trace: Trace,
    ) -> Option<Admitted> {
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
                return None;
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
            return closed(
                tracked,
                refused(&mut respond, refusal, Some(decision.reason)),
            );
        }
        // Held until the stream ends: its socket to the application.
        let permit = match self.pod.budget.admit_from(&Peer::of(&peer_identity), 1) {
            Ok(permit) => permit,
            Err(over) => {
                // Logged now and then, not once a stream: a peer over its
                // limit is opening them by the thousand.
                self.pod.refused_over_limit("HBONE stream", over);
                let refusal = Refusal::OverLimit(over);
                server::refuse(&mut respond, &refusal);
                return closed(
                    tracked,
                    Outcome::failed(
                        ResponseFlag::ConnectFailed,
                        Some(decision.reason),
                        refusal.to_string(),
                    ),
                );
            }
        };
        // The application sees the address the tunnel came from: the client
        // pod's own (its agent dials from inside the client pod).
        let IpAddr::V4(src_ip) = peer.ip() else {
            // Pods are IPv4 here; an IPv6 peer cannot be one of them.
            let refusal = Refusal::Unreachable {
                dst,
                reason: format!("cannot deliver as {peer}: only IPv4 clients are supported"),
            };
            return closed(
                tracked,
                refused(&mut respond, refusal, Some(decision.reason)),
            );
        };
        let app = match transparent::connect(&self.pod.netns, src_ip, dst).await {
            Ok(app) => app,
            Err(e) => {
                let refusal = Refusal::Unreachable {
                    dst,
                    reason: e.to_string(),
                };
                return closed(
                    tracked,
                    refused(&mut respond, refusal, Some(decision.reason)),
                );
            }
        };
        let send = match server::accept(&mut respond) {
            Ok(send) => send,
            Err(error) => {
                let error = Chain(&error).to_string();
                warn!(%workload, %peer_identity, %error, connection = id, trace_id = %trace, "HBONE stream lost before it started");
                return closed(
                    tracked,
                    Outcome::failed(ResponseFlag::None, Some(decision.reason), error),
                );
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
        Some(Admitted {
            app: tracked.server_side(app),
            send,
            body: request.into_body(),
            tracked,
            peer_identity,
            dst,
            policy: decision.reason,
            _permit: permit,
        })
    }
}

/// A stream admitted: its socket to the application, its HTTP/2 halves,
/// and what its access line and re-decisions need.
struct Admitted {
    app: Counted<TcpStream>,
    send: SendStream<Bytes>,
    body: RecvStream,
    tracked: Tracked,
    peer_identity: SpiffeId,
    dst: SocketAddr,
    /// The policy that allowed it.
    policy: String,
    /// Its socket to the application, counted against the limits.
    _permit: Permit,
}

/// Closes a stream's access record with `outcome`; admission gave up.
fn closed(tracked: Tracked, outcome: Outcome) -> Option<Admitted> {
    tracked.close(outcome);
    None
}

/// The next value `ending` takes; `None` once its sender is gone (or
/// without a receiver at all: then it never resolves).
async fn changed(ending: &mut Option<watch::Receiver<Ending>>) -> Option<Ending> {
    match ending {
        Some(ending) => match ending.changed().await {
            Ok(()) => Some(ending.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// What may end an established HBONE connection.
struct Watched {
    /// Our certificate's replacements.
    renewed: watch::Receiver<Option<Arc<WorkloadCertificate>>>,
    /// The mesh, for the roots.
    state: watch::Receiver<Arc<Snapshot>>,
    /// The roots the peer was checked against.
    trust: Arc<TrustBundle>,
    /// The chain the peer presented, leaf first.
    peer_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    peer_expires_in: Duration,
    ours_expires_in: Duration,
}

/// Follows what ends an established HBONE connection, and says it in
/// `ending`: our certificate renewed or expired, or a root removed that the
/// peer does not chain to, wind it down (the client reconnects; streams in
/// flight finish); the peer's certificate expired, or no longer chaining to
/// a trusted root, revoke it (its streams are cut after the drain deadline).
async fn watch_ending(ending: watch::Sender<Ending>, watched: Watched) {
    let Watched {
        mut renewed,
        mut state,
        mut trust,
        peer_chain,
        peer_expires_in,
        ours_expires_in,
    } = watched;
    let wind_down = || {
        ending.send_if_modified(|e| {
            let serving = *e == Ending::Serving;
            if serving {
                *e = Ending::WindDown;
            }
            serving
        });
    };
    let peer_expired = tokio::time::sleep(peer_expires_in);
    let ours_expired = tokio::time::sleep(ours_expires_in);
    tokio::pin!(peer_expired, ours_expired);
    let (mut renewals, mut ours_live) = (true, true);
    loop {
        tokio::select! {
            changed = renewed.changed(), if renewals => {
                renewals = changed.is_ok();
                wind_down();
            }
            () = &mut ours_expired, if ours_live => {
                ours_live = false;
                wind_down();
            }
            () = &mut peer_expired => {
                ending.send_replace(Ending::Revoked("the peer's certificate expired".into()));
                return;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = state.borrow_and_update().trust().clone();
                if Arc::ptr_eq(&now, &trust) || now.includes(&trust) {
                    continue;
                }
                if !tls::client_still_trusted(&peer_chain, &now) {
                    ending.send_replace(Ending::Revoked(
                        "the peer's certificate no longer chains to a trusted root".into(),
                    ));
                    return;
                }
                // Another root went: new connections are checked against
                // the roots left.
                trust = now;
                wind_down();
            }
        }
    }
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
