//! `warren uninstall --wait`, as the uninstall DaemonSet runs it: it cleans
//! the node, says so, and then stays (so the pod is ready only once its node
//! is clean) until SIGTERM, which ends it successfully.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const WARREN: &str = env!("CARGO_BIN_EXE_warren");

#[test]
fn uninstall_wait_cleans_then_stays_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    // A node that has nothing pinned: uninstalling it is a no-op.
    let pins = dir.path().join("no-pins-here");
    std::fs::write(
        &config,
        format!(
            "node: node-1\nbpfPinDir: {}\nworkloads: []\n",
            pins.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(WARREN)
        .args(["uninstall", "--wait", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let released = lines.next().unwrap().unwrap();
    assert!(released.starts_with("released 0 pod(s)"), "{released}");
    assert_eq!(lines.next().unwrap().unwrap(), "waiting for SIGTERM");

    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "it must stay");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM ignored");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
