//! The CA service over real TLS and real gRPC on loopback, in-process: what a
//! node may obtain, what it is refused and how, and who cannot connect at all.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, SystemTime},
};

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
    client::{CaClient, ClientError},
    identity::{NodeId, SpiffeId, TrustDomain},
    tls::{TrustBundle, WorkloadCertificate},
    transport::{self, NodeCredential},
};

use crate::{service::CaServer, workloads::Workloads};

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
        let dir = tempfile::tempdir().unwrap();
        init::lab(dir.path(), &td()).unwrap();
        let mut policy = Policy::new(td());
        policy.max_ttl = max_ttl;
        policy.default_ttl = policy.default_ttl.min(max_ttl);
        let workloads = Workloads::parse(Path::new("workloads.yaml"), WORKLOADS).unwrap();
        let server = CaServer::new(
            load_lab(dir.path(), policy),
            &workloads.trust_domain,
            &workloads.placements,
        )
        .unwrap();
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
            _stop: stop,
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
