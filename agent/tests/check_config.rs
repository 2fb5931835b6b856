//! `warren check-config` with a node credential as `warren-ca
//! node-credential` writes it (made here with the same library calls):
//! refused credentials are refused before the agent relies on them.

use std::{fs, os::unix::fs::PermissionsExt, path::Path, process::Command, time::Duration};

use warren_pki::{
    ca::{Authority, CaError, Policy, init, write_node_credential},
    identity::{NodeId, TrustDomain},
};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

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

#[test]
fn node_credentials_are_checked_before_the_agent_relies_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let td = TrustDomain::new("cluster.local").unwrap();
    // `warren-ca init --dir ca`.
    init::lab(&dir.join("ca"), &td).unwrap();
    let authority = Authority::load(
        &dir.join("ca/ca-cert.pem"),
        &dir.join("ca/ca-key.pem"),
        &dir.join("ca/root.pem"),
        Policy::new(td.clone()),
    )
    .unwrap();
    // `warren-ca node-credential --node <node> --out node [--replace]`.
    let credential = |node: &str, replace: bool| {
        let node = NodeId::new(td.clone(), node).unwrap();
        let issued = authority
            .issue_credential(&node.to_string(), Duration::from_secs(30 * 24 * 3600))
            .unwrap();
        write_node_credential(&dir.join("node"), &issued, authority.roots(), replace)
    };
    let config = |node: &str| {
        fs::write(
            dir.join("agent.yaml"),
            format!("node: {node}\nca: {{address: \"127.0.0.1:15012\", nodeCredential: node}}\n"),
        )
        .unwrap();
        warren_output(&["check-config", "agent.yaml"], dir)
    };

    credential("node-1", false).unwrap();
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
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = config("node-1");
    assert!(!ok);
    assert!(
        text.contains("readable by group or others (mode 0644)"),
        "{text}"
    );

    // Never overwritten by mistake; renewed on purpose.
    let refused = credential("node-2", false).unwrap_err();
    assert!(matches!(refused, CaError::Exists(_)), "{refused}");
    credential("node-2", true).unwrap();
    let (ok, text) = config("node-2");
    assert!(ok, "{text}");
}
