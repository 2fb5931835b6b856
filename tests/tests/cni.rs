//! Race-free enrollment: the agent installs warren-cni after the node's
//! primary CNI (Debian's bridge + host-local), and the lab plays the
//! container runtime with those real plugins ([`warren_tests::cni`]): a pod
//! of the mesh is captured before ADD returns, so its first connection is
//! too. A real API server, real eBPF, real mTLS.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;
use warren_tests::{
    cluster::{PodSpec, addr, enrolled, withdrawn},
    cni::{CniCluster, cni_added, socket_of, wait_installed},
    harness::{
        Agent, Call, MeshWorkload, PATIENCE, Server, WireCapture, agent_config, binary, contains,
    },
    lab::Node,
};

const PORT: u16 = 8080;
/// labpod's payload repeats this.
const MARKER: &[u8] = b"warren-labpod-warren-labpod-";

#[test]
fn a_pod_the_runtime_adds_is_captured_before_its_first_connection() {
    let mut cni = CniCluster::up(2);
    cni.cluster.namespace("shop", true, &["web", "sleep"]);
    cni.cluster.namespace("plain", false, &["default"]);
    // Plaintext to web is dropped: a connection that escaped capture fails.
    cni.cluster.apply(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    );
    let web = cni.cluster.pod(&PodSpec::new("shop", "web", 1, "web"));
    cni.cluster.agents[1]
        .wait_for(PATIENCE, enrolled("shop/web"))
        .unwrap();
    let mut server = Server::start(&web, PORT).unwrap();

    // The runtime makes the sandbox; the first connection leaves the
    // instant ADD returns, before the API server knows the pod's address.
    let uid = cni.pod("shop", "sleep", 0, "sleep");
    let wire = WireCapture::start(&cni.cluster.lab).unwrap();
    let started = Instant::now();
    let sleep = cni.add(0, "shop", "sleep", &uid).expect("ADD");
    let added = started.elapsed();
    let called = Call::default().run(&sleep.pod, addr(&web, PORT));
    let packets = wire.finish().unwrap();
    eprintln!("ADD with enrollment took {added:?}");
    let called = called.expect("the first call goes through the tunnel");
    assert!(called.ok);
    assert_eq!(server.next_served().unwrap().peer.ip(), sleep.pod.ip);
    let accepted = cni.cluster.agents[1]
        .wait_for(PATIENCE, |l| l.message() == "accepted HBONE stream")
        .unwrap();
    assert_eq!(
        accepted.field("peer_identity"),
        "spiffe://cluster.local/ns/shop/sa/sleep"
    );
    assert!(!contains(&packets, MARKER), "payload crossed in clear");
    cni.cluster.agents[0]
        .wait_for(PATIENCE, cni_added("shop/sleep"))
        .unwrap();
    // Enrolled where the runtime said, before any sandbox process existed.
    let enrolled_line = cni.cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/sleep"))
        .unwrap();
    assert_eq!(
        enrolled_line.field("netns"),
        sleep.pod.netns_path().display().to_string()
    );

    // CHECK: held as set up.
    cni.runtimes[0].check(&sleep).unwrap().expect("CHECK");

    // A pod outside the mesh passes straight through, and is not captured.
    let uid = cni.pod("plain", "other", 0, "default");
    let other = cni.add(0, "plain", "other", &uid).expect("ADD");
    assert!(
        !cni.cluster.agents[0]
            .lines()
            .iter()
            .any(|l| l.field("workload") == "plain/other"),
        "a pod outside the mesh was enrolled"
    );

    // DEL withdraws the pod from its sandbox.
    cni.runtimes[0].del(&sleep).unwrap();
    cni.cluster.agents[0]
        .wait_for(PATIENCE, withdrawn("shop/sleep"))
        .unwrap();
    cni.runtimes[0].del(&other).unwrap();
}

