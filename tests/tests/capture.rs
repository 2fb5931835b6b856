//! End-to-end: in-pod capture of outbound TCP connections, with the real eBPF
//! programs, real namespaces and cgroups, and real agent processes.
//!
//! Needs root (run through `cargo xtask test`).

use std::{collections::HashSet, net::IpAddr, path::PathBuf, process::Command, thread};

use warren_tests::{
    Lab,
    harness::{
        Agent, Call, Capture, MeshWorkload, PATIENCE, Server, agent_config, binary, finish,
        test_lab,
    },
};

const PORT: u16 = 8080;

/// A lab, plus a directory for the agents' configs and logs (kept when a
/// test fails, to read).
struct Scene {
    lab: Lab,
    dir: PathBuf,
}

impl Scene {
    fn new(nodes: usize, pods_per_node: usize) -> Self {
        let lab = test_lab(nodes, pods_per_node);
        let dir = std::env::temp_dir().join("warren-e2e").join(lab.prefix());
        Self { lab, dir }
    }

    /// Mesh workload for pod `p` of node `n` (0-based), in namespace `ns`.
    fn workload(&self, n: usize, p: usize, ns: &str, sa: &str) -> MeshWorkload {
        MeshWorkload::new(self.lab.pod(n, p), ns, sa)
    }

