//! `cargo xtask demo`: two nodes, two pods each, an agent per node, the mesh
//! CA, and a few conversations between pods, told in plain words. Everything
//! is real: eBPF programs in the pods' cgroups, processes in network
//! namespaces, a CA signing CSRs over mutual TLS, mutual TLS between the
//! agents, bytes on veths. Every claim printed is checked first. The lab is
//! torn down at the end, also on failure. Then what the agents report:
//! Istio's metrics, the access log, the admin endpoint. The last scenes run the agents in
//! Kubernetes mode against a real API server, and a new pod through the CNI
//! plugin.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Instant,
};

use anyhow::{Context, Result, anyhow, ensure};
use warren_tests::{
    Lab, LabSpec,
    cluster::{Cluster, PodSpec, RBAC, addr, cluster_ip, enrolled, withdrawn},
    cni::{CniCluster, cni_added},
    harness::{
        Agent, CA_PORT, CaService, Call, Capture, LabCa, MeshWorkload, PATIENCE, Server,
        WireCapture, ca_agent_config, ca_workloads, contains,
    },
    telemetry,
};

const PORT: u16 = 8080;
const METRICS_PORT: u16 = 15020;
const BYTES: usize = 4096;
/// labpod's payload repeats this.
const MARKER: &[u8] = b"warren-labpod-warren-labpod-";

