//! `cargo xtask demo`: two nodes, two pods each, an agent per node, and a few
//! conversations between pods, told in plain words. Everything is real: eBPF
//! programs in the pods' cgroups, processes in network namespaces, bytes on
//! veths. The lab is torn down at the end, also on failure.

use anyhow::{Context, Result, ensure};
use warren_tests::{
    Lab, LabSpec,
    harness::{Agent, Call, Capture, MeshWorkload, PATIENCE, Server, agent_config},
};

const PORT: u16 = 8080;
const BYTES: usize = 4096;

pub fn run() -> Result<()> {
    crate::setup::run(true)?;
    println!("building warren and the lab tools...");
    crate::build()?;

    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let dir = std::env::temp_dir().join("warren-demo").join(lab.prefix());
    println!("\nThe lab: network namespaces for nodes and pods, a cgroup per pod.");
    print!("{}", lab.describe());

    // n2p2 is left out of the mesh on purpose: its traffic must not be touched.
    let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
    let local_web = MeshWorkload::new(lab.pod(0, 1), "default", "web");
    let remote_web = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
    let outsider = lab.pod(1, 1);
    let mesh = [sleep.clone(), local_web.clone(), remote_web.clone()];

    let mut agents = Vec::new();
    for node in lab.nodes() {
        agents.push(Agent::start(node, &agent_config(node, &mesh), &dir)?);
    }
    println!(
        "\nA warren agent runs on each node. Enrolled: {}, {} (node-1) and {} (node-2); \
         {} (node-2) is not enrolled.",
        sleep.qualified_name(),
        local_web.qualified_name(),
        remote_web.qualified_name(),
        outsider.name
    );

    let mut remote_server = Server::start(&remote_web.pod, PORT)?;
    let mut local_server = Server::start(&local_web.pod, PORT)?;

    println!("\n1. Across nodes");
    conversation(&mut agents[0], &sleep, &remote_web, &mut remote_server)?;
    println!("\n2. On the same node");
    conversation(&mut agents[0], &sleep, &local_web, &mut local_server)?;

    println!("\n3. From a pod outside the mesh");
    let called = Call::default().run(outsider, local_server.addr)?;
    let served = local_server.next_served()?;
    let captured = agents[1]
        .captures()
        .iter()
        .any(|c| c.src.ip() == &outsider.ip);
    ensure!(
        !captured,
        "the agent captured an unenrolled pod's connection"
    );
    println!(
        "   {} ({}) called {}: {} bytes there and back; its socket talked to the server directly \
         (the server saw {}, the client's own address and port), and node-2's agent did not touch it.",
        outsider.name, outsider.ip, local_server.addr, called.received, served.peer
    );

    for agent in &mut agents {
        agent.stop()?;
    }
    println!("\nAgents stopped (their eBPF programs detached with them); tearing the lab down.");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    println!("Demo complete.");
    Ok(())
}

fn conversation(
    agent: &mut Agent,
    client: &MeshWorkload,
    server: &MeshWorkload,
    listener: &mut Server,
) -> Result<()> {
    let called = Call {
        bytes: Some(BYTES),
        ..Call::default()
    }
    .run(&client.pod, listener.addr)?;
    let served = listener.next_served()?;
    // The story below is checked, not assumed.
    ensure!(
        called.received == called.sent,
        "the echo came back short: {called:?}"
    );
    ensure!(
        served.peer.ip() == std::net::IpAddr::V4(client.pod.ip),
        "the server saw {} instead of the client's address",
        served.peer
    );
    let dst = listener.addr.to_string();
    let capture = agent.wait_for(PATIENCE, |l| {
        l.message() == "captured outbound connection" && l.field("dst") == dst
    })?;
    let capture: Capture = serde_json::from_value(capture.0).context("capture log line")?;
    let closed = agent.wait_for(PATIENCE, |l| {
        l.message() == "connection closed" && l.field("src") == capture.src.to_string()
    })?;

    println!(
        "   {} ({}, on {}) called {} at {} (on {}).",
        client.qualified_name(),
        client.pod.ip,
        client.pod.node,
        server.qualified_name(),
        listener.addr,
        server.pod.node
    );
    println!(
        "   {}'s agent captured it inside the client pod: workload {}, original destination {} \
         ({}), forwarded by {}.",
        agent.node,
        capture.workload,
        capture.dst,
        describe_dst(&capture),
        capture.path
    );
    println!(
        "   Bytes: the client sent {} and got {} echoed back; the agent relayed {} out and {} in \
         (the server's greeting line included).",
        called.sent, called.received, closed.0["sent"], closed.0["received"]
    );
    println!(
        "   The server saw the caller as {}: the client pod's own address.",
        served.peer
    );
    Ok(())
}

fn describe_dst(capture: &Capture) -> String {
    if capture.dst_workload == "-" {
        "outside the mesh".into()
    } else {
        format!("mesh workload {}", capture.dst_workload)
    }
}
