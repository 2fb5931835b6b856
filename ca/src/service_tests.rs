//! The CA service over real TLS and real gRPC on loopback, in-process: what a
//! node may obtain, what it is refused and how, and who cannot connect at all.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use kube::runtime::watcher::Event;
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String};
use rustls::pki_types::ServerName;
use tempfile::TempDir;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tokio_rustls::TlsConnector;
use tonic::Code;
use warren_pki::{
    ca::{Authority, Policy, init},
    client::{CaClient, ClientError, TlsSource},
    identity::{NodeId, SpiffeId, TrustDomain},
    tls::{TrustBundle, WorkloadCertificate},
    transport::{self, NodeCredential},
};

use crate::{
    kubernetes::{Authenticator, Pods, tests as kubernetes_tests},
    metrics::{Authentication, ConnectionRefusal, Metrics, ReviewOutcome, testing},
    service::{CaServer, ConnectionLimits},
    workloads::Workloads,
};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn sleep() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/sleep")
}

/// `sleep` runs on node-1 and node-3, `web` on node-2; `httpbin` on node-1.
const WORKLOADS: &str = "
node: ca
trustDomain: cluster.local
workloads:
  - {name: sleep-1, namespace: default, serviceAccount: sleep, ip: 10.244.1.2, node: node-1}
  - {name: httpbin-1, namespace: default, serviceAccount: httpbin, ip: 10.244.1.3, node: node-1}
  - {name: web-1, namespace: shop, serviceAccount: web, ip: 10.244.2.2, node: node-2}
  - {name: sleep-3, namespace: default, serviceAccount: sleep, ip: 10.244.3.2, node: node-3}
";

fn web() -> SpiffeId {
    id("spiffe://cluster.local/ns/shop/sa/web")
}

/// A lab CA (root + intermediate, as `warren-ca init` makes them) served on
/// a loopback port until dropped.
struct Served {
    dir: TempDir,
    addr: SocketAddr,
    /// The same CA, loaded again, to issue node credentials as
    /// `warren-ca node-credential` does.
    issuer: Authority,
    roots: TrustBundle,
    /// The CA's metrics, as its endpoint would serve them.
    registry: Registry,
    _stop: oneshot::Sender<()>,
}

fn load_lab(dir: &Path, policy: Policy) -> Authority {
    Authority::load(
        &dir.join("ca-cert.pem"),
        &dir.join("ca-key.pem"),
        &dir.join("root.pem"),
        policy,
    )
    .unwrap()
}

impl Served {
    async fn start() -> Self {
        Self::with_max_ttl(HOUR * 24).await
    }

    async fn with_max_ttl(max_ttl: Duration) -> Self {
        Self::serving(max_ttl, ConnectionLimits::default()).await
    }

    async fn serving(max_ttl: Duration, limits: ConnectionLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        init::lab(dir.path(), &td()).unwrap();
        let mut policy = Policy::new(td());
        policy.max_ttl = max_ttl;
        policy.default_ttl = policy.default_ttl.min(max_ttl);
        let workloads = Workloads::parse(Path::new("workloads.yaml"), WORKLOADS).unwrap();
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let server = CaServer::new(
            load_lab(dir.path(), policy),
            &workloads.trust_domain,
            &workloads.placements,
        )
        .unwrap()
        .with_limits(limits)
        .with_metrics(metrics);
        Self::launch(dir, server, registry).await
    }

    /// The same CA for agents on Kubernetes: tokens reviewed by `api`,
    /// placed by `pods`.
    async fn with_tokens(api: kube::Client, pods: Arc<Pods>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        init::lab(dir.path(), &td()).unwrap();
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let authenticator =
            Authenticator::new(api, kubernetes_tests::settings(), pods, metrics.clone());
        let server = CaServer::with_tokens(
            load_lab(dir.path(), Policy::new(td())),
            Arc::new(authenticator),
        )
        .unwrap()
        .with_metrics(metrics);
        Self::launch(dir, server, registry).await
    }

