//! An agent that cannot start says why, as its last log line, in the
//! format asked for.

use std::process::Command;

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

#[test]
fn an_agent_that_fails_at_start_writes_why_before_it_exits() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // Parses as YAML, but names no node: refused when the agent starts.
    std::fs::write(&config, "trustDomain: cluster.local\nworkloads: []\n").unwrap();
    let output = Command::new(WARREN)
        .args(["agent", "--log-format", "json", "--config"])
        .arg(&config)
        // Neither names the node for it nor silences it.
        .env_remove("NODE_NAME")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last: serde_json::Value = serde_json::from_str(
        stderr
            .lines()
            .last()
            .unwrap_or_else(|| panic!("nothing logged; stdout: {:?}", output.stdout)),
    )
    .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(last["message"], "warren agent failed", "{stderr}");
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("node"),
        "the error names the problem: {stderr}"
    );
}
