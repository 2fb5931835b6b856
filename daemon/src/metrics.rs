//! The Prometheus endpoint of warren's daemons: a
//! [`Registry`](prometheus_client::registry::Registry), encoded in the
//! OpenMetrics text format at each scrape, on the bounded server of
//! [`crate::http`].
//!
//! - `GET /metrics`: the usual path, which Prometheus asks by default.
//! - `GET /stats/prometheus`: the same, on the path ztunnel and Istio's
//!   proxies serve theirs, so that scrape configurations written for them
//!   find warren's too.
//!
//! A scrape encodes the registry afresh, so collectors registered with
//! `register_collector` compute their values then (a certificate's time
//! left, say), unless another scrape encoded it less than [`FRESH_FOR`]
//! ago: then that answer is served again. Encoding runs on the runtime's
//! threads, and holds each family's lock while it reads it (which a new
//! connection's first count waits for); so however many clients scrape
//! (on a host-network port, every pod can), the registry is encoded at most
//! once per [`FRESH_FOR`], one scrape at a time. What a daemon registers
//! must still be quick to read.
//!
//! Plain HTTP without TLS, as Prometheus scrapes pods; nothing secret is
//! served, and label values must never carry what a client sent.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use prometheus_client::{encoding::text, metrics::gauge::Gauge, registry::Registry};

use crate::http::{self as server, reply};

pub const METRICS_PATH: &str = "/metrics";
/// Where ztunnel and Istio's proxies serve their metrics.
pub const ISTIO_METRICS_PATH: &str = "/stats/prometheus";
/// What [`text::encode`] writes: OpenMetrics 1.0, which Prometheus asks for
/// first and reads natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counts one live thing (an open connection, a stream) in a gauge: up when
/// made, down when dropped.
#[derive(Debug)]
pub struct Live(Gauge);

impl Live {
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How long one encoding of the registry answers scrapes. Prometheus scrapes
/// every 15 s or more; a second's staleness costs it nothing.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// Serves `registry` on [`METRICS_PATH`] and [`ISTIO_METRICS_PATH`]; GET
/// only, 404 elsewhere.
pub fn handler(registry: Arc<Registry>) -> server::Handler {
    handler_fresh_for(registry, FRESH_FOR)
}

/// Like [`handler`], an encoding answering scrapes for `fresh_for`.
pub fn handler_fresh_for(registry: Arc<Registry>, fresh_for: Duration) -> server::Handler {
    let scrapes = Scrapes {
        registry,
        fresh_for,
        last: Mutex::new(None),
    };
    Arc::new(move |request| answer(request, &scrapes))
}

/// The registry and its last successful encoding.
struct Scrapes {
    registry: Arc<Registry>,
    fresh_for: Duration,
    last: Mutex<Option<(Instant, Bytes)>>,
}

impl Scrapes {
    fn answer(&self) -> Response<Full<Bytes>> {
        // Held while encoding: concurrent scrapes wait for this one's
        // answer instead of each encoding their own.
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, body)) = &*last
            && at.elapsed() < self.fresh_for
        {
            return reply(StatusCode::OK, CONTENT_TYPE, body.clone());
        }
        match encoded(&self.registry) {
            Some(body) => {
                *last = Some((Instant::now(), body.clone()));
                reply(StatusCode::OK, CONTENT_TYPE, body)
            }
            None => cannot_encode(),
        }
    }
}

/// Binds `address` and serves `registry` there in a task of its own, which
/// ends with the runtime. Returns the address bound (a port of 0 picks one).
pub async fn spawn(address: &str, registry: Arc<Registry>) -> io::Result<SocketAddr> {
    server::spawn(address, "metrics", handler(registry)).await
}

/// The registry in the OpenMetrics text format: what a scrape gets (and
/// what tests read); an error if a metric or collector failed.
pub fn exposition(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut body = String::new();
    text::encode(&mut body, registry)?;
    Ok(body)
}

fn encoded(registry: &Registry) -> Option<Bytes> {
    exposition(registry).ok().map(Bytes::from)
}

/// A registry that cannot be encoded (a collector failed) answers 500, and
/// is logged: the scraper records only that the target is down.
fn cannot_encode() -> Response<Full<Bytes>> {
    tracing::error!("cannot encode the metrics: a metric or collector failed");
    server::text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "cannot encode the metrics; see the daemon's log\n".into(),
    )
}

