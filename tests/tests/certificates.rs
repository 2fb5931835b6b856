//! Workload certificates from the CA service, end to end: real `warren-ca
//! serve` and agent processes on lab nodes, real eBPF capture and HBONE.
//!
//! Node 1 runs the CA (as a control-plane process would) and the client pod
//! n1p1 (default/sleep); node 2 runs the server pod n2p1 (shop/web). Pod n1p2
//! is left out of the mesh unless a test puts it in.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use warren_tests::{
    Lab,
    harness::{
        Agent, CaService, Call, CallLoop, LabCa, LogLine, MeshWorkload, PATIENCE, Server,
        ca_agent_config, ca_workloads, finish, test_lab,
    },
    lab::files_dir,
};

const PORT: u16 = 8080;

struct CaMesh {
    lab: Lab,
    dir: PathBuf,
    signing: LabCa,
    ca: Option<CaService>,
    client: MeshWorkload,
    server: MeshWorkload,
    agents: Vec<Agent>,
}

impl CaMesh {
    /// The CA (a lab root and intermediate) serving on node 1; both agents
    /// get their workloads' certificates from it, living `ttl`.
    fn start(ttl: &str) -> Self {
        Self::start_with(ttl, true, "")
    }

    /// Like [`CaMesh::start`]; without `ca_running`, the CA is not started
    /// (its files are made); `extra` is added to each agent's config.
    fn start_with(ttl: &str, ca_running: bool, extra: &str) -> Self {
        let lab = test_lab(2, 2);
        let dir = files_dir(lab.prefix());
        let signing = LabCa::init(&dir.join("r1")).unwrap();
        let client = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
        let server = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
        let mut mesh = Self {
            dir,
            signing: signing.clone(),
            ca: None,
            client,
            server,
            agents: Vec::new(),
            lab,
        };
        fs::write(
            mesh.ca_workloads_path(),
            ca_workloads(&[mesh.client.clone(), mesh.server.clone()]),
        )
        .unwrap();
        if ca_running {
            mesh.start_ca(&signing, &signing.root());
        }
        for i in 0..2 {
            let node = mesh.lab.node(i);
            signing
                .node_credential(node, &signing.root(), &mesh.credential(i), false)
                .unwrap();
            let workloads = [mesh.client.clone(), mesh.server.clone()];
            let config =
                mesh.agent_config(i, &workloads) + &format!("certificateTtl: {ttl}\n{extra}");
            let agent = Agent::start(node, &config, &mesh.dir.join("agents")).unwrap();
            mesh.agents.push(agent);
        }
        mesh
    }

    fn ca_workloads_path(&self) -> PathBuf {
        self.dir.join("ca-workloads.yaml")
    }

    /// Node `i`'s credential directory (its trust bundle is in there too).
    fn credential(&self, i: usize) -> PathBuf {
        self.dir.join("credentials").join(&self.lab.node(i).name)
    }

    fn agent_config(&self, i: usize, workloads: &[MeshWorkload]) -> String {
        let ca = std::net::SocketAddrV4::new(self.lab.node(0).ip, warren_tests::harness::CA_PORT);
        ca_agent_config(self.lab.node(i), workloads, ca, &self.credential(i))
    }

    /// (Re)starts the CA on node 1 with `signing`'s intermediate,
    /// publishing the roots in `roots`.
    fn start_ca(&mut self, signing: &LabCa, roots: &Path) {
        let n = fs::read_dir(&self.dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("ca-"))
            })
            .count();
        let log = self.dir.join(format!("ca-{n}.log"));
        self.ca = Some(
            CaService::start(
                self.lab.node(0),
                signing,
                roots,
                &self.ca_workloads_path(),
                log,
            )
            .unwrap(),
        );
    }

    fn stop_ca(&mut self) {
        self.ca.take().expect("the CA runs").stop().unwrap();
    }

    fn ca(&mut self) -> &mut CaService {
        self.ca.as_mut().expect("the CA runs")
    }

    /// Outbound connections that failed, on every node.
    fn failures(&self) -> Vec<LogLine> {
        self.agents
            .iter()
            .flat_map(|a| a.lines())
            .filter(|l| l.message() == "outbound connection failed")
            .collect()
    }
}

impl Drop for CaMesh {
    fn drop(&mut self) {
        // The logs go with the lab; show what the daemons complained about.
        if thread::panicking() {
            let daemons = self.agents.iter().map(|a| &**a).chain(self.ca.as_deref());
            for daemon in daemons {
                for line in daemon.complaints() {
                    eprintln!("{}: {}", daemon.name, line.0);
                }
            }
        }
    }
}