pub fn run() -> Result<()> {
    crate::setup::run(true)?;
    println!("building warren and the lab tools...");
    crate::build(crate::Profile::Debug)?;

    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    println!("\nThe lab: network namespaces for nodes and pods, a cgroup per pod.");
    print!("{}", lab.describe());

    // n2p2 is left out of the mesh on purpose: its traffic must not be touched.
    let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
    let local_web = MeshWorkload::new(lab.pod(0, 1), "default", "web");
    let remote_web = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
    let outsider = lab.pod(1, 1);
    let mesh = [sleep.clone(), local_web.clone(), remote_web.clone()];

    let dir = warren_tests::lab::files_dir(lab.prefix());
    let signing = LabCa::init(&dir.join("ca"))?;
    let workloads = dir.join("ca-workloads.yaml");
    std::fs::write(&workloads, ca_workloads(&mesh))?;
    let mut ca = CaService::start(
        lab.node(0),
        &signing,
        &signing.root(),
        &workloads,
        dir.join("ca.log"),
    )?;
    println!(
        "\nThe mesh CA (`warren-ca serve`) runs on node-1 at {}. It signs with an intermediate \
         of a root made for this lab by `warren-ca init` (in production: an intermediate of your \
         organisation's root).",
        ca.addr
    );

    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    let mut agents = Vec::new();
    for node in lab.nodes() {
        let credential = dir.join("credentials").join(&node.name);
        signing.node_credential(node, &signing.root(), &credential, false)?;
        let ca_addr = std::net::SocketAddrV4::new(lab.node(0).ip, CA_PORT);
        let config = ca_agent_config(node, &mesh, ca_addr, &credential)
            + &format!(
                "policyDir: {}\nmetricsListen: {}:{METRICS_PORT}\n",
                policies.display(),
                node.ip
            );
        agents.push(Agent::start(node, &config, &dir)?);
    }
    println!(
        "A warren agent runs on each node. Enrolled: {} and {} on node-1, {} on node-2; {} on \
         node-2 is not enrolled.",
        sleep.qualified_name(),
        local_web.qualified_name(),
        remote_web.qualified_name(),
        outsider.name
    );
    for workload in &mesh {
        let identity = workload.identity();
        let node = workload.pod.node.clone();
        let signed = ca.wait_for(PATIENCE, |l| {
            l.message() == "signed a workload certificate"
                && l.field("identity") == identity
                && l.field("node") == node
        })?;
        println!(
            "   {node}'s agent made a key for {} (it never leaves the node) and sent a CSR \
             as {node}, asking for {} s; the CA signed {}, knowing that workload runs on {node}.",
            workload.qualified_name(),
            signed.0["requested_seconds"],
            identity,
        );
    }

    let mut remote_server = Server::start(&remote_web.pod, PORT)?;
    let mut local_server = Server::start(&local_web.pod, PORT)?;

    println!("\n1. Across nodes");
    let wire = WireCapture::start(&lab)?;
    conversation(&mut agents, &sleep, &remote_web, &mut remote_server)?;
    let packets = wire.finish()?;
    ensure!(
        !contains(&packets, MARKER),
        "the payload crossed the wire in clear"
    );
    ensure!(
        contains(&packets, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]),
        "no TLS 1.3 handshake on the wire"
    );
    println!(
        "   On the wire between the nodes, tcpdump saw {} bytes of packets: a TLS 1.3 handshake \
         to port 15008, and not one byte of the payload in clear.",
        packets.len()
    );

    println!("\n2. On the same node");
    conversation(&mut agents, &sleep, &local_web, &mut local_server)?;

    println!("\n3. From a pod outside the mesh, to a PERMISSIVE pod (no policy: the default)");
    let called = Call::default().run(outsider, local_server.addr)?;
    let served = local_server.next_served()?;
    ensure!(
        !agents[1]
            .captures()
            .iter()
            .any(|c| c.src.ip() == &outsider.ip),
        "the agent captured an unenrolled pod's connection"
    );
    let src = outsider.ip.to_string();
    let accepted = agents[0].wait_for(PATIENCE, |l| {
        l.message() == "accepted plaintext connection" && l.field("src").starts_with(&src)
    })?;
    ensure!(
        served.peer.ip() == std::net::IpAddr::V4(outsider.ip),
        "the server saw {} instead of the outsider",
        served.peer
    );
    println!(
        "   {} ({}, not enrolled) called {} in plain TCP: {} bytes there and back. The kernel \
         program on {}'s interface handed the connection to node-1's agent, which authorized \
         it with no identity ({}) and delivered it; the application saw {}.",
        outsider.name,
        outsider.ip,
        local_server.addr,
        called.received,
        local_web.pod.name,
        accepted.field("policy"),
        served.peer.ip()
    );

    println!(
        "\n4. Istio policies: STRICT mTLS mesh-wide, and an ALLOW rule for {}",
        sleep.identity()
    );
    std::fs::write(policies.join("policies.yaml"), DEMO_POLICIES)?;
    for agent in &mut agents {
        agent.wait_for_count(PATIENCE, 2, |l| l.message() == "policies loaded")?;
    }
    let refused = Call::quick().run(outsider, local_server.addr);
    ensure!(refused.is_err(), "plaintext reached a STRICT pod");
    ensure!(
        local_server.saw_nothing(),
        "the STRICT pod's application saw the outsider"
    );
    let dropped = agents[0].wait_for(PATIENCE, |l| {
        l.message().starts_with("ingress: STRICT pod") && l.message().contains("dropped")
    })?;
    println!(
        "   {} tried again: its SYN was dropped in the kernel (\"{}\"), the application saw \
         nothing. This holds even while the agent is down: the programs are pinned.",
        outsider.name,
        dropped.message()
    );
    conversation(&mut agents, &sleep, &local_web, &mut local_server)?;
    let allowed = agents[0].wait_for(PATIENCE, |l| {
        l.message() == "accepted HBONE stream" && l.field("policy").starts_with("ALLOW")
    })?;
    println!("   Allowed by {}.", allowed.field("policy"));

    println!("\n5. What the agents report");
    observability(&lab, &agents)?;

    for agent in &mut agents {
        agent.stop()?;
    }
    ca.stop()?;
    println!(
        "\nAgents and CA stopped. The pods' programs stay pinned (they fail closed until an \
         agent takes over); tearing the lab down removes them."
    );
    drop(lab);
    kubernetes()?;
    new_pod_through_cni()?;
    println!("\nDemo complete.");
    Ok(())
}

