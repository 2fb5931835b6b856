//! Istio's TCP metrics, and the access log, for each connection a proxy
//! carries.
//!
//! Both ends report a connection, as Istio's proxies do: the client's agent
//! with `reporter="source"`, the server's with `reporter="destination"`.
//! Byte counts follow Istio's definitions, the same at both ends:
//! `istio_tcp_received_bytes_total` counts what the client sent (the
//! request direction), `istio_tcp_sent_bytes_total` what the server sent
//! back. They count application bytes only, as they cross the pod's own
//! socket (no TLS, no HTTP/2 framing), and move while the connection is
//! open, not only when it closes.
//!
//! A connection is [`Tracked`] from the moment its agent knows both ends
//! (counted opened) until it ends (counted closed, with Istio's response
//! flag, and one `access` log line). Dropping a `Tracked` that was not
//! closed closes it as cut short, so no path forgets the count.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use warren_pki::identity::SpiffeId;

use crate::{
    hbone::Trace,
    hbone::copy::{Duplex, Readable},
    mesh::{Cluster, ServicePort, Workload},
};

/// What the metrics say where a value is not known, as Istio's do.
const UNKNOWN: &str = "unknown";

/// The four families, as Istio names them (under the `istio` prefix).
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    received: Family<TrafficLabels, Counter>,
    sent: Family<TrafficLabels, Counter>,
    /// Each label set's counters, fetched from the families once: a
    /// connection then finds all four with one lookup.
    series: Arc<RwLock<HashMap<TrafficLabels, Arc<Series>>>>,
    /// Values of the labels that come from the cluster, not the workloads.
    cluster: Cluster,
}

/// One label set's counters (closed: with the response flag `-`; closes
/// with another flag are counted under their own label set).
#[derive(Debug)]
struct Series {
    labels: TrafficLabels,
    opened: Counter,
    closed: Counter,
    received: Counter,
    sent: Counter,
}

impl Traffic {
    /// Registers the families in `registry`, which should carry the
    /// `istio` prefix.
    pub fn register(registry: &mut Registry, cluster: Cluster) -> Self {
        let traffic = Self {
            cluster,
            ..Self::default()
        };
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened",
            traffic.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            traffic.closed.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes the client sent (the request direction) on TCP connections",
            traffic.received.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes the server sent back (the response direction) on TCP connections",
            traffic.sent.clone(),
        );
        traffic
    }

    /// Starts tracking a connection: it counts as opened from now.
    pub fn open(&self, connection: &Connection<'_>) -> Tracked {
        let series = self.series(TrafficLabels::new(connection, &self.cluster));
        series.opened.inc();
        Tracked {
            // Each chunk then costs two atomic additions.
            request: Tally::new(series.received.clone()),
            response: Tally::new(series.sent.clone()),
            closed: self.closed.clone(),
            series,
            access: Access::of(connection),
            started: Instant::now(),
            done: false,
        }
    }

    fn series(&self, labels: TrafficLabels) -> Arc<Series> {
        let known = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&labels)
            .cloned();
        if let Some(series) = known {
            return series;
        }
        let mut all = self.series.write().unwrap_or_else(PoisonError::into_inner);
        all.entry(labels.clone())
            .or_insert_with(|| {
                Arc::new(Series {
                    opened: self.opened.get_or_create(&labels).clone(),
                    closed: self.closed.get_or_create(&labels).clone(),
                    received: self.received.get_or_create(&labels).clone(),
                    sent: self.sent.get_or_create(&labels).clone(),
                    labels,
                })
            })
            .clone()
    }
}

/// Which end reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "Istio's label values, as they appear")]
pub enum Reporter {
    source,
    destination,
}

/// Why a connection ended badly, as Istio's `response_flags` says it; `-`
/// when it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResponseFlag {
    #[default]
    None,
    /// Refused by an authorization policy.
    Denied,
    /// The upstream (the destination, or at the destination the
    /// application) could not be connected to.
    ConnectFailed,
}

impl EncodeLabelValue for ResponseFlag {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> std::fmt::Result {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Denied => "DENY",
            Self::ConnectFailed => "CONNECT",
        }
    }
}

/// How a connection's traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// In an HBONE tunnel: mutual TLS.
    Hbone,
    /// Plain TCP to a destination outside the mesh (or one that takes
    /// plaintext only).
    Passthrough,
    /// Plain TCP that arrived at a PERMISSIVE pod.
    PlaintextInbound,
    /// Between two pods of this node, straight through its kernel: the
    /// identities are the ones the kernel attributes (each pod's cgroup),
    /// checked as HBONE's certificates are.
    FastPath,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hbone => "hbone",
            Self::Passthrough => "passthrough",
            Self::PlaintextInbound => "plaintext",
            Self::FastPath => "fast_path",
        }
    }
}

