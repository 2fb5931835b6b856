//! End-to-end: attacks on the lab, each as an attacker tried it (scaled
//! down), and what the agent now does instead.
//!
//! - A pod spraying connections at a destination whose tunnel cannot be
//!   opened: they all fail with the one attempt they waited for, and those
//!   whose client left are let go at once (they once waited in turn, each
//!   for a 10 s attempt of its own, holding the agent's descriptors).
//! - A pod, or a peer identity, over its limit: refused at once, with a
//!   line naming the limit, while its neighbours keep working.
//! - A forged packet for a connection the agent delivered inside a pod: it
//!   never reaches the application.
//!
//! Needs root (run through `cargo xtask test`).

use std::{
    net::{SocketAddr, SocketAddrV4},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use warren_agent::redirect::{DropReason, read_drops};
use warren_tests::{
    Lab, Pod,
    harness::{
        Agent, Call, MeshWorkload, PATIENCE, Server, Tool, agent_config, binary, closed, ended,
        spray, spray_with, test_lab,
    },
    lab::{files_dir, pin_dir},
};

const PORT: u16 = 8080;

/// Sockets of the agent's outbound listener in `pod` whose client has closed
/// and that the agent has not closed yet.
fn close_wait(pod: &Pod) -> usize {
    let output = pod
        .command("ss")
        .args(["-Htn", "state", "close-wait", "( sport = :15001 )"])
        .output()
        .unwrap();
    assert!(output.status.success(), "ss in {}", pod.name);
    String::from_utf8_lossy(&output.stdout).lines().count()
}

/// Two nodes: n1p1 (default/sleep) and n1p2 (ops/other) are clients,
/// n2p1 (shop/web) serves. n2p2 runs outside the mesh; `ghost` names it as a
/// mesh workload of a node with no agent, so that the agents tunnel to its
/// port 15008, where nothing but an attacker's tool answers.
struct Mesh {
    lab: Lab,
    agents: Vec<Agent>,
    client: Pod,
    neighbour: Pod,
    server: Pod,
    ghost: Pod,
}

impl Mesh {
    /// `extra`: added to each node's agent config, in node order.
    fn new(extra: [&str; 2]) -> Self {
        let lab = test_lab(2, 2);
        let client = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
        // Another namespace: the limits count peers by namespace.
        let neighbour = MeshWorkload::new(lab.pod(0, 1), "ops", "other");
        let server = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
        let mut ghost = MeshWorkload::new(lab.pod(1, 1), "shop", "ghost");
        ghost.pod.node = "node-9".into();
        let mesh = [client.clone(), neighbour.clone(), server.clone(), ghost];
        let dir = files_dir(lab.prefix());
        let agents = lab
            .nodes()
            .iter()
            .zip(extra)
            .map(|(node, extra)| {
                Agent::start(node, &(agent_config(node, &mesh) + extra), &dir).unwrap()
            })
            .collect();
        Self {
            agents,
            client: client.pod,
            neighbour: neighbour.pod,
            server: server.pod,
            ghost: lab.pod(1, 1).clone(),
            lab,
        }
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddrV4::new(self.server.ip, PORT).into()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if thread::panicking() {
            for agent in &self.agents {
                for line in agent.complaints().iter().take(40) {
                    eprintln!("{}: {}", agent.node, line.0);
                }
            }
        }
    }
}

#[test]
fn connections_waiting_for_a_stalled_tunnel_fail_with_it_or_go_with_their_client() {
    let mesh = Mesh::new(["", ""]);
    // The ghost's "agent": takes the TCP connection and never answers the
    // TLS handshake, so each attempt lasts the tunnel's 10 s timeout.
    let mute = Tool::start(&mesh.ghost, &["mute", "--port", "15008"]);
    mute.next("listening", PATIENCE);
    let ghost_app: SocketAddr = SocketAddrV4::new(mesh.ghost.ip, PORT).into();

    // One connection starts an attempt and stays...
    let first = spray(&mesh.client, ghost_app, 1, 30_000, 0);
    mute.next("accepted", PATIENCE);
    // ...and 300 more wait for it, then leave after a second, having sent
    // nothing (as the attacker's did; one that sent its request and closed
    // its side may be waiting for the answer: it waits for the attempt).
    let leaving = spray_with(&mesh.client, ghost_app, 300, 1_000, 1_000, &["--silent"]);
    let report = leaving.next("sprayed", PATIENCE);
    assert_eq!(ended(&report, "waiting"), 300, "{report}");
    // The agent lets every one of them go while the attempt they waited
    // for is still under way: it noticed they left.
    let deadline = Instant::now() + PATIENCE;
    while close_wait(&mesh.client) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} connections whose client left are still held",
            close_wait(&mesh.client)
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !mute.so_far().iter().any(|e| e["event"] == "closed"),
        "the attempt ended before the leavers were let go: this shows nothing"
    );

    // The attempt fails; so does the connection that started it.
    let report = first.next("sprayed", Duration::from_secs(30));
    assert_eq!(closed(&report), 1, "{report}");

    // A burst of 300 that stay: one attempt for all of them, and all of them
    // fail with it (they once tried in turn, 10 s each: 50 minutes).
    let accepted_before = mute
        .so_far()
        .iter()
        .filter(|e| e["event"] == "accepted")
        .count();
    let staying = spray(&mesh.client, ghost_app, 300, 30_000, 0);
    let report = staying.next("sprayed", Duration::from_secs(40));
    assert_eq!(closed(&report), 300, "{report}");
    let attempts = accepted_before
        + mute
            .so_far()
            .iter()
            .filter(|e| e["event"] == "accepted")
            .count();
    assert!(attempts <= 3, "{attempts} tunnel attempts for one burst");
    let shared = mesh.agents[0]
        .lines()
        .into_iter()
        .filter(|l| {
            l.message() == "outbound connection failed"
                && l.field("error").contains("the tunnel connection to")
                && l.field("error")
                    .contains("timed out opening the tunnel connection")
        })
        .count();
    assert!(
        shared >= 250,
        "{shared} failed with the attempt they waited for"
    );

    // The agent serves everyone else meanwhile and after.
    let _server = Server::start(&mesh.server, PORT).unwrap();
    Call::default()
        .run(&mesh.neighbour, mesh.server_addr())
        .unwrap();
    Call::default()
        .run(&mesh.client, mesh.server_addr())
        .unwrap();
}

