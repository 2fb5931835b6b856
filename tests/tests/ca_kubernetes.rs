//! The CA on Kubernetes, end to end: a real API server (1.20) and controller
//! manager, `warren-ca serve --kubernetes` with its own service account's
//! token bound to the roles of deploy/, agents presenting real projected
//! tokens (TokenRequest, bound to their Pods) that the CA has the API server
//! review (TokenReview). The roots reach the agents through the ConfigMap the
//! CA publishes.

use std::{
    fs,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use k8s_openapi::api::core::v1::{Pod as KubePod, ServiceAccount};
use kube::api::Api;
use rcgen::{CertificateParams, KeyPair, SanType};
use warren_pki::{
    client::{CaClient, ClientError},
    identity::TrustDomain,
    tls::{TrustBundle, certificates_from_pem, spiffe_id_of},
    transport,
};
use warren_tests::{
    audit,
    cluster::{
        CA_AUDIENCE, CA_RBAC, Cluster, KubeCa, PodSpec, RBAC, addr, agent_capabilities, agent_pod,
        bound_token, enrolled,
    },
    controlplane::{ControlPlane, block_on_in_netns},
    harness::{CA_HEALTH_PORT, CA_PORT, Call, HEALTH_PORT, LogLine, PATIENCE, Server},
    lab::Node,
};

const AGENT_USER: &str = "system:serviceaccount:warren-system:warren-agent";
const CA_USER: &str = "system:serviceaccount:warren-system:warren-ca";
const PORT: u16 = 8080;

/// A lab cluster with the CA on Kubernetes ([`KubeCa`]); agents once
/// started.
struct Mesh {
    cluster: Cluster,
    ca: KubeCa,
}

impl Mesh {
    fn start() -> Self {
        let cluster = Cluster::without_agents(2, true, RBAC);
        let ca = cluster.start_ca();
        Self { cluster, ca }
    }

    fn start_agents(&mut self) {
        self.cluster.start_agents_with_ca(&self.ca);
    }

    fn node(&self, i: usize) -> &Node {
        self.cluster.lab.node(i)
    }

    fn token(&self, i: usize) -> String {
        fs::read_to_string(&self.ca.tokens[i]).unwrap()
    }

    /// Asks the CA, from node `from`'s network, for a certificate for
    /// `identity`, presenting `token` (none: no authorization header).
    fn ask(&self, from: usize, token: Option<&str>, identity: &str) -> Result<String, ClientError> {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        if let Some(token) = token {
            fs::write(&token_file, token).unwrap();
        }
        let roots = TrustBundle::from_pem_file(&self.ca.trust).unwrap();
        let ca = SocketAddrV4::new(self.node(0).ip, CA_PORT).to_string();
        let csr = csr_for(identity);
        block_on_in_netns(&self.node(from).netns_path(), || async move {
            let td = TrustDomain::new("cluster.local").unwrap();
            let tls = transport::token_client_config(&roots, &td)?;
            let mut client = CaClient::lazy(&ca, Arc::new(move || Ok(tls.clone())))?;
            if token.is_some() {
                client = client.with_token(&token_file);
            }
            let chain = client
                .create_certificate(&csr, Duration::from_secs(3600))
                .await?;
            let leaf = certificates_from_pem(chain[0].as_bytes(), "leaf").unwrap();
            Ok(spiffe_id_of(&leaf[0]).unwrap().to_string())
        })
        .unwrap()
    }

    /// Asks as [`ask`](Self::ask) and expects a refusal with gRPC `code`,
    /// for a reason (as the CA logs it) that says `why`; returns that log
    /// line.
    fn refused(
        &mut self,
        from: usize,
        token: Option<&str>,
        identity: &str,
        (code, why): (tonic::Code, &str),
    ) -> LogLine {
        let before = self.refusals().len();
        let error = self
            .ask(from, token, identity)
            .expect_err("the CA must refuse");
        let status = error
            .status()
            .unwrap_or_else(|| panic!("not a refusal: {error}"));
        assert_eq!(status.code(), code, "{status:?}");
        let lines = self
            .ca
            .service
            .wait_for_count(PATIENCE, before + 1, |l| {
                l.message().starts_with("refused: ")
            })
            .unwrap();
        let refusal = lines[before].clone();
        assert!(refusal.field("reason").contains(why), "{refusal:?}");
        refusal
    }

    fn refusals(&self) -> Vec<LogLine> {
        self.ca
            .service
            .lines()
            .into_iter()
            .filter(|l| l.message().starts_with("refused: "))
            .collect()
    }
}

/// A token exactly like the kubelet's for `pod`, signed with the API
/// server's own service-account key, but that expired an hour ago.
fn expired_token(cp: &ControlPlane, pod: &KubePod) -> String {
    use ring::{rand::SystemRandom, signature};
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};

    let key_pem = fs::read(cp.dir().join("sa.key")).unwrap();
    let key = PrivateKeyDer::from_pem_slice(&key_pem).unwrap();
    let key = signature::EcdsaKeyPair::from_pkcs8(
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key.secret_der(),
        &SystemRandom::new(),
    )
    .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(cp.client(), "warren-system");
    let account = cp.block_on(accounts.get("warren-agent")).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc",
        "sub": AGENT_USER,
        "aud": [CA_AUDIENCE],
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": now - 3600,
        "kubernetes.io": {
            "namespace": "warren-system",
            "serviceaccount": {"name": "warren-agent", "uid": account.metadata.uid},
            "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
        },
    });
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signed = format!(
        "{}.{}",
        b64(br#"{"alg":"ES256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = key.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(signature.as_ref()))
}

/// A PEM CSR for the SPIFFE ID `identity`.
fn csr_for(identity: &str) -> String {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.try_into().unwrap())];
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// `GET path` on `address`, from `node`'s network; the status line and body.
fn http_get(node: &Node, address: SocketAddrV4, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n");
    block_on_in_netns(&node.netns_path(), || async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    })
    .unwrap()
}