/// What a reporting agent knows about a connection when it opens.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub reporter: Reporter,
    pub path: Path,
    /// The connection's own id (in the span of each of its log lines).
    pub id: u64,
    /// Its W3C trace, when it has one (HBONE).
    pub trace: Option<Trace>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The client's workload, if it is one of the mesh's.
    pub source: Option<&'a Workload>,
    /// The client's identity: the certificate it presented (at the
    /// destination) or its own (at the source); none in plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    /// The server's workload, if it is one of the mesh's.
    pub destination: Option<&'a Workload>,
    /// The Service the client asked for, when it dialled one.
    pub service: Option<&'a ServicePort>,
}

impl Connection<'_> {
    /// Whether both ends' identities are authenticated (and the
    /// connection is as a STRICT peer requires): by mutual TLS, or for the
    /// fast path by the kernel, which the dashboards need not tell apart.
    fn mtls(&self) -> bool {
        matches!(self.path, Path::Hbone | Path::FastPath)
    }

    fn direction(&self) -> &'static str {
        match self.reporter {
            Reporter::source => "outbound",
            Reporter::destination => "inbound",
        }
    }
}

/// Istio's standard labels of its TCP metrics, in its order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrafficLabels {
    reporter: Reporter,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: ResponseFlag,
    connection_security_policy: &'static str,
}

/// The labels that describe one end's workload.
struct End {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    cluster: String,
}

impl End {
    fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// `workload`, which `identity` is (when the connection has one) the
    /// authenticated identity of.
    fn of(workload: Option<&Workload>, identity: Option<&SpiffeId>, cluster: &Cluster) -> Self {
        let mut end = Self::unknown();
        if let Some(identity) = identity {
            end.principal = identity.to_string();
            end.namespace = identity.namespace().to_owned();
        }
        // A workload found by address describes the peer only if it is the
        // identity that was authenticated (when one was).
        let workload = workload.filter(|w| identity.is_none_or(|id| *id == w.identity));
        if let Some(w) = workload {
            end.workload = w.workload_name.clone();
            end.canonical_service = w.canonical_service().to_owned();
            end.canonical_revision = w.canonical_revision().to_owned();
            end.namespace = w.namespace.clone();
            end.cluster = cluster.id.clone();
        }
        end
    }
}

impl TrafficLabels {
    fn new(c: &Connection<'_>, cluster: &Cluster) -> Self {
        let mtls = c.mtls();
        // Principals only where mutual TLS proved them.
        let source = End::of(c.source, c.source_identity.filter(|_| mtls), cluster);
        let destination_identity = c.destination.map(|w| &w.identity).filter(|_| mtls);
        let destination = End::of(c.destination, destination_identity, cluster);
        let (service, service_namespace, service_name) = match c.service {
            Some(s) => (
                s.hostname(&cluster.domain),
                s.namespace.clone(),
                s.name.clone(),
            ),
            None => (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()),
        };
        Self {
            reporter: c.reporter,
            source_app: source.canonical_service.clone(),
            source_version: source.canonical_revision.clone(),
            source_workload: source.workload,
            source_canonical_service: source.canonical_service,
            source_canonical_revision: source.canonical_revision,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            source_cluster: source.cluster,
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_app: destination.canonical_service.clone(),
            destination_version: destination.canonical_revision.clone(),
            destination_workload: destination.workload,
            destination_canonical_service: destination.canonical_service,
            destination_canonical_revision: destination.canonical_revision,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_cluster: destination.cluster,
            request_protocol: "tcp",
            response_flags: ResponseFlag::None,
            // As Istio defines it: the source cannot know the policy the
            // destination applied to plaintext; the destination can.
            connection_security_policy: match (mtls, c.reporter) {
                (true, _) => "mutual_tls",
                (false, Reporter::source) => UNKNOWN,
                (false, Reporter::destination) => "none",
            },
        }
    }
}

/// One direction's count: the family's counter and this connection's own.
#[derive(Debug, Clone)]
struct Tally {
    family: Counter,
    connection: Counter,
}

impl Tally {
    fn new(family: Counter) -> Self {
        Self {
            family,
            connection: Counter::default(),
        }
    }

    fn add(&self, n: usize) {
        if n > 0 {
            self.family.inc_by(n as u64);
            self.connection.inc_by(n as u64);
        }
    }
}

