//! `warren ca serve` as a real process: made with `warren ca init`, a node
//! credential from `warren ca node-credential`, and the library's client.

use std::{
    fs,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use warren_agent::{
    ca::{
        client::{CaClient, CsrSource},
        transport::{NODE_ROOTS, NodeCredential},
    },
    tls::{CertificateSource, TrustBundle},
};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

const WORKLOADS: &str = "
node: ca
workloads:
  - {name: sleep-1, namespace: default, serviceAccount: sleep, ip: 10.244.1.2, node: node-1}
  - {name: web-1, namespace: shop, serviceAccount: web, ip: 10.244.2.2, node: node-2}
";

/// The signing files `warren ca init --dir ca` makes, as the CA commands
/// take them.
const SIGNING: [&str; 6] = [
    "--ca-cert",
    "ca/ca-cert.pem",
    "--ca-key",
    "ca/ca-key.pem",
    "--roots",
    "ca/root.pem",
];

/// Runs `warren args` in `dir`; fails the test if it fails.
fn warren(args: &[&str], dir: &Path) {
    let (ok, text) = warren_output(args, dir);
    assert!(ok, "warren {args:?}: {text}");
}

/// Runs `warren args` in `dir`; returns whether it succeeded, and what it
/// printed on stdout and stderr.
fn warren_output(args: &[&str], dir: &Path) -> (bool, String) {
    let output = Command::new(WARREN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// Kills the CA when the test ends, also when it fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_ca_process_serves_its_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    warren(&["ca", "init", "--dir", "ca"], dir);
    let mut args = vec![
        "ca",
        "node-credential",
        "--node",
        "node-1",
        "--out",
        "node-1",
    ];
    args.extend(SIGNING);
    warren(&args, dir);
    fs::write(dir.join("workloads.yaml"), WORKLOADS).unwrap();

    // A free port: taken and released, then given to the CA.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = fs::File::create(dir.join("ca.log")).unwrap();
    let mut serve = vec![
        "ca",
        "serve",
        "--workloads",
        "workloads.yaml",
        "--listen",
        &addr,
        "--max-ttl",
        "1h",
    ];
    serve.extend(SIGNING);
    let ca = Running(
        Command::new(WARREN)
            .args(&serve)
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let credential = NodeCredential::load(&dir.join("node-1")).unwrap();
    let roots = TrustBundle::from_pem_file(&dir.join("node-1").join(NODE_ROOTS)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match CaClient::connect(&addr, &credential, &roots).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the CA did not come up: {e}"),
        }
    };
    let source = CsrSource::new(client, Duration::from_secs(48 * 3600));

    let sleep = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    let cert = source.certificate(&sleep).await.unwrap();
    assert_eq!(cert.identity(), &sleep);
    let left = cert
        .not_after()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left <= Duration::from_secs(3600), "not capped: {left:?}");

    let web = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let refused = source.certificate(&web).await.unwrap_err().to_string();
    assert!(refused.contains("node-2"), "{refused}");
    drop(ca);

    let log = fs::read_to_string(dir.join("ca.log")).unwrap();
    assert!(log.contains("signed a workload certificate"), "{log}");
    assert!(log.contains("refused: not authorized"), "{log}");
    assert!(
        log.contains("node-1") && log.contains("ns/shop/sa/web"),
        "{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[test]
fn node_credentials_are_checked_before_the_agent_relies_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    warren(&["ca", "init", "--dir", "ca"], dir);
    let credential = |node: &str, extra: &[&str]| {
        let mut args = vec!["ca", "node-credential", "--node", node, "--out", "node"];
        args.extend(SIGNING);
        args.extend(extra);
        warren_output(&args, dir)
    };
    let config = |node: &str| {
        fs::write(
            dir.join("agent.yaml"),
            format!("node: {node}\nca: {{address: \"127.0.0.1:15012\", nodeCredential: node}}\n"),
        )
        .unwrap();
        warren_output(&["check-config", "agent.yaml"], dir)
    };

    assert!(credential("node-1", &[]).0);
    let (ok, text) = config("node-1");
    assert!(ok, "{text}");
    assert!(
        text.contains("with the node credential of spiffe://cluster.local/warren/node/node-1"),
        "{text}"
    );
    assert!(
        text.contains("trusting the 1 root(s) in node/ca-roots.pem"),
        "{text}"
    );

    // Another node's credential.
    let (ok, text) = config("node-2");
    assert!(!ok);
    assert!(
        text.contains("it is for spiffe://cluster.local/warren/node/node-1, but this agent is spiffe://cluster.local/warren/node/node-2"),
        "{text}"
    );

    // A key others can read.
    let key = dir.join("node/node-key.pem");
    fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (ok, text) = config("node-1");
    assert!(!ok);
    assert!(
        text.contains("readable by group or others (mode 0644)"),
        "{text}"
    );

    // Never overwritten by mistake; renewed on purpose.
    let (ok, text) = credential("node-2", &[]);
    assert!(!ok);
    assert!(text.contains("renew it with --replace"), "{text}");
    let (ok, text) = credential("node-2", &["--replace"]);
    assert!(ok, "{text}");
    let (ok, text) = config("node-2");
    assert!(ok, "{text}");
}