#[test]
fn a_pod_over_its_limit_is_refused_and_its_neighbours_are_not() {
    // The limit on node 1 only: the server's pod, on node 2, takes all.
    let mut mesh = Mesh::new(["limits:\n  connectionsPerPod: 100\n", ""]);
    // 200 at once, held 4 s: the first 100 are carried, the rest reset.
    let (sprayed, other, _servers) = spray_over_a_limit(&mut mesh, 4_000, "pod", "limit of 100");
    // While the pod is at its limit, its neighbour is served.
    Call::default().run(&mesh.neighbour, other).unwrap();

    let report = sprayed.next("sprayed", Duration::from_secs(20));
    // 100 descriptors, the tunnel carrying them one (a connection accepted
    // just before the tunnel asked for its own fails with it).
    let echoed = ended(&report, "echoed");
    assert!((95..=99).contains(&echoed), "{report}");
    // The rest refused: reset as soon as accepted (the client may learn it
    // before its connect() returns).
    assert_eq!(
        closed(&report) + ended(&report, "not_connected"),
        200 - echoed,
        "{report}"
    );
    // Its share comes back when its connections end.
    Call::default().run(&mesh.client, other).unwrap();
    assert_refusals_throttled(&mesh.agents[0]);
}

/// Has the client pod spray 200 connections at the server's `keep`, held
/// `hold_ms`, and waits for the agent's refusal line, which must name
/// `limit` and say `reason`. Returns the spray, the address of another
/// server on the server's pod, and the servers (they stop when dropped).
fn spray_over_a_limit(
    mesh: &mut Mesh,
    hold_ms: u64,
    limit: &str,
    reason: &str,
) -> (Tool, SocketAddr, (Tool, Server)) {
    let keep = Tool::start(&mesh.server, &["keep", "--port", &PORT.to_string()]);
    keep.next("listening", PATIENCE);
    let server = Server::start(&mesh.server, PORT + 1).unwrap();
    let sprayed = spray(&mesh.client, mesh.server_addr(), 200, 5_000, hold_ms);
    let refused = mesh.agents[0]
        .wait_for(PATIENCE, |l| {
            l.message() == "outbound connection refused: over the limit"
        })
        .unwrap();
    assert_eq!(refused.field("limit"), limit, "{:?}", refused.0);
    assert!(refused.field("reason").contains(reason), "{:?}", refused.0);
    let other = SocketAddrV4::new(mesh.server.ip, PORT + 1).into();
    (sprayed, other, (keep, server))
}

