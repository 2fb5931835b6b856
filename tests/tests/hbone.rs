//! End-to-end: HBONE between agents in the lab. Mesh traffic crosses the
//! wire inside mutual TLS carrying each workload's own identity; the agents
//! refuse clients and requests they must refuse, and say why.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    net::{IpAddr, SocketAddr},
    process::Child,
    sync::Arc,
    thread,
    time::Duration,
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use warren_agent::{
    hbone::{self, client::Connection},
    netns::NetNs,
    tls::{self, DevCa, testing},
};
use warren_pki::{
    identity::{SpiffeId, TrustDomain},
    tls::WorkloadCertificate,
};
use warren_tests::{
    Lab, Pod,
    harness::{
        Agent, Call, LogLine, MeshWorkload, PATIENCE, Server, WireCapture, agent_config, contains,
        dev_ca_dir, finish, test_lab,
    },
};

const PORT: u16 = 8080;

struct Mesh {
    lab: Lab,
    client: MeshWorkload,
    server: MeshWorkload,
    local_server: MeshWorkload,
    agents: Vec<Agent>,
}

impl Mesh {
    /// Two nodes, two pods each. n1p1 (default/sleep) is the client; n2p1
    /// (shop/web) and n1p2 (default/web) serve. n2p2 is outside the mesh.
    fn new() -> Self {
        Self::with_config("")
    }

    /// Like [`Mesh::new`], with `extra` appended to every agent's config.
    fn with_config(extra: &str) -> Self {
        let lab = test_lab(2, 2);
        let client = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
        let local_server = MeshWorkload::new(lab.pod(0, 1), "default", "web");
        let server = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
        let mesh = [client.clone(), local_server.clone(), server.clone()];
        let dir = warren_tests::lab::files_dir(lab.prefix());
        let agents = lab
            .nodes()
            .iter()
            .map(|node| {
                let config = agent_config(node, &mesh) + extra;
                Agent::start(node, &config, &dir).expect("agent start")
            })
            .collect();
        Self {
            lab,
            client,
            server,
            local_server,
            agents,
        }
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.pod.ip.into(), PORT)
    }

    fn hbone_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server.pod.ip.into(), hbone::PORT)
    }

    /// The development CA the agents share (created by the first of them).
    fn ca(&self) -> DevCa {
        DevCa::load_or_create(&dev_ca_dir(self.lab.node(0)), &testing::trust_domain())
            .expect("the lab's dev CA")
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // The logs go with the lab; show what the agents complained about.
        if thread::panicking() {
            for agent in &self.agents {
                for line in agent.lines() {
                    if line.0["level"] != "INFO" && line.0["level"] != "DEBUG" {
                        eprintln!("{}: {}", agent.node, line.0);
                    }
                }
            }
        }
    }
}

#[test]
fn mesh_traffic_rides_hbone_with_both_identities_and_the_clients_address() {
    let mut mesh = Mesh::new();
    for target in [mesh.server.clone(), mesh.local_server.clone()] {
        let mut server = Server::start(&target.pod, PORT).unwrap();
        let called = Call {
            bytes: Some(256 * 1024),
            ..Call::default()
        }
        .run(&mesh.client.pod, server.addr)
        .unwrap();
        let served = server.next_served().unwrap();
        assert_eq!(
            (called.sent, called.received, served.bytes),
            (262_144, 262_144, 262_144)
        );
        // Transparent delivery: the application sees the client pod.
        assert_eq!(served.peer.ip(), IpAddr::V4(mesh.client.pod.ip));

        // The client's agent opened a tunnel as the client...
        let client_agent = &mut mesh.agents[0];
        let captured = client_agent
            .wait_for(PATIENCE, |l| {
                l.message() == "captured outbound connection"
                    && l.field("dst") == server.addr.to_string()
            })
            .unwrap();
        assert_eq!(captured.field("path"), "hbone");
        assert_eq!(captured.field("identity"), mesh.client.identity());
        assert_eq!(captured.field("dst_identity"), target.identity());

        // ...and the server's agent saw the client's identity.
        let server_agent = if target.pod.node == "node-1" { 0 } else { 1 };
        let accepted = mesh.agents[server_agent]
            .wait_for(PATIENCE, |l| {
                l.message() == "accepted HBONE stream" && l.field("dst") == server.addr.to_string()
            })
            .unwrap();
        assert_eq!(accepted.field("peer_identity"), mesh.client.identity());
        assert_eq!(accepted.field("workload"), target.qualified_name());
    }
}