    fn agent(&self, node: usize, workloads: &[MeshWorkload]) -> Agent {
        let node = self.lab.node(node);
        Agent::start(node, &agent_config(node, workloads), &self.dir).expect("agent start")
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("agent configs and logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ip(addr: std::net::SocketAddr) -> IpAddr {
    addr.ip()
}

#[test]
fn captures_connections_to_other_nodes_and_to_the_same_node() {
    let scene = Scene::new(2, 2);
    let client = scene.workload(0, 0, "default", "sleep");
    let local_server = scene.workload(0, 1, "default", "httpbin");
    let remote_server = scene.workload(1, 0, "backend", "httpbin");
    let mesh = [client.clone(), local_server.clone(), remote_server.clone()];
    let mut agent = scene.agent(0, &mesh);
    let _agent2 = scene.agent(1, &mesh);

    for target in [&remote_server, &local_server] {
        let mut server = Server::start(&target.pod, PORT).unwrap();
        let called = Call {
            bytes: Some(64 * 1024),
            ..Call::default()
        }
        .run(&client.pod, server.addr)
        .unwrap();
        let served = server.next_served().unwrap();

        // Every byte went there and back, through the agent: the client's
        // connect() was sent to the agent's listener inside its own pod...
        assert_eq!(called.server, target.pod.name);
        assert_eq!((called.sent, called.received), (65536, 65536));
        assert_eq!(served.bytes, 65536);
        assert!(called.local.ip().is_loopback(), "not captured: {called:?}");
        // ...and the agent forwarded it from the pod's own address.
        assert_eq!(ip(served.peer), IpAddr::V4(client.pod.ip));
        assert_ne!(served.peer.port(), called.local.port());

        let capture = agent
            .wait_for(PATIENCE, |l| {
                l.message() == "captured outbound connection"
                    && l.field("dst") == server.addr.to_string()
            })
            .unwrap();
        let capture: Capture = serde_json::from_value(capture.0).unwrap();
        assert_eq!(capture.workload, client.qualified_name());
        assert_eq!(capture.src.ip(), &client.pod.ip);
        assert_eq!(capture.src.port(), called.local.port());
        assert_eq!(capture.dst_workload, target.qualified_name());
        assert_eq!(capture.path, "hbone");
    }

    // Exactly the two calls were captured: the agent's own connections to
    // the servers (made inside the client's namespace) were not.
    assert_eq!(agent.captures().len(), 2, "{}", agent.log_text());
    assert!(
        agent
            .lines()
            .iter()
            .any(|l| l.field("target") == "warren_ebpf"
                && l.message().contains("captured connect to 10.244.2.2:8080")),
        "no eBPF log line in the agent's log:\n{}",
        agent.log_text()
    );
}

#[test]
fn pods_using_the_same_source_port_are_not_confused() {
    let scene = Scene::new(2, 2);
    let a = scene.workload(0, 0, "default", "alpha");
    let b = scene.workload(0, 1, "default", "beta");
    let mesh = [a.clone(), b.clone()];
    let agent = scene.agent(0, &mesh);
    let mut server_a = Server::start(scene.lab.pod(1, 0), PORT).unwrap();
    let mut server_b = Server::start(scene.lab.pod(1, 1), PORT).unwrap();

    // Both clients bind the same source port and hold their connections
    // open together, so both captures are in flight at once.
    let call = Call {
        bind_port: Some(40_000),
        hold_ms: Some(300),
        ..Call::default()
    };
    let from_a = call.spawn(&a.pod, server_a.addr).unwrap();
    let from_b = call.spawn(&b.pod, server_b.addr).unwrap();
    let (from_a, from_b) = (finish(from_a).unwrap(), finish(from_b).unwrap());

    assert_eq!(from_a.server, server_a.name);
    assert_eq!(from_b.server, server_b.name);
    assert_eq!(from_a.local.port(), 40_000);
    assert_eq!(from_b.local.port(), 40_000);
    assert_eq!(
        ip(server_a.next_served().unwrap().peer),
        IpAddr::V4(a.pod.ip)
    );
    assert_eq!(
        ip(server_b.next_served().unwrap().peer),
        IpAddr::V4(b.pod.ip)
    );

    let seen: HashSet<_> = agent
        .captures()
        .into_iter()
        .map(|c| (c.workload, c.src.port(), c.dst))
        .collect();
    let expected = HashSet::from([
        (a.qualified_name(), 40_000, server_a.addr),
        (b.qualified_name(), 40_000, server_b.addr),
    ]);
    assert_eq!(seen, expected);
}

#[test]
fn an_unenrolled_pod_is_left_alone() {
    let scene = Scene::new(2, 2);
    let enrolled = scene.workload(0, 0, "default", "sleep");
    let outsider = scene.lab.pod(0, 1);
    let agent = scene.agent(0, std::slice::from_ref(&enrolled));
    let mut server = Server::start(scene.lab.pod(1, 0), PORT).unwrap();

    let called = Call::default().run(outsider, server.addr).unwrap();
    let served = server.next_served().unwrap();
    // Straight from the outsider's socket to the server: same address both ends.
    assert_eq!(called.local.ip(), IpAddr::V4(outsider.ip));
    assert_eq!(served.peer, called.local);

    // The enrolled pod next door is still captured.
    let called = Call::default().run(&enrolled.pod, server.addr).unwrap();
    assert!(called.local.ip().is_loopback());
    let captures = agent.captures();
    assert_eq!(captures.len(), 1);
    assert_eq!(captures[0].workload, enrolled.qualified_name());
}

#[test]
fn config_changes_withdraw_and_enroll_pods_while_running() {
    let scene = Scene::new(2, 1);
    let client = scene.workload(0, 0, "default", "sleep");
    let mut agent = scene.agent(0, std::slice::from_ref(&client));
    let mut server = Server::start(scene.lab.pod(1, 0), PORT).unwrap();
    let node = scene.lab.node(0);

    assert!(
        Call::default()
            .run(&client.pod, server.addr)
            .unwrap()
            .local
            .ip()
            .is_loopback()
    );
    server.next_served().unwrap();

    // Removed from the config: capture stops.
    agent.rewrite_config(&agent_config(node, &[])).unwrap();
    agent
        .wait_for(PATIENCE, |l| {
            l.message().starts_with("withdrew from pod")
                && l.field("workload") == client.qualified_name()
        })
        .unwrap();
    let called = Call::default().run(&client.pod, server.addr).unwrap();
    assert_eq!(called.local.ip(), IpAddr::V4(client.pod.ip));
    assert_eq!(server.next_served().unwrap().peer, called.local);
    assert_eq!(agent.captures().len(), 1);

    // Back in the config: captured again.
    agent
        .rewrite_config(&agent_config(node, std::slice::from_ref(&client)))
        .unwrap();
    agent
        .wait_for_count(PATIENCE, 2, |l| l.message().starts_with("enrolled pod"))
        .unwrap();
    assert!(
        Call::default()
            .run(&client.pod, server.addr)
            .unwrap()
            .local
            .ip()
            .is_loopback()
    );
    assert_eq!(agent.captures().len(), 2);
}

#[test]
fn a_stopped_agent_leaves_its_pods_failing_closed_until_the_next_takes_over() {
    let scene = Scene::new(2, 1);
    let client = scene.workload(0, 0, "default", "sleep");
    let mut server = Server::start(scene.lab.pod(1, 0), PORT).unwrap();
    let quick = Call {
        connect_timeout_ms: Some(2000),
        ..Call::default()
    };
    let enrolled = |agent: &mut Agent| {
        agent
            .wait_for(PATIENCE, |l| l.message().starts_with("enrolled pod"))
            .unwrap()
    };

    // A clean stop (SIGTERM) and a crash (SIGKILL) alike leave the pod's
    // programs in place: its connections fail instead of leaving in clear,
    // and the next agent takes over what is attached.
    for (round, graceful) in [true, false].into_iter().enumerate() {
        let mut agent = scene.agent(0, std::slice::from_ref(&client));
        assert_eq!(
            enrolled(&mut agent).0["taken_over"],
            round > 0,
            "round {round}"
        );
        let called = Call::default().run(&client.pod, server.addr).unwrap();
        assert!(called.local.ip().is_loopback(), "not captured");
        server.next_served().unwrap();
        if graceful {
            assert!(agent.stop().unwrap().success());
        } else {
            drop(agent); // SIGKILL
        }
        assert!(
            quick.run(&client.pod, server.addr).is_err(),
            "graceful={graceful}: a connection left without the agent"
        );
        assert!(server.saw_nothing());
    }

    // `warren uninstall` releases the pod: it talks directly again.
    let mut agent = scene.agent(0, std::slice::from_ref(&client));
    assert_eq!(enrolled(&mut agent).0["taken_over"], true);
    assert!(agent.stop().unwrap().success());
    let stdout = agent.uninstall().unwrap();
    assert!(stdout.contains("released 1 pod(s)"), "{stdout}");
    let called = Call::default().run(&client.pod, server.addr).unwrap();
    assert_eq!(called.local.ip(), IpAddr::V4(client.pod.ip));
    assert_eq!(server.next_served().unwrap().peer, called.local);
}

#[test]
fn a_bad_config_is_refused_with_the_file_and_field_named() {
    let scene = Scene::new(1, 1);
    let node = scene.lab.node(0);
    let dir = &scene.dir;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("bad.yaml");
    let good = agent_config(node, &[scene.workload(0, 0, "default", "sleep")]);
    std::fs::write(&path, good.replace("netns:", "netnss:")).unwrap();

    let output = node
        .command(binary("warren").unwrap())
        .arg("agent")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(
        stderr.contains("workloads[0]") && stderr.contains("netnss"),
        "{stderr}"
    );

    let output = Command::new(binary("warren").unwrap())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[test]
fn a_broken_pod_or_a_bad_reload_does_not_stop_the_others() {
    let scene = Scene::new(2, 1);
    let client = scene.workload(0, 0, "default", "sleep");
    let node = scene.lab.node(0);
    // A second local pod whose namespace does not exist (it was deleted, say).
    let mut ghost = scene.workload(0, 0, "default", "ghost");
    ghost.pod.name = "ghost".into();
    ghost.pod.ip = "10.244.1.99".parse().unwrap();
    ghost.pod.netns = format!("{}-gone", ghost.pod.netns);
    let config = agent_config(node, &[client.clone(), ghost]);
    let mut agent = Agent::start(node, &config, &scene.dir).unwrap();
    let refused = agent
        .wait_for(PATIENCE, |l| l.message().starts_with("cannot enroll pod"))
        .unwrap();
    assert_eq!(refused.field("workload"), "default/ghost");
    assert!(refused.field("error").contains("-gone"), "{:?}", refused.0);

    let mut server = Server::start(scene.lab.pod(1, 0), PORT).unwrap();
    assert!(
        Call::default()
            .run(&client.pod, server.addr)
            .unwrap()
            .local
            .ip()
            .is_loopback()
    );
    server.next_served().unwrap();

    // A broken edit is refused and the running config stays in force.
    agent.rewrite_config("node: [oops").unwrap();
    agent
        .wait_for(PATIENCE, |l| {
            l.message().starts_with("config reload failed")
        })
        .unwrap();
    assert!(
        Call::default()
            .run(&client.pod, server.addr)
            .unwrap()
            .local
            .ip()
            .is_loopback()
    );
    assert_eq!(agent.captures().len(), 2);
}

#[test]
fn ipv6_sockets_to_ipv4_mapped_addresses_are_captured_too() {
    let scene = Scene::new(2, 1);
    let client = scene.workload(0, 0, "default", "sleep");
    let server_pod = scene.lab.pod(1, 0);
    let agent = scene.agent(0, std::slice::from_ref(&client));
    let mut server = Server::start(server_pod, PORT).unwrap();

    // What Java and other dual-stack clients do: an AF_INET6 socket to
    // ::ffff:10.244.2.2. It must not slip past capture.
    let mapped = std::net::SocketAddrV6::new(server_pod.ip.to_ipv6_mapped(), PORT, 0, 0);
    let called = Call::default().run(&client.pod, mapped).unwrap();
    assert_eq!(
        called.local.ip(),
        IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        "not captured: {called:?}"
    );
    assert_eq!(
        ip(server.next_served().unwrap().peer),
        IpAddr::V4(client.pod.ip)
    );
    let captures = agent.captures();
    assert_eq!(captures.len(), 1);
    assert_eq!(captures[0].dst, server.addr);
}
