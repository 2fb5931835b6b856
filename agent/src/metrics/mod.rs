//! What the agent measures, in Prometheus's model: Istio's TCP metrics
//! ([`traffic`], under `istio_`), so that dashboards and alerts built for
//! Istio work unchanged, and warren's own (under `warren_`).
//!
//! Counters and gauges that the agent moves as things happen live here;
//! values that are cheaper to read when scraped (certificate expiry,
//! kernel drop counters) are [`Scraped`] collectors the daemon registers.

pub mod traffic;

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use traffic::Traffic;

use warren_pki::{
    identity::SpiffeId,
    tls::{TlsError, WorkloadCertificate},
};

use crate::{
    mesh::{Cluster, policy::Decision},
    tls::CertificateSource,
};

/// Every metric the agent moves as it works.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub traffic: Traffic,
    /// Pods of this node captured and served, and pods that failed to be.
    pub enrolled_pods: Gauge,
    pub failing_pods: Gauge,
    /// The agent's certificate requests to the CA, by outcome.
    pub ca_requests: Family<Outcome, Counter>,
    /// Authorization decisions on connections to this node's pods.
    pub policy_decisions: Family<PolicyDecision, Counter>,
    /// Open connections in the HBONE pool, and streams open on them.
    pub pool_connections: Gauge,
    pub pool_streams: Gauge,
    /// Whether the mesh's sources have delivered a complete view (1) or
    /// not yet (0).
    pub discovery_synced: Gauge,
    /// Errors of the Kubernetes source (a watch failing, a relist), and the
    /// time of the last one (Unix seconds).
    pub discovery_errors: Counter,
    pub discovery_last_error: Gauge,
    /// The same-node fast path: pairs granted, connections open, and those
    /// cut because their pair was no longer allowed.
    pub fast_path_grants: Gauge,
    pub fast_path_connections: Gauge,
    pub fast_path_cuts: Family<CutReason, Counter>,
}

/// A count as a gauge's value.
pub fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Why fast-path connections were cut: a closed set (see
/// `fastpath::Refusal::reason`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CutReason {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyDecision {
    /// `allow` or `deny`.
    pub action: &'static str,
    /// The deciding AuthorizationPolicy (`namespace/name`), or `none` when
    /// none decided (no policy applies, or none of the ALLOW policies
    /// matched).
    pub policy: String,
}

impl Metrics {
    /// Makes the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry, cluster: Cluster) -> Arc<Self> {
        let traffic = Traffic::register(registry.sub_registry_with_prefix("istio"), cluster);
        let metrics = Self {
            traffic,
            enrolled_pods: Gauge::default(),
            failing_pods: Gauge::default(),
            ca_requests: Family::default(),
            policy_decisions: Family::default(),
            pool_connections: Gauge::default(),
            pool_streams: Gauge::default(),
            discovery_synced: Gauge::default(),
            discovery_errors: Counter::default(),
            discovery_last_error: Gauge::default(),
            fast_path_grants: Gauge::default(),
            fast_path_connections: Gauge::default(),
            fast_path_cuts: Family::default(),
        };
        let own = registry.sub_registry_with_prefix("warren");
        own.register(
            "enrolled_pods",
            "Pods of this node captured and served",
            metrics.enrolled_pods.clone(),
        );
        own.register(
            "failing_pods",
            "Pods of this node in the mesh that could not be enrolled (retried)",
            metrics.failing_pods.clone(),
        );
        own.register(
            "ca_requests",
            "Workload certificate requests to the CA, by outcome (issued, failed)",
            metrics.ca_requests.clone(),
        );
        own.register(
            "policy_decisions",
            "Authorization decisions on connections to this node's pods",
            metrics.policy_decisions.clone(),
        );
        own.register(
            "pool_connections",
            "HBONE connections open in the outbound pool",
            metrics.pool_connections.clone(),
        );
        own.register(
            "pool_streams",
            "Streams open on the outbound pool's HBONE connections",
            metrics.pool_streams.clone(),
        );
        own.register(
            "discovery_synced",
            "1 once the mesh's sources have delivered a complete view",
            metrics.discovery_synced.clone(),
        );
        own.register(
            "discovery_errors",
            "Errors of the Kubernetes source (watches failing, relists)",
            metrics.discovery_errors.clone(),
        );
        own.register(
            "discovery_last_error_timestamp_seconds",
            "When the Kubernetes source last failed (Unix seconds; 0: never)",
            metrics.discovery_last_error.clone(),
        );
        own.register(
            "fast_path_grants",
            "Same-node pairs (source pod, destination, port) allowed to connect straight",
            metrics.fast_path_grants.clone(),
        );
        own.register(
            "fast_path_connections",
            "Same-node fast-path connections open",
            metrics.fast_path_connections.clone(),
        );
        own.register(
            "fast_path_cuts",
            "Fast-path connections cut because their pair was no longer allowed, by why",
            metrics.fast_path_cuts.clone(),
        );
        Arc::new(metrics)
    }

    /// Counts an authorization decision.
    pub fn decided(&self, decision: &Decision) {
        self.policy_decisions
            .get_or_create(&PolicyDecision::of(decision))
            .inc();
    }

    /// Counts a certificate request's outcome.
    pub fn ca_request(&self, outcome: &'static str) {
        self.ca_requests.get_or_create(&Outcome { outcome }).inc();
    }

    /// Notes an error of a mesh source.
    pub fn discovery_error(&self) {
        self.discovery_errors.inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.discovery_last_error
            .set(i64::try_from(now).unwrap_or(i64::MAX));
    }
}