#[test]
fn nothing_crosses_the_wire_in_clear() {
    let mesh = Mesh::new();
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    let outsider = mesh.lab.pod(1, 1);
    let mut plain_server = Server::start(outsider, PORT).unwrap();
    // labpod's payload repeats this marker.
    let marker = b"warren-labpod-warren-labpod-";

    let capture = WireCapture::start(&mesh.lab).unwrap();
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    server.next_served().unwrap();
    let packets = capture.finish().unwrap();
    assert!(
        !contains(&packets, marker),
        "the payload crossed the wire in clear"
    );
    // A TLS 1.3 ServerHello (its supported_versions extension selects 0x0304)
    // on the HBONE port.
    assert!(
        contains(&packets, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 handshake seen"
    );
    assert!(
        contains(&packets, &hbone::PORT.to_be_bytes()),
        "nothing on port 15008"
    );

    // The same capture does see a payload in clear: to a pod outside the
    // mesh, warren passes traffic through as it is.
    let capture = WireCapture::start(&mesh.lab).unwrap();
    Call::default()
        .run(&mesh.client.pod, plain_server.addr)
        .unwrap();
    plain_server.next_served().unwrap();
    assert!(
        contains(&capture.finish().unwrap(), marker),
        "the capture misses payloads"
    );
}

#[test]
fn a_hundred_connections_share_a_handful_of_tunnels() {
    let mut mesh = Mesh::new();
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    let call = Call {
        hold_ms: Some(1000),
        ..Call::default()
    };
    let calls: Vec<Child> = (0..100)
        .map(|_| call.spawn(&mesh.client.pod, server.addr).unwrap())
        .collect();
    for child in calls {
        finish(child).unwrap();
    }
    for _ in 0..100 {
        server.next_served().unwrap();
    }
    let streams = mesh.agents[1]
        .wait_for_count(PATIENCE, 100, |l| l.message() == "accepted HBONE stream")
        .unwrap();
    assert_eq!(streams.len(), 100);
    let connections = mesh.agents[1]
        .lines()
        .iter()
        .filter(|l| l.message() == "HBONE connection accepted")
        .count();
    assert!(
        (1..=3).contains(&connections),
        "100 concurrent streams took {connections} TLS connections"
    );
}

#[test]
fn refused_clients_and_requests_are_refused_with_a_reason() {
    let mut mesh = Mesh::new();
    let _server = Server::start(&mesh.server.pod, PORT).unwrap();
    let ca = mesh.ca();
    let client_id = SpiffeId::new(
        TrustDomain::new("cluster.local").unwrap(),
        "default",
        "sleep",
    )
    .unwrap();
    let server_id: SpiffeId = mesh.server.identity().parse().unwrap();
    let expect_server = std::slice::from_ref(&server_id);
    let trust = ca.trust_bundle();
    let good = ca.issue(&client_id).unwrap();
    let rogue = Rogue::new(&mesh.client.pod);
    let hbone = mesh.hbone_addr();
    let app = mesh.server_addr().to_string();

    // The control: a mesh client with a good certificate gets its tunnel.
    let config = tls::client_config(&good, &trust, expect_server).unwrap();
    assert_eq!(rogue.connect(config.clone(), hbone, &app), Ok(200));

    // Requests the server refuses (400), each logged with its reason.
    let elsewhere = SocketAddr::new(mesh.lab.pod(0, 1).ip.into(), PORT).to_string();
    let own_port = SocketAddr::new(mesh.server.pod.ip.into(), hbone::PORT).to_string();
    for (authority, reason) in [
        (
            elsewhere.as_str(),
            "is not the pod this connection arrived at",
        ),
        (own_port.as_str(), "one of the proxy's own ports"),
    ] {
        assert_eq!(rogue.connect(config.clone(), hbone, authority), Ok(400));
        let refused = mesh.agents[1]
            .wait_for(PATIENCE, |l| {
                l.message() == "HBONE stream refused" && l.field("authority") == authority
            })
            .unwrap();
        assert!(refused.field("reason").contains(reason), "{:?}", refused.0);
    }

    // Clients the TLS handshake refuses.
    let other_ca = testing::TempCa::new();
    let foreign_id: SpiffeId = "spiffe://example.org/ns/default/sa/sleep".parse().unwrap();
    let cases: Vec<(&str, Arc<rustls::ClientConfig>, &str)> = vec![
        ("no client certificate", no_client_cert(), "no certificate"),
        (
            "a certificate from another root",
            tls::client_config(&other_ca.issue(&client_id).unwrap(), &trust, expect_server)
                .unwrap(),
            "UnknownIssuer",
        ),
        (
            "another trust domain",
            tls::client_config(&ca.issue(&foreign_id).unwrap(), &trust, expect_server).unwrap(),
            "trust domain",
        ),
        (
            "an expired certificate",
            tls::client_config(&testing::expired(&ca, &client_id), &trust, expect_server).unwrap(),
            "Expired",
        ),
        ("TLS 1.2", tls12_client(&good), "tls12"),
    ];
    for (n, (what, config, reason)) in cases.into_iter().enumerate() {
        assert!(
            rogue.connect(config, hbone, &app).is_err(),
            "{what}: not refused"
        );
        let refusals = mesh.agents[1]
            .wait_for_count(PATIENCE, n + 1, |l| {
                l.message() == "HBONE connection refused: TLS handshake failed"
            })
            .unwrap();
        let error = refusals[n].field("error");
        assert!(
            error.to_lowercase().contains(&reason.to_lowercase()),
            "{what}: logged {error:?}"
        );
    }

    // A good certificate, but no ALPN at all: TLS would accept it (rustls
    // refuses only offers without h2); HBONE is HTTP/2, so the agent does not.
    let mut no_alpn = Arc::unwrap_or_clone(config.clone());
    no_alpn.alpn_protocols.clear();
    assert!(
        rogue.connect(Arc::new(no_alpn), hbone, &app).is_err(),
        "a client without ALPN was served"
    );
    mesh.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message() == "HBONE connection refused: the client did not offer ALPN h2"
        })
        .unwrap();
}