fn answer(request: &Request<Incoming>, scrapes: &Scrapes) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != METRICS_PATH && path != ISTIO_METRICS_PATH {
        return server::text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint; try {METRICS_PATH}\n"),
        );
    }
    if request.method() != Method::GET {
        let mut refused = server::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
        // RFC 9110: a 405 says what is allowed.
        refused
            .headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
        return refused;
    }
    scrapes.answer()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use prometheus_client::{
        collector::Collector,
        encoding::{DescriptorEncoder, EncodeMetric},
        metrics::{counter::Counter, gauge::ConstGauge},
    };

    use super::*;
    use crate::http::testing::{get, request};

    /// Serves `registry` on a free port, each encoding answering scrapes for
    /// `fresh_for`.
    async fn spawn_fresh(registry: Arc<Registry>, fresh_for: Duration) -> SocketAddr {
        server::spawn(
            "127.0.0.1:0",
            "metrics",
            handler_fresh_for(registry, fresh_for),
        )
        .await
        .unwrap()
    }

    #[test]
    fn live_things_are_counted_while_they_live() {
        let gauge = Gauge::default();
        let (a, b) = (Live::new(&gauge), Live::new(&gauge));
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(gauge.get(), 1);
        drop(b);
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn scrapes_in_quick_succession_share_one_encoding() {
        let mut registry = Registry::default();
        let requests: Counter = Counter::default();
        registry.register("test_requests", "Requests seen", requests.clone());
        let fresh_for = Duration::from_millis(300);
        let address = spawn_fresh(Arc::new(registry), fresh_for).await;
        let scrape = || async { get(address, &request("GET", METRICS_PATH)).await };
        assert!(scrape().await.contains("test_requests_total 0\n"));
        requests.inc();
        // Within its freshness, the same answer; after it, the new value.
        assert!(scrape().await.contains("test_requests_total 0\n"));
        tokio::time::sleep(fresh_for).await;
        assert!(scrape().await.contains("test_requests_total 1\n"));
    }

    /// The status line, the headers (names lowercased) and the body of a
    /// raw HTTP/1.1 response.
    fn parse(response: &str) -> (String, Vec<(String, String)>, String) {
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {response:?}"));
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().to_owned();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.trim().to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        (status, headers, body.to_owned())
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn a_counter_shows_on_both_paths_as_openmetrics() {
        let mut registry = Registry::default();
        let requests: Counter = Counter::default();
        registry.register("test_requests", "Requests seen", requests.clone());
        let address = spawn_fresh(Arc::new(registry), Duration::ZERO).await;

        let (status, headers, body) = parse(&get(address, &request("GET", METRICS_PATH)).await);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(header(&headers, "content-type"), Some(CONTENT_TYPE));
        assert!(body.contains("test_requests_total 0\n"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");

        requests.inc();
        requests.inc();
        for path in [METRICS_PATH, ISTIO_METRICS_PATH] {
            let (status, _, body) = parse(&get(address, &request("GET", path)).await);
            assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
            assert!(body.contains("# TYPE test_requests counter\n"), "{body}");
            assert!(body.contains("test_requests_total 2\n"), "{path}: {body}");
        }
    }

    /// Reads a value that changes between scrapes, as a certificate's time
    /// left does.
    #[derive(Debug)]
    struct Reading(Arc<AtomicI64>);

    impl Collector for Reading {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let gauge = ConstGauge::new(self.0.load(Ordering::Relaxed));
            let metric = encoder.encode_descriptor(
                "test_reading",
                "A reading",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)
        }
    }

    #[tokio::test]
    async fn collectors_run_at_each_scrape() {
        let value = Arc::new(AtomicI64::new(7));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Reading(value.clone())));
        let address = spawn_fresh(Arc::new(registry), Duration::ZERO).await;

        let (_, _, body) = parse(&get(address, &request("GET", METRICS_PATH)).await);
        assert!(body.contains("test_reading 7\n"), "{body}");
        value.store(-3, Ordering::Relaxed);
        let (_, _, body) = parse(&get(address, &request("GET", METRICS_PATH)).await);
        assert!(body.contains("test_reading -3\n"), "{body}");
    }

    #[derive(Debug)]
    struct Broken;

    impl Collector for Broken {
        fn encode(&self, _: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            Err(std::fmt::Error)
        }
    }

    #[tokio::test]
    async fn a_registry_that_cannot_be_encoded_answers_500() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Broken));
        let address = spawn_fresh(Arc::new(registry), Duration::ZERO).await;
        let (status, headers, body) = parse(&get(address, &request("GET", METRICS_PATH)).await);
        assert_eq!(status, "HTTP/1.1 500 Internal Server Error");
        assert_eq!(
            header(&headers, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(body, "cannot encode the metrics; see the daemon's log\n");
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let address = spawn("127.0.0.1:0", Arc::new(Registry::default()))
            .await
            .unwrap();
        for path in ["/", "/healthz/ready", "/metrics/", "/stats"] {
            let (status, _, _) = parse(&get(address, &request("GET", path)).await);
            assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
        }
        for method in ["POST", "PUT", "DELETE", "HEAD"] {
            let (status, headers, _) = parse(&get(address, &request(method, METRICS_PATH)).await);
            assert_eq!(status, "HTTP/1.1 405 Method Not Allowed", "{method}");
            assert_eq!(header(&headers, "allow"), Some("GET"), "{method}");
        }
        // Still serving after all that.
        let (status, _, body) = parse(&get(address, &request("GET", METRICS_PATH)).await);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, "# EOF\n");
    }
}