fn identity(namespace: &str, account: &str) -> String {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{account}")
}

fn signed<'a>(lines: &'a [LogLine], node: &str, identity: &str) -> Option<&'a LogLine> {
    lines.iter().find(|l| {
        l.message() == "signed a workload certificate"
            && l.field("node") == node
            && l.field("identity") == identity
    })
}

#[test]
fn agents_get_certificates_for_their_own_nodes_pods_with_their_tokens() {
    let mut mesh = Mesh::start();
    let ca_health = SocketAddrV4::new(mesh.node(0).ip, CA_HEALTH_PORT);
    let ready = http_get(mesh.node(0), ca_health, "/healthz/ready");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    mesh.start_agents();
    let cluster = &mesh.cluster;
    cluster.namespace("shop", true, &["web", "db"]);
    let web = cluster.pod(&PodSpec::new("shop", "web", 0, "web"));
    let db = cluster.pod(&PodSpec::new("shop", "db", 1, "db"));
    let mut server = Server::start(&db, PORT).unwrap();
    mesh.cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();
    mesh.cluster.agents[1]
        .wait_for(PATIENCE, enrolled("shop/db"))
        .unwrap();

    // mTLS with certificates the CA signed for each agent's own pods.
    Call::default().run(&web, addr(&db, PORT)).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), web.ip);
    let capture = mesh.cluster.agents[0].captures().pop().expect("captured");
    assert_eq!(capture.path, "hbone");
    let lines = mesh.ca.service.lines();
    let (node1, node2) = (mesh.node(0).name.clone(), mesh.node(1).name.clone());
    assert!(signed(&lines, &node1, &identity("shop", "web")).is_some());
    assert!(signed(&lines, &node2, &identity("shop", "db")).is_some());
    assert!(mesh.refusals().is_empty(), "{:?}", mesh.refusals());

    // The agents ran with exactly the DaemonSet's capabilities, and no more.
    let expected = agent_capabilities()
        .iter()
        .map(|name| match name.as_str() {
            "NET_ADMIN" => 12,
            "SYS_PTRACE" => 19,
            "SYS_ADMIN" => 21,
            "BPF" => 39,
            other => panic!("a capability this test does not know: {other}"),
        })
        .fold(0u64, |mask, bit| mask | 1 << bit);
    for agent in &mesh.cluster.agents {
        let status = fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
        let effective = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(effective, expected, "{}: {status}", agent.name);
    }

    // The agents say they are ready where the kubelet asks.
    for i in 0..2 {
        let address = SocketAddrV4::new(mesh.node(i).ip, HEALTH_PORT);
        let ready = http_get(mesh.node(i), address, "/healthz/ready");
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    }

    // node-1's token does not get node-2's identities.
    let token1 = mesh.token(0);
    let (web, db) = (identity("shop", "web"), identity("shop", "db"));
    let refusal = mesh.refused(
        0,
        Some(&token1),
        &db,
        (
            tonic::Code::PermissionDenied,
            &format!("node {node1} runs no pod of namespace shop with service account db"),
        ),
    );
    assert_eq!(refusal.message(), "refused: not authorized");
    assert_eq!(refusal.field("node"), node1);
    assert_eq!(refusal.field("identity"), db);
    // ...and does get its own.
    assert_eq!(mesh.ask(0, Some(&token1), &web).unwrap(), web);

    // A token for another audience (the API server's own): its claims say
    // so, and it is refused without asking the API server.
    let agent1: Api<KubePod> = Api::namespaced(mesh.cluster.cp.client(), "warren-system");
    let agent1 = mesh
        .cluster
        .cp
        .block_on(agent1.get(&format!("warren-agent-{node1}")))
        .unwrap();
    let other_audience = bound_token(&mesh.cluster.cp, &agent1, "https://kubernetes.default.svc");
    // Another service account's token, bound to its pod, for the CA's
    // audience: a workload posing as an agent.
    let web_pod: Api<KubePod> = Api::namespaced(mesh.cluster.cp.client(), "shop");
    let web_pod = mesh.cluster.cp.block_on(web_pod.get("web")).unwrap();
    let impostor = bound_token(&mesh.cluster.cp, &web_pod, CA_AUDIENCE);
    // An expired token, otherwise exactly the kubelet's.
    let expired = expired_token(&mesh.cluster.cp, &agent1);
    // Claims a running agent's pod could make, a signature it could not:
    // only the API server's review tells.
    let forged = format!("{}.AAAA", token1.rsplit_once('.').unwrap().0);
    let unauthenticated = tonic::Code::Unauthenticated;
    for (token, why) in [
        (Some(other_audience.as_str()), "not for audience warren-ca"),
        (Some(&impostor), "another subject"),
        (Some(&expired), "expired"),
        (None, "no service-account token"),
        (Some("not.a.token"), "its claims cannot be read"),
        (Some("garbage"), "its claims cannot be read"),
        (Some(&forged), "does not accept the token"),
    ] {
        let refusal = mesh.refused(0, token, &web, (unauthenticated, why));
        assert_eq!(refusal.message(), "refused: not authenticated");
    }

    // A deleted agent pod: its token worked, and stops working at once,
    // although its review is remembered.
    let spare = agent_pod(&mesh.cluster, &node2, "warren-agent-spare");
    let spare_token = bound_token(&mesh.cluster.cp, &spare, CA_AUDIENCE);
    assert_eq!(
        mesh.ask(1, Some(&spare_token), &identity("shop", "db"))
            .unwrap(),
        identity("shop", "db")
    );
    mesh.cluster
        .delete_pod("warren-system", "warren-agent-spare");
    let deadline = Instant::now() + PATIENCE;
    let refusal = loop {
        match mesh.ask(1, Some(&spare_token), &identity("shop", "db")) {
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "a deleted pod's token still works"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => {
                let status = error.status().expect("a refusal");
                assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
                break mesh.refusals().pop().unwrap();
            }
        }
    };
    assert!(
        refusal
            .field("reason")
            .contains("agent pod warren-system/warren-agent-spare (UID"),
        "{refusal:?}"
    );

    // No token, reason or log line carries a token.
    let log = mesh.ca.service.log_text();
    for token in [
        &token1,
        &other_audience,
        &impostor,
        &expired,
        &spare_token,
        &forged,
    ] {
        assert!(!log.contains(token.as_str()), "a token in the CA's log");
    }

    // The agents and the CA ran with exactly the roles of deploy/: the API
    // server's audit log shows every grant used and nothing refused. (It
    // logs a watch when it ends: stop the clients first.)
    for agent in &mut mesh.cluster.agents {
        agent.stop().unwrap();
    }
    mesh.ca.service.stop().unwrap();
    let events = mesh.cluster.cp.audit_events().unwrap();
    for (rbac, user) in [(RBAC, AGENT_USER), (CA_RBAC, CA_USER)] {
        assert!(
            events.iter().any(|e| e.user == user),
            "no request of {user} audited"
        );
        assert_eq!(audit::denied(&events, user), Vec::<String>::new(), "{user}");
        assert_eq!(
            audit::unused_grants(rbac, &events, user),
            Vec::<String>::new(),
            "{user}"
        );
    }
}

