//! The same-node fast path, end to end: two enrolled pods of one node that
//! policy lets talk connect straight to each other through the node's
//! kernel, with the real programs, real agents and real applications.
//!
//! Node 1: n1p1 is default/sleep (the client), n1p2 is shop/web (the
//! server, STRICT), n1p3 is ops/admin (another client). Node 2 has n2p1,
//! shop/remote, to compare with the HBONE path.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use warren_tests::{
    Lab, Pod,
    harness::{
        Agent, Call, Called, LogLine, MeshWorkload, PATIENCE, Server, WireCapture, binary,
        contains, finish, replace_policies, start_agents_with, test_lab,
    },
    lab::files_dir,
    telemetry::{self, Metrics},
};

const PORT: u16 = 8080;
const METRICS_PORT: u16 = 15020;
/// What labpod's server sends first: its name and a newline.
const GREETING: u64 = "n1p2\n".len() as u64;

struct Mesh {
    lab: Lab,
    sleep: MeshWorkload,
    web: MeshWorkload,
    admin: MeshWorkload,
    agents: Vec<Agent>,
    policies: PathBuf,
}

/// The server is STRICT: nothing in plaintext reaches it but what the fast
/// path admits.
const STRICT_WEB: &str = "---\napiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n\
metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";

fn deny_sleep() -> String {
    format!(
        "{STRICT_WEB}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: no-sleep, namespace: shop}}\n\
         spec: {{action: DENY, rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/sleep]}}}}]}}]}}\n"
    )
}

impl Mesh {
    fn new() -> Self {
        Self::with_config("")
    }

    /// With `extra` appended to each agent's config (which serves metrics).
    fn with_config(extra: &str) -> Self {
        let extra = format!("metricsListen: 0.0.0.0:{METRICS_PORT}\n{extra}");
        let lab = test_lab(2, 3);
        let sleep = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
        let web = MeshWorkload::new(lab.pod(0, 1), "shop", "web");
        let admin = MeshWorkload::new(lab.pod(0, 2), "ops", "admin");
        let remote = MeshWorkload::new(lab.pod(1, 0), "shop", "remote");
        let dir = files_dir(lab.prefix());
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).unwrap();
        fs::write(policies.join("policies.yaml"), STRICT_WEB).unwrap();
        let workloads = [sleep.clone(), web.clone(), admin.clone(), remote];
        let agents = start_agents_with(&lab, &workloads, &policies, &dir.join("agents"), &extra);
        Self {
            lab,
            sleep,
            web,
            admin,
            agents,
            policies,
        }
    }

    fn agent(&mut self) -> &mut Agent {
        &mut self.agents[0]
    }

    /// Where node 1's agent pins its maps.
    fn pins(&self) -> PathBuf {
        warren_tests::lab::pin_dir(self.lab.prefix()).join(&self.lab.node(0).name)
    }

    /// The kernel counts each pod's fast-path connections, and the node's,
    /// as it records them (to be called when none is opening or closing),
    /// and the agent never had to set a count to the records (it checks
    /// every 10 s, and would hide a count gone wrong since).
    fn assert_counted_as_recorded(&mut self) {
        let (open, records) = warren_agent::redirect::read_fast_open(&self.pins()).unwrap();
        for (cookie, counted) in &open.by_pod {
            let recorded = records.get(cookie).copied().unwrap_or(0);
            assert_eq!(*counted, recorded, "pod {cookie}: {open:?} {records:?}");
        }
        assert_eq!(open.node, records.values().sum::<i64>(), "{open:?}");
        let drifted: Vec<String> = self
            .agents
            .iter_mut()
            .flat_map(|agent| agent.lines())
            .filter(|l| {
                l.message()
                    .contains("had drifted from the kernel's records")
            })
            .map(|l| format!("{l:?}"))
            .collect();
        assert!(drifted.is_empty(), "{drifted:?}");
    }

    /// Connects `client` to `server` (through the agent) until the agent
    /// grants the pair the fast path.
    fn grant(&mut self, client: &Pod, server: std::net::SocketAddrV4) {
        drop(Held::start(client, server, 8));
        self.agent()
            .wait_for(PATIENCE, |l| {
                l.message() == "fast path granted" && l.field("dst") == server.to_string()
            })
            .unwrap_or_else(|e| panic!("no grant for {server}: {e:#}"));
    }

    /// Node 1's agent's metrics.
    fn metrics(&self) -> Metrics {
        let node = self.lab.node(0);
        let addr = SocketAddr::from((node.ip, METRICS_PORT));
        telemetry::scrape(&node.netns_path(), addr, "/metrics").unwrap()
    }

    /// Waits until `metric` with `labels` is `want` on node 1.
    fn wait_for_metric(&self, metric: &str, labels: &[(&str, &str)], want: f64) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let have = self.metrics().value(metric, labels).unwrap();
            if have == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{metric}{labels:?}: {have}, not {want}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn set_policies(&mut self, yaml: &str) {
        replace_policies(&mut self.agents, &self.policies, yaml);
    }

    /// Calls `server` from `client` until a call goes straight (the client's
    /// socket is bound to its own address, not to the agent's listener on
    /// loopback), and returns it; the first goes through the agent, which
    /// grants the pair.
    fn call_until_direct(&self, client: &Pod, server: &mut Server, call: &Call) -> Called {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let called = call.run(client, server.addr).expect("call gets through");
            server.next_served().expect("served");
            if !called.local.ip().is_loopback() {
                return called;
            }
            assert!(
                Instant::now() < deadline,
                "no call went straight; agent log:\n{}",
                self.agents[0].log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "agent configs and logs kept in {}",
                files_dir(self.lab.prefix()).display()
            );
        }
    }
}