/// What the access log says of a connection, beyond its labels.
#[derive(Debug)]
struct Access {
    direction: &'static str,
    path: &'static str,
    id: u64,
    trace: Option<Trace>,
    src: SocketAddr,
    dst: SocketAddr,
    src_workload: Option<String>,
    dst_workload: Option<String>,
}

impl Access {
    fn of(c: &Connection<'_>) -> Self {
        Self {
            direction: c.direction(),
            path: c.path.as_str(),
            id: c.id,
            trace: c.trace,
            src: c.src,
            dst: c.dst,
            src_workload: c.source.map(Workload::qualified_name),
            dst_workload: c.destination.map(Workload::qualified_name),
        }
    }
}

/// How a tracked connection ended.
#[derive(Debug)]
pub struct Outcome {
    pub flag: ResponseFlag,
    /// The authorization decision that applied (at the destination).
    pub policy: Option<String>,
    /// Why it ended, if not by both ends closing.
    pub error: Option<String>,
}

impl Outcome {
    pub fn completed(policy: Option<String>) -> Self {
        Self {
            flag: ResponseFlag::None,
            policy,
            error: None,
        }
    }

    pub fn failed(flag: ResponseFlag, policy: Option<String>, error: String) -> Self {
        Self {
            flag,
            policy,
            error: Some(error),
        }
    }
}

/// A connection being counted; see the module's documentation.
#[derive(Debug)]
pub struct Tracked {
    series: Arc<Series>,
    closed: Family<TrafficLabels, Counter>,
    request: Tally,
    response: Tally,
    access: Access,
    started: Instant,
    done: bool,
}

/// The access log's target: routed, filtered or silenced apart from the
/// rest (`--log-level info,access=off`).
pub const ACCESS_LOG: &str = "access";

impl Tracked {
    /// Wraps the socket on the client's side of the proxy (at the source:
    /// the client's connection; reads are the request).
    pub fn client_side<S>(&self, socket: S) -> Counted<S> {
        Counted {
            inner: socket,
            reads: self.request.clone(),
            writes: self.response.clone(),
        }
    }

    /// Wraps the socket on the server's side of the proxy (at the
    /// destination: the connection to the application; writes are the
    /// request).
    pub fn server_side<S>(&self, socket: S) -> Counted<S> {
        Counted {
            inner: socket,
            reads: self.response.clone(),
            writes: self.request.clone(),
        }
    }

    /// Bytes counted so far: (request, response).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.request.connection.get(),
            self.response.connection.get(),
        )
    }

    /// Forgets the connection without counting it closed or writing its
    /// line: it lives on out of this agent's sight (a fast-path connection,
    /// as the agent stops).
    pub fn abandon(mut self) {
        self.done = true;
    }

    /// Counts the connection closed and writes its access log line.
    pub fn close(mut self, outcome: Outcome) {
        let duration = self.started.elapsed();
        self.finish(outcome, duration);
    }

    /// Closes a connection whose bytes were counted elsewhere (by the
    /// kernel, for the fast path): `request` and `response` bytes, over
    /// `duration`.
    pub fn close_counted(
        mut self,
        request: u64,
        response: u64,
        duration: Duration,
        outcome: Outcome,
    ) {
        // usize is 64 bits wherever eBPF runs.
        self.request.add(request as usize);
        self.response.add(response as usize);
        self.finish(outcome, duration);
    }

    fn finish(&mut self, outcome: Outcome, duration: Duration) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if outcome.flag == ResponseFlag::None {
            self.series.closed.inc();
        } else {
            let mut labels = self.series.labels.clone();
            labels.response_flags = outcome.flag;
            self.closed.get_or_create(&labels).inc();
        }
        self.log(&outcome, duration);
    }

    fn log(&self, outcome: &Outcome, duration: Duration) {
        let (request_bytes, response_bytes) = self.bytes();
        let (a, labels) = (&self.access, &self.series.labels);
        let known = |value: &str| (value != UNKNOWN).then(|| value.to_owned());
        macro_rules! access {
            ($level:expr, $message:literal) => {
                // Outside the connection's span: the line names the
                // connection and its trace itself, and a formatter need not
                // write out the span's fields once more.
                tracing::event!(
                    target: ACCESS_LOG,
                    parent: None,
                    $level,
                    direction = a.direction,
                    path = a.path,
                    connection = a.id,
                    trace_id = a.trace.as_ref().map(tracing::field::display),
                    src.addr = %a.src,
                    src.workload = a.src_workload.as_deref(),
                    src.identity = known(&labels.source_principal).as_deref(),
                    dst.addr = %a.dst,
                    dst.workload = a.dst_workload.as_deref(),
                    dst.service = known(&labels.destination_service).as_deref(),
                    dst.identity = known(&labels.destination_principal).as_deref(),
                    policy = outcome.policy.as_deref(),
                    request_bytes,
                    response_bytes,
                    duration_ms = duration.as_millis() as u64,
                    response_flags = outcome.flag.as_str(),
                    error = outcome.error.as_deref(),
                    $message
                )
            };
        }
        match outcome.error {
            None => access!(tracing::Level::INFO, "connection complete"),
            Some(_) => access!(tracing::Level::WARN, "connection failed"),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // The task serving it was aborted (the pod was withdrawn, the agent
        // is stopping), or a path returned without closing it.
        let duration = self.started.elapsed();
        self.finish(
            Outcome::failed(
                ResponseFlag::None,
                None,
                "cut short: the agent stopped serving it".into(),
            ),
            duration,
        );
    }
}

