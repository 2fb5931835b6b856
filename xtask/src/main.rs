//! `cargo xtask`: everything beyond a plain `cargo build`.
//!
//! - `setup`: install what building and testing warren needs (idempotent).
//! - `test`: setup, unit tests, then the end-to-end suites (root).
//! - `demo`: a two-node lab with real eBPF capture, narrated, then torn down.
//! - `lab up|down|status|exec`: a lab that stays up for poking at by hand.
//! - `image`: OCI images of the agent and the CA under target/images/, each run once to check it.
//! - `fuzz`: every fuzz target (cargo-fuzz, libFuzzer) for a while, with executions and coverage.
//! - `vm`: the capture and ingress smoke tests on Debian 12's own kernel (6.1), under qemu.
//! - `soak`: mixed traffic and churn for a while, the agents' memory sampled.
//! - `scale`: 10 000 tunnelled connections held with traffic, 100 000 made one after the
//!   other, the agents' memory per connection and after the churn.

mod bench;
mod bench_discovery;
mod child;
mod demo;
mod fuzz;
mod image;
mod lab;
mod procfs;
mod scale;
mod setup;
mod soak;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "warren's build, test, demo and lab tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test warren (apt packages, rust-src, bpf-linker).
    Setup,
    /// Run every test: unit tests, then the end-to-end suites in a lab (needs root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Bring up a two-node lab, show warren capturing pods' connections, tear it down.
    Demo,
    /// A lab that stays up until `lab down`.
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Measure throughput, latency and connection rate with warren against without (needs root);
    /// `--against REV` also measures the agent of another git revision.
    Bench(bench::Args),
    /// Measure what the agent's Kubernetes discovery costs at scale, 10k pods (needs root).
    BenchDiscovery(bench_discovery::Args),
    /// Build OCI images of the agent and the CA as archives under target/images/, and run
    /// each with podman to check it (needs root).
    Image(image::Args),
    /// Run every fuzz target (cargo-fuzz) for a while; report executions and coverage.
    Fuzz(fuzz::Args),
    /// Boot Debian 12's own kernel under qemu and run the capture and ingress smoke tests in it.
    Vm(vm::Args),
    /// Mixed traffic, policy, config and certificate churn and an agent restart for a while,
    /// with the agents' memory sampled (needs root).
    Soak(soak::Args),
    /// Many tunnelled connections held at once and many made one after the other across the
    /// lab, with the agents' memory per connection and after the churn (needs root).
    Scale(scale::Args),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(false).map(drop),
        Task::Test { args } => test(&args),
        Task::Demo => demo::run(),
        Task::Lab { action } => lab::run(action),
        Task::Bench(args) => bench::run(&args),
        Task::BenchDiscovery(args) => bench_discovery::run(&args),
        Task::Image(args) => image::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Vm(args) => vm::run(&args),
        Task::Soak(args) => soak::run(&args),
        Task::Scale(args) => scale::run(&args),
    }
}

fn test(args: &[String]) -> Result<()> {
    setup::run(true)?;
    println!("\n== building the agent and the lab tools");
    build(Profile::Debug)?;
    let mut tally = Tally::default();
    println!("\n== unit tests");
    let unit = [
        "test",
        "-p",
        "warren-agent",
        "-p",
        "warren-ca",
        "-p",
        "warren-cni",
        "-p",
        "warren-pki",
        "-p",
        "warren-daemon",
        "-p",
        "warren-common",
        "-p",
        "xtask",
        "--",
    ];
    let unit = cargo_test(&unit, args, &mut tally);
    println!("\n== end-to-end tests (lab of network namespaces, real eBPF, real agents)");
    let e2e =
        unit.and_then(|()| cargo_test(&["test", "-p", "warren-tests", "--"], args, &mut tally));
    // One line for the whole run, last, so that it is what a reader (or CI)
    // sees at the end rather than the doc-tests' "0 passed".
    println!("\ntests: {} passed, {} failed", tally.passed, tally.failed);
    e2e
}

/// Test counts over several `cargo test` runs.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

/// Runs `cargo test`, passing its output through and counting its results.
fn cargo_test(args: &[&str], extra: &[String], tally: &mut Tally) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(cargo)
        .args(args)
        .args(extra)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo")?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        // "test result: ok. 7 passed; 0 failed; 0 ignored; ..."
        if let Some(counts) = line.strip_prefix("test result: ") {
            for part in counts.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                match (what, n.parse::<u64>()) {
                    ("passed", Ok(n)) => tally.passed += n,
                    ("failed", Ok(n)) => tally.failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// Builds the `warren`, `warren-ca` and `labpod` binaries; returns the
/// directory holding them.
fn build(profile: Profile) -> Result<PathBuf> {
    let mut args = vec![
        "build",
        "-p",
        "warren-agent",
        "-p",
        "warren-ca",
        "-p",
        "warren-cni",
        "-p",
        "warren-tests",
        "--bins",
    ];
    if profile == Profile::Release {
        args.push("--release");
    }
    cargo(&args, &[])?;
    let dir = match profile {
        Profile::Debug => "target/debug",
        Profile::Release => "target/release",
    };
    Ok(workspace_root().join(dir))
}

/// Runs `cargo ARGS` in the workspace, with `env` set besides.
fn cargo(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}
