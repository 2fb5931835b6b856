//! End-to-end: an agent killed and started again while its pods have
//! traffic. Every pod is STRICT. While it is away, its pods' connections
//! fail closed (nothing crosses the wire in clear); once it is back, new
//! connections work at once; and tunnels between the other nodes never
//! notice.
//!
//! Three nodes, one pod each: n1p1 (default/sleep) calls n2p1 (shop/web)
//! all along; n2p1 sends a long transfer to n3p1 (shop/db). Node 1's agent
//! is killed (SIGKILL) and started again.

use std::{
    fs,
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use warren_tests::{
    harness::{
        Agent, Call, CallLoop, MeshWorkload, PATIENCE, Server, WireCapture, contains, finish,
        start_agents_with_policies, test_lab,
    },
    lab::files_dir,
};

const PORT: u16 = 8080;

const STRICT_EVERYWHERE: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
    metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n";

#[test]
fn an_agent_killed_under_load_leaks_nothing_and_serves_again_at_once() {
    let lab = test_lab(3, 1);
    let client = MeshWorkload::new(lab.pod(0, 0), "default", "sleep");
    let web = MeshWorkload::new(lab.pod(1, 0), "shop", "web");
    let db = MeshWorkload::new(lab.pod(2, 0), "shop", "db");
    let dir = files_dir(lab.prefix());
    let policies = dir.join("policies");
    fs::create_dir_all(&policies).unwrap();
    fs::write(policies.join("strict.yaml"), STRICT_EVERYWHERE).unwrap();
    let workloads = [client.clone(), web.clone(), db.clone()];
    let mut agents = start_agents_with_policies(&lab, &workloads, &policies, &dir.join("agents"));
    let web_server = Server::start(&web.pod, PORT).unwrap();
    let mut db_server = Server::start(&db.pod, PORT).unwrap();

    // Between the two other nodes, a transfer spread over the whole scene.
    let long = Call {
        bytes: Some(4 << 20),
        spread_ms: Some(12_000),
        ..Call::default()
    }
    .spawn(&web.pod, SocketAddrV4::new(db.pod.ip, PORT))
    .unwrap();
    let capture = WireCapture::start(&lab).unwrap();
    // Dropped SYNs are not refused: each call gives up connecting quickly.
    let traffic = CallLoop::start(
        &client.pod,
        web_server.addr,
        Call::quick(),
        Duration::from_millis(50),
    );
    thread::sleep(Duration::from_secs(2));

    // Killed: no clean stop, no chance to tidy up.
    let config = fs::read_to_string(agents[0].config_path()).unwrap();
    drop(agents.remove(0));
    thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let agent = Agent::start(lab.node(0), &config, &dir.join("agents")).unwrap();
    thread::sleep(Duration::from_secs(3));

    let calls: Vec<(Instant, bool)> = traffic
        .finish()
        .into_iter()
        .map(|end| (end.at, end.error.is_none()))
        .collect();
    let packets = capture.finish().unwrap();
    // labpod's payload repeats this marker: never on the wire in clear.
    assert!(
        !contains(&packets, b"warren-labpod-warren-labpod-"),
        "a payload crossed the wire in clear"
    );
    // The agent was away: calls failed (closed) meanwhile...
    let away: Vec<bool> = calls
        .iter()
        .filter(|(at, _)| *at < started)
        .rev()
        .take(3)
        .map(|(_, ok)| *ok)
        .collect();
    assert_eq!(away, [false; 3], "calls went through without the agent");
    // ...and work again once it is back.
    let back = calls
        .iter()
        .find(|(at, ok)| *ok && *at > started)
        .map(|(at, _)| at.duration_since(started))
        .expect("no call went through after the restart");
    eprintln!("new connections went through {back:?} after the agent was started again");
    assert!(back < PATIENCE, "{back:?}");
    assert!(
        calls.iter().rev().take(3).all(|(_, ok)| *ok),
        "calls still failing at the end"
    );
    // The other nodes' tunnel never noticed.
    let long = finish(long).expect("the transfer between the other nodes");
    assert_eq!(long.received, 4 << 20);
    assert_eq!(db_server.next_served().unwrap().bytes, 4 << 20);
    drop(agent);
}