/// The access lines for the connection from `client` (its address and
/// port), both ends', once both are written.
fn access_lines(agent: &mut Agent, client: SocketAddr) -> Vec<LogLine> {
    agent
        .wait_for_count(PATIENCE, 2, |l| {
            l.field("target") == "access" && l.field("src.addr") == client.to_string()
        })
        .expect("both ends' access lines")
}

#[test]
fn same_node_pods_connect_straight_with_the_bytes_both_ways_and_their_accounting() {
    let mut mesh = Mesh::new();
    let (sleep, web) = (mesh.sleep.clone(), mesh.web.clone());
    let mut server = Server::start(&web.pod, PORT).unwrap();
    let wire = WireCapture::start(&mesh.lab).unwrap();
    let call = Call {
        bytes: Some(256 * 1024),
        ..Call::default()
    };

    let called = mesh.call_until_direct(&sleep.pod, &mut server, &call);
    // Istio's metrics count the next connection as they count a tunnel's,
    // from both ends, with both principals.
    let principals = [
        ("source_principal", sleep.identity()),
        ("destination_principal", web.identity()),
        ("connection_security_policy", "mutual_tls".to_owned()),
    ];
    let labels = |reporter: &'static str| -> Vec<(&str, &str)> {
        std::iter::once(("reporter", reporter))
            .chain(principals.iter().map(|(k, v)| (*k, v.as_str())))
            .collect()
    };
    access_lines(mesh.agent(), called.local);
    let before = mesh.metrics();
    let counted = |metrics: &Metrics, metric: &str, reporter| {
        metrics.value(metric, &labels(reporter)).unwrap()
    };
    // Straight: the server's peer is the client's own socket (its address
    // and port), with every byte echoed after the client's half-close.
    let served = {
        let called = call.run(&sleep.pod, server.addr).unwrap();
        assert_eq!(called.local.ip(), IpAddr::V4(sleep.pod.ip));
        let served = server.next_served().unwrap();
        assert_eq!(served.peer, called.local, "not the client's own socket");
        assert_eq!((called.sent, called.received), (262_144, 262_144));
        served
    };
    assert_eq!(served.bytes, 262_144);

    // Accounted as an HBONE connection is: both ends, the identities, the
    // bytes as the applications counted them (the greeting, then the echo).
    let lines = access_lines(mesh.agent(), called.local);
    for direction in ["outbound", "inbound"] {
        let line = lines
            .iter()
            .find(|l| l.field("direction") == direction)
            .unwrap_or_else(|| panic!("no {direction} access line: {lines:?}"));
        assert_eq!(line.message(), "connection complete", "{line:?}");
        assert_eq!(line.field("path"), "fast_path");
        assert_eq!(line.field("src.identity"), sleep.identity());
        assert_eq!(line.field("dst.identity"), web.identity());
        assert_eq!(line.field("dst.addr"), server.addr.to_string());
        assert_eq!(line.0["request_bytes"], 262_144, "{line:?}");
        assert_eq!(line.0["response_bytes"], 262_144 + GREETING, "{line:?}");
        assert_eq!(line.field("policy"), "no policy");
    }
    for reporter in ["source", "destination"] {
        for (metric, more) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_received_bytes_total", 262_144.0),
            ("istio_tcp_sent_bytes_total", 262_144.0 + GREETING as f64),
        ] {
            let want = counted(&before, metric, reporter) + more;
            mesh.wait_for_metric(metric, &labels(reporter), want);
        }
    }
    assert!(
        mesh.metrics()
            .value("warren_fast_path_grants", &[])
            .unwrap()
            >= 1.0
    );

    // Never on the wire between nodes, and the agent said which pair it let
    // through.
    let pcap = wire.finish().unwrap();
    assert!(!contains(&pcap, b"warren-labpod-"), "payload on the wire");
    mesh.agent()
        .wait_for(PATIENCE, |l| {
            l.message() == "fast path granted" && l.field("dst") == server.addr.to_string()
        })
        .unwrap();

    // A pod of another node is still reached through HBONE.
    let remote = mesh.lab.pod(1, 0).clone();
    let mut far = Server::start(&remote, PORT).unwrap();
    for _ in 0..3 {
        let called = Call::default().run(&sleep.pod, far.addr).unwrap();
        assert!(called.local.ip().is_loopback(), "{called:?}");
        far.next_served().unwrap();
    }
}