    async fn launch(dir: TempDir, server: CaServer, registry: Registry) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        let issuer = load_lab(dir.path(), Policy::new(td()));
        let roots = issuer.roots().clone();
        Self {
            dir,
            addr,
            issuer,
            roots,
            registry,
            _stop: stop,
        }
    }

    /// The series of `metric`, by labels.
    fn series(&self, metric: &str) -> BTreeMap<String, f64> {
        testing::series(&testing::samples(&self.registry), metric)
    }

    /// Waits until `metric{labels}` is `value`: the service counts what
    /// happens on a connection in its own tasks.
    async fn eventually(&self, metric: &str, labels: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.series(metric).get(labels).copied();
            if now == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{metric}{{{labels}}} is {now:?}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn node_credential(&self, node: &str) -> NodeCredential {
        credential_from(&self.issuer, node)
    }

    async fn client(&self, node: &str) -> CaClient {
        CaClient::connect(
            &self.addr.to_string(),
            &self.node_credential(node),
            &self.roots,
        )
        .await
        .unwrap()
    }
}

fn credential_from(issuer: &Authority, node: &str) -> NodeCredential {
    credential_for(issuer, node, HOUR)
}

fn credential_for(issuer: &Authority, node: &str, ttl: Duration) -> NodeCredential {
    let node = NodeId::new(td(), node).unwrap();
    let credential = issuer.issue_credential(&node.to_string(), ttl).unwrap();
    NodeCredential::from_pem(
        credential.chain_pem().as_bytes(),
        credential.key_pem().as_bytes(),
    )
    .unwrap()
}

fn csr_with(sans: Vec<SanType>) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    (params.serialize_request(&key).unwrap().pem().unwrap(), key)
}

fn csr_for(id: &SpiffeId) -> (String, KeyPair) {
    csr_with(vec![SanType::URI(
        Ia5String::try_from(id.to_string()).unwrap(),
    )])
}

fn status(error: ClientError) -> tonic::Status {
    match error {
        ClientError::Request(status) => status,
        other => panic!("expected a gRPC status, got {other}"),
    }
}

#[tokio::test]
async fn a_node_gets_certificates_for_its_workloads() {
    let ca = Served::start().await;
    let client = ca.client("node-1").await;
    let (csr, key) = csr_for(&sleep());
    let chain = client.create_certificate(&csr, HOUR).await.unwrap();

    // Leaf, intermediate, and the root last, as istiod answers.
    assert_eq!(chain.len(), 3, "{chain:?}");
    let root = std::fs::read_to_string(ca.dir.path().join("root.pem")).unwrap();
    assert_eq!(chain[2].trim(), root.trim());
    let cert = WorkloadCertificate::from_pem(
        chain[..2].concat().as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .unwrap();
    assert_eq!(cert.identity(), &sleep());

    // node-3 runs a `sleep` too, so it may have that identity as well.
    let (csr, _) = csr_for(&sleep());
    ca.client("node-3")
        .await
        .create_certificate(&csr, HOUR)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_node_is_refused_identities_it_does_not_run() {
    let ca = Served::start().await;
    let client = ca.client("node-1").await;

    let (csr, _) = csr_for(&web());
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let message = refused.message();
    for expected in ["spiffe://cluster.local/ns/shop/sa/web", "node-1", "node-2"] {
        assert!(message.contains(expected), "{message:?} lacks {expected}");
    }

    let (csr, _) = csr_for(&id("spiffe://cluster.local/ns/default/sa/nobody"));
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("no workload"), "{refused:?}");
}

#[tokio::test]
async fn bad_requests_are_invalid_arguments() {
    let ca = Served::start().await;
    let client = ca.client("node-1").await;

    let (csr, _) = csr_with(vec![
        SanType::URI(Ia5String::try_from(sleep().to_string()).unwrap()),
        SanType::DnsName(Ia5String::try_from("sleep.default.svc").unwrap()),
    ]);
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("sleep.default.svc"),
        "{refused:?}"
    );

    // An extra identity rides along with a legitimate one.
    let (csr, _) = csr_with(vec![
        SanType::URI(Ia5String::try_from(sleep().to_string()).unwrap()),
        SanType::URI(Ia5String::try_from(web().to_string()).unwrap()),
    ]);
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("2 URI SANs"), "{refused:?}");

    // A key too weak to sign with (made by OpenSSL: see testdata/README.md).
    let weak = include_str!("../../pki/src/ca/testdata/rsa1024.csr");
    let refused = status(client.create_certificate(weak, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("RSA of 1024 bits"),
        "{refused:?}"
    );

    for garbage in [
        "",
        "not a CSR",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let refused = status(client.create_certificate(garbage, HOUR).await.unwrap_err());
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{garbage:?}: {refused:?}"
        );
        assert!(refused.message().starts_with("CSR"), "{refused:?}");
    }

    // The service survives all of it.
    let (csr, _) = csr_for(&sleep());
    client.create_certificate(&csr, HOUR).await.unwrap();
}

