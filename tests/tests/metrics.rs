//! Istio's metrics and the access log, in the lab: known traffic gives
//! exactly the expected counters, with every label, on both agents.
//!
//! Node 1: n1p1 is default/sleep (a pod of the Deployment `sleep`, app=sleep,
//! version=v1), n1p2 is outside the mesh. Node 2: n2p1 is shop/web (of the
//! Deployment `web`, app=web, version=v2), serving on 8080 and 9090; an
//! AuthorizationPolicy denies 9090. The mesh is PERMISSIVE (no
//! PeerAuthentication), so plaintext reaches web through its agent.

use std::{collections::BTreeMap, fs, net::SocketAddr, time::Instant};

use warren_tests::{
    Lab, Node,
    harness::{Agent, Call, LogLine, MeshWorkload, PATIENCE, Server, start_agents_with, test_lab},
    lab::files_dir,
    telemetry::{self, ISTIO_TCP_LABELS, ISTIO_TCP_METRICS, Metrics, NO_ADMIN_PORT},
};

const PORT: u16 = 8080;
const DENIED_PORT: u16 = 9090;
const METRICS_PORT: u16 = 15020;

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

struct Mesh {
    lab: Lab,
    sleep: MeshWorkload,
    web: MeshWorkload,
    agents: Vec<Agent>,
}

impl Mesh {
    fn new() -> Self {
        let lab = test_lab(2, 2);
        let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep")
            .label("app", "sleep")
            .label("version", "v1")
            .workload_name("sleep");
        let web = MeshWorkload::new(lab.pod(1, 0), "shop", "web")
            .label("app", "web")
            .label("version", "v2")
            .workload_name("web");
        let dir = files_dir(lab.prefix());
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).unwrap();
        fs::write(policies.join("deny.yaml"), NO_ADMIN_PORT).unwrap();
        let workloads = [sleep.clone(), web.clone()];
        let agents = start_agents_with(
            &lab,
            &workloads,
            &policies,
            &dir.join("agents"),
            &format!("metricsListen: 0.0.0.0:{METRICS_PORT}\n"),
        );
        Self {
            lab,
            sleep,
            web,
            agents,
        }
    }

    fn scrape(&self, node: usize) -> Metrics {
        scrape(self.lab.node(node), "/metrics")
    }
}

fn scrape(node: &Node, path: &str) -> Metrics {
    let addr = SocketAddr::from((node.ip, METRICS_PORT));
    telemetry::scrape(&node.netns_path(), addr, path).unwrap()
}