#[test]
fn with_the_agent_away_mesh_pods_are_held_and_others_start() {
    let mut cni = CniCluster::up(1);
    cni.cluster.namespace("shop", true, &["sleep"]);
    cni.cluster.namespace("plain", false, &["default"]);
    let held_uid = cni.pod("shop", "held", 0, "sleep");
    let free_uid = cni.pod("plain", "free", 0, "default");
    // The agent knew both pods when it went away: it left them in its
    // membership file.
    let membership =
        socket_of(&cni.cluster, cni.cluster.lab.node(0)).with_file_name("membership.json");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(&membership).unwrap_or_default();
        if text.contains("shop/held") && text.contains("plain/free") {
            break;
        }
        assert!(Instant::now() < deadline, "membership: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    cni.cluster.agents[0].stop().unwrap();

    let refused = cni.add(0, "shop", "held", &held_uid).unwrap_err();
    assert!(
        refused.contains("code Some(11)")
            && refused.contains("must be in the mesh")
            && refused.contains("cannot be reached"),
        "{refused}"
    );
    let free = cni.add(0, "plain", "free", &free_uid).expect("ADD");
    // A namespace made while the agent is away: unknown, held.
    cni.cluster.namespace("new", false, &["default"]);
    let new_uid = cni.pod("new", "pod", 0, "default");
    let unknown = cni.add(0, "new", "pod", &new_uid).unwrap_err();
    assert!(unknown.contains("must be in the mesh"), "{unknown}");

    // The agent is back: the runtime's retry succeeds, the pod is captured.
    cni.restart_agent(0);
    let held = cni.add(0, "shop", "held", &held_uid).expect("ADD retried");
    cni.cluster.agents[0]
        .wait_for(PATIENCE, cni_added("shop/held"))
        .unwrap();
    let new = cni.add(0, "new", "pod", &new_uid).expect("ADD retried");

    // Restarted before the API server has the pod's address (the lab's
    // kubelet leaves these pods to the test): the new agent keeps the
    // runtime's report, takes the pod over where it is, and CHECK agrees.
    cni.runtimes[0].check(&held).unwrap().expect("CHECK");
    cni.restart_agent(0);
    cni.cluster.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message() == "kept the runtime's sandbox reports of an earlier agent"
        })
        .unwrap();
    let again = cni.cluster.agents[0]
        .wait_for(PATIENCE, enrolled("shop/held"))
        .unwrap();
    assert_eq!(
        again.field("netns"),
        held.pod.netns_path().display().to_string()
    );
    assert_eq!(again.0["taken_over"], true, "{again:?}");
    cni.runtimes[0].check(&held).unwrap().expect("CHECK");

    // CHECK tells a pod the agent has lost: it went away again.
    cni.cluster.agents[0].stop().unwrap();
    let lost = cni.runtimes[0].check(&held).unwrap().unwrap_err();
    assert!(lost.msg.contains("cannot be reached"), "{lost}");
    // DEL succeeds whatever the agent's state.
    for sandbox in [&held, &free, &new] {
        cni.runtimes[0].del(sandbox).unwrap();
    }
}

#[test]
fn uninstall_takes_the_plugin_out_of_the_primarys_list() {
    let mut cni = CniCluster::up(1);
    let runtime = &cni.runtimes[0];
    let (file, installed) = runtime.list().unwrap();
    assert_eq!(
        installed["plugins"][1]["socket"],
        socket_of(&cni.cluster, cni.cluster.lab.node(0))
            .display()
            .to_string()
    );
    // The primary rewrites its own file, without us: we are back.
    std::fs::write(&file, serde_json::to_string(&runtime.primary()).unwrap()).unwrap();
    wait_installed(runtime);
    cni.cluster.agents[0].stop().unwrap();
    let said = cni.cluster.agents[0].uninstall().unwrap();
    assert!(said.contains("removed warren-cni from"), "{said}");
    let (_, after) = runtime.list().unwrap();
    assert_eq!(after, runtime.primary());
    assert!(!runtime.bin_dir.join("warren-cni").exists());
    // Again: nothing left to do.
    let said = cni.cluster.agents[0].uninstall().unwrap();
    assert!(!said.contains("removed warren-cni"), "{said}");
}

#[test]
fn version_answers_as_the_spec_says() {
    let output = std::process::Command::new(binary("warren-cni").unwrap())
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success());
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["cniVersion"], "1.1.0");
    assert_eq!(
        answer["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    // Not run by a runtime: the spec's error, naming what is missing.
    let output = std::process::Command::new(binary("warren-cni").unwrap())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["code"], 4);
    assert!(error["msg"].as_str().unwrap().contains("CNI_COMMAND"));
}