/// Scene 6: the same agents in Kubernetes mode, learning the mesh from a real
/// API server (the lab plays the kubelet).
fn kubernetes() -> Result<()> {
    println!(
        "\n6. On Kubernetes: a real API server and controller manager (1.20, built from \
         Debian's source package), the lab playing the kubelet, an agent per node reading the \
         API with its own service account (RBAC as in deploy/kustomize/base/agent/rbac.yaml)"
    );
    let mut cluster = Cluster::without_agents(2, true, RBAC);
    let ca = cluster.start_ca();
    println!(
        "   The CA runs as the manifests run it (`warren-ca serve --kubernetes`, its own service \
         account): it watches the Pods and published its roots in the ConfigMap \
         warren-system/warren-trust-bundle, which the agents trust. Each agent presents the \
         projected token of its own Pod; the CA has the API server review it (TokenReview) and \
         signs only identities of pods on that Pod's node."
    );
    cluster.start_agents_with_ca(&ca);
    cluster.namespace("shop", false, &["web", "sleep"]);
    let http = |port: u16| format!("    ports: [{{name: http, containerPort: {port}}}]\n");
    let sleep = cluster.pod(&PodSpec::new("shop", "sleep", 0, "sleep"));
    let web1 = cluster.pod(
        &PodSpec::new("shop", "web-1", 0, "web")
            .label("app", "web")
            .container(&http(8080)),
    );
    let web2 = cluster.pod(
        &PodSpec::new("shop", "web-2", 1, "web")
            .label("app", "web")
            .container(&http(8081)),
    );
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}\n",
    );
    let vip = SocketAddrV4::new(cluster_ip(&cluster, "shop", "web"), 80);
    println!(
        "   Pods created through the API: shop/sleep and shop/web-1 on node-1, shop/web-2 on \
         node-2 (its container port `http` is 8081, web-1's is 8080); Service shop/web at {vip}."
    );

    let labelled = Instant::now();
    cluster.label_namespace("shop", Some("ambient"));
    let mut agents = cluster.agents;
    for (agent, names) in agents
        .iter_mut()
        .zip([&["shop/sleep", "shop/web-1"][..], &["shop/web-2"]])
    {
        for name in names {
            agent.wait_for(PATIENCE, enrolled(name))?;
        }
    }
    println!(
        "   Namespace shop labelled istio.io/dataplane-mode=ambient (as `kubectl label` does): the \
         agents enrolled its three pods {} ms later, finding each pod's cgroup from its UID \
         (systemd layout on node-1, cgroupfs on node-2) and its network namespace from its \
         sandbox process.",
        labelled.elapsed().as_millis()
    );

    let mut servers = [Server::start(&web1, 8080)?, Server::start(&web2, 8081)?];
    let mut reached = [0, 0];
    let deadline = Instant::now() + 3 * PATIENCE;
    while reached.contains(&0) {
        ensure!(
            Instant::now() < deadline,
            "calls to the Service never reached both endpoints"
        );
        // Until the controller manager has published the endpoints, the
        // Service has none and the call is refused.
        let Ok(called) = Call::default().run(&sleep, vip) else {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        };
        let capture = agents[0]
            .captures()
            .pop()
            .context("the call was not captured")?;
        ensure!(capture.path == "hbone", "the call went by {}", capture.path);
        let i = usize::from(capture.dst_workload == "shop/web-2");
        let served = servers[i].next_served()?;
        ensure!(
            served.peer.ip() == sleep.ip,
            "the server saw {} instead of the client pod",
            served.peer
        );
        // The endpoint's agent saw the client's own identity.
        let accepted = agents[i]
            .wait_for_count(PATIENCE, reached[i] + 1, |l| {
                l.message() == "accepted HBONE stream" && l.field("dst") == capture.dst.to_string()
            })?
            .pop()
            .context("no stream accepted")?;
        let identity = "spiffe://cluster.local/ns/shop/sa/sleep";
        ensure!(
            accepted.field("peer_identity") == identity,
            "the endpoint's agent saw {}",
            accepted.field("peer_identity")
        );
        reached[i] += 1;
        println!(
            "   shop/sleep called {vip}: node-1's agent chose the ready endpoint {} ({}) and \
             tunnelled it over HBONE; {}'s agent saw {identity}; the server saw {}; {} bytes \
             echoed.",
            capture.dst, capture.dst_workload, agents[i].node, served.peer, called.received
        );
    }
    for agent in &mut agents {
        agent.stop()?;
    }
    let signed: Vec<String> = ca
        .service
        .lines()
        .iter()
        .filter(|l| l.message() == "signed a workload certificate")
        .map(|l| format!("{} on {}", l.field("identity"), l.field("node")))
        .collect();
    ensure!(
        signed.iter().any(|s| s.ends_with("/sa/sleep on node-1"))
            && signed.iter().any(|s| s.ends_with("/sa/web on node-2")),
        "the CA did not sign the certificates the calls used: {signed:?}"
    );
    println!(
        "   Calls to the Service's virtual address went to both endpoints, each to its own target \
         port, mTLS all the way, with certificates the CA signed for each agent's own pods: {}. \
         Tearing down the lab and its control plane.",
        signed.join(", ")
    );
    Ok(())
}

