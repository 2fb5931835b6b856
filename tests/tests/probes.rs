//! The kubelet's probes in the lab: plaintext from the node itself, to the
//! ports a pod's probes name (`probePorts` in the agent's config), reaches the
//! application directly, whatever the pod's mTLS mode, without the agent;
//! nothing else gets that way in.
//!
//! Node 1: n1p1 is shop/web (app=web), with probePorts [8080] and servers on
//! 8080 and 9090; n1p2 is outside the mesh (not enrolled). Node 2: n2p1 is
//! default/sleep, a mesh client. The kubelet is played by `labpod call` in
//! node 1's own namespace, whose address as web sees it is web's gateway.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use warren_tests::{
    Lab, Node, Pod,
    harness::{
        Agent, Call, LogLine, MeshWorkload, PATIENCE, Server, replace_policies,
        start_agents_with_policies, test_lab,
    },
    lab::files_dir,
};

const PROBE_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
/// Node 1's address on its pods' links: what web sees the kubelet call from.
const NODE_AS_SEEN_BY_WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);

struct ProbeMesh {
    lab: Lab,
    web: MeshWorkload,
    sleep: MeshWorkload,
    agents: Vec<Agent>,
    policies: PathBuf,
}

impl ProbeMesh {
    fn new() -> Self {
        let lab = test_lab(2, 2);
        let web = MeshWorkload::new(lab.pod(0, 0), "shop", "web")
            .label("app", "web")
            .probe_port(PROBE_PORT);
        let sleep = MeshWorkload::new(lab.pod(1, 0), "default", "sleep").label("app", "sleep");
        let dir = files_dir(lab.prefix());
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).unwrap();
        let workloads = [web.clone(), sleep.clone()];
        let agents = start_agents_with_policies(&lab, &workloads, &policies, &dir.join("agents"));
        Self {
            lab,
            web,
            sleep,
            agents,
            policies,
        }
    }

    /// Not enrolled, on web's node.
    fn outsider(&self) -> Pod {
        self.lab.pod(0, 1).clone()
    }

    /// The node that runs web, where the kubelet probing it runs.
    fn web_node(&self) -> &Node {
        self.lab.node(0)
    }

    fn web_agent(&self) -> &Agent {
        &self.agents[0]
    }

    /// Replaces the policies with `yaml` and waits until both agents have
    /// loaded them.
    fn set_policies(&mut self, yaml: &str) {
        replace_policies(&mut self.agents, &self.policies, yaml);
    }

    /// How many lines of web's agent match `pred`.
    fn count(&self, pred: impl Fn(&LogLine) -> bool) -> usize {
        self.web_agent().lines().iter().filter(|l| pred(l)).count()
    }

    /// How many plaintext connections web's agent accepted.
    fn plaintext_accepted(&self) -> usize {
        self.count(|l| l.message() == "accepted plaintext connection")
    }
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

/// The eBPF log line of a STRICT drop of a SYN to `port` of the pod at `pod`.
fn strict_drop(pod: Ipv4Addr, port: u16) -> impl Fn(&LogLine) -> bool {
    let message = format!("ingress: STRICT pod {pod}: dropped plaintext SYN to port {port}");
    move |l| l.message() == message
}

/// The eBPF log line of a probe let through.
fn probe_let_through(pod: Ipv4Addr, src: Ipv4Addr, port: u16) -> impl Fn(&LogLine) -> bool {
    let message = format!(
        "ingress: pod {pod}: probe from {src} to port {port} let through to the application"
    );
    move |l| l.message() == message
}

