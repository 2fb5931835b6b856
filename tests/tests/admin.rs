//! The agent's admin endpoint in the lab: on the node's loopback only, its
//! dump follows the mesh within a second and holds no key, and its log
//! filter changes at run time.
//!
//! Node 1: n1p1 is default/sleep. Node 2: n2p1 is shop/web. Policies come
//! from a directory the agents watch.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::Value;
use warren_tests::{
    Node,
    harness::{
        Agent, Call, MeshWorkload, PATIENCE, Server, agent_config, dev_ca_dir, log_level, test_lab,
    },
    lab::files_dir,
    telemetry::{Answer, NO_ADMIN_PORT, http},
};

const ADMIN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));

fn admin(node: &Node, method: &str, path: &str) -> Answer {
    http(&node.netns_path(), ADMIN, method, path).unwrap()
}

fn dump(node: &Node) -> Value {
    let answer = admin(node, "GET", "/config_dump");
    assert_eq!(answer.status, 200, "{}", answer.body);
    serde_json::from_str(&answer.body).unwrap()
}

#[test]
fn the_dump_follows_the_mesh_holds_no_key_and_the_endpoint_stays_on_the_node() {
    let lab = test_lab(2, 1);
    let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep").label("app", "sleep");
    let web = MeshWorkload::new(lab.pod(1, 0), "shop", "web").label("app", "web");
    let dir = files_dir(lab.prefix());
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).unwrap();
    let workloads = [sleep.clone(), web.clone()];
    let _agents: Vec<Agent> = lab
        .nodes()
        .iter()
        .map(|node| {
            let config =
                agent_config(node, &workloads) + &format!("policyDir: {}\n", policies.display());
            Agent::start(node, &config, &dir.join("agents")).unwrap()
        })
        .collect();
    let node = lab.node(1);

    // The agent's view: both workloads, web enrolled here with its
    // certificate, and no policy yet.
    let view = dump(node);
    assert_eq!(view["node"], node.name.as_str());
    let names: Vec<&str> = view["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [sleep.pod.name.as_str(), web.pod.name.as_str()]);
    let pods = view["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{pods:?}");
    assert_eq!(pods[0]["pod"], web.qualified_name().as_str());
    assert_eq!(pods[0]["state"], "enrolled");
    let deadline = Instant::now() + PATIENCE;
    let certificate = loop {
        let view = dump(node);
        if let Some(certificate) = view["certificates"].as_array().and_then(|c| c.first()) {
            break certificate.clone();
        }
        assert!(Instant::now() < deadline, "no certificate in {view:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(certificate["identity"], web.identity().as_str());
    assert!(!certificate["serial"].as_str().unwrap().is_empty());
    assert_eq!(
        view["policies"]["authorization_policies"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // A policy written now is in the dump within a second.
    fs::write(policies.join("deny.yaml"), NO_ADMIN_PORT).unwrap();
    let written = Instant::now();
    let seen = loop {
        let view = dump(node);
        let named = view["policies"]["authorization_policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "no-admin-port" && p["action"] == "DENY");
        if named {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the policy never showed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(seen < Duration::from_secs(1), "the dump took {seen:?}");

    // No key material: no PEM key block, and not the development CA's root
    // key, which this node's agent read.
    let text = admin(node, "GET", "/config_dump").body;
    assert!(!text.contains("PRIVATE KEY"));
    let root_key = fs::read_to_string(dev_ca_dir(node).join("root-key.pem")).unwrap();
    for line in root_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !text.contains(line),
            "a line of the root key is in the dump"
        );
    }

    // The endpoint is on the node's loopback: not on its address, so
    // neither another node nor a pod reaches it.
    let on_address = SocketAddr::from((node.ip, 15000));
    let refused = |netns: &std::path::Path, addr: SocketAddr| {
        let tried = warren_tests::controlplane::block_on_in_netns(netns, || async move {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .unwrap();
        match tried {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{addr}: {e}"
            ),
            Ok(_) => panic!("{addr} reached from {}", netns.display()),
        }
    };
    refused(&lab.node(0).netns_path(), on_address);
    // A pod of this node: its own loopback is its own, and the node's
    // address takes nothing on that port.
    let pod = &web.pod;
    refused(&pod.netns_path(), on_address);
    refused(&pod.netns_path(), ADMIN);
    // (An enrolled pod's connections go through the agent: what it cannot
    // reach directly it cannot reach through the tunnel either.)
    let _server = Server::start(&sleep.pod, 8080).unwrap();
    Call::default()
        .run(&web.pod, (sleep.pod.ip, 8080))
        .expect("the mesh still works");
}

#[test]
fn the_log_filter_changes_at_run_time() {
    let lab = test_lab(1, 2);
    let web = MeshWorkload::new(lab.pod(0, 0), "shop", "web");
    // Outside the mesh: web reaches it by passthrough.
    let outside = lab.pod(0, 1).clone();
    let _server = Server::start(&outside, 8080).unwrap();
    let dir = files_dir(lab.prefix());
    let node = lab.node(0);
    let mut agent =
        Agent::start(node, &agent_config(node, std::slice::from_ref(&web)), &dir).unwrap();
    let answer = admin(node, "GET", "/logging");
    let started = log_level();
    assert_eq!((answer.status, answer.body.trim()), (200, started.as_str()));
    let access_lines = |agent: &Agent| {
        agent
            .lines()
            .iter()
            .filter(|l| l.field("target") == "access")
            .count()
    };
    let call = || {
        Call::default()
            .run(&web.pod, (outside.ip, 8080))
            .expect("passthrough");
    };

    // Silence the access log, and only it.
    let silenced = format!("{started},access=off");
    let answer = admin(node, "POST", &format!("/logging?level={silenced}"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(admin(node, "GET", "/logging").body.trim(), silenced);
    call();
    // The connection's other lines are still there: it was served.
    agent
        .wait_for(PATIENCE, |l| l.message() == "captured outbound connection")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(access_lines(&agent), 0);

    // A filter that does not parse is refused, and the one in force stays.
    let bad = admin(node, "POST", "/logging?level=info,%3D%3D");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert_eq!(admin(node, "GET", "/logging").body.trim(), silenced);

    // Back on: the next connection has its line.
    let answer = admin(node, "POST", &format!("/logging?level={started}"));
    assert_eq!(answer.status, 200, "{}", answer.body);
    call();
    let deadline = Instant::now() + PATIENCE;
    while access_lines(&agent) == 0 {
        assert!(
            Instant::now() < deadline,
            "no access line once it is on again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(access_lines(&agent), 1);
}