/// Scene 7: a pod made the way a container runtime makes it, with the CNI
/// plugin holding it until its agent has captured it.
fn new_pod_through_cni() -> Result<()> {
    println!(
        "\n7. A new pod, held until it is captured: each agent put warren-cni after its node's \
         primary CNI (Debian's bridge + host-local), and the lab makes sandboxes as containerd \
         does (the pod's cgroup, an empty network namespace, then each plugin of the list)"
    );
    let mut cni = CniCluster::up(2);
    cni.cluster.namespace("shop", true, &["web", "sleep"]);
    cni.cluster.apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let web = cni.cluster.pod(&PodSpec::new("shop", "web", 1, "web"));
    cni.cluster.agents[1].wait_for(PATIENCE, enrolled("shop/web"))?;
    let mut server = Server::start(&web, PORT)?;
    let uid = cni.pod("shop", "sleep", 0, "sleep");
    let asked = Instant::now();
    let sleep = cni.add(0, "shop", "sleep", &uid).map_err(|e| anyhow!(e))?;
    let held_ms = asked.elapsed().as_millis();
    let called = Call::default().run(&sleep.pod, addr(&web, PORT))?;
    let served = server.next_served()?;
    ensure!(
        served.peer.ip() == sleep.pod.ip,
        "the server saw {}",
        served.peer
    );
    cni.cluster.agents[0].wait_for(PATIENCE, cni_added("shop/sleep"))?;
    let accepted =
        cni.cluster.agents[1].wait_for(PATIENCE, |l| l.message() == "accepted HBONE stream")?;
    let identity = accepted.field("peer_identity").to_owned();
    ensure!(
        identity == "spiffe://cluster.local/ns/shop/sa/sleep",
        "node-2's agent saw {identity}"
    );
    println!(
        "   The runtime asked for shop/sleep's sandbox on node-1 (STRICT namespace): ADD \
         returned after {held_ms} ms, once node-1's agent held the pod in the namespace the \
         runtime made, before any process ran there and before the API server knew its \
         address {}. Its very first connection went over HBONE: node-2's agent saw {identity}, \
         the server saw {}, {} bytes echoed.",
        sleep.pod.ip, served.peer, called.received
    );
    cni.runtimes[0].del(&sleep).context("DEL")?;
    cni.cluster.agents[0].wait_for(PATIENCE, withdrawn("shop/sleep"))?;
    println!("   DEL withdrew it. Tearing down.");
    Ok(())
}

/// What scene 4 applies: Istio documents, as they would come from a cluster.
const DEMO_POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-sleep, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
";