/// The labels of a connection from sleep to web, as Istio would report
/// them, with `changes` applied.
fn labels(changes: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> = [
        ("reporter", "source"),
        ("source_workload", "sleep"),
        ("source_canonical_service", "sleep"),
        ("source_canonical_revision", "v1"),
        ("source_workload_namespace", "default"),
        ("source_principal", SLEEP),
        ("source_app", "sleep"),
        ("source_version", "v1"),
        ("source_cluster", "Kubernetes"),
        ("destination_service", "unknown"),
        ("destination_service_namespace", "unknown"),
        ("destination_service_name", "unknown"),
        ("destination_workload", "web"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v2"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", WEB),
        ("destination_app", "web"),
        ("destination_version", "v2"),
        ("destination_cluster", "Kubernetes"),
        ("request_protocol", "tcp"),
        ("response_flags", "-"),
        ("connection_security_policy", "mutual_tls"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (key, value) in changes {
        assert!(labels.contains_key(*key), "no label {key}");
        labels.insert((*key).to_owned(), (*value).to_owned());
    }
    labels
}

type Series = BTreeMap<BTreeMap<String, String>, f64>;

/// Every Istio TCP series an agent should expose, by metric.
fn expected(entries: &[(&str, BTreeMap<String, String>, f64)]) -> BTreeMap<String, Series> {
    let mut all: BTreeMap<String, Series> = ISTIO_TCP_METRICS
        .iter()
        .map(|m| ((*m).to_owned(), Series::new()))
        .collect();
    for (metric, labels, value) in entries {
        *all.get_mut(*metric)
            .unwrap()
            .entry(labels.clone())
            .or_default() += value;
    }
    all
}

fn istio_series(metrics: &Metrics) -> BTreeMap<String, Series> {
    ISTIO_TCP_METRICS
        .iter()
        .map(|m| ((*m).to_owned(), metrics.series(m).unwrap()))
        .collect()
}

/// Scrapes `node` until its Istio series are `want` (the last counters
/// move when both ends have closed), then asserts they are.
fn assert_settles(node: &Node, want: &BTreeMap<String, Series>) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let have = istio_series(&scrape(node, "/metrics"));
        if &have == want || Instant::now() > deadline {
            assert_eq!(&have, want, "Istio's TCP metrics on {}", node.name);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn known_traffic_gives_exact_istio_metrics_on_both_agents() {
    let mesh = Mesh::new();
    let _servers = [
        Server::start(&mesh.web.pod, PORT).unwrap(),
        Server::start(&mesh.web.pod, DENIED_PORT).unwrap(),
    ];
    // The server greets each client with its name and a newline, then
    // echoes: what it sends back is that much more than it received.
    let greeting = mesh.web.pod.name.len() as f64 + 1.0;
    let sizes = [1000.0, 2000.0, 3000.0];
    for size in sizes {
        let call = Call {
            bytes: Some(size as usize),
            ..Call::default()
        };
        let called = call.run(&mesh.sleep.pod, (mesh.web.pod.ip, PORT)).unwrap();
        assert!(called.ok);
    }
    // Refused by the policy at the destination.
    let denied = Call::quick().run(&mesh.sleep.pod, (mesh.web.pod.ip, DENIED_PORT));
    assert!(denied.is_err(), "the policy lets 9090 through: {denied:?}");
    // Plaintext from outside the mesh, through web's PERMISSIVE port.
    let outsider = mesh.lab.pod(0, 1).clone();
    let plain = Call {
        bytes: Some(500),
        ..Call::default()
    };
    assert!(plain.run(&outsider, (mesh.web.pod.ip, PORT)).unwrap().ok);

    let sent: f64 = sizes.iter().sum();
    let answered = sent + greeting * sizes.len() as f64;
    // The client's agent: the four connections it carried (the outsider's
    // is not its to see). The denied one is refused by the destination's
    // agent, which the source reports as DENY too.
    let source = expected(&[
        ("istio_tcp_connections_opened_total", labels(&[]), 4.0),
        ("istio_tcp_connections_closed_total", labels(&[]), 3.0),
        (
            "istio_tcp_connections_closed_total",
            labels(&[("response_flags", "DENY")]),
            1.0,
        ),
        ("istio_tcp_received_bytes_total", labels(&[]), sent),
        ("istio_tcp_sent_bytes_total", labels(&[]), answered),
    ]);
    assert_settles(mesh.lab.node(0), &source);

    // The server's agent: the same four, reported by the destination, and
    // the plaintext one: no identity either way, the client unknown (it is
    // not a workload of the mesh), and the security policy `none`.
    let inbound = labels(&[("reporter", "destination")]);
    let plaintext = labels(&[
        ("reporter", "destination"),
        ("source_workload", "unknown"),
        ("source_canonical_service", "unknown"),
        ("source_canonical_revision", "unknown"),
        ("source_workload_namespace", "unknown"),
        ("source_principal", "unknown"),
        ("source_app", "unknown"),
        ("source_version", "unknown"),
        ("source_cluster", "unknown"),
        ("destination_principal", "unknown"),
        ("connection_security_policy", "none"),
    ]);
    let destination = expected(&[
        ("istio_tcp_connections_opened_total", inbound.clone(), 4.0),
        ("istio_tcp_connections_closed_total", inbound.clone(), 3.0),
        (
            "istio_tcp_connections_closed_total",
            labels(&[("reporter", "destination"), ("response_flags", "DENY")]),
            1.0,
        ),
        ("istio_tcp_received_bytes_total", inbound.clone(), sent),
        ("istio_tcp_sent_bytes_total", inbound, answered),
        ("istio_tcp_connections_opened_total", plaintext.clone(), 1.0),
        ("istio_tcp_connections_closed_total", plaintext.clone(), 1.0),
        ("istio_tcp_received_bytes_total", plaintext.clone(), 500.0),
        ("istio_tcp_sent_bytes_total", plaintext, 500.0 + greeting),
    ]);
    assert_settles(mesh.lab.node(1), &destination);

    // Istio's path answers the same.
    let stats = scrape(mesh.lab.node(1), "/stats/prometheus");
    assert_eq!(istio_series(&stats), destination);

    // Each decision, by what decided it.
    let web = mesh.scrape(1);
    let decisions = |action: &str, policy: &str| {
        web.value(
            "warren_policy_decisions_total",
            &[("action", action), ("policy", policy)],
        )
        .unwrap()
    };
    assert_eq!(decisions("allow", "none"), 4.0);
    assert_eq!(decisions("deny", "shop/no-admin-port"), 1.0);
    assert_eq!(
        web.value("warren_enrolled_pods", &[]).unwrap(),
        1.0,
        "node 2 serves web"
    );

    // The access log: one line per connection, on its own target, the
    // denied one saying why.
    let access = |agent: &Agent| -> Vec<LogLine> {
        agent
            .lines()
            .into_iter()
            .filter(|l| l.field("target") == "access")
            .collect()
    };
    let client_side = access(&mesh.agents[0]);
    let server_side = access(&mesh.agents[1]);
    assert_eq!(client_side.len(), 4, "{client_side:#?}");
    assert_eq!(server_side.len(), 5, "{server_side:#?}");
    let refused = server_side
        .iter()
        .find(|l| l.field("response_flags") == "DENY")
        .expect("the denied connection's line");
    assert_eq!(refused.message(), "connection failed");
    assert_eq!(refused.field("policy"), "DENY shop/no-admin-port");
    assert_eq!(refused.field("src.identity"), SLEEP);
    let plain_line = server_side
        .iter()
        .find(|l| l.field("path") == "plaintext")
        .expect("the plaintext connection's line");
    assert_eq!(plain_line.0["request_bytes"], 500);
    assert_eq!(
        plain_line.0["src.addr"].as_str().unwrap().split(':').next(),
        Some(outsider.ip.to_string().as_str())
    );
    assert!(plain_line.0.get("src.identity").is_none(), "{plain_line:?}");

    // Both agents' lines of one connection carry its trace: the one the
    // client's agent sent in `traceparent`. The access lines name it (and
    // the connection) themselves; every other line of the connection has it
    // from the connection's span.
    for line in &client_side {
        let trace = line.field("trace_id");
        assert_eq!(trace.len(), 32, "{line:?}");
        let matching = server_side
            .iter()
            .filter(|l| l.field("trace_id") == trace)
            .count();
        assert_eq!(matching, 1, "trace {trace} at the destination");
    }
    let first = &client_side[0];
    let (id, trace) = (first.0["connection"].to_string(), first.field("trace_id"));
    let captured: Vec<LogLine> = mesh.agents[0]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "captured outbound connection")
        .filter(|l| span_field(l, "connection") == id)
        .collect();
    assert_eq!(captured.len(), 1, "the capture line of connection {id}");
    assert_eq!(span_field(&captured[0], "trace_id"), trace);
    let accepted = mesh.agents[1]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "accepted HBONE stream")
        .filter(|l| span_field(l, "trace_id") == trace)
        .count();
    assert_eq!(
        accepted, 1,
        "the destination's decision line in trace {trace}"
    );
}

/// A field of the innermost span of a log line (JSON logs list the spans
/// the event was in).
fn span_field(line: &LogLine, field: &str) -> String {
    let spans = line.0["spans"].as_array().cloned().unwrap_or_default();
    spans
        .iter()
        .rev()
        .find_map(|span| match &span[field] {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .unwrap_or_default()
}

#[test]
fn every_istio_series_carries_exactly_istios_labels() {
    let mesh = Mesh::new();
    let _server = Server::start(&mesh.web.pod, PORT).unwrap();
    Call::default()
        .run(&mesh.sleep.pod, (mesh.web.pod.ip, PORT))
        .unwrap();
    for node in 0..2 {
        let deadline = Instant::now() + PATIENCE;
        let metrics = loop {
            let metrics = mesh.scrape(node);
            let closed = metrics
                .series("istio_tcp_connections_closed_total")
                .unwrap();
            if !closed.is_empty() || Instant::now() > deadline {
                break metrics;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        for metric in ISTIO_TCP_METRICS {
            let series = metrics.series(metric).unwrap();
            assert!(!series.is_empty(), "no {metric} on node {node}");
            for labels in series.keys() {
                let names: Vec<&str> = labels.keys().map(String::as_str).collect();
                let mut istio = ISTIO_TCP_LABELS.to_vec();
                istio.sort_unstable();
                assert_eq!(names, istio, "{metric}'s labels");
            }
        }
    }
}

#[test]
fn a_label_changed_while_the_pod_runs_is_what_the_next_connection_reports() {
    let mut mesh = Mesh::new();
    let _server = Server::start(&mesh.web.pod, PORT).unwrap();
    // web's version goes from v2 to v3 in both agents' configs: a refresh,
    // not a new enrollment.
    for agent in &mut mesh.agents {
        let config = fs::read_to_string(agent.config_path()).unwrap();
        let changed = config.replace(
            "labels: {app: web, version: v2}",
            "labels: {app: web, version: v3}",
        );
        assert_ne!(config, changed);
        agent.rewrite_config(&changed).unwrap();
        agent
            .wait_for(PATIENCE, |l| l.message() == "config reloaded")
            .unwrap();
    }
    Call::default()
        .run(&mesh.sleep.pod, (mesh.web.pod.ip, PORT))
        .unwrap();
    for node in 0..2 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let metrics = mesh.scrape(node);
            let v3 = metrics
                .value(
                    "istio_tcp_connections_closed_total",
                    &[("destination_version", "v3")],
                )
                .unwrap();
            if v3 == 1.0 {
                break;
            }
            assert!(Instant::now() < deadline, "node {node}: no v3 series");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