/// Refusals over a limit are logged a line now and then, whichever way the
/// connection met the limit (its own socket, or the tunnel it waited for),
/// never a warning each: a pod over its limit tries by the thousand.
fn assert_refusals_throttled(agent: &Agent) {
    let each: Vec<_> = agent
        .lines()
        .into_iter()
        .filter(|l| {
            l.message() == "outbound connection failed" && l.field("error").contains("limit")
        })
        .collect();
    assert!(
        each.is_empty(),
        "{} lines, the first: {:?}",
        each.len(),
        each[0].0
    );
}

#[test]
fn a_pod_that_fills_the_node_leaves_its_neighbours_their_reserve() {
    // Node 1's pods may each hold all the node's budget (their own limit is
    // above it) but the 20 each way the other keeps for itself: two pods,
    // 80 reserved of 200.
    let mut mesh = Mesh::new([
        "limits:\n  connectionsPerPod: 1000\n  connectionsPerNode: 200\n  reservedPerPod: 20\n",
        "",
    ]);
    // Held 10 s: the node stays full while the neighbour calls.
    let (sprayed, other, _servers) = spray_over_a_limit(&mut mesh, 10_000, "node", "limit of 200");
    // The node is full, but not of the neighbour's reserve.
    Call::default().run(&mesh.neighbour, other).unwrap();

    assert!(
        sprayed.so_far().iter().all(|e| e["event"] != "sprayed"),
        "the spray let go before the neighbour's call: it proved nothing"
    );
    let report = sprayed.next("sprayed", Duration::from_secs(30));
    // Its reserve and the 120 not reserved: 140 descriptors, two of them
    // its tunnels (100 streams each), or only 100 carried if the second
    // tunnel found the node full (its accepts outran its handshake).
    let echoed = ended(&report, "echoed");
    assert!((100..=138).contains(&echoed), "{report}");
    assert_eq!(
        closed(&report) + ended(&report, "not_connected"),
        200 - echoed,
        "{report}"
    );
    assert_refusals_throttled(&mesh.agents[0]);
}

#[test]
fn a_peer_over_its_stream_limit_gets_refusals_and_other_peers_do_not() {
    let mut mesh = Mesh::new(["", "limits:\n  streamsPerPeerNamespace: 100\n"]);
    let keep = Tool::start(&mesh.server, &["keep", "--port", &PORT.to_string()]);
    keep.next("listening", PATIENCE);
    let _server = Server::start(&mesh.server, PORT + 1).unwrap();

    let sprayed = spray(&mesh.client, mesh.server_addr(), 200, 5_000, 4_000);
    // A stream refused, or the second tunnel that would carry more: the
    // first refusal is logged (the next ones only counted, for 10 s).
    let refused = mesh.agents[1]
        .wait_for(PATIENCE, |l| {
            l.message() == "HBONE stream refused: over the limit"
                || l.message() == "HBONE connection refused: over the limit"
        })
        .unwrap();
    assert_eq!(refused.field("limit"), "peer");
    // Another identity, from the same node, is served meanwhile.
    let other: SocketAddr = SocketAddrV4::new(mesh.server.ip, PORT + 1).into();
    Call::default().run(&mesh.neighbour, other).unwrap();

    let report = sprayed.next("sprayed", Duration::from_secs(20));
    // 100: the connection carrying the streams counts as one (and a second
    // connection, when the first was full, may have been refused or not).
    let echoed = ended(&report, "echoed");
    assert!((95..=99).contains(&echoed), "{report}");
    // Refused by the server's agent (503), closed by the client's: with the
    // client's byte unread, so the close is a reset.
    assert_eq!(closed(&report), 200 - echoed, "{report}");
    // Each failed at the client's agent with why: a 503 for a stream, or,
    // once the first tunnel was full, the next tunnel refused outright.
    let failed = mesh.agents[0]
        .lines()
        .into_iter()
        .filter(|l| l.message() == "outbound connection failed")
        .count();
    assert_eq!(failed as u64, 200 - echoed);
}