/// A socket whose traffic is counted as it passes.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    reads: Tally,
    writes: Tally,
}

/// The relay counts each direction on its own half of the socket.
impl<S: Duplex> Duplex for Counted<S> {
    type Reader<'a>
        = Counted<S::Reader<'a>>
    where
        Self: 'a;
    type Writer<'a>
        = Counted<S::Writer<'a>>
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        let (reader, writer) = self.inner.halves();
        let reader = Counted {
            inner: reader,
            reads: self.reads.clone(),
            writes: self.writes.clone(),
        };
        let writer = Counted {
            inner: writer,
            reads: self.reads.clone(),
            writes: self.writes.clone(),
        };
        (reader, writer)
    }
}

impl<S: Readable> Readable for Counted<S> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.reads.add(buf.filled().len() - before);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.writes.add(n);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.writes.add(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn workload(namespace: &str, sa: &str, ip: [u8; 4], labels: &[(&str, &str)]) -> Workload {
        Workload::for_tests(namespace, sa, ip, labels)
    }

    fn connection<'a>(
        reporter: Reporter,
        path: Path,
        source: Option<&'a Workload>,
        source_identity: Option<&'a SpiffeId>,
        destination: &'a Workload,
    ) -> Connection<'a> {
        Connection {
            reporter,
            path,
            id: 7,
            trace: None,
            src: "10.244.1.2:40000".parse().unwrap(),
            dst: "10.244.2.2:8080".parse().unwrap(),
            source,
            source_identity,
            destination: Some(destination),
            service: None,
        }
    }

    #[test]
    fn labels_say_what_istio_would_for_each_end_and_path() {
        let cluster = Cluster::default();
        let sleep = workload("default", "sleep", [10, 244, 1, 2], &[("app", "sleep")]);
        let web = workload("shop", "web", [10, 244, 2, 2], &[("version", "v2")]);
        let hbone = TrafficLabels::new(
            &connection(
                Reporter::source,
                Path::Hbone,
                Some(&sleep),
                Some(&sleep.identity),
                &web,
            ),
            &cluster,
        );
        assert_eq!(
            hbone.source_principal,
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert_eq!(
            hbone.destination_principal,
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            (hbone.source_app.as_str(), hbone.source_version.as_str()),
            ("sleep", "latest")
        );
        assert_eq!(
            (
                hbone.destination_app.as_str(),
                hbone.destination_version.as_str()
            ),
            ("web", "v2")
        );
        assert_eq!(hbone.connection_security_policy, "mutual_tls");
        assert_eq!(hbone.source_cluster, "Kubernetes");

        // Plaintext proves nobody: no principal at either end; the source
        // cannot know the destination's policy, the destination can.
        for (reporter, policy) in [
            (Reporter::source, "unknown"),
            (Reporter::destination, "none"),
        ] {
            let plain = TrafficLabels::new(
                &connection(
                    reporter,
                    Path::Passthrough,
                    Some(&sleep),
                    Some(&sleep.identity),
                    &web,
                ),
                &cluster,
            );
            assert_eq!(plain.source_principal, "unknown");
            assert_eq!(plain.destination_principal, "unknown");
            assert_eq!(plain.source_workload, "sleep", "known by its address");
            assert_eq!(plain.connection_security_policy, policy);
        }

        // At the destination, a workload found at the tunnel's address that
        // is not the identity that authenticated describes nobody: the
        // identity's namespace is all that is known.
        let other: SpiffeId = "spiffe://cluster.local/ns/ops/sa/admin".parse().unwrap();
        let mismatched = TrafficLabels::new(
            &connection(
                Reporter::destination,
                Path::Hbone,
                Some(&sleep),
                Some(&other),
                &web,
            ),
            &cluster,
        );
        assert_eq!(mismatched.source_principal, other.to_string());
        assert_eq!(mismatched.source_workload_namespace, "ops");
        assert_eq!(mismatched.source_workload, "unknown");
        assert_eq!(mismatched.source_cluster, "unknown");

        // A Service the client dialled is named by its hostname.
        let service = ServicePort {
            name: "web".into(),
            namespace: "shop".into(),
            endpoints: vec![],
        };
        let custom = Cluster {
            id: "east".into(),
            domain: "corp.example".into(),
        };
        let mut via_service = connection(
            Reporter::source,
            Path::Hbone,
            Some(&sleep),
            Some(&sleep.identity),
            &web,
        );
        via_service.service = Some(&service);
        let labels = TrafficLabels::new(&via_service, &custom);
        assert_eq!(labels.destination_service, "web.shop.svc.corp.example");
        assert_eq!(
            (
                labels.destination_service_name.as_str(),
                labels.destination_service_namespace.as_str()
            ),
            ("web", "shop")
        );
        assert_eq!(labels.destination_cluster, "east");
    }

    #[tokio::test]
    async fn bytes_are_counted_each_way_as_they_pass_and_closing_counts_once() {
        let mut registry = Registry::default();
        let traffic = Traffic::register(&mut registry, Cluster::default());
        let sleep = workload("default", "sleep", [10, 244, 1, 2], &[]);
        let web = workload("shop", "web", [10, 244, 2, 2], &[]);
        let c = connection(
            Reporter::source,
            Path::Hbone,
            Some(&sleep),
            Some(&sleep.identity),
            &web,
        );
        let tracked = traffic.open(&c);
        let labels = TrafficLabels::new(&c, &Cluster::default());

        // At the source the client's socket is wrapped: what it sends is
        // read (the request), what it gets is written (the response).
        let (client, proxy_end) = tokio::io::duplex(1024);
        let mut counted = tracked.client_side(proxy_end);
        let mut client = client;
        client.write_all(&[1; 100]).await.unwrap();
        let mut buf = [0; 100];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(&[2; 30]).await.unwrap();
        let mut back = [0; 30];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(tracked.bytes(), (100, 30));
        // The families moved while the connection is open.
        assert_eq!(traffic.received.get_or_create(&labels).get(), 100);
        assert_eq!(traffic.sent.get_or_create(&labels).get(), 30);
        assert_eq!(traffic.opened.get_or_create(&labels).get(), 1);
        assert_eq!(traffic.closed.get_or_create(&labels).get(), 0);

        tracked.close(Outcome::failed(ResponseFlag::Denied, None, "denied".into()));
        let mut denied = labels.clone();
        denied.response_flags = ResponseFlag::Denied;
        assert_eq!(traffic.closed.get_or_create(&denied).get(), 1);
        assert_eq!(traffic.closed.get_or_create(&labels).get(), 0);
        let exposed = warren_daemon::metrics::exposition(&registry).unwrap();
        assert!(exposed.contains("response_flags=\"DENY\""), "{exposed}");
        assert!(exposed.contains("tcp_received_bytes_total{"), "{exposed}");

        // A connection whose task is dropped is closed all the same.
        drop(traffic.open(&c));
        assert_eq!(traffic.closed.get_or_create(&labels).get(), 1);
        assert_eq!(traffic.opened.get_or_create(&labels).get(), 2);
    }

    #[tokio::test]
    async fn the_relay_halves_of_a_counted_socket_count_each_way() {
        let mut registry = Registry::default();
        let traffic = Traffic::register(&mut registry, Cluster::default());
        let sleep = workload("default", "sleep", [10, 244, 1, 2], &[]);
        let web = workload("shop", "web", [10, 244, 2, 2], &[]);
        let c = connection(
            Reporter::destination,
            Path::Hbone,
            Some(&sleep),
            Some(&sleep.identity),
            &web,
        );
        let tracked = traffic.open(&c);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut app = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (delivery, _) = listener.accept().await.unwrap();
        // At the destination the delivery socket is wrapped: what it writes
        // is the request, what it reads the response.
        let mut counted = tracked.server_side(delivery);
        let (mut reader, mut writer) = counted.halves();
        writer.write_all(&[1; 70]).await.unwrap();
        let mut request = [0; 70];
        app.read_exact(&mut request).await.unwrap();
        app.write_all(&[2; 20]).await.unwrap();
        std::future::poll_fn(|cx| reader.poll_read_ready(cx))
            .await
            .unwrap();
        let mut response = [0; 20];
        reader.read_exact(&mut response).await.unwrap();
        assert_eq!(tracked.bytes(), (70, 20));
    }
}