#[test]
fn one_address_gets_only_its_share_of_a_pods_hbone_connections() {
    let mut mesh = Mesh::new();
    let _server = Server::start(&mesh.server.pod, PORT).unwrap();
    let ca = mesh.ca();
    let server_id: SpiffeId = mesh.server.identity().parse().unwrap();
    let config = |id: &str| {
        let id: SpiffeId = id.parse().unwrap();
        tls::client_config(
            &ca.issue(&id).unwrap(),
            &ca.trust_bundle(),
            std::slice::from_ref(&server_id),
        )
        .unwrap()
    };
    let hbone = mesh.hbone_addr();
    // Held open: before its handshake a client is only an address, and one
    // address may hold 128 of a pod's connections.
    let rogue = Rogue::new(&mesh.client.pod);
    let sleep = config("spiffe://cluster.local/ns/default/sa/sleep");
    let held: Vec<Connection> = (0..128)
        .map(|n| {
            rogue
                .open(sleep.clone(), hbone)
                .unwrap_or_else(|e| panic!("connection {n}: {e}"))
        })
        .collect();
    assert!(
        rogue.open(sleep.clone(), hbone).is_err(),
        "a 129th was accepted"
    );
    mesh.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message()
                == "HBONE connection refused: too many connections to this pod, or from this address"
        })
        .unwrap();
    // Another address is not affected...
    let other = Rogue::new(&mesh.local_server.pod);
    let web = config("spiffe://cluster.local/ns/default/sa/web");
    let app = mesh.server_addr().to_string();
    assert_eq!(other.connect(web, hbone, &app), Ok(200));
    // ...and the address has its share back as its connections close.
    drop(held);
    let deadline = std::time::Instant::now() + PATIENCE;
    while rogue.connect(sleep.clone(), hbone, &app) != Ok(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the share never came back"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_server_with_an_unexpected_identity_is_refused_by_the_client() {
    let mut mesh = Mesh::new();
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    // Node 1 believes n2p1 runs as shop/payments; node 2 (which holds its
    // key) knows it as shop/web. The client must not talk to it.
    let mut wrong = mesh.server.clone();
    wrong.service_account = "payments".into();
    let node = mesh.lab.node(0);
    mesh.agents[0]
        .rewrite_config(&agent_config(
            node,
            &[mesh.client.clone(), mesh.local_server.clone(), wrong],
        ))
        .unwrap();
    mesh.agents[0]
        .wait_for(PATIENCE, |l| l.message() == "config reloaded")
        .unwrap();

    assert!(Call::default().run(&mesh.client.pod, server.addr).is_err());
    let failed = mesh.agents[0]
        .wait_for(PATIENCE, |l| l.message() == "outbound connection failed")
        .unwrap();
    let error = failed.field("error");
    assert!(
        error.contains("spiffe://cluster.local/ns/shop/sa/web") && error.contains("payments"),
        "{error}"
    );
    // Nothing reached the application.
    assert!(
        server
            .next_served_within(Duration::from_millis(500))
            .is_err()
    );
}

