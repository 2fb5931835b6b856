//! The per-pod outbound listener.
//!
//! The kernel programs send an enrolled pod's outbound connect() to
//! 127.0.0.1:15001 inside the pod's own network namespace. Here the agent
//! accepts it, asks the kernel where it was going, and forwards it:
//!
//! - to a mesh workload: as an HBONE stream (mutual TLS, presenting this
//!   pod's certificate, expecting the destination's identity) on a pooled
//!   connection to `<destination>:15008`;
//! - to a Service's virtual address (ClusterIP:port) with ready endpoints in
//!   the mesh: to one of its ready endpoints, chosen at random, each way as
//!   above (HBONE to a mesh endpoint, whose CONNECT authority is
//!   `<endpoint IP>:<target port>`); an endpoint that cannot be reached is
//!   replaced by another (up to three tries) before the client sees a
//!   failure. Endpoints at an address several pods claim are left out. A
//!   Service with no ready endpoint: the client's connection is reset at
//!   once. A Service with no endpoint in the mesh is passed through to its
//!   virtual address unchanged (the node's service proxy takes it from
//!   there);
//! - anywhere else: passthrough, plain TCP to the original destination.
//!
//! Either way the agent's socket is made in the pod's namespace, so traffic
//! leaves from the pod's own address. The agent is not in the pod's cgroup,
//! so its sockets are not captured again.
//!
//! Each captured connection is charged to the pod's budget (`limits`) from
//! accept to close: over it, the connection is reset at once. A client that
//! goes away while its connection is being routed (a tunnel being opened) is
//! noticed, and its connection given up.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use rand::seq::SliceRandom;
use rustls::pki_types::ServerName;
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, debug_span, warn};
use warren_common::OUTBOUND_PORT;
use warren_daemon::logging::Chain;
use warren_pki::tls::{TlsError, handshake_error};

use super::PodProxy;
use crate::{
    hbone::{
        self, Trace,
        copy::relay,
        pool::{AttemptError, Checkout, CheckoutError, PoolKey, SharedFailure},
    },
    limits::{Direction, OverLimit, Permit},
    mesh::{ServicePort, Workload, policy::MtlsMode},
    metrics::traffic::{Connection, Outcome, Path, Reporter, ResponseFlag},
    tls,
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot listen on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddrV4,
        netns: String,
        source: io::Error,
    },
    #[error("connecting to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("the workload has no valid certificate; no tunnel without one")]
    NoCertificate,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS handshake with {dst} failed: {reason}")]
    Handshake { dst: SocketAddr, reason: String },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the destination's agent refused the tunnel: {0}")]
    Refused(http::StatusCode),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// Opening the tunnel connection this one waited for failed.
    #[error("the tunnel connection to {dst} failed: {reason}")]
    TunnelFailed { dst: SocketAddr, reason: Arc<str> },
    /// The pod (or the node) has no room for the socket it would take.
    #[error("refused: {0}")]
    OverLimit(#[from] OverLimit),
    #[error("{0} is claimed by several pods; refused until only one does")]
    Conflicted(Ipv4Addr),
    #[error("service {service}: no ready endpoint")]
    NoEndpoint { service: String },
    #[error("service {service}: no endpoint could be reached (tried {tried}); last: {last}")]
    EndpointsUnreachable {
        service: String,
        tried: usize,
        last: Box<OutboundError>,
    },
}

impl AttemptError for OutboundError {
    fn shared(&self) -> SharedFailure {
        match self {
            Self::OverLimit(over) => SharedFailure::OverLimit(*over),
            other => SharedFailure::Failed(other.to_string().into()),
        }
    }
}

/// How many of a Service's endpoints one connection tries.
const MAX_ENDPOINT_TRIES: usize = 3;

/// Makes closing `client` send a reset: its connect() appeared to succeed
/// (the agent accepted it), so a reset is how it learns at once that there
/// is nowhere to go. A zero linger does not block the close.
fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
}

/// An HBONE stream that its peer answered.
struct Stream {
    /// Held while the stream lives: the pool counts the connection in use,
    /// so that retiring it lets the stream finish.
    _checkout: Checkout,
    response: http::Response<h2::RecvStream>,
    send: h2::SendStream<bytes::Bytes>,
}

