//! Reading what agents expose about themselves: their Prometheus metrics,
//! scraped over HTTP from inside a node's network namespace and parsed
//! with a Prometheus text-format parser, and their admin endpoint.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use prometheus_parse::{Sample, Scrape, Value};

use crate::controlplane::block_on_in_netns;

/// Istio's TCP metrics, as Istio's documentation lists them ("Istio
/// Standard Metrics").
pub const ISTIO_TCP_METRICS: [&str; 4] = [
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
];

/// The labels Istio's documentation gives its TCP metrics (the standard
/// labels, bar the HTTP-only `response_code` and `grpc_response_status`).
pub const ISTIO_TCP_LABELS: [&str; 23] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// An AuthorizationPolicy that denies port 9090 of shop's `app: web`: a
/// decision whose name the telemetry must show.
pub const NO_ADMIN_PORT: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: no-admin-port, namespace: shop}\n\
     spec: {selector: {matchLabels: {app: web}}, action: DENY, \
     rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}\n";

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Sends one HTTP/1.1 request to `addr` from inside the network namespace
/// `netns` and reads the whole answer.
pub fn http(netns: &Path, addr: SocketAddr, method: &str, path: &str) -> Result<Answer> {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = block_on_in_netns(netns, || async move {
        // Plain blocking I/O: this thread is in the namespace, and it is
        // one short request.
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok::<_, std::io::Error>(raw)
    })?
    .with_context(|| format!("{method} http://{addr}{path}"))?;
    let raw = String::from_utf8(raw).context("the answer is not UTF-8")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer: {raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// One scrape of an agent's metrics, parsed.
#[derive(Debug)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

/// Scrapes `addr` (a node's metrics address) from inside `netns`.
pub fn scrape(netns: &Path, addr: SocketAddr, path: &str) -> Result<Metrics> {
    let answer = http(netns, addr, "GET", path)?;
    ensure!(
        answer.status == 200,
        "scraping {addr}{path}: status {}: {}",
        answer.status,
        answer.body
    );
    let lines = answer.body.lines().map(|l| Ok(l.to_owned()));
    let parsed = Scrape::parse(lines).context("parsing the exposition")?;
    Ok(Metrics {
        samples: parsed.samples,
    })
}

/// A sample's value as a number, whatever type the parser gave it.
pub fn number(sample: &Sample) -> Result<f64> {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Ok(*v),
        other => bail!("{}: not a single number: {other:?}", sample.metric),
    }
}

/// A sample's labels, ordered.
pub fn labels(sample: &Sample) -> BTreeMap<String, String> {
    sample
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Metrics {
    /// The samples of `metric`.
    pub fn of<'a>(&'a self, metric: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.metric == metric)
    }

    /// The value of `metric` with labels including `matching`; 0 when there
    /// is no such sample (a counter not yet moved); an error when several
    /// match.
    pub fn value(&self, metric: &str, matching: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self
            .of(metric)
            .filter(|s| matching.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        match found.as_slice() {
            [] => Ok(0.0),
            [one] => number(one),
            many => bail!("{} samples of {metric} match {matching:?}", many.len()),
        }
    }

    /// Every sample of `metric` as (labels, value), ordered by labels.
    pub fn series(&self, metric: &str) -> Result<BTreeMap<BTreeMap<String, String>, f64>> {
        self.of(metric)
            .map(|s| Ok((labels(s), number(s)?)))
            .collect()
    }
}