fn renewed(l: &LogLine) -> bool {
    l.message() == "certificate renewed"
}

/// A tunnel refused because the workload had no valid certificate.
fn refused_without_certificate(l: &LogLine) -> bool {
    l.message() == "outbound connection failed" && l.field("error").contains("no valid certificate")
}

/// How many renewals each agent has logged so far.
fn renewals(mesh: &CaMesh) -> Vec<usize> {
    mesh.agents
        .iter()
        .map(|a| a.lines().iter().filter(|l| renewed(l)).count())
        .collect()
}

#[test]
fn a_long_transfer_outlives_repeated_renewals_by_the_ca() {
    // Certificates of 4 s, renewed every 2 s or so, on both ends. A renewal
    // only winds the connection down; the certificates it was made with
    // expiring cuts its streams after the drain deadline, here longer than
    // the transfer (see the next test).
    let mut mesh = CaMesh::start_with("4s", true, "limits:\n  drainDeadline: 60s\n");
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();

    // 8 MiB, sent over 10 s on one connection.
    let long = Call {
        bytes: Some(8 << 20),
        spread_ms: Some(10_000),
        ..Call::default()
    }
    .spawn(&mesh.client.pod, server.addr)
    .unwrap();
    let long = finish(long).unwrap();
    assert_eq!(long.received, 8 << 20);
    let served = server.next_served().unwrap();
    assert_eq!(served.peer.ip(), mesh.client.pod.ip);
    assert_eq!(served.bytes, 8 << 20);

    for agent in &mut mesh.agents {
        agent.wait_for_count(PATIENCE, 3, renewed).unwrap();
    }
    // Every certificate came from the CA, for the node that runs it.
    let signed = mesh
        .ca()
        .wait_for_count(PATIENCE, 8, |l| {
            l.message() == "signed a workload certificate"
        })
        .unwrap();
    for line in &signed {
        let expected = if line.field("node") == "node-1" {
            mesh.client.identity()
        } else {
            mesh.server.identity()
        };
        assert_eq!(line.field("identity"), expected, "{:?}", line.0);
    }
    assert!(mesh.failures().is_empty(), "{:?}", mesh.failures());
}

#[test]
fn a_ca_outage_is_ridden_out_until_certificates_expire() {
    let mut mesh = CaMesh::start("6s");
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    server.next_served().unwrap();

    // The CA goes away for longer than a renewal period.
    mesh.stop_ca();
    mesh.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message()
                == "certificate renewal failed; keeping the current certificate until it expires"
        })
        .unwrap();
    // Still valid: traffic goes on.
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    server.next_served().unwrap();

    // Expired: the workload gets no tunnels, and the agent says why.
    mesh.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message()
                .starts_with("certificate expired without renewal")
                && l.field("identity") == mesh.client.identity()
        })
        .unwrap();
    assert!(
        Call::default().run(&mesh.client.pod, server.addr).is_err(),
        "a workload with an expired certificate got a tunnel"
    );
    mesh.agents[0]
        .wait_for(PATIENCE, refused_without_certificate)
        .unwrap();

    // The CA returns: renewals resume, and so does traffic.
    let signing = mesh.signing.clone();
    let before = renewals(&mesh);
    mesh.start_ca(&signing, &signing.root());
    for (agent, before) in mesh.agents.iter_mut().zip(before) {
        agent.wait_for_count(PATIENCE, before + 1, renewed).unwrap();
    }
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), mesh.client.pod.ip);
}

#[test]
fn agents_started_while_the_ca_is_down_fail_closed_then_recover() {
    let mut mesh = CaMesh::start_with("1h", false, "");
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    // Pods are enrolled, so that their traffic cannot leave in clear...
    for (agent, workload) in mesh.agents.iter_mut().zip([&mesh.client, &mesh.server]) {
        let enrolled = agent
            .wait_for(PATIENCE, |l| {
                l.message().starts_with("enrolled pod")
                    && l.field("workload") == workload.qualified_name()
            })
            .unwrap();
        assert_eq!(enrolled.field("certificate"), "none yet");
        agent
            .wait_for(PATIENCE, |l| {
                l.message()
                    == "no certificate: the workload gets no tunnels until the CA issues one"
            })
            .unwrap();
    }
    // ...but without a certificate they get no tunnels: nothing reaches the
    // server, in clear or otherwise.
    assert!(Call::default().run(&mesh.client.pod, server.addr).is_err());
    assert!(server.next_served_within(Duration::from_secs(1)).is_err());
    mesh.agents[0]
        .wait_for(PATIENCE, refused_without_certificate)
        .unwrap();

    // The CA comes up: the agents, retrying with backoff, get certificates.
    let signing = mesh.signing.clone();
    mesh.start_ca(&signing, &signing.root());
    for agent in &mut mesh.agents {
        agent
            .wait_for(Duration::from_secs(20), |l| {
                l.message() == "certificate issued"
            })
            .unwrap();
    }
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), mesh.client.pod.ip);
}