/// The far end of a captured connection, reached.
enum Upstream {
    Tunnel(Stream),
    Plain(TcpStream),
}

/// Where a captured connection goes, as far as it is known.
#[derive(Clone)]
struct Target {
    /// The address connected to (a Service's endpoint, for a Service).
    addr: SocketAddrV4,
    /// The mesh workload there, if any.
    workload: Option<Arc<Workload>>,
    service: Option<Arc<ServicePort>>,
    path: Path,
}

/// A captured connection that reached its destination.
struct Routed {
    upstream: Upstream,
    target: Target,
}

/// A captured connection that did not: why, and where it was going.
struct Unrouted {
    error: OutboundError,
    target: Target,
    /// Whether the client learns it by a reset (it has sent nothing
    /// anywhere) rather than a close.
    reset: bool,
}

impl Unrouted {
    fn new(error: OutboundError, target: Target) -> Self {
        Self {
            error,
            target,
            reset: false,
        }
    }

    fn with_reset(mut self) -> Self {
        self.reset = true;
        self
    }

    /// Istio's response flag for a connection that failed this way.
    fn flag(&self) -> ResponseFlag {
        match self.error {
            OutboundError::Refused(http::StatusCode::UNAUTHORIZED) => ResponseFlag::Denied,
            _ => ResponseFlag::ConnectFailed,
        }
    }
}

/// Opens the outbound listener inside the pod's network namespace.
pub async fn bind(pod: &PodProxy) -> Result<TcpListener, OutboundError> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT);
    pod.netns
        .listen(addr.into())
        .await
        .map_err(|source| OutboundError::Listen {
            addr,
            netns: pod.netns.path().display().to_string(),
            source,
        })
}