#[test]
fn the_ca_keeps_serving_reviewed_agents_while_the_api_server_is_away() {
    let mut mesh = Mesh::start();
    mesh.cluster.namespace("shop", false, &["web", "db"]);
    mesh.cluster.pod(&PodSpec::new("shop", "web", 0, "web"));
    mesh.cluster.pod(&PodSpec::new("shop", "db", 1, "db"));
    let (token1, token2) = (mesh.token(0), mesh.token(1));
    // node-1's token is reviewed now; node-2's never before the outage.
    assert_eq!(
        mesh.ask(0, Some(&token1), &identity("shop", "web"))
            .unwrap(),
        identity("shop", "web")
    );

    mesh.cluster.cp.kill_apiserver().unwrap();
    assert_eq!(
        mesh.ask(0, Some(&token1), &identity("shop", "web"))
            .unwrap(),
        identity("shop", "web"),
        "a reviewed agent is served from the remembered review"
    );
    mesh.refused(
        1,
        Some(&token2),
        &identity("shop", "db"),
        (
            tonic::Code::Unavailable,
            "cannot review the token with the API server",
        ),
    );
    let ready = http_get(
        mesh.node(0),
        SocketAddrV4::new(mesh.node(0).ip, CA_HEALTH_PORT),
        "/healthz/live",
    );
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Back: the new agent is reviewed and served.
    mesh.cluster.cp.restart_apiserver().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match mesh.ask(1, Some(&token2), &identity("shop", "db")) {
            Ok(id) => {
                assert_eq!(id, identity("shop", "db"));
                break;
            }
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "not served after the outage: {error}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[test]
fn an_agent_the_ca_refuses_is_not_ready_until_it_gets_certificates() {
    let mut mesh = Mesh::start();
    // node-1's agent presents a token for the wrong audience.
    let agent1: Api<KubePod> = Api::namespaced(mesh.cluster.cp.client(), "warren-system");
    let node1 = mesh.node(0).name.clone();
    let agent1 = mesh
        .cluster
        .cp
        .block_on(agent1.get(&format!("warren-agent-{node1}")))
        .unwrap();
    let good = mesh.token(0);
    let wrong = bound_token(&mesh.cluster.cp, &agent1, "https://kubernetes.default.svc");
    fs::write(&mesh.ca.tokens[0], wrong).unwrap();
    mesh.start_agents();
    mesh.cluster.namespace("shop", true, &["web"]);
    mesh.cluster.pod(&PodSpec::new("shop", "web", 0, "web"));
    mesh.cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();

    let probe = |i: usize| {
        let address = SocketAddrV4::new(mesh.node(i).ip, HEALTH_PORT);
        http_get(mesh.node(i), address, "/healthz/ready")
    };
    let deadline = Instant::now() + PATIENCE;
    let refused = loop {
        let response = probe(0);
        if response.starts_with("HTTP/1.1 503") && response.contains("none of this node's pods") {
            break response;
        }
        assert!(Instant::now() < deadline, "{response}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(refused.contains("certificate"), "{refused}");
    // A node without mesh pods is ready.
    assert!(probe(1).starts_with("HTTP/1.1 200"));

    // The kubelet projects a good token: the agent reads it at its next
    // request, gets its certificate, and becomes ready.
    fs::write(&mesh.ca.tokens[0], good).unwrap();
    let deadline = Instant::now() + 2 * PATIENCE;
    loop {
        let response = probe(0);
        if response.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {response}");
        std::thread::sleep(Duration::from_millis(500));
    }
}