/// A client the agent must judge: dials HBONE from inside a pod's network
/// namespace (not its cgroup, so it is not captured) with whatever TLS
/// configuration the test gives it.
struct Rogue {
    runtime: tokio::runtime::Runtime,
    netns: NetNs,
}

impl Rogue {
    fn new(pod: &Pod) -> Self {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let netns = runtime.block_on(NetNs::open(&pod.netns_path())).unwrap();
        Self { runtime, netns }
    }

    /// Opens a connection and sends one CONNECT for `authority`: the
    /// response status, or why there was none.
    fn connect(
        &self,
        config: Arc<rustls::ClientConfig>,
        hbone: SocketAddr,
        authority: &str,
    ) -> Result<u16, String> {
        let connection = self.open(config, hbone)?;
        self.send(&connection, authority)
    }

    /// Opens an HBONE connection (TCP, TLS, HTTP/2).
    fn open(
        &self,
        config: Arc<rustls::ClientConfig>,
        hbone: SocketAddr,
    ) -> Result<Connection, String> {
        self.runtime.block_on(async {
            let tcp = self.netns.connect(hbone).await.map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::IpAddress(hbone.ip().into()), tcp)
                .await
                .map_err(|e| e.to_string())?;
            Connection::handshake(tls, Default::default())
                .await
                .map_err(|e| e.to_string())
        })
    }

    /// Sends one CONNECT for `authority` on `connection`: the response
    /// status, or why there was none.
    fn send(&self, connection: &Connection, authority: &str) -> Result<u16, String> {
        self.runtime.block_on(async {
            let request = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(authority)
                .body(())
                .unwrap();
            let (response, _stream) =
                tokio::time::timeout(Duration::from_secs(5), connection.send(request))
                    .await
                    .map_err(|_| "no response".to_string())?
                    .map_err(|e| e.to_string())?;
            Ok(response.status().as_u16())
        })
    }
}

/// A TLS 1.3 client that presents no certificate.
fn no_client_cert() -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth(),
    )
    .with_h2()
}

/// A client that only speaks TLS 1.2, with a good certificate.
fn tls12_client(cert: &WorkloadCertificate) -> Arc<rustls::ClientConfig> {
    let (_, key_pem) = testing::to_pem(cert);
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_client_auth_cert(cert.chain().to_vec(), key)
            .unwrap(),
    )
    .with_h2()
}

trait WithH2 {
    fn with_h2(self) -> Self;
}