#[tokio::test]
async fn a_node_credential_that_expires_on_an_open_connection_is_refused() {
    let ca = Served::start().await;
    let short = credential_for(&ca.issuer, "node-1", Duration::from_secs(2));
    let client = CaClient::connect(&ca.addr.to_string(), &short, &ca.roots)
        .await
        .unwrap();
    let (csr, _) = csr_for(&sleep());
    client.create_certificate(&csr, HOUR).await.unwrap();
    // Same connection, after the credential's end (whole seconds: 1 to 2 s).
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("expired"), "{refused:?}");
    let refused = ca.series("warren_ca_requests_refused_total");
    assert_eq!(refused["reason=\"node_credential_expired\""], 1.0);
    assert_eq!(refused.values().sum::<f64>(), 1.0, "{refused:?}");
}

#[tokio::test]
async fn lifetimes_are_capped_by_the_policy() {
    let ca = Served::with_max_ttl(HOUR).await;
    let client = ca.client("node-1").await;
    for asked in [HOUR * 48, Duration::ZERO, Duration::from_secs(600)] {
        let (csr, key) = csr_for(&sleep());
        let chain = client.create_certificate(&csr, asked).await.unwrap();
        let cert = WorkloadCertificate::from_pem(
            chain[..2].concat().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let left = cert.not_after().duration_since(SystemTime::now()).unwrap();
        let expected = if asked.is_zero() {
            HOUR
        } else {
            asked.min(HOUR)
        };
        assert!(
            left <= expected && left + Duration::from_secs(60) > expected,
            "asked {asked:?}, got {left:?} left"
        );
    }
}

/// Connects with `config`, says hello in HTTP/2 and reads: the error the
/// server's refusal causes. With TLS 1.3 the client's side of the handshake
/// may complete; the server's refusal then arrives as an alert at the first
/// read.
async fn refusal(ca: &Served, config: std::sync::Arc<rustls::ClientConfig>) -> std::io::Error {
    let tcp = TcpStream::connect(ca.addr).await.unwrap();
    let name = ServerName::try_from("warren-ca").unwrap();
    let outcome = async {
        let mut tls = TlsConnector::from(config).connect(name, tcp).await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    }
    .await;
    outcome.expect_err("the CA answered a client it should have refused")
}

#[tokio::test]
async fn a_client_without_a_node_credential_cannot_connect() {
    let ca = Served::start().await;
    let error = refusal(&ca, transport::test_client_config(&ca.roots, &td(), None)).await;
    assert!(
        format!("{error:?}").contains("CertificateRequired"),
        "{error:?}"
    );

    // A workload's certificate from the same CA is not a node credential.
    let workload = ca
        .issuer
        .issue_credential(&sleep().to_string(), HOUR)
        .unwrap();
    let config = transport::test_client_config(
        &ca.roots,
        &td(),
        Some((workload.chain.clone(), workload.key())),
    );
    let error = refusal(&ca, config).await;
    assert!(
        format!("{error:?}").contains("CertificateUnknown"),
        "{error:?}"
    );
    // Neither got as far as a request.
    ca.eventually(
        "warren_ca_connections_refused_total",
        "reason=\"handshake_failed\"",
        2.0,
    )
    .await;
    let refused = ca.series("warren_ca_requests_refused_total");
    assert_eq!(refused.values().sum::<f64>(), 0.0, "{refused:?}");
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let ca = Served::start().await;
    let client = ca.client("node-1").await;
    // Over the policy's CSR limit: refused with the CA's reason.
    let big = "A".repeat(20 * 1024);
    let refused = status(client.create_certificate(&big, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("20480 bytes"), "{refused:?}");
    // Over the message limit: refused by gRPC before it is decoded.
    let huge = "A".repeat(1024 * 1024);
    let refused = status(client.create_certificate(&huge, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    // And the connection is still good.
    let (csr, _) = csr_for(&sleep());
    client.create_certificate(&csr, HOUR).await.unwrap();
}

#[tokio::test]
async fn a_credential_from_another_ca_is_refused() {
    let ca = Served::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    init::lab(other_dir.path(), &td()).unwrap();
    let other = load_lab(other_dir.path(), Policy::new(td()));
    let foreign = credential_from(&other, "node-1");

    let (csr, _) = csr_for(&sleep());
    let outcome = async {
        let client = CaClient::connect(&ca.addr.to_string(), &foreign, &ca.roots).await?;
        client.create_certificate(&csr, HOUR).await
    }
    .await;
    let error = outcome.expect_err("a foreign node credential was accepted");
    // Refused at the TLS handshake (the server's alert), not by the service.
    assert!(format!("{error:?}").contains("UnknownCA"), "{error:?}");

    // And the client refuses a CA that does not chain to its roots.
    let ours = ca.node_credential("node-1");
    let outcome = async {
        let client = CaClient::connect(&ca.addr.to_string(), &ours, other.roots()).await?;
        client.create_certificate(&csr, HOUR).await
    }
    .await;
    let error = outcome.expect_err("the client trusted a CA outside its roots");
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
}

#[tokio::test]
async fn metrics_count_what_was_signed_and_refused_and_why() {
    let ca = Served::start().await;
    let client = ca.client("node-1").await;
    let (csr, _) = csr_for(&sleep());
    client.create_certificate(&csr, HOUR).await.unwrap();
    // Two refusals of different kinds: the node does not run `web`; the
    // CSR is not one.
    let (csr, _) = csr_for(&web());
    let refused = status(client.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = status(
        client
            .create_certificate("garbage", HOUR)
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    assert_eq!(
        ca.series("warren_ca_certificates_signed_total"),
        testing::expected(
            "authentication",
            ["node_credential"],
            &[("node_credential", 1.0)]
        )
    );
    // Exactly those two moved; the rest of the node-credential CA's reasons
    // are there, at zero; the token ones are not there at all.
    assert_eq!(
        ca.series("warren_ca_requests_refused_total"),
        testing::expected(
            "reason",
            testing::reasons_of(Authentication::NodeCredential),
            &[("not_authorized", 1.0), ("csr_malformed", 1.0)]
        )
    );
    assert_eq!(
        ca.series("warren_ca_connections_refused_total"),
        testing::expected(
            "reason",
            ConnectionRefusal::ALL.iter().map(|r| r.as_str()),
            &[]
        )
    );
    assert!(ca.series("warren_ca_token_reviews_total").is_empty());
    assert_eq!(ca.series("warren_ca_open_connections")[""], 1.0);
    // The lab's intermediate, the first of the chain to expire.
    let expires = ca.series("warren_ca_certificate_expiry_timestamp_seconds")[""];
    let not_after = ca
        .issuer
        .not_after()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(expires, not_after as f64);
    let left = ca.series("warren_ca_certificate_expiry_seconds")[""];
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(
        (expires - now - left).abs() <= 2.0,
        "{left} left, expires at {expires}"
    );

    drop(client);
    ca.eventually("warren_ca_open_connections", "", 0.0).await;
}

/// Connects from `ip` (a loopback address), without saying anything.
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn connections_over_the_limits_are_counted_by_limit() {
    let limits = ConnectionLimits {
        total: 2,
        per_address: 1,
    };
    let ca = Served::serving(HOUR, limits).await;
    let _first = connect_from("127.0.0.1", ca.addr).await;
    ca.eventually("warren_ca_open_connections", "", 1.0).await;
    let _same_address = connect_from("127.0.0.1", ca.addr).await;
    ca.eventually(
        "warren_ca_connections_refused_total",
        "reason=\"too_many_from_address\"",
        1.0,
    )
    .await;
    let _second = connect_from("127.0.0.2", ca.addr).await;
    ca.eventually("warren_ca_open_connections", "", 2.0).await;
    let _third = connect_from("127.0.0.3", ca.addr).await;
    ca.eventually(
        "warren_ca_connections_refused_total",
        "reason=\"too_many_connections\"",
        1.0,
    )
    .await;
    assert_eq!(
        ca.series("warren_ca_connections_refused_total"),
        testing::expected(
            "reason",
            ConnectionRefusal::ALL.iter().map(|r| r.as_str()),
            &[
                ("too_many_from_address", 1.0),
                ("too_many_connections", 1.0)
            ]
        )
    );
    assert_eq!(ca.series("warren_ca_open_connections")[""], 2.0);
}

/// On Kubernetes: an API server that vouches for one agent's token, and
/// Pods that place that agent and `sleep` on node-1.
#[tokio::test]
async fn metrics_of_a_ca_on_kubernetes() {
    let api = kubernetes_tests::fake_api_server(
        201,
        kubernetes_tests::review_of_agent("warren-agent-a", "a1"),
    )
    .await;
    let pods = Arc::new(Pods::default());
    pods.apply(Event::Init);
    for pod in [
        kubernetes_tests::pod(
            "warren-system",
            "warren-agent-a",
            "a1",
            Some("warren-agent"),
            Some("node-1"),
            "Running",
        ),
        kubernetes_tests::pod(
            "default",
            "sleep-1",
            "s1",
            Some("sleep"),
            Some("node-1"),
            "Running",
        ),
    ] {
        pods.apply(Event::InitApply(pod));
    }
    pods.apply(Event::InitDone);
    let ca = Served::with_tokens(api, pods).await;

    let tokens = tempfile::tempdir().unwrap();
    // A client that sends the token of `pod`, if any, as agents do.
    let client = |pod: Option<(&str, &str)>| {
        let roots = ca.roots.clone();
        let tls: TlsSource = Arc::new(move || transport::token_client_config(&roots, &td()));
        let client = CaClient::lazy(&ca.addr.to_string(), tls).unwrap();
        match pod {
            Some((name, uid)) => {
                let path = tokens.path().join(name);
                std::fs::write(&path, kubernetes_tests::agent_token(name, uid)).unwrap();
                client.with_token(&path)
            }
            None => client,
        }
    };
    let agent = client(Some(("warren-agent-a", "a1")));
    let (csr, _) = csr_for(&sleep());
    agent.create_certificate(&csr, HOUR).await.unwrap();
    let (csr, _) = csr_for(&web());
    let refused = status(agent.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    let (csr, _) = csr_for(&sleep());
    let refused = status(
        client(None)
            .create_certificate(&csr, HOUR)
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    // A token of a pod that does not run: refused before any review.
    let gone = client(Some(("warren-agent-gone", "g1")));
    let refused = status(gone.create_certificate(&csr, HOUR).await.unwrap_err());
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    assert_eq!(
        ca.series("warren_ca_certificates_signed_total"),
        testing::expected("authentication", ["token"], &[("token", 1.0)])
    );
    assert_eq!(
        ca.series("warren_ca_requests_refused_total"),
        testing::expected(
            "reason",
            testing::reasons_of(Authentication::Token),
            &[
                ("not_authorized", 1.0),
                ("token_missing", 1.0),
                ("token_invalid", 1.0)
            ]
        )
    );
    // One review: the agent's second request recalled it.
    assert_eq!(
        ca.series("warren_ca_token_reviews_total"),
        testing::expected(
            "outcome",
            ReviewOutcome::ALL.iter().map(|o| o.as_str()),
            &[("accepted", 1.0)]
        )
    );
}