/// Accepts captured connections until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match pod.budget.admit(Direction::Outbound, 1) {
                Ok(permit) => {
                    tokio::spawn(pod.clone().forward(stream, peer.port(), permit));
                }
                Err(over) => {
                    // Its original destination is not needed: out of the
                    // kernel's table at once.
                    let _ = pod.original_dsts.take(pod.netns.cookie(), peer.port());
                    reset(&stream);
                    pod.refused_over_limit("outbound connection", over);
                }
            },
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(workload = %pod.workload.qualified_name(), error = %Chain(&error), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Resolves once the client has gone away: it reset its connection, or
/// closed it having sent nothing. A client that sent its request and then
/// closed its side is waiting for the answer: that one has not gone.
async fn client_gone(client: &TcpStream) {
    loop {
        let Ok(ready) = client.ready(Interest::READABLE | Interest::ERROR).await else {
            return;
        };
        if ready.is_error() {
            return;
        }
        if ready.is_read_closed() {
            let mut byte = [0; 1];
            match client.peek(&mut byte).await {
                Ok(0) | Err(_) => return,
                Ok(_) => std::future::pending().await,
            }
        }
        // Bytes for the destination are waiting (readiness stays set until
        // they are read): look again in a while, for a close behind them.
        tokio::time::sleep(CLIENT_CHECK).await;
    }
}

/// How often [`client_gone`] looks at a client that has sent bytes.
const CLIENT_CHECK: Duration = Duration::from_millis(250);

impl PodProxy {
    /// Serves one captured connection. Every log line about it carries its
    /// id and its trace (the one sent to the destination): the warnings and
    /// the access line name them, and the debug lines are in a span that
    /// does (a span of its own at info level would cost every connection
    /// for lines that are not written).
    async fn forward(self: Arc<Self>, client: TcpStream, src_port: u16, permit: Permit) {
        let id = super::connection_id();
        let trace = Trace::start();
        let span = debug_span!(
            "outbound",
            connection = id,
            trace_id = %trace,
        );
        self.forward_in_span(client, src_port, id, trace, permit)
            .instrument(span)
            .await
    }

    /// Logs a connection refused for being over a limit (a line now and
    /// then, with how many more were refused since).
    pub(super) fn refused_over_limit(&self, what: &str, over: OverLimit) {
        if let Some(unlogged) = self.budget.refusals.tick() {
            warn!(
                workload = %self.workload.qualified_name(),
                limit = over.scope(),
                reason = %over,
                refused_since_last_line = unlogged,
                "{what} refused: over the limit"
            );
        }
    }

    async fn forward_in_span(
        &self,
        client: TcpStream,
        src_port: u16,
        id: u64,
        trace: Trace,
        mut permit: Permit,
    ) {
        let workload = self.workload.qualified_name();
        let src = SocketAddrV4::new(self.workload.ip, src_port);
        let Some(dst) = self.original_dsts.take(self.netns.cookie(), src_port) else {
            // Evicted from the kernel's table before we got to it: we do not
            // know where it was going, so it goes nowhere.
            warn!(%workload, %src, connection = id, "outbound connection dropped: no original destination recorded");
            return;
        };
        let _ = client.set_nodelay(true);
        // Routing runs boxed: its state (the pool's checkout, a tunnel's
        // opening, the CONNECT's answer) is freed once it is done, and a
        // connection held open keeps only the relay's in its task (memory
        // per open connection: the task had been as large as both).
        let routed = tokio::select! {
            biased;
            routed = Box::pin(self.route(src, dst, trace, &mut permit)) => routed,
            () = client_gone(&client) => {
                debug!(%workload, %src, %dst, connection = id, "outbound connection given up: the client went away before it was routed");
                return;
            }
        };
        let target = match &routed {
            Ok(routed) => &routed.target,
            Err(unrouted) => &unrouted.target,
        };
        let me = self.current();
        let tracked = self.metrics.traffic.open(&Connection {
            reporter: Reporter::source,
            path: target.path,
            id,
            trace: Some(trace),
            src: src.into(),
            dst: target.addr.into(),
            source: Some(&me),
            source_identity: Some(&self.workload.identity),
            destination: target.workload.as_deref(),
            service: target.service.as_deref(),
        });
        let routed = match routed {
            Ok(routed) => routed,
            Err(unrouted) => {
                if unrouted.reset {
                    reset(&client);
                }
                let error = Chain(&unrouted.error).to_string();
                match unrouted.error {
                    // A pod over its limit tries by the thousand: a line now
                    // and then, not one each (the access log has each).
                    OutboundError::OverLimit(over) => {
                        self.refused_over_limit("outbound connection", over);
                    }
                    _ => {
                        warn!(%workload, %src, %dst, %error, connection = id, trace_id = %trace, "outbound connection failed");
                    }
                }
                tracked.close(Outcome::failed(unrouted.flag(), None, error));
                return;
            }
        };
        // Both ways until both ends are done; the bytes are counted as they
        // pass the client's socket.
        let mut client = tracked.client_side(client);
        let relayed = match routed.upstream {
            Upstream::Tunnel(stream) => relay(client, stream.send, stream.response.into_body())
                .await
                .map(drop),
            Upstream::Plain(mut upstream) => {
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .map(drop)
            }
        };
        match relayed {
            Ok(_) => tracked.close(Outcome::completed(None)),
            Err(error) => {
                let error = Chain(&error).to_string();
                warn!(%workload, %src, %dst, %error, connection = id, trace_id = %trace, "outbound connection failed");
                tracked.close(Outcome::failed(ResponseFlag::None, None, error));
            }
        }
    }

    /// Decides where a connection to `dst` goes (see the module's
    /// documentation) and reaches it.
    async fn route(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        trace: Trace,
        permit: &mut Permit,
    ) -> Result<Routed, Unrouted> {
        let workload = self.workload.qualified_name();
        let (dst_workload, mode, service, conflicted) = {
            let state = self.state.borrow();
            let conflicted = state.workloads().is_conflicted(*dst.ip());
            let dst_workload = state.workload_by_ip(*dst.ip()).cloned();
            let mode = dst_workload
                .as_ref()
                .map(|w| state.policies().mtls_mode(w, dst.port()));
            let service = state.service(dst).cloned();
            (dst_workload, mode, service, conflicted)
        };
        let plain = |workload| Target {
            addr: dst,
            workload,
            service: None,
            path: Path::Passthrough,
        };
        match dst_workload {
            // Neither claimant's identity can be expected, and plaintext
            // would leak to whichever it is.
            None if conflicted => {
                Err(Unrouted::new(OutboundError::Conflicted(*dst.ip()), plain(None)).with_reset())
            }
            None => match service {
                Some(service) => self.to_service(src, dst, service, trace, permit).await,
                None => {
                    debug!(%workload, %src, %dst, dst_workload = "-", path = "passthrough", "captured outbound connection");
                    self.passthrough(plain(None), permit).await
                }
            },
            // The destination takes plaintext only: as Istio, send it so.
            Some(dst_workload) if mode == Some(MtlsMode::Disable) => {
                debug!(
                    %workload, %src, %dst,
                    dst_workload = %dst_workload.qualified_name(),
                    path = "passthrough",
                    mtls = "DISABLE",
                    "captured outbound connection"
                );
                self.passthrough(plain(Some(dst_workload)), permit).await
            }
            Some(dst_workload) => {
                let on_this_node = dst_workload.local.is_some();
                let target = Target {
                    addr: dst,
                    workload: Some(dst_workload),
                    service: None,
                    path: Path::Hbone,
                };
                let routed = self.tunnel(src, target, trace).await;
                // A pod of this node took the stream: the pair may go
                // straight from now on, if policy allows (the fast path
                // decides). Only pairs that work are offered.
                if on_this_node
                    && routed.is_ok()
                    && let Some(shortcuts) = &self.shortcuts
                {
                    // Full (a burst of them): the next connection asks again.
                    let _ = shortcuts.try_send(super::Shortcut {
                        netns_cookie: self.netns.cookie(),
                        dst,
                    });
                }
                routed
            }
        }
    }

    /// Plain TCP to `target`: a second socket, charged to `permit` first
    /// (once, however many endpoints are tried).
    async fn passthrough(&self, target: Target, permit: &mut Permit) -> Result<Routed, Unrouted> {
        if let Err(over) = permit.hold(2) {
            // Logged, through the pod's throttle, with the connection's end.
            return Err(Unrouted::new(over.into(), target).with_reset());
        }
        match self.netns.connect(target.addr.into()).await {
            Ok(upstream) => Ok(Routed {
                upstream: Upstream::Plain(upstream),
                target,
            }),
            Err(source) => Err(Unrouted::new(
                OutboundError::Connect {
                    dst: target.addr.into(),
                    source,
                },
                target,
            )),
        }
    }

    /// An HBONE stream to `target`, a mesh workload, that its agent
    /// accepted.
    async fn tunnel(
        &self,
        src: SocketAddrV4,
        target: Target,
        trace: Trace,
    ) -> Result<Routed, Unrouted> {
        let dst_workload = target
            .workload
            .as_deref()
            .expect("a tunnel goes to a workload");
        let service = target.service.as_ref().map(|s| s.qualified_name());
        let opened = self
            .open_stream(src, target.addr, dst_workload, service.as_deref(), trace)
            .await
            .and_then(|stream| match stream.response.status() {
                http::StatusCode::OK => Ok(stream),
                status => Err(OutboundError::Refused(status)),
            });
        match opened {
            Ok(stream) => Ok(Routed {
                upstream: Upstream::Tunnel(stream),
                target,
            }),
            Err(error) => Err(Unrouted::new(error, target)),
        }
    }

    /// Sends a CONNECT for `dst` to `dst_workload`'s agent and waits for its
    /// answer, on a pooled connection (opened if need be).
    async fn open_stream(
        &self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        dst_workload: &Workload,
        service: Option<&str>,
        trace: Trace,
    ) -> Result<Stream, OutboundError> {
        let key = PoolKey {
            src_netns: self.netns.cookie(),
            src_ip: self.workload.ip.into(),
            src: self.workload.identity.clone(),
            dst: dst_workload.identity.clone(),
            dst_addr: SocketAddr::new((*dst.ip()).into(), hbone::PORT),
        };
        // The connection may turn out to be going away (its peer renewed its
        // certificate a moment ago, say); then one more is tried.
        let mut attempts = 0;
        let (checkout, response, send) = loop {
            attempts += 1;
            // Opening a connection (TLS's state, the handshakes) takes
            // kilobytes of future, and happens once per pooled connection:
            // boxed, it stays out of every connection's task, which is then
            // a fifth of the size (memory per open connection).
            let checkout = self
                .pool
                .checkout(&key, || Box::pin(self.open_connection(&key)))
                .await
                .map_err(|error| match error {
                    CheckoutError::Connect(error) => error,
                    CheckoutError::Shared(SharedFailure::OverLimit(over)) => over.into(),
                    CheckoutError::Shared(SharedFailure::Failed(reason)) => {
                        OutboundError::TunnelFailed {
                            dst: key.dst_addr,
                            reason,
                        }
                    }
                })?;
            let request = hbone::connect_request(dst.into(), src.into(), trace);
            match timeout(hbone::CONNECT_TIMEOUT, checkout.connection().send(request)).await {
                Ok(Ok((response, send))) => break (checkout, response, send),
                Ok(Err(e)) if attempts == 1 && checkout.connection().is_closed() => {
                    debug!(connection = checkout.connection_id(), error = %e, "tunnel connection went away; trying another");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(OutboundError::Timeout("waiting for the answer to CONNECT")),
            }
        };
        debug!(
            workload = %self.workload.qualified_name(),
            %src,
            %dst,
            service = service.unwrap_or("-"),
            dst_workload = %dst_workload.qualified_name(),
            identity = %key.src,
            dst_identity = %key.dst,
            path = "hbone",
            tunnel = checkout.connection_id(),
            reused = checkout.reused(),
            "captured outbound connection"
        );
        Ok(Stream {
            _checkout: checkout,
            response,
            send,
        })
    }

    /// A connection to a Service's virtual address `vip`: to one of its
    /// ready endpoints (see the module's documentation).
    async fn to_service(
        &self,
        src: SocketAddrV4,
        vip: SocketAddrV4,
        service: Arc<ServicePort>,
        trace: Trace,
        permit: &mut Permit,
    ) -> Result<Routed, Unrouted> {
        let workload = self.workload.qualified_name();
        let name = service.qualified_name();
        let at = |addr, workload, path| Target {
            addr,
            workload,
            service: Some(service.clone()),
            path,
        };
        if service.endpoints.is_empty() {
            // Fail fast, as a connection refused would.
            return Err(Unrouted::new(
                OutboundError::NoEndpoint { service: name },
                at(vip, None, Path::Passthrough),
            )
            .with_reset());
        }
        // Where each endpoint is, as of now: a mesh workload (HBONE, unless
        // it takes plaintext only), outside the mesh, or an address several
        // pods claim (left out: neither identity can be expected, and
        // plaintext could reach a mesh pod).
        let (endpoints, contested) = {
            let state = self.state.borrow();
            let (contested, clear): (Vec<SocketAddrV4>, Vec<SocketAddrV4>) = service
                .endpoints
                .iter()
                .partition(|e| state.workloads().is_conflicted(*e.ip()));
            let endpoints: Vec<(SocketAddrV4, Option<Arc<Workload>>)> = clear
                .into_iter()
                .map(|endpoint| {
                    let mesh = state.workload_by_ip(*endpoint.ip()).filter(|w| {
                        state.policies().mtls_mode(w, endpoint.port()) != MtlsMode::Disable
                    });
                    (endpoint, mesh.cloned())
                })
                .collect();
            (endpoints, contested)
        };
        if let ([], [first, ..]) = (endpoints.as_slice(), contested.as_slice()) {
            return Err(Unrouted::new(
                OutboundError::Conflicted(*first.ip()),
                at(*first, None, Path::Passthrough),
            )
            .with_reset());
        }
        // The node's service proxy may pick any endpoint, a contested one
        // too: only with none contested is the virtual address left to it.
        if contested.is_empty() && endpoints.iter().all(|(_, mesh)| mesh.is_none()) {
            debug!(%workload, %src, dst = %vip, service = %name, dst_workload = "-", path = "passthrough", "captured outbound connection");
            return self
                .passthrough(at(vip, None, Path::Passthrough), permit)
                .await;
        }
        let mut order = endpoints;
        order.shuffle(&mut rand::rng());
        // A few tries, not one per endpoint: each may take a connect timeout,
        // and the client is waiting.
        order.truncate(MAX_ENDPOINT_TRIES);
        let tried = order.len();
        let mut last = None;
        for (endpoint, mesh) in order {
            let opened = match mesh {
                Some(dst_workload) => {
                    self.tunnel(src, at(endpoint, Some(dst_workload), Path::Hbone), trace)
                        .await
                }
                None => {
                    debug!(%workload, %src, dst = %endpoint, service = %name, dst_workload = "-", path = "passthrough", "captured outbound connection");
                    let target = at(endpoint, None, Path::Passthrough);
                    // Bounded: a black-holed endpoint must not hold the
                    // client for the kernel's minutes of SYN retries.
                    match timeout(
                        hbone::CONNECT_TIMEOUT,
                        self.passthrough(target.clone(), permit),
                    )
                    .await
                    {
                        Ok(connected) => connected,
                        Err(_) => Err(Unrouted::new(
                            OutboundError::Timeout("connecting to the endpoint"),
                            target,
                        )),
                    }
                }
            };
            match opened {
                Ok(routed) => return Ok(routed),
                // A policy refusal is an answer, not an unreachable endpoint:
                // another endpoint of the same service would say the same.
                // Without a certificate of its own, this pod reaches no
                // endpoint over HBONE; over its limit, none at all.
                Err(
                    unrouted @ Unrouted {
                        error:
                            OutboundError::Refused(http::StatusCode::UNAUTHORIZED)
                            | OutboundError::NoCertificate
                            | OutboundError::OverLimit(_),
                        ..
                    },
                ) => return Err(unrouted.with_reset()),
                // The client has sent nothing anywhere yet: another endpoint
                // can take it.
                Err(unrouted) => {
                    warn!(%workload, %src, dst = %vip, service = %name, %endpoint, error = %Chain(&unrouted.error), trace_id = %trace, "service endpoint unreachable; trying another");
                    last = Some(unrouted);
                }
            }
        }
        let last = last.expect("at least one endpoint was tried");
        Err(Unrouted::new(
            OutboundError::EndpointsUnreachable {
                service: name,
                tried,
                last: Box::new(last.error),
            },
            last.target,
        )
        .with_reset())
    }

    /// A new mutual-TLS HTTP/2 connection to the destination's HBONE port,
    /// presenting this pod's certificate and accepting only the expected
    /// destination identity.
    async fn open_connection(
        &self,
        key: &PoolKey,
    ) -> Result<hbone::client::Connection, OutboundError> {
        timeout(hbone::CONNECT_TIMEOUT, self.handshakes(key))
            .await
            .map_err(|_| OutboundError::Timeout("opening the tunnel connection"))?
    }

    async fn handshakes(&self, key: &PoolKey) -> Result<hbone::client::Connection, OutboundError> {
        let certificate = self
            .valid_certificate()
            .ok_or(OutboundError::NoCertificate)?;
        // The tunnel's socket, charged to the pod that opens it for as long
        // as the pool keeps it.
        let permit = self.budget.admit(Direction::Outbound, 1)?;
        let config =
            tls::client_config(&certificate, &self.trust(), std::slice::from_ref(&key.dst))?;
        let tcp =
            self.netns
                .connect(key.dst_addr)
                .await
                .map_err(|source| OutboundError::Connect {
                    dst: key.dst_addr,
                    source,
                })?;
        let mut tls = TlsConnector::from(config)
            .connect(
                ServerName::IpAddress(key.dst_addr.ip().into()),
                hbone::Transport::new(tcp),
            )
            .await
            .map_err(|e| OutboundError::Handshake {
                dst: key.dst_addr,
                reason: handshake_error(&e),
            })?;
        hbone::tune_tls(tls.get_mut().1);
        // No stream rides it once either end's certificate has expired.
        let valid_until = tls::peer_not_after(tls.get_ref().1)
            .map_or(certificate.not_after(), |peer| {
                peer.min(certificate.not_after())
            });
        Ok(
            hbone::client::Connection::handshake(tls, self.pool.settings().keepalive)
                .await?
                .valid_until(valid_until)
                .charged(permit),
        )
    }
}