impl WithH2 for Arc<rustls::ClientConfig> {
    fn with_h2(self) -> Self {
        let mut config = Arc::unwrap_or_clone(self);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any server: these clients exist to be judged by the server.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn the_trust_bundle_is_reloaded_live_without_breaking_tunnels() {
    let mut mesh = Mesh::new();
    let server = Server::start(&mesh.server.pod, PORT).unwrap();
    let ca = mesh.ca();
    let trust = ca.trust_bundle();
    let server_id: SpiffeId = mesh.server.identity().parse().unwrap();
    let client_id: SpiffeId = mesh.client.identity().parse().unwrap();
    // A client whose certificate comes from another organisation's root.
    let other_ca = testing::TempCa::new();
    let config = tls::client_config(
        &other_ca.issue(&client_id).unwrap(),
        &trust,
        std::slice::from_ref(&server_id),
    )
    .unwrap();
    let rogue = Rogue::new(&mesh.client.pod);
    let app = mesh.server_addr().to_string();
    assert!(
        rogue
            .connect(config.clone(), mesh.hbone_addr(), &app)
            .is_err()
    );

    // A tunnel in use while the roots change underneath it.
    let mut long = Call {
        spread_ms: Some(5000),
        bytes: Some(1 << 20),
        ..Call::default()
    }
    .spawn(&mesh.client.pod, server.addr)
    .unwrap();

    // Node 2's agent is given a trust bundle with that root: it trusts it
    // from then on, without a restart.
    let node = mesh.lab.node(1);
    let bundle = warren_tests::lab::files_dir(mesh.lab.prefix()).join("bundle.pem");
    std::fs::write(
        &bundle,
        std::fs::read(other_ca.dir().join("root.pem")).unwrap(),
    )
    .unwrap();
    let workloads = [mesh.client.clone(), mesh.server.clone()];
    let with_bundle =
        agent_config(node, &workloads) + &format!("trustBundle: {}\n", bundle.display());
    let reloaded = |added: u64, removed: u64| {
        move |l: &LogLine| {
            l.message() == "trust bundle reloaded"
                && l.0["added"] == added
                && l.0["removed"] == removed
        }
    };
    mesh.agents[1].rewrite_config(&with_bundle).unwrap();
    mesh.agents[1].wait_for(PATIENCE, reloaded(1, 0)).unwrap();
    assert_eq!(
        rogue.connect(config.clone(), mesh.hbone_addr(), &app),
        Ok(200)
    );
    // A connection made under that root, held open.
    let held = rogue.open(config.clone(), mesh.hbone_addr()).unwrap();
    assert_eq!(rogue.send(&held, &app), Ok(200));

    // A broken bundle is refused, and the roots in force stay.
    std::fs::write(&bundle, "not a certificate").unwrap();
    mesh.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message() == "trust bundle reload failed; keeping the previous roots"
                && l.field("error").contains(&bundle.display().to_string())
        })
        .unwrap();
    assert_eq!(
        rogue.connect(config.clone(), mesh.hbone_addr(), &app),
        Ok(200)
    );

    // Without the bundle, that root is no longer trusted.
    mesh.agents[1]
        .rewrite_config(&agent_config(node, &workloads))
        .unwrap();
    mesh.agents[1].wait_for(PATIENCE, reloaded(0, 1)).unwrap();
    assert!(rogue.connect(config, mesh.hbone_addr(), &app).is_err());
    // The connection made under the removed root is told to go away: it
    // takes no new stream.
    let deadline = std::time::Instant::now() + PATIENCE;
    while !held.is_closed() && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        held.is_closed(),
        "a connection under a removed root stays open"
    );
    assert!(rogue.send(&held, &app).is_err());

    // The tunnel in use throughout delivered every byte, and was still
    // sending when the last reload came.
    assert!(
        long.try_wait().unwrap().is_none(),
        "the transfer ended too soon"
    );
    let long = finish(long).unwrap();
    assert_eq!(long.received, 1 << 20);
    let failures: Vec<_> = mesh.agents[0]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "outbound connection failed")
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn certificates_are_renewed_without_breaking_connections() {
    // Certificates of 4 s, renewed every 2 s or so, on both ends.
    let mut mesh = Mesh::with_config("certificateTtl: 4s\n");
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();

    // One connection held open across several renewals...
    let long = Call {
        hold_ms: Some(6000),
        bytes: Some(64 * 1024),
        ..Call::default()
    }
    .spawn(&mesh.client.pod, server.addr)
    .unwrap();
    // ...while new connections keep coming, before and after each renewal.
    for _ in 0..12 {
        Call::default().run(&mesh.client.pod, server.addr).unwrap();
        thread::sleep(Duration::from_millis(500));
    }
    let long = finish(long).unwrap();
    assert_eq!(long.received, 64 * 1024);
    for _ in 0..13 {
        server.next_served().unwrap();
    }

    for agent in &mut mesh.agents {
        agent
            .wait_for_count(PATIENCE, 2, |l| l.message() == "certificate renewed")
            .unwrap();
    }
    // Tunnels were re-established with the new certificates: no connection
    // outlives the certificate it was made with.
    let connections = mesh.agents[1]
        .lines()
        .iter()
        .filter(|l| l.message() == "HBONE connection accepted")
        .count();
    assert!(
        connections >= 3,
        "only {connections} TLS connections in 6 s of renewals"
    );
    let failures: Vec<_> = mesh.agents[0]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "outbound connection failed")
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}