#[test]
fn a_strict_pod_takes_the_kubelets_probes_and_nothing_else() {
    let mut mesh = ProbeMesh::new();
    let mut probed = Server::start(&mesh.web.pod, PROBE_PORT).unwrap();
    let mut other = Server::start(&mesh.web.pod, OTHER_PORT).unwrap();
    mesh.set_policies(&pa(
        "shop",
        "web-strict",
        "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
    ));
    let web_ip = mesh.web.pod.ip;
    let node = mesh.web_node().clone();

    // The kubelet's probe port, from the node: straight to the application,
    // which sees the node's address; the agent never sees it.
    let plaintext_before = mesh.plaintext_accepted();
    let called = Call::quick()
        .run_from_node(&node, probed.addr)
        .expect("the probe was dropped");
    let served = probed.next_served().unwrap();
    assert_eq!(served.peer.ip(), NODE_AS_SEEN_BY_WEB);
    assert_eq!(served.bytes, called.sent);
    assert_eq!(
        mesh.plaintext_accepted(),
        plaintext_before,
        "through the agent"
    );
    mesh.agents[0]
        .wait_for(
            PATIENCE,
            probe_let_through(web_ip, NODE_AS_SEEN_BY_WEB, PROBE_PORT),
        )
        .unwrap();

    // Another port, from the node: STRICT, dropped in the kernel.
    let drops_before = mesh.count(strict_drop(web_ip, OTHER_PORT));
    let err = Call::quick()
        .run_from_node(&node, other.addr)
        .expect_err("plaintext reached a port no probe names");
    assert!(
        format!("{err:#}").contains("timed out"),
        "not dropped: {err:#}"
    );
    assert!(other.saw_nothing(), "the application saw a connection");
    mesh.agents[0]
        .wait_for_count(PATIENCE, drops_before + 1, strict_drop(web_ip, OTHER_PORT))
        .unwrap();

    // The probe port, from a pod outside the mesh (routed by the same node):
    // only the node's address is let through.
    let outsider = mesh.outsider();
    let drops_before = mesh.count(strict_drop(web_ip, PROBE_PORT));
    let err = Call::quick()
        .run(&outsider, probed.addr)
        .expect_err("a pod's plaintext reached the probe port");
    assert!(
        format!("{err:#}").contains("timed out"),
        "not dropped: {err:#}"
    );
    assert!(probed.saw_nothing(), "the application saw a connection");
    mesh.agents[0]
        .wait_for_count(PATIENCE, drops_before + 1, strict_drop(web_ip, PROBE_PORT))
        .unwrap();
    assert_eq!(
        mesh.plaintext_accepted(),
        plaintext_before,
        "through the agent"
    );

    // A mesh client still reaches both ports, over HBONE.
    let sleep = mesh.sleep.pod.clone();
    for server in [&mut probed, &mut other] {
        Call::default().run(&sleep, server.addr).unwrap();
        assert_eq!(server.next_served().unwrap().peer.ip(), sleep.ip);
        let capture = mesh.agents[1].captures().last().unwrap().clone();
        assert_eq!(capture.dst, server.addr);
        assert_eq!(capture.path, "hbone");
    }
}

#[test]
fn probes_bypass_the_agent_and_its_policies_under_permissive() {
    let mut mesh = ProbeMesh::new();
    let mut probed = Server::start(&mesh.web.pod, PROBE_PORT).unwrap();
    let mut other = Server::start(&mesh.web.pod, OTHER_PORT).unwrap();
    // PERMISSIVE (the default), but only sleep may call web: plaintext, which
    // has no identity, is refused by the agent.
    mesh.set_policies(&ap(
        "shop",
        "web-from-sleep",
        "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]}",
    ));
    let node = mesh.web_node().clone();
    let refused = |port: u16| {
        let dst = SocketAddrV4::new(mesh.web.pod.ip, port).to_string();
        move |l: &LogLine| {
            l.message() == "plaintext connection refused"
                && l.field("dst") == dst
                && l.field("reason").starts_with("denied by policy")
        }
    };

    // The probe port: to the application, as Istio's probe rewrite does,
    // neither handed to the agent nor subject to its policies.
    let plaintext_before = mesh.plaintext_accepted();
    Call::quick()
        .run_from_node(&node, probed.addr)
        .expect("the probe did not get through");
    assert_eq!(probed.next_served().unwrap().peer.ip(), NODE_AS_SEEN_BY_WEB);
    assert_eq!(
        mesh.plaintext_accepted(),
        plaintext_before,
        "through the agent"
    );
    assert_eq!(mesh.count(refused(PROBE_PORT)), 0);
    mesh.agents[0]
        .wait_for(
            PATIENCE,
            probe_let_through(mesh.web.pod.ip, NODE_AS_SEEN_BY_WEB, PROBE_PORT),
        )
        .unwrap();

    // Another port, from the node: handed to the agent (which logs why it
    // refuses), as any plaintext.
    let refusals_before = mesh.count(refused(OTHER_PORT));
    assert!(
        Call::quick().run_from_node(&node, other.addr).is_err(),
        "the node got past the policy"
    );
    assert!(other.saw_nothing(), "the application saw a connection");
    mesh.agents[0]
        .wait_for_count(PATIENCE, refusals_before + 1, refused(OTHER_PORT))
        .unwrap();

    // The probe port from a pod outside the mesh: the agent's, and refused.
    let refusals_before = mesh.count(refused(PROBE_PORT));
    assert!(
        Call::quick().run(&mesh.outsider(), probed.addr).is_err(),
        "a pod got past the policy on the probe port"
    );
    assert!(probed.saw_nothing(), "the application saw a connection");
    mesh.agents[0]
        .wait_for_count(PATIENCE, refusals_before + 1, refused(PROBE_PORT))
        .unwrap();
}