impl PolicyDecision {
    fn of(decision: &Decision) -> Self {
        let action = if decision.allowed { "allow" } else { "deny" };
        // `DENY ns/name` or `ALLOW ns/name` name the deciding policy; the
        // other reasons say none did.
        let policy = decision
            .reason
            .strip_prefix("DENY ")
            .or_else(|| decision.reason.strip_prefix("ALLOW "))
            .unwrap_or("none")
            .to_owned();
        Self { action, policy }
    }
}

/// A certificate source whose requests are counted by outcome (`issued`,
/// `failed`), whatever the source is.
pub struct CountedSource {
    pub inner: Arc<dyn CertificateSource>,
    pub metrics: Arc<Metrics>,
}

impl CertificateSource for CountedSource {
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>> {
        let id = id.clone();
        Box::pin(async move {
            let result = self.inner.certificate(&id).await;
            self.metrics
                .ca_request(if result.is_ok() { "issued" } else { "failed" });
            result
        })
    }
}

/// A gauge or counter family whose values are read at each scrape.
pub struct Scraped<L> {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    read: Reader<L>,
}

/// Reads a family's values: each label set and its value.
type Reader<L> = Box<dyn Fn() -> Vec<(L, f64)> + Send + Sync>;

impl<L> Scraped<L> {
    /// `name` is the whole name (with its prefix); a counter's gets
    /// `_total` when encoded.
    pub fn gauge(
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> Vec<(L, f64)> + Send + Sync + 'static,
    ) -> Self {
        Self::new(MetricType::Gauge, name, help, Box::new(read))
    }

    pub fn counter(
        name: &'static str,
        help: &'static str,
        read: impl Fn() -> Vec<(L, f64)> + Send + Sync + 'static,
    ) -> Self {
        Self::new(MetricType::Counter, name, help, Box::new(read))
    }

    fn new(kind: MetricType, name: &'static str, help: &'static str, read: Reader<L>) -> Self {
        Self {
            name,
            help,
            kind,
            read,
        }
    }
}

impl<L> fmt::Debug for Scraped<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scraped").field("name", &self.name).finish()
    }
}

impl<L: EncodeLabelSet + Send + Sync + 'static> Collector for Scraped<L> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let values = (self.read)();
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in values {
            let metric = family.encode_family(&labels)?;
            match self.kind {
                MetricType::Counter => {
                    prometheus_client::metrics::counter::ConstCounter::new(value as u64)
                        .encode(metric)?
                }
                _ => prometheus_client::metrics::gauge::ConstGauge::new(value).encode(metric)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_action_and_deciding_policy() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry, Cluster::default());
        let decision = |allowed: bool, reason: &str| Decision {
            allowed,
            reason: reason.into(),
            audited: vec![],
            dry_run: vec![],
        };
        metrics.decided(&decision(false, "DENY shop/no-admin"));
        metrics.decided(&decision(true, "ALLOW shop/from-sleep"));
        metrics.decided(&decision(true, "no policy"));
        metrics.decided(&decision(false, "no ALLOW policy matched"));
        let text = warren_daemon::metrics::exposition(&registry).unwrap();
        for line in [
            "warren_policy_decisions_total{action=\"deny\",policy=\"shop/no-admin\"} 1",
            "warren_policy_decisions_total{action=\"allow\",policy=\"shop/from-sleep\"} 1",
            "warren_policy_decisions_total{action=\"allow\",policy=\"none\"} 1",
            "warren_policy_decisions_total{action=\"deny\",policy=\"none\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn scraped_values_are_read_at_each_scrape() {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
        struct Reason {
            reason: &'static str,
        }
        let value = Arc::new(std::sync::atomic::AtomicU64::new(3));
        let read = value.clone();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scraped::counter(
            "warren_test_drops",
            "Test drops",
            move || {
                let n = read.load(std::sync::atomic::Ordering::Relaxed);
                vec![(Reason { reason: "spoofed" }, n as f64)]
            },
        )));
        let scrape = || warren_daemon::metrics::exposition(&registry).unwrap();
        assert!(
            scrape().contains("warren_test_drops_total{reason=\"spoofed\"} 3"),
            "{}",
            scrape()
        );
        value.store(5, std::sync::atomic::Ordering::Relaxed);
        assert!(
            scrape().contains("warren_test_drops_total{reason=\"spoofed\"} 5"),
            "{}",
            scrape()
        );
    }
}