fn conversation(
    agents: &mut [Agent],
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
    let client_agent = &mut agents[node_index(&client.pod.node)];
    let capture = client_agent.wait_for(PATIENCE, |l| {
        l.message() == "captured outbound connection" && l.field("dst") == dst
    })?;
    let identity = capture.field("identity").to_owned();
    let dst_identity = capture.field("dst_identity").to_owned();
    let capture: Capture = serde_json::from_value(capture.0).context("capture log line")?;
    ensure!(
        capture.path == "hbone",
        "a mesh destination went by {}",
        capture.path
    );
    // The access log's line for it, once both ends have closed.
    let closed = client_agent.wait_for(PATIENCE, |l| {
        l.field("target") == "access" && l.field("src.addr") == capture.src.to_string()
    })?;
    let (relayed_out, relayed_in) = (
        closed.0["request_bytes"].clone(),
        closed.0["response_bytes"].clone(),
    );
    let client_node = client_agent.node.clone();

    let server_agent = &mut agents[node_index(&server.pod.node)];
    let accepted = server_agent.wait_for(PATIENCE, |l| {
        l.message() == "accepted HBONE stream" && l.field("dst") == dst
    })?;
    ensure!(
        accepted.field("peer_identity") == identity,
        "the server side saw {} instead of {identity}",
        accepted.field("peer_identity")
    );

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
        "   {client_node}'s agent captured it inside the client pod (original destination {}) \
         and sent it through an HBONE tunnel to {}:15008, presenting {identity} and accepting \
         only {dst_identity}.",
        capture.dst, server.pod.ip
    );
    println!(
        "   {}'s agent checked the client's certificate, saw {}, and delivered the stream to \
         the application.",
        server_agent.node,
        accepted.field("peer_identity")
    );
    println!(
        "   Bytes: the client sent {} and got {} echoed back; its agent relayed {relayed_out} \
         out and {relayed_in} in (the server's greeting line included).",
        called.sent, called.received
    );
    println!(
        "   The server saw the caller as {}: the client pod's own address, not an agent's.",
        served.peer
    );
    Ok(())
}

/// Scene 5: node-1's metrics (Istio's names), its access log and its admin endpoint, read
/// as an operator would.
fn observability(lab: &Lab, agents: &[Agent]) -> Result<()> {
    let node = lab.node(0);
    let metrics = SocketAddr::from((node.ip, METRICS_PORT));
    let scraped = telemetry::scrape(&node.netns_path(), metrics, "/stats/prometheus")?;
    let sum = |metric: &str, matching: &[(&str, &str)]| -> f64 {
        scraped
            .of(metric)
            .filter(|s| matching.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| telemetry::number(s).ok())
            .sum()
    };
    let inbound = [
        ("reporter", "destination"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let opened = sum("istio_tcp_connections_opened_total", &inbound);
    let received = sum("istio_tcp_received_bytes_total", &inbound);
    let plaintext = sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
        ],
    );
    let dropped = sum(
        "warren_kernel_drops_total",
        &[("reason", "strict_plaintext")],
    );
    ensure!(
        opened >= 2.0 && dropped >= 1.0,
        "the metrics missed the scenes above"
    );
    println!(
        "   node-1's agent serves Prometheus metrics on {metrics}, with Istio's names and labels: \
         {opened} mutual-TLS connections into its pods (istio_tcp_connections_opened_total, \
         reporter=\"destination\"), {received} bytes from their clients, {plaintext} in plaintext \
         (connection_security_policy=\"none\"); and warren's own: {dropped} plaintext SYNs dropped \
         by the kernel under STRICT (warren_kernel_drops_total)."
    );
    // The destination's line: it has the policy decision.
    let access = agents[0]
        .lines()
        .into_iter()
        .rfind(|l| l.field("target") == "access" && l.field("direction") == "inbound")
        .context("no access log line")?;
    println!(
        "   Each connection ends with one line on the `access` log target of each agent: the \
         last one node-1's agent wrote as the destination says {} -> {} ({}), {} bytes in, {} \
         out, {} ms, decided by {}.",
        access.field("src.workload"),
        access.field("dst.workload"),
        access.field("path"),
        access.0["request_bytes"],
        access.0["response_bytes"],
        access.0["duration_ms"],
        access.field("policy"),
    );
    let admin = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 15000));
    let dump = telemetry::http(&node.netns_path(), admin, "GET", "/config_dump")?;
    let dump: serde_json::Value = serde_json::from_str(&dump.body)?;
    let certificates = dump["certificates"].as_array().cloned().unwrap_or_default();
    println!(
        "   On the node's loopback only, the admin endpoint (127.0.0.1:15000/config_dump) shows \
         the agent's view: {} workloads, {} pods enrolled here, {} certificates held (identity, \
         serial, expiry; never a key); POST /logging?level=... changes the log filter live.",
        dump["workloads"].as_array().map_or(0, Vec::len),
        dump["pods"].as_array().map_or(0, Vec::len),
        certificates.len(),
    );
    Ok(())
}

/// `node-2` → 1.
fn node_index(node: &str) -> usize {
    node.trim_start_matches("node-")
        .parse::<usize>()
        .map_or(0, |n| n - 1)
}