/// The delivered connection's numbers, read off the pod's loopback: the
/// client side's next sequence number and acknowledgement, and the latest
/// timestamps of each side.
#[derive(Debug, Clone, Copy)]
struct Numbers {
    client: SocketAddrV4,
    next_seq: u32,
    ack: u32,
    client_tsval: u32,
    server_tsval: u32,
}

/// Reads `tcpdump -S -n` lines of one connection to `server` until the
/// client has acknowledged the server's greeting, and works out what a
/// segment from the client must carry to be accepted next.
fn numbers(lines: &mpsc::Receiver<String>, server: SocketAddrV4) -> Numbers {
    let server_end = format!("{}.{}", server.ip(), server.port());
    let mut client = None;
    let (mut next_seq, mut ack, mut client_tsval, mut server_tsval) = (None, None, None, None);
    let mut server_sent_data = false;
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        // "IP 10.244.1.1.61000 > 10.244.2.2.8080: Flags [.], seq 1:2, ack 3, win 5,
        //  options [nop,nop,TS val 6 ecr 7], length 0"
        let Some((from, rest)) = line
            .split_once(" > ")
            .map(|(a, b)| (a.rsplit(' ').next().unwrap().to_owned(), b))
        else {
            continue;
        };
        let value = |key: &str| -> Option<u32> {
            let at = rest.find(key)? + key.len();
            rest[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        let length = value("length ").unwrap_or(0);
        if from == server_end {
            server_tsval = value("TS val ").or(server_tsval);
            server_sent_data |= length > 0;
        } else {
            let (ip, port) = from.rsplit_once('.').unwrap();
            client = Some(SocketAddrV4::new(
                ip.parse().unwrap(),
                port.parse().unwrap(),
            ));
            client_tsval = value("TS val ").or(client_tsval);
            ack = value(" ack ").or(ack);
            // "seq A:B" for data, "seq A" (or none, relative) otherwise.
            if let Some(seq) = value(" seq ") {
                next_seq = Some(seq + length);
            }
            if server_sent_data && length == 0 && next_seq.is_some() && ack.is_some() {
                break;
            }
        }
    }
    Numbers {
        client: client.expect("no packet of the connection seen"),
        next_seq: next_seq.expect("no sequence number seen"),
        ack: ack.expect("no acknowledgement seen"),
        client_tsval: client_tsval.expect("no timestamp seen"),
        server_tsval: server_tsval.expect("no server timestamp seen"),
    }
}

/// `tcpdump` in `pod`'s namespace on `interface`, its lines as they come.
fn tcpdump(pod: &Pod, interface: &str, filter: &str) -> (Child, mpsc::Receiver<String>) {
    let mut child = pod
        .command("tcpdump")
        .args(["-i", interface, "-S", "-n", "-l", "-tt", filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump starts");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    // tcpdump says on stderr when it is listening.
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening on") {
                let _ = ready_tx.send(());
            }
        }
    });
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    ready_rx.recv_timeout(PATIENCE).expect("tcpdump listening");
    (child, rx)
}

/// Forges a segment from `numbers.client` to `server` that the server's
/// socket would accept, carrying `payload`, sent to the pod's interface from
/// its node.
fn forge(node_pod: &Pod, server: SocketAddrV4, numbers: Numbers, payload: &str) {
    let status = Command::new("ip")
        .args(["netns", "exec", &node_netns(node_pod)])
        .arg(binary("labpod").unwrap())
        .args(["forge", "--src", &numbers.client.to_string()])
        .args(["--dst", &server.to_string()])
        .args(["--seq", &numbers.next_seq.to_string()])
        .args(["--ack", &numbers.ack.to_string()])
        .args(["--tsval", &(numbers.client_tsval + 1).to_string()])
        .args(["--tsecr", &numbers.server_tsval.to_string()])
        .args(["--payload", payload])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "forging a segment");
}

/// The namespace of the node that hosts `pod`.
fn node_netns(pod: &Pod) -> String {
    // Pods are named {prefix}n{i}p{j}, their node {prefix}n{i}.
    let cut = pod.netns.rfind('p').unwrap();
    pod.netns[..cut].to_owned()
}

