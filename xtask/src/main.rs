//! `cargo xtask`: everything beyond a plain `cargo build`.
//!
//! - `setup`: install what building and testing warren needs (idempotent).
//! - `test`: setup, unit tests, then the end-to-end suites (root).
//! - `demo`: a two-node lab with real eBPF capture, narrated, then torn down.
//! - `lab up|down|status|exec`: a lab that stays up for poking at by hand.

mod bench;
mod demo;
mod lab;
mod setup;

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
    /// Measure throughput, latency and connection rate with warren against without (needs root).
    Bench,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(false).map(drop),
        Task::Test { args } => test(&args),
        Task::Demo => demo::run(),
        Task::Lab { action } => lab::run(action),
        Task::Bench => bench::run(),
    }
}

fn test(args: &[String]) -> Result<()> {
    setup::run(true)?;
    println!("\n== building the agent and the lab tools");
    build(Profile::Debug)?;
    println!("\n== unit tests");
    cargo(
        &[
            "test",
            "-p",
            "warren-agent",
            "-p",
            "warren-common",
            "-p",
            "xtask",
            "--",
        ],
        args,
    )?;
    println!("\n== end-to-end tests (lab of network namespaces, real eBPF, real agents)");
    cargo(&["test", "-p", "warren-tests", "--"], args)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Profile {
    Debug,
    Release,
}

/// Builds the `warren` and `labpod` binaries; returns the directory holding them.
fn build(profile: Profile) -> Result<PathBuf> {
    let mut args = vec![
        "build",
        "-p",
        "warren-agent",
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

fn cargo(args: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(args)
        .args(extra)
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