#[test]
fn a_node_cannot_get_the_identity_of_another_nodes_workload() {
    let mut mesh = CaMesh::start("1h");
    let mut server = Server::start(&mesh.server.pod, PORT).unwrap();
    // Node 1's agent is told that its pod n1p2 is shop/web, an identity the
    // CA knows runs on node 2 only.
    let impostor = MeshWorkload::new(mesh.lab.pod(0, 1), "shop", "web");
    let workloads = [mesh.client.clone(), mesh.server.clone(), impostor.clone()];
    mesh.agents[0]
        .rewrite_config(&(mesh.agent_config(0, &workloads) + "certificateTtl: 1h\n"))
        .unwrap();

    let refusal = mesh.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message()
                == "no certificate for the workload: it gets no tunnels until the CA issues one"
        })
        .unwrap();
    assert_eq!(refusal.field("workload"), impostor.qualified_name());
    let error = refusal.field("error");
    assert!(
        error.contains("PermissionDenied") || error.contains("permission"),
        "{error}"
    );
    assert!(error.contains(&mesh.server.identity()), "{error}");
    mesh.ca()
        .wait_for(PATIENCE, |l| {
            l.message() == "refused: not authorized"
                && l.field("node") == "node-1"
                && l.field("identity") == impostor.identity()
        })
        .unwrap();

    // The impostor gets no tunnels; everyone else is served.
    assert!(Call::default().run(&impostor.pod, server.addr).is_err());
    mesh.agents[0]
        .wait_for(PATIENCE, |l| {
            refused_without_certificate(l) && l.field("workload") == impostor.qualified_name()
        })
        .unwrap();
    Call::default().run(&mesh.client.pod, server.addr).unwrap();
    assert_eq!(server.next_served().unwrap().peer.ip(), mesh.client.pod.ip);
}

#[test]
fn renewals_wind_idle_tunnels_down_without_a_warning() {
    // Certificates of 4 s: each renewal tells the client to go away on the
    // tunnels made with the old one (a GOAWAY, then a PING). Calls a few
    // tenths of a second apart leave the pooled tunnel idle most of the
    // time, and an idle client leaves as soon as it reads the GOAWAY,
    // resetting the PING under the server's write: that is how it should
    // leave, and no failure (it was one warning a renewal).
    let mut mesh = CaMesh::start("4s");
    let _server = Server::start(&mesh.server.pod, PORT).unwrap();
    let before = renewals(&mesh);
    let calls = CallLoop::start(
        &mesh.client.pod,
        (mesh.server.pod.ip, PORT),
        Call::default(),
        Duration::from_millis(300),
    );
    for (agent, before) in mesh.agents.iter_mut().zip(before) {
        agent.wait_for_count(PATIENCE, before + 4, renewed).unwrap();
    }
    let calls = calls.finish();
    assert!(calls.len() > 10, "{} calls", calls.len());
    let failed: Vec<_> = calls.iter().filter_map(|c| c.error.as_ref()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let ended_badly: Vec<_> = mesh.agents[1]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "HBONE connection ended with an error")
        .map(|l| l.0)
        .collect();
    assert!(ended_badly.is_empty(), "{ended_badly:?}");
    // The tunnels were made again after each renewal.
    let accepted = mesh.agents[1]
        .lines()
        .iter()
        .filter(|l| l.message() == "HBONE connection accepted")
        .count();
    assert!(accepted >= 4, "{accepted} tunnels accepted");
}

/// 4 MiB from the client to the server, spread over 20 s: longer than the
/// short certificates some tests use.
fn long_transfer(mesh: &CaMesh) -> std::process::Child {
    Call {
        bytes: Some(4 << 20),
        spread_ms: Some(20_000),
        ..Call::default()
    }
    .spawn(&mesh.client.pod, (mesh.server.pod.ip, PORT))
    .unwrap()
}

