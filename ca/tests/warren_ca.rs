//! `warren-ca` as a real process: made with `warren-ca init`, a node
//! credential from `warren-ca node-credential`, and the client the agents
//! use; its metrics scraped as Prometheus does.

use std::{
    collections::BTreeMap,
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use prometheus_parse::{Scrape, Value};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
use warren_pki::{
    client::CaClient,
    identity::{NodeId, SpiffeId, TrustDomain},
    tls::{TrustBundle, WorkloadCertificate, certificates_from_pem},
    transport::{NODE_ROOTS, NodeCredential},
};

const WARREN_CA: &str = env!("CARGO_BIN_EXE_warren-ca");

const WORKLOADS: &str = "
node: ca
workloads:
  - {name: sleep-1, namespace: default, serviceAccount: sleep, ip: 10.244.1.2, node: node-1}
  - {name: web-1, namespace: shop, serviceAccount: web, ip: 10.244.2.2, node: node-2}
";

/// The signing files `warren-ca init --dir ca` makes, as the CA commands
/// take them.
const SIGNING: [&str; 6] = [
    "--ca-cert",
    "ca/ca-cert.pem",
    "--ca-key",
    "ca/ca-key.pem",
    "--roots",
    "ca/root.pem",
];

/// Runs `warren-ca args` in `dir`; fails the test if it fails.
fn warren_ca(args: &[&str], dir: &Path) {
    let (ok, text) = warren_ca_output(args, dir);
    assert!(ok, "warren-ca {args:?}: {text}");
}

/// Runs `warren-ca args` in `dir`; returns whether it succeeded, and what it
/// printed on stdout and stderr.
fn warren_ca_output(args: &[&str], dir: &Path) -> (bool, String) {
    let output = Command::new(WARREN_CA)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Kills the CA when the test ends, also when it fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CSR for `id` alone, as an agent makes it, and its key.
fn csr_for(id: &SpiffeId) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string()).unwrap())];
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

/// A port free now: taken and released, then given to the CA.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GETs `path` from `addr` as Prometheus would, and returns the response's
/// head and its samples: value by `name{labels}` (labels sorted).
async fn scrape(addr: &str, path: &str) -> (String, BTreeMap<String, f64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let samples = scrape
        .samples
        .into_iter()
        .map(|sample| {
            let value = match sample.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                other => panic!("{}: {other:?}", sample.metric),
            };
            (format!("{}{{{}}}", sample.metric, sample.labels), value)
        })
        .collect();
    (head.to_owned(), samples)
}

#[tokio::test]
async fn a_ca_process_serves_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    warren_ca(&["init", "--dir", "ca"], dir);
    let mut args = vec!["node-credential", "--node", "node-1", "--out", "node-1"];
    args.extend(SIGNING);
    warren_ca(&args, dir);
    fs::write(dir.join("workloads.yaml"), WORKLOADS).unwrap();

    let addr = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = fs::File::create(dir.join("ca.log")).unwrap();
    let mut serve = vec![
        "serve",
        "--workloads",
        "workloads.yaml",
        "--listen",
        &addr,
        "--metrics-listen",
        &metrics,
        "--max-ttl",
        "1h",
    ];
    serve.extend(SIGNING);
    let ca = Running(
        Command::new(WARREN_CA)
            .args(&serve)
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let credential = NodeCredential::load(&dir.join("node-1")).unwrap();
    let roots = TrustBundle::from_pem_file(&dir.join("node-1").join(NODE_ROOTS)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match CaClient::connect(&addr, &credential, &roots).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the CA did not come up: {e}"),
        }
    };

    let sleep: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    let (csr, key) = csr_for(&sleep);
    let chain = client
        .create_certificate(&csr, Duration::from_secs(48 * 3600))
        .await
        .unwrap();
    let chain = certificates_from_pem(chain.concat().as_bytes(), "chain").unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let cert = WorkloadCertificate::from_issued(chain, key).unwrap();
    assert_eq!(cert.identity(), &sleep);
    let left = cert.not_after().duration_since(SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(3600), "not capped: {left:?}");

    let web = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let (csr, _) = csr_for(&web);
    let refused = client
        .create_certificate(&csr, Duration::from_secs(3600))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("node-2"), "{refused}");

    // What the process counted, on both paths.
    for path in ["/metrics", "/stats/prometheus"] {
        let (head, samples) = scrape(&metrics, path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{head}"
        );
        let value = |series: &str| {
            *samples
                .get(series)
                .unwrap_or_else(|| panic!("no {series} in {samples:?}"))
        };
        assert_eq!(
            value("warren_ca_certificates_signed_total{authentication=\"node_credential\"}"),
            1.0
        );
        assert_eq!(
            value("warren_ca_requests_refused_total{reason=\"not_authorized\"}"),
            1.0
        );
        let refused: f64 = samples
            .iter()
            .filter(|(series, _)| series.starts_with("warren_ca_requests_refused_total{"))
            .map(|(_, n)| n)
            .sum();
        assert_eq!(refused, 1.0, "{samples:?}");
        // `warren-ca init`'s lab intermediate lives for a year or so.
        let left = value("warren_ca_certificate_expiry_seconds{}");
        assert!(left > 300.0 * 86400.0, "{left}");
        assert_eq!(
            value(&format!(
                "warren_ca_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )),
            1.0
        );
    }
    let (head, _) = scrape(&metrics, "/healthz/ready").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    drop(ca);

    let log = fs::read_to_string(dir.join("ca.log")).unwrap();
    assert!(log.contains("signed a workload certificate"), "{log}");
    assert!(log.contains("refused: not authorized"), "{log}");
    assert!(log.contains("metrics serving"), "{log}");
    assert!(
        log.contains("node-1") && log.contains("ns/shop/sa/web"),
        "{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[test]
fn node_credentials_are_never_overwritten_by_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    warren_ca(&["init", "--dir", "ca"], dir);
    let credential = |node: &str, extra: &[&str]| {
        let mut args = vec!["node-credential", "--node", node, "--out", "node"];
        args.extend(SIGNING);
        args.extend(extra);
        warren_ca_output(&args, dir)
    };
    let node = |name: &str| NodeId::new(TrustDomain::new("cluster.local").unwrap(), name).unwrap();

    let (ok, text) = credential("node-1", &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("Wrote the credential of spiffe://cluster.local/warren/node/node-1"),
        "{text}"
    );
    let key = dir.join("node/node-key.pem");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    NodeCredential::load_for(&dir.join("node"), &node("node-1")).unwrap();

    // Never overwritten by mistake; renewed on purpose.
    let (ok, text) = credential("node-2", &[]);
    assert!(!ok);
    assert!(text.contains("renew it with --replace"), "{text}");
    NodeCredential::load_for(&dir.join("node"), &node("node-1")).unwrap();
    let (ok, text) = credential("node-2", &["--replace"]);
    assert!(ok, "{text}");
    NodeCredential::load_for(&dir.join("node"), &node("node-2")).unwrap();
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}