#[test]
fn policy_decides_who_takes_the_fast_path_and_a_change_cuts_what_it_now_refuses() {
    let mut mesh = Mesh::new();
    let (sleep, web, admin) = (mesh.sleep.clone(), mesh.web.clone(), mesh.admin.clone());
    let mut server = Server::start(&web.pod, PORT).unwrap();

    // sleep is denied: each of its calls goes to the agent, which refuses
    // it; none ever reaches the application.
    mesh.set_policies(&deny_sleep());
    for _ in 0..5 {
        let denied = Call::quick().run(&sleep.pod, server.addr);
        assert!(denied.is_err(), "sleep got through: {denied:?}");
    }
    assert!(server.saw_nothing());
    let refusals = mesh
        .agent()
        .wait_for_count(PATIENCE, 5, |l| {
            l.message() == "HBONE stream refused"
                && l.field("reason").contains("DENY shop/no-sleep")
        })
        .unwrap();
    assert!(refusals.len() >= 5);
    // admin is not: it goes straight.
    mesh.call_until_direct(&admin.pod, &mut server, &Call::default());

    // Both allowed; sleep holds a connection open on the fast path.
    mesh.set_policies(STRICT_WEB);
    mesh.call_until_direct(&sleep.pod, &mut server, &Call::default());
    let held = Call {
        hold_ms: Some(6_000),
        ..Call::default()
    }
    .spawn(&sleep.pod, server.addr)
    .unwrap();
    let open = wait_for_connection(&sleep.pod, server.addr, true).unwrap();
    assert_eq!(
        open.ip(),
        IpAddr::V4(sleep.pod.ip),
        "the held call is not straight"
    );

    // The policy changes: the open connection is cut at once (not at its
    // end), in both pods, with a line naming the policy.
    mesh.set_policies(&deny_sleep());
    let cut = mesh
        .agent()
        .wait_for(PATIENCE, |l| {
            l.message().starts_with("fast-path connection cut")
                && l.field("src") == open.to_string()
        })
        .unwrap();
    assert!(
        cut.field("reason").contains("DENY shop/no-sleep"),
        "{cut:?}"
    );
    mesh.wait_for_metric("warren_fast_path_cuts_total", &[("reason", "policy")], 1.0);
    for pod in [&sleep.pod, &web.pod] {
        let deadline = Instant::now() + Duration::from_secs(2);
        while wait_for_connection(pod, server.addr, false).is_some() {
            assert!(
                Instant::now() < deadline,
                "{} still has the connection",
                pod.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    // The client learns it when it next uses the socket.
    let failed = finish(held);
    assert!(failed.is_err(), "the held call completed: {failed:?}");
    let lines = access_lines(mesh.agent(), open);
    for line in &lines {
        assert_eq!(line.message(), "connection failed", "{line:?}");
        assert_eq!(line.field("response_flags"), "DENY", "{line:?}");
        assert!(
            line.field("error").contains("DENY shop/no-sleep"),
            "{line:?}"
        );
    }
    // And sleep's next calls are refused by the agent again; admin's still
    // go straight.
    assert!(Call::quick().run(&sleep.pod, server.addr).is_err());
    let called = Call::default().run(&admin.pod, server.addr).unwrap();
    assert_eq!(called.local.ip(), IpAddr::V4(admin.pod.ip));
    // The cut connection's record, removed by the agent, no longer counts.
    mesh.assert_counted_as_recorded();
}

#[test]
fn the_fast_path_fails_closed() {
    let mut mesh = Mesh::new();
    let (sleep, web) = (mesh.sleep.clone(), mesh.web.clone());
    let mut server = Server::start(&web.pod, PORT).unwrap();
    mesh.call_until_direct(&sleep.pod, &mut server, &Call::default());

    // A process in the client's network namespace but not in its cgroup
    // (not the pod's own) cannot use the pod's grant: its SYN is not
    // recorded, and the STRICT server's ingress drops it.
    let outsider = Command::new("nsenter")
        .arg(format!("--net={}", sleep.pod.netns_path().display()))
        .arg(binary("labpod").unwrap())
        .args([
            "call",
            &server.addr.to_string(),
            "--connect-timeout-ms",
            "1500",
        ])
        .output()
        .unwrap();
    assert!(!outsider.status.success(), "{outsider:?}");
    assert!(server.saw_nothing());

    // The agent stops: the grants go with it. The pod's connections go to
    // the agent's listener, where nobody is: refused, not let through.
    mesh.agent().stop().unwrap();
    let refused = Call::quick().run(&sleep.pod, server.addr);
    let error = format!("{:#}", refused.expect_err("got through with no agent"));
    assert!(error.contains("refused"), "{error}");
    assert!(server.saw_nothing());
}

#[test]
fn with_the_switch_off_same_node_connections_stay_on_hbone() {
    let mesh = Mesh::with_config("fastPath: false\n");
    let (sleep, web) = (mesh.sleep.clone(), mesh.web.clone());
    let mut server = Server::start(&web.pod, PORT).unwrap();
    for _ in 0..5 {
        let called = Call::default().run(&sleep.pod, server.addr).unwrap();
        assert!(called.local.ip().is_loopback(), "{called:?}");
        server.next_served().unwrap();
    }
    assert!(
        mesh.agents[0]
            .lines()
            .iter()
            .any(|l| l.message() == "same-node fast path off"),
        "{}",
        mesh.agents[0].log_text()
    );
}

/// The local address of `pod`'s connection to `server` (its client's
/// address, in the client's pod; the server's own, in the server's), once
/// there is one (`wait`), or now.
fn wait_for_connection(
    pod: &Pod,
    server: std::net::SocketAddrV4,
    wait: bool,
) -> Option<SocketAddr> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        // Both ends' view: to the server's address, or from its port.
        let output = pod
            .command("ss")
            .args(["-Htn", "state", "established"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let found = text.lines().find_map(|l| {
            let mut fields = l.split_whitespace().skip(2);
            let local: SocketAddr = fields.next()?.parse().ok()?;
            let peer: SocketAddr = fields.next()?.parse().ok()?;
            (peer == SocketAddr::V4(server) || local == SocketAddr::V4(server)).then_some(local)
        });
        if found.is_some() || !wait {
            return found;
        }
        assert!(Instant::now() < deadline, "no connection to {server}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_agent_keeps_what_policy_allows_and_cuts_what_it_refuses() {
    let mut mesh = Mesh::new();
    let (sleep, web, admin) = (mesh.sleep.clone(), mesh.web.clone(), mesh.admin.clone());
    let mut server = Server::start(&web.pod, PORT).unwrap();
    let hold = Call {
        hold_ms: Some(10_000),
        ..Call::default()
    };
    let mut held = Vec::new();
    for client in [&sleep.pod, &admin.pod] {
        mesh.call_until_direct(client, &mut server, &Call::default());
        let call = hold.spawn(client, server.addr).unwrap();
        let local = wait_for_connection(client, server.addr, true).unwrap();
        assert_eq!(local.ip(), IpAddr::V4(client.ip), "not straight");
        held.push((call, local));
    }

    // The agent dies (no clean stop): once its lease runs out (3 s), its
    // grants are void, and the pods' new connections fail closed.
    let node = mesh.lab.node(0).clone();
    let config = fs::read_to_string(mesh.agent().config_path()).unwrap();
    let pid = mesh.agent().pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    thread::sleep(Duration::from_millis(3_500));
    assert!(Call::quick().run(&sleep.pod, server.addr).is_err());
    assert!(server.saw_nothing());

    // While it is down, sleep is denied. The next agent finds both open
    // connections in the kernel's records: it cuts sleep's, naming the
    // policy, and leaves admin's alone.
    let tmp = mesh.policies.join(".policies.yaml.new");
    fs::write(&tmp, deny_sleep()).unwrap();
    fs::rename(&tmp, mesh.policies.join("policies.yaml")).unwrap();
    let dir = files_dir(mesh.lab.prefix()).join("agents");
    mesh.agents[0] = Agent::start(&node, &config, &dir).unwrap();
    let (sleep_call, sleep_local) = held.remove(0);
    let (admin_call, admin_local) = held.remove(0);
    let cut = mesh
        .agent()
        .wait_for(PATIENCE, |l| {
            l.message().starts_with("fast-path connection cut")
                && l.field("src") == sleep_local.to_string()
        })
        .unwrap();
    assert!(
        cut.field("reason").contains("DENY shop/no-sleep"),
        "{cut:?}"
    );
    assert!(finish(sleep_call).is_err(), "sleep's connection lived on");
    let admin_called = finish(admin_call).expect("admin's connection lived on");
    assert_eq!(admin_called.local, admin_local);
    assert!(
        !mesh
            .agent()
            .lines()
            .iter()
            .any(|l| l.message().starts_with("fast-path connection cut")
                && l.field("src") == admin_local.to_string()),
        "admin's connection was cut"
    );
    // Its close is accounted for by the new agent.
    let lines = access_lines(mesh.agent(), admin_local);
    assert!(
        lines.iter().all(|l| l.message() == "connection complete"),
        "{lines:?}"
    );

    // From now on: sleep through the agent (refused), admin straight.
    assert!(Call::quick().run(&sleep.pod, server.addr).is_err());
    mesh.call_until_direct(&admin.pod, &mut server, &Call::default());
    // The counts outlived the first agent with the records.
    mesh.assert_counted_as_recorded();
}

/// `labpod <command>` from `pod` with `count` connections to `server`,
/// and the first line it says (once they are made).
fn labpod_connections(
    command: &str,
    pod: &Pod,
    server: std::net::SocketAddrV4,
    count: usize,
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = pod
        .command(binary("labpod").unwrap())
        .args([
            command,
            "--addr",
            &server.to_string(),
            "--count",
            &count.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufReader::new(stdout)
        .lines()
        .next()
        .unwrap_or_else(|| panic!("labpod {command} says when its connections are made"))
        .unwrap();
    (child, line)
}

/// `labpod hold`: `count` connections from `pod` to `server`, open until
/// dropped.
struct Held(std::process::Child);

impl Held {
    fn start(pod: &Pod, server: std::net::SocketAddrV4, count: usize) -> Self {
        let (child, held) = labpod_connections("hold", pod, server, count);
        assert!(held.contains("\"held\""), "{held}");
        Self(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take()); // its end: let go
        let _ = self.0.wait();
    }
}

/// The mesh, with web serving on [`PORT`] and keeping connections (`labpod
/// keep`) on another port, whose address comes last.
fn with_a_keeper() -> (Mesh, Server, KeepServer, std::net::SocketAddrV4) {
    const KEEP_PORT: u16 = 7100;
    let mesh = Mesh::new();
    let web = mesh.web.pod.clone();
    let server = Server::start(&web, PORT).unwrap();
    let keeper = KeepServer::start(&web, KEEP_PORT);
    (
        mesh,
        server,
        keeper,
        std::net::SocketAddrV4::new(web.ip, KEEP_PORT),
    )
}

#[test]
fn a_pod_with_too_many_fast_path_connections_open_loses_the_fast_path_alone() {
    let (mut mesh, mut server, _keeper, keep) = with_a_keeper();
    let (sleep, admin) = (mesh.sleep.clone(), mesh.admin.clone());
    mesh.call_until_direct(&sleep.pod, &mut server, &Call::default());
    mesh.call_until_direct(&admin.pod, &mut server, &Call::default());
    // The pair (sleep, keep's port) granted first, then more connections
    // open at once than a pod may have on the fast path (8192).
    mesh.grant(&sleep.pod, keep);
    // All at once, faster than the agent reads the kernel's events: the
    // kernel's count stops them at the limit, not the agent's.
    let held = Held::start(&sleep.pod, keep, 8_500);
    let limit = warren_agent::redirect::FAST_OPEN_PER_POD;
    let (open, records) = warren_agent::redirect::read_fast_open(&mesh.pins()).unwrap();
    let (&cookie, &recorded) = records.iter().max_by_key(|(_, n)| **n).unwrap();
    // connect()s racing on the other CPU between connect4's check and their
    // record may pass a few over; the agent's own count once let thousands.
    assert!(
        (limit..limit + 16).contains(&recorded),
        "sleep has {recorded} fast-path connections recorded, its limit is {limit}"
    );
    assert_eq!(open.by_pod.get(&cookie), Some(&recorded), "{open:?}");
    let over = mesh
        .agent()
        .wait_for(PATIENCE, |l| {
            l.message()
                .starts_with("fast path: the pod has as many connections open as it may")
        })
        .unwrap();
    assert_eq!(over.field("workload"), sleep.qualified_name());
    // sleep's next connection takes the agent's path at once; admin's still
    // goes straight.
    let called = Call::default().run(&sleep.pod, server.addr).unwrap();
    server.next_served().unwrap();
    assert!(called.local.ip().is_loopback(), "sleep kept the fast path");
    let called = Call::default().run(&admin.pod, server.addr).unwrap();
    server.next_served().unwrap();
    assert_eq!(
        called.local.ip(),
        IpAddr::V4(admin.pod.ip),
        "admin lost the fast path"
    );

    // Let go of them: sleep gets the fast path back, and the count is what
    // is recorded.
    drop(held);
    mesh.agent()
        .wait_for(PATIENCE, |l| {
            l.message() == "fast path: the pod's open connections back under its limit"
        })
        .unwrap();
    mesh.call_until_direct(&sleep.pod, &mut server, &Call::default());
    mesh.assert_counted_as_recorded();
}

#[test]
fn connects_whose_syn_waits_for_the_first_write_still_meet_the_pods_share() {
    use warren_agent::redirect::{DropReason, FAST_OPEN_PER_POD, FAST_OPEN_SLACK, read_drops};
    let (mut mesh, mut server, _keeper, keep) = with_a_keeper();
    let (sleep, admin) = (mesh.sleep.clone(), mesh.admin.clone());
    mesh.call_until_direct(&admin.pod, &mut server, &Call::default());
    mesh.grant(&sleep.pod, keep);
    let full = || {
        read_drops(&mesh.pins())
            .unwrap()
            .get(DropReason::FastPathFull)
    };
    let before = full();
    // TCP_FASTOPEN_CONNECT: every connect() passes connect4 with none
    // recorded yet, and the SYNs leave with the writes, all after.
    let count = 10_000;
    let deferred = Deferred::start(&sleep.pod, keep, count);
    assert_eq!(deferred.written, count);
    let cap = FAST_OPEN_PER_POD + FAST_OPEN_SLACK;
    let (_, records) = warren_agent::redirect::read_fast_open(&mesh.pins()).unwrap();
    let recorded = records.values().copied().max().unwrap();
    assert_eq!(recorded, cap, "sleep's records");
    assert_eq!(full() - before, count as u64 - cap as u64, "not recorded");
    // Its neighbour keeps the fast path.
    let called = Call::default().run(&admin.pod, server.addr).unwrap();
    server.next_served().unwrap();
    assert_eq!(called.local.ip(), IpAddr::V4(admin.pod.ip));
}

/// `labpod deferred`: connections whose SYN leaves with their first write,
/// all connected before any is written to; open until dropped.
struct Deferred {
    child: std::process::Child,
    written: usize,
}

impl Deferred {
    fn start(pod: &Pod, server: std::net::SocketAddrV4, count: usize) -> Self {
        let (child, line) = labpod_connections("deferred", pod, server, count);
        let said: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(said["event"], "written", "{line}");
        let written = said["connections"].as_u64().unwrap() as usize;
        Self { child, written }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// `labpod keep`: accepts and keeps connections until their clients close.
struct KeepServer(std::process::Child);

impl KeepServer {
    fn start(pod: &Pod, port: u16) -> Self {
        use std::io::BufRead;
        let mut child = pod
            .command(binary("labpod").unwrap())
            .args(["keep", "--port", &port.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let listening = std::io::BufReader::new(stdout).lines().next();
        assert!(
            listening.is_some_and(|l| l.is_ok_and(|l| l.contains("listening"))),
            "labpod keep did not start"
        );
        Self(child)
    }
}

impl Drop for KeepServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