/// Writes the PEM roots of `cas` as one bundle at `path`, replacing it in
/// one step as config management would.
fn write_bundle(path: &Path, cas: &[&LabCa]) {
    let pem: String = cas
        .iter()
        .map(|ca| fs::read_to_string(ca.root()).unwrap())
        .collect();
    let tmp = path.with_extension("new");
    fs::write(&tmp, pem).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_stream_does_not_outlive_its_peers_certificate_by_more_than_the_drain_deadline() {
    let mut mesh = CaMesh::start_with("4s", true, "limits:\n  drainDeadline: 2s\n");
    let _server = Server::start(&mesh.server.pod, PORT).unwrap();
    // A transfer spread over 20 s: the client's certificate, 4 s long,
    // expires under it (the client renews meanwhile, but the connection was
    // authenticated with the old one).
    let long = long_transfer(&mesh);
    let cut = mesh.agents[1]
        .wait_for(Duration::from_secs(20), |l| {
            l.message() == "HBONE stream closed: no longer allowed"
        })
        .unwrap();
    assert_eq!(cut.field("reason"), "the peer's certificate expired");
    assert_eq!(cut.field("peer_identity"), mesh.client.identity());
    // The client sees its connection end before its transfer did.
    finish(long).expect_err("the transfer outlived its certificate");
    // New connections, with the renewed certificates, go on.
    Call::default()
        .run(&mesh.client.pod, (mesh.server.pod.ip, PORT))
        .unwrap();
}

#[test]
fn the_ca_is_rotated_to_a_new_root_without_a_failed_connection() {
    // The long transfer below outlives the 4 s certificates it was opened
    // with, and the root they chain to: what lets it finish is a drain
    // deadline longer than it (the default, 10 s, would cut it: see
    // a_stream_does_not_outlive_its_peers_certificate_by_more_than_the_drain_deadline).
    let mut mesh = CaMesh::start_with("4s", true, "limits:\n  drainDeadline: 60s\n");
    let _server = Server::start(&mesh.server.pod, PORT).unwrap();
    let r1 = mesh.signing.clone();
    let r2 = LabCa::init(&mesh.dir.join("r2")).unwrap();
    let traffic = CallLoop::start(
        &mesh.client.pod,
        (mesh.server.pod.ip, PORT),
        Call::default(),
        Duration::from_millis(100),
    );
    // One long transfer across the whole rotation, too.
    let long = long_transfer(&mesh);
    let reloaded = |added: u64, removed: u64| {
        move |l: &LogLine| {
            l.message() == "trust bundle reloaded"
                && l.0["added"] == added
                && l.0["removed"] == removed
        }
    };

    // 1. Every node trusts R2 besides R1 (the bundle is the credential's
    //    ca-roots.pem here).
    for i in 0..2 {
        write_bundle(&mesh.credential(i).join("ca-roots.pem"), &[&r1, &r2]);
        mesh.agents[i].wait_for(PATIENCE, reloaded(1, 0)).unwrap();
    }
    let both = mesh.dir.join("r1-r2.pem");
    write_bundle(&both, &[&r1, &r2]);

    // 2. The CA switches to an intermediate of R2. Until each workload renews,
    //    R1- and R2-chained certificates meet.
    mesh.stop_ca();
    mesh.start_ca(&r2, &both);
    let renewals_before = renewals(&mesh);
    // 3. Node credentials are re-issued by the new CA.
    for i in 0..2 {
        r2.node_credential(mesh.lab.node(i), &both, &mesh.credential(i), true)
            .unwrap();
    }
    // Every workload renews, twice to be sure, from the new CA.
    for (agent, before) in mesh.agents.iter_mut().zip(renewals_before) {
        agent.wait_for_count(PATIENCE, before + 2, renewed).unwrap();
    }

    // 4. R1 goes: from every trust bundle and from the CA.
    let r2_only = mesh.dir.join("r2.pem");
    write_bundle(&r2_only, &[&r2]);
    for i in 0..2 {
        write_bundle(&mesh.credential(i).join("ca-roots.pem"), &[&r2]);
    }
    for agent in &mut mesh.agents {
        agent.wait_for(PATIENCE, reloaded(0, 1)).unwrap();
    }
    mesh.stop_ca();
    mesh.start_ca(&r2, &r2_only);
    // Everything runs on R2 now: renewals go on, with node credentials and
    // certificates that chain to R2 alone.
    let renewals_before = renewals(&mesh);
    for (agent, before) in mesh.agents.iter_mut().zip(renewals_before) {
        agent.wait_for_count(PATIENCE, before + 1, renewed).unwrap();
    }
    thread::sleep(Duration::from_secs(1));

    let ends = traffic.finish();
    let calls = ends.len();
    let failures: Vec<String> = ends.into_iter().filter_map(|e| e.error).collect();
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {failures:?}",
        failures.len()
    );
    assert!(calls > 20, "only {calls} calls during the rotation");
    let long = finish(long).unwrap();
    assert_eq!(long.received, 4 << 20);
    assert!(mesh.failures().is_empty(), "{:?}", mesh.failures());
}