/// Runs warren-cni once as a runtime would, in `node`'s namespace; its exit
/// status and what it printed.
fn plugin(
    node: &Node,
    command: &str,
    netns: &Path,
    pod: (&str, &str),
    config: &Value,
) -> (bool, Value) {
    use std::io::Write as _;
    let mut child = node
        .command(binary("warren-cni").unwrap())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "0123456789abcdef")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.0, pod.1
            ),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let printed = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.success(), printed)
}

#[test]
fn without_kubernetes_the_config_file_decides_and_its_namespace_must_be_the_sandbox() {
    let lab = warren_tests::harness::test_lab(1, 2);
    let node = lab.node(0);
    let listed = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
    let other = lab.pod(0, 1);
    let dir = warren_tests::lab::files_dir(lab.prefix());
    let socket = dir.join("cni-run/cni.sock");
    let config = agent_config(node, std::slice::from_ref(&listed))
        + &format!("cni:\n  socket: {}\n", socket.display());
    let mut agent = Agent::start(node, &config, &dir).unwrap();
    let name = listed.pod.name.as_str();
    let conf = |ip: std::net::Ipv4Addr, netns: &Path| {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "lab", "type": "warren-cni",
            "socket": socket,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": netns}],
                "ips": [{"interface": 0, "address": format!("{ip}/32")}],
            },
        })
    };

    // The listed pod, in the namespace the config gives: held, and the
    // previous result passed on.
    let own = listed.pod.netns_path();
    let (ok, printed) = plugin(
        node,
        "ADD",
        &own,
        ("default", name),
        &conf(listed.pod.ip, &own),
    );
    assert!(ok, "{printed}");
    assert_eq!(
        printed["ips"][0]["address"],
        format!("{}/32", listed.pod.ip)
    );
    agent
        .wait_for(PATIENCE, cni_added(&listed.qualified_name()))
        .unwrap();
    // The same name in another namespace: not what the config enrolled.
    let elsewhere = other.netns_path();
    let (ok, printed) = plugin(
        node,
        "ADD",
        &elsewhere,
        ("default", name),
        &conf(listed.pod.ip, &elsewhere),
    );
    assert!(!ok, "{printed}");
    assert_eq!(printed["code"], 100);
    assert!(
        printed["msg"]
            .as_str()
            .unwrap()
            .contains("in another network namespace"),
        "{printed}"
    );
    // The config's namespace made again at its path, as a runtime re-making
    // the sandbox would: the ADD waits while the agent enrolls the pod where
    // it is now, and is then answered.
    let ip_in = |args: &str| {
        let status = std::process::Command::new("ip")
            .args(args.split(' '))
            .status()
            .unwrap();
        assert!(status.success(), "ip {args}");
    };
    let netns = &listed.pod.netns;
    ip_in(&format!("netns del {netns}"));
    ip_in(&format!("netns add {netns}"));
    ip_in(&format!("-n {netns} link set lo up"));
    ip_in(&format!(
        "-n {netns} link add eth0 type veth peer name peer0"
    ));
    ip_in(&format!(
        "-n {netns} addr add {}/32 dev eth0",
        listed.pod.ip
    ));
    ip_in(&format!("-n {netns} link set eth0 up"));
    let (ok, printed) = plugin(
        node,
        "ADD",
        &own,
        ("default", name),
        &conf(listed.pod.ip, &own),
    );
    assert!(ok, "{printed}");
    agent
        .wait_for_count(PATIENCE, 2, enrolled(&listed.qualified_name()))
        .unwrap();
    // A pod the config does not list is outside the mesh.
    let (ok, printed) = plugin(
        node,
        "ADD",
        &elsewhere,
        ("default", "other"),
        &conf(other.ip, &elsewhere),
    );
    assert!(ok, "{printed}");
    let (ok, _) = plugin(
        node,
        "CHECK",
        &own,
        ("default", name),
        &conf(listed.pod.ip, &own),
    );
    assert!(ok);

    // DEL succeeds even with a configuration the plugin cannot read;
    // STATUS says such a configuration cannot serve.
    let garbage = serde_json::json!({"cniVersion": "9.9.9", "socket": socket});
    let (ok, _) = plugin(node, "DEL", &own, ("default", name), &garbage);
    assert!(ok);
    let (ok, printed) = plugin(node, "STATUS", &own, ("default", name), &garbage);
    assert!(!ok);
    assert_eq!(printed["code"], 50);
    assert!(
        printed["msg"].as_str().unwrap().contains("9.9.9"),
        "{printed}"
    );
}