#[test]
fn a_forged_packet_never_reaches_a_connection_the_agent_delivered() {
    let mesh = Mesh::new(["", ""]);
    let injected = "INJECTED";
    let server = SocketAddrV4::new(mesh.server.ip, PORT);

    // The control, outside the mesh: n2p2 (not enrolled) serves node 1's
    // own namespace (not captured). A segment forged the same way is
    // accepted there: the application reads the injected bytes, and the
    // client's echo is spoiled. So the forging is right.
    let outside = SocketAddrV4::new(mesh.ghost.ip, PORT);
    let mut control = Server::start(&mesh.ghost, PORT).unwrap();
    let (mut dump, lines) = tcpdump(&mesh.ghost, "eth0", &format!("tcp port {PORT}"));
    let call = Call {
        hold_ms: Some(3_000),
        ..Call::default()
    }
    .spawn_from_node(mesh.lab.node(0), outside)
    .unwrap();
    let plain = numbers(&lines, outside);
    forge(&mesh.ghost, outside, plain, injected);
    let spoiled = warren_tests::harness::finish(call);
    let _ = dump.kill();
    // The injected bytes took the place of the client's first ones (which
    // the server's kernel then took for a retransmission).
    let error = spoiled.expect_err("the control's call was not disturbed: the forgery is wrong");
    assert!(error.to_string().contains("the echo differs"), "{error:#}");
    control.next_served().unwrap();

    // Through the mesh: the client's connection is delivered inside the
    // server's pod, on its loopback, by the agent.
    let mut served = Server::start(&mesh.server, PORT).unwrap();
    let (mut dump, lines) = tcpdump(&mesh.server, "lo", &format!("tcp port {PORT}"));
    let call = Call {
        hold_ms: Some(3_000),
        ..Call::default()
    }
    .spawn(&mesh.client, server)
    .unwrap();
    let numbers = numbers(&lines, server);
    let before = read_drops(&pin_dir(mesh.lab.prefix()).join(&mesh.lab.node(1).name)).unwrap();
    forge(&mesh.server, server, numbers, injected);
    let called = warren_tests::harness::finish(call);
    let _ = dump.kill();
    let after = read_drops(&pin_dir(mesh.lab.prefix()).join(&mesh.lab.node(1).name)).unwrap();
    assert_eq!(
        after.get(DropReason::ForgedDelivery) - before.get(DropReason::ForgedDelivery),
        1,
        "the forged segment was not dropped as a forgery"
    );
    // The application got the client's bytes, and nothing else.
    called.expect("the client's call, untouched");
    let seen = served.next_served().unwrap();
    assert_eq!(
        (seen.peer.ip(), seen.bytes),
        (std::net::IpAddr::V4(mesh.client.ip), 1024)
    );
}

#[test]
fn a_pod_whose_connects_outrun_the_agent_meets_its_kernel_quota_and_its_neighbours_do_not() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mesh = Mesh::new(["", ""]);
    let _server = Server::start(&mesh.server, PORT).unwrap();
    let pins = pin_dir(mesh.lab.prefix()).join(&mesh.lab.node(0).name);
    let drops = || read_drops(&pins).unwrap().get(DropReason::CaptureQuota);
    let before = drops();
    let agent = Pid::from_raw(mesh.agents[0].pid().unwrap() as i32);

    // The agent accepts nothing for a while (stopped): every connect the
    // pod makes leaves its original destination in the shared table.
    kill(agent, Signal::SIGSTOP).unwrap();
    let quota = warren_agent::redirect::PENDING_PER_POD as u64;
    let count = quota + 900;
    let sprayed = spray(&mesh.client, mesh.server_addr(), count as usize, 100, 0);
    sprayed.next("connected", Duration::from_secs(30));
    // connect() is refused past the pod's share (the spray connects one
    // after another: exactly).
    assert_eq!(drops() - before, count - quota);
    // Its neighbour's connect is recorded all the same, and goes through
    // once the agent is back.
    let neighbour = Call::default()
        .spawn(&mesh.neighbour, mesh.server_addr())
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    kill(agent, Signal::SIGCONT).unwrap();
    warren_tests::harness::finish(neighbour).expect("the neighbour's call");
    assert_eq!(drops() - before, count - quota, "the neighbour was refused");

    // What the agent took stops counting once it counts the table again
    // (every 10 s): the pod connects again. (What its clients gave up on
    // stays in the table, counted, until it is stale: 140 s.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while warren_agent::redirect::read_pending(&pins).unwrap() as u64 >= quota {
        assert!(Instant::now() < deadline, "the pod's share never came back");
        thread::sleep(Duration::from_millis(500));
    }
    Call::default()
        .run(&mesh.client, mesh.server_addr())
        .unwrap();
}
