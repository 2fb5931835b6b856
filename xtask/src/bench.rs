//! `cargo xtask bench`: what warren costs, against no warren, measured in the same run.
//!
//! A 2-node x 2-pod lab; the client is n1p1, the servers n2p1 (other node) and n1p2 (same
//! node). Two configurations: baseline (no agent at all: plain pod-to-pod TCP) and warren
//! (an agent per node, every pod enrolled; the bench measures whichever path the agent takes).
//! Starting or stopping the agents takes a fraction of a second, so the two take turns at
//! every measurement (B W, W B, ...): a machine that slows down for a while, because someone
//! else is compiling say, weighs on both alike. Each figure is the median of its rounds, so
//! that one disturbed measurement does not count. On a noisy machine only the ratios mean
//! much; every round's figures are in the JSON.
//!
//! Metrics: iperf3 throughput with 1 and 4 streams, round-trip latency of 64-byte messages on
//! one kept-alive connection (`labpod rr`), and sequential new connections per second
//! (`labpod connrate`). Release builds; results also go to `target/bench/results.json`.
//!
//! The agents run as in production, with their Prometheus endpoint on and scraped every
//! second, and their access log on. `--against REV` adds a third configuration, the agent
//! built from the git revision REV (in a worktree of its own, with a target directory of its
//! own: the first build takes minutes), taking its turns like the others: how a change moves
//! warren's figures, measured in one run.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use warren_tests::{
    Lab, LabSpec, Pod,
    harness::{Agent, MeshWorkload, agent_config, binary},
    telemetry,
};

/// `labpod serve`, for round trips.
const ECHO_PORT: u16 = 8080;
/// `labpod greet`, for new connections.
const GREET_PORT: u16 = 8081;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: u32 = 2;
const RR_COUNT: u32 = 2000;
const CONNRATE_SECONDS: f64 = 1.0;
/// A bound, in case connections get very cheap.
const CONNRATE_MAX: u32 = 50_000;
/// For any one command of the bench: iperf3 runs for IPERF_SECONDS, the others for about 1s.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Baseline,
    Warren,
    /// The agent built from `--against`'s revision.
    Against,
}

#[derive(clap::Args)]
pub struct Args {
    /// Also measure the agent built from this git revision (a commit, tag or branch).
    #[arg(long, value_name = "REV")]
    against: Option<String>,
    /// Rounds of every measurement; each figure is the median of its rounds. More rounds
    /// narrow what the machine's noise leaves uncertain.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    rounds: u32,
}

/// How often the agents' metrics are scraped while they run.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);
const METRICS_PORT: u16 = 15020;

/// One measurement, yielding the figures of the [`METRICS`] that name it, in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    OneStream,
    FourStreams,
    RoundTrips,
    NewConnections,
}

const PROBES: [Probe; 4] = [
    Probe::OneStream,
    Probe::FourStreams,
    Probe::RoundTrips,
    Probe::NewConnections,
];

struct Metric {
    label: &'static str,
    key: &'static str,
    higher_is_better: bool,
    probe: Probe,
}

const METRICS: [Metric; 5] = [
    Metric {
        label: "throughput 1 stream (Gbit/s)",
        key: "throughput_1_stream_gbit_s",
        higher_is_better: true,
        probe: Probe::OneStream,
    },
    Metric {
        label: "throughput 4 streams (Gbit/s)",
        key: "throughput_4_streams_gbit_s",
        higher_is_better: true,
        probe: Probe::FourStreams,
    },
    Metric {
        label: "latency p50 (us)",
        key: "latency_p50_us",
        higher_is_better: false,
        probe: Probe::RoundTrips,
    },
    Metric {
        label: "latency p99 (us)",
        key: "latency_p99_us",
        higher_is_better: false,
        probe: Probe::RoundTrips,
    },
    Metric {
        label: "connections/s",
        key: "connections_per_s",
        higher_is_better: true,
        probe: Probe::NewConnections,
    },
];

/// Per metric, one figure per round.
type Series = [Vec<f64>; METRICS.len()];

/// A client-server pair and the figures measured for it.
struct Target<'a> {
    name: &'static str,
    server: &'a Pod,
    baseline: Series,
    warren: Series,
    against: Series,
}

pub fn run(args: &Args) -> Result<()> {
    crate::setup::run(true)?;
    let against = match &args.against {
        Some(rev) => Some((rev.clone(), build_against(rev)?)),
        None => None,
    };
    println!("building warren and labpod (release)...");
    let bin_dir = crate::build(crate::Profile::Release)?;
    // SAFETY: xtask has spawned no thread yet (only child processes, waited
    // for), so no one reads the environment concurrently. harness::binary()
    // reads this variable to find the release builds.
    unsafe { std::env::set_var("WARREN_BIN_DIR", &bin_dir) };
    // SAFETY: as above. The agents log as in production (the tests' filter adds each
    // connection's decisions at debug, which costs).
    unsafe { std::env::set_var("WARREN_LOG_LEVEL", "info") };

    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let client = lab.pod(0, 0);
    let mut targets = [
        Target::new("cross-node", lab.pod(1, 0)),
        Target::new("same-node", lab.pod(0, 1)),
    ];
    // Each server pod runs an echo and a greeter; they are killed when this is dropped.
    let mut servers = Vec::new();
    for target in &targets {
        for (mode, port) in [("serve", ECHO_PORT), ("greet", GREET_PORT)] {
            let mut cmd = target.server.try_command(binary("labpod")?)?;
            cmd.args([
                mode,
                "--port",
                &port.to_string(),
                "--name",
                &target.server.name,
            ]);
            servers.push(start_server(cmd, "listening")?);
        }
    }
    let mut agents = Agents {
        lab: &lab,
        mesh: lab
            .nodes()
            .iter()
            .flat_map(|node| &node.pods)
            .map(|pod| MeshWorkload::new(pod, "default", &pod.name))
            .collect(),
        dir: std::env::temp_dir().join("warren-bench").join(lab.prefix()),
        running: Vec::new(),
        current: None,
        against: against.as_ref().map(|(_, binary)| binary.clone()),
        scraper: None,
    };
    let mut configs = vec![Config::Baseline, Config::Warren];
    if against.is_some() {
        configs.push(Config::Against);
    }

    let rounds = args.rounds as usize;
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        for (k, &probe) in PROBES.iter().enumerate() {
            // Who goes first rotates, so that none always follows another.
            let mut order = configs.clone();
            order.rotate_left((round + k) % configs.len());
            for config in order {
                agents.set(config, &targets)?;
                for target in &mut targets {
                    let figures = measure(probe, client, target.server)
                        .with_context(|| format!("{probe:?}, {config:?}, {}", target.name))?;
                    target.record(config, probe, figures);
                }
            }
        }
    }
    agents.set(Config::Baseline, &targets)?;

    let against = against.map(|(rev, _)| rev);
    print_table(client, &targets, against.as_deref(), rounds);
    let path = crate::workspace_root().join("target/bench/results.json");
    fs::create_dir_all(path.parent().expect("a file path has a parent"))?;
    fs::write(
        &path,
        serde_json::to_string_pretty(&to_json(client, &targets, against.as_deref(), rounds))?,
    )?;
    println!("\nresults: {}", path.display());
    let _ = fs::remove_dir_all(&agents.dir);
    Ok(())
}

impl<'a> Target<'a> {
    fn new(name: &'static str, server: &'a Pod) -> Self {
        Self {
            name,
            server,
            baseline: Default::default(),
            warren: Default::default(),
            against: Default::default(),
        }
    }

    fn record(&mut self, config: Config, probe: Probe, figures: Vec<f64>) {
        let series = match config {
            Config::Baseline => &mut self.baseline,
            Config::Warren => &mut self.warren,
            Config::Against => &mut self.against,
        };
        let slots = (0..METRICS.len()).filter(|&m| METRICS[m].probe == probe);
        for (m, figure) in slots.zip(figures) {
            series[m].push(figure);
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Warren on (an agent on every node, every pod enrolled), the agent of another revision, or
/// off (no agent at all).
struct Agents<'a> {
    lab: &'a Lab,
    mesh: Vec<MeshWorkload>,
    /// Their configs and logs.
    dir: PathBuf,
    running: Vec<Agent>,
    /// Which configuration runs now.
    current: Option<Config>,
    /// The agent binary of `--against`'s revision.
    against: Option<PathBuf>,
    /// Scrapes the running agents' metrics (this revision's only: an older one may have
    /// none), until dropped.
    scraper: Option<Scraper>,
}

impl Agents<'_> {
    fn set(&mut self, config: Config, targets: &[Target]) -> Result<()> {
        if self.current.unwrap_or(Config::Baseline) == config {
            return Ok(());
        }
        if !self.running.is_empty() {
            self.check_captured(targets)?;
            self.scraper = None;
            // A stopped agent leaves its pods failing closed (pinned
            // programs): release them, for plain pod-to-pod TCP or the other agent.
            for mut agent in self.running.drain(..) {
                agent.stop()?;
                agent.uninstall()?;
            }
        }
        match config {
            Config::Baseline => {}
            Config::Warren => {
                for node in self.lab.nodes() {
                    let agent_config = agent_config(node, &self.mesh)
                        + &format!("metricsListen: {}:{METRICS_PORT}\n", node.ip);
                    self.running
                        .push(Agent::start(node, &agent_config, &self.dir)?);
                }
                self.scraper = Some(Scraper::start(self.lab));
            }
            Config::Against => {
                let binary = self.against.clone().context("no --against build")?;
                for node in self.lab.nodes() {
                    let agent_config = agent_config(node, &self.mesh);
                    self.running.push(Agent::start_binary(
                        binary.clone(),
                        node,
                        &agent_config,
                        &self.dir,
                    )?);
                }
            }
        }
        self.current = Some(config);
        Ok(())
    }

    /// The warren figures are only warren's if the agent really carried the connections.
    fn check_captured(&self, targets: &[Target]) -> Result<()> {
        // The client's node, node-1, was started first.
        let agent = &self.running[0];
        // Each connection's access line, or (an older agent's) capture line.
        let mut carried: Vec<String> = agent
            .lines()
            .iter()
            .filter(|l| l.field("target") == "access" && l.field("direction") == "outbound")
            .map(|l| l.field("dst.addr").to_owned())
            .collect();
        carried.extend(agent.captures().iter().map(|c| c.dst.to_string()));
        for target in targets {
            let server = format!("{}:", target.server.ip);
            ensure!(
                carried.iter().any(|dst| dst.starts_with(&server)),
                "the agent on {} captured no connection to {}; log: {}",
                agent.node,
                target.server.ip,
                agent.log_path().display()
            );
        }
        Ok(())
    }
}

/// Scrapes every node's agent once per [`SCRAPE_EVERY`], as Prometheus would (more often),
/// so that the figures include what serving metrics costs.
struct Scraper {
    stop: mpsc::Sender<()>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Scraper {
    fn start(lab: &Lab) -> Self {
        let nodes: Vec<(PathBuf, std::net::SocketAddr)> = lab
            .nodes()
            .iter()
            .map(|n| (n.netns_path(), (n.ip, METRICS_PORT).into()))
            .collect();
        let (stop, stopped) = mpsc::channel();
        let thread = thread::spawn(move || {
            while stopped.recv_timeout(SCRAPE_EVERY).is_err() {
                for (netns, addr) in &nodes {
                    if let Err(error) = telemetry::scrape(netns, *addr, "/metrics") {
                        eprintln!("scraping {addr}: {error:#}");
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Builds the agent of git revision `rev` (release) in a worktree and target directory of
/// its own under target/bench/against, and returns the binary's path.
fn build_against(rev: &str) -> Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = root.join("target/bench/against");
    let tree = dir.join("tree");
    fs::create_dir_all(&dir)?;
    let git = |args: &[&str]| -> Result<()> {
        let status = Command::new("git")
            .args(args)
            .current_dir(&root)
            .stdout(Stdio::null())
            .status()
            .context("running git")?;
        ensure!(
            status.success(),
            "`git {}` failed ({status})",
            args.join(" ")
        );
        Ok(())
    };
    let tree_arg = tree.to_str().context("a non-UTF-8 path")?;
    if tree.exists() {
        git(&["worktree", "remove", "--force", tree_arg])?;
    }
    // The commit it names, so that what reaches git's other commands is a
    // hash, never something that reads as an option.
    let resolved = Command::new("git")
        .args(["rev-parse", "--verify", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .current_dir(&root)
        .output()
        .context("running git")?;
    ensure!(
        resolved.status.success(),
        "{rev:?} is not a commit here: {}",
        String::from_utf8_lossy(&resolved.stderr).trim()
    );
    let commit = String::from_utf8(resolved.stdout)?.trim().to_owned();
    println!(
        "building the agent of {rev} ({commit}, release) in {}...",
        tree.display()
    );
    git(&["worktree", "add", "--detach", tree_arg, &commit])?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "warren-agent",
            "--bin",
            "warren",
        ])
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .current_dir(&tree)
        .status()
        .context("running cargo")?;
    let removed = git(&["worktree", "remove", "--force", tree_arg]);
    ensure!(
        status.success(),
        "building the agent of {rev} failed ({status})"
    );
    removed?;
    let binary = dir.join(format!("warren-{}", rev.replace('/', "_")));
    fs::copy(dir.join("target/release/warren"), &binary)?;
    Ok(binary)
}

/// Runs `probe` from `client` to `server`.
fn measure(probe: Probe, client: &Pod, server: &Pod) -> Result<Vec<f64>> {
    Ok(match probe {
        Probe::OneStream => vec![iperf(client, server, 1)?],
        Probe::FourStreams => vec![iperf(client, server, 4)?],
        Probe::RoundTrips => {
            let (p50, p99) = latency(client, server)?;
            vec![p50, p99]
        }
        Probe::NewConnections => vec![connection_rate(client, server)?],
    })
}

/// Gbit/s received by an iperf3 server in `server` from `streams` parallel streams.
fn iperf(client: &Pod, server: &Pod, streams: u32) -> Result<f64> {
    let port = IPERF_PORT.to_string();
    let mut iperf_server = server.try_command("iperf3")?;
    iperf_server.args(["-s", "-1", "-p", &port, "--forceflush"]);
    let mut iperf_server = start_server(iperf_server, "Server listening")?;
    let mut cmd = client.try_command("iperf3")?;
    cmd.args(["-c", &server.ip.to_string(), "-p", &port, "-J"])
        .args(["-t", &IPERF_SECONDS.to_string()])
        .args(["-P", &streams.to_string()])
        .args(["--connect-timeout", "5000"]);
    let report: Value = serde_json::from_str(&output_within(cmd, COMMAND_TIMEOUT)?)
        .context("parsing iperf3 -J output")?;
    // A one-off server exits once its client is done.
    wait_within(&mut iperf_server.child, COMMAND_TIMEOUT).context("iperf3 -s")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 1e9)
        .with_context(|| format!("no end.sum_received.bits_per_second in {report}"))
}

/// Median and 99th percentile round trip, in microseconds.
fn latency(client: &Pod, server: &Pod) -> Result<(f64, f64)> {
    let mut cmd = client.try_command(binary("labpod")?)?;
    cmd.args(["rr", &format!("{}:{ECHO_PORT}", server.ip)])
        .args(["--count", &RR_COUNT.to_string()]);
    let report = last_json_line(&output_within(cmd, COMMAND_TIMEOUT)?)?;
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("no {name} in {report}"))
    };
    Ok((field("p50_us")?, field("p99_us")?))
}

/// New connections per second, one after the other.
fn connection_rate(client: &Pod, server: &Pod) -> Result<f64> {
    let mut cmd = client.try_command(binary("labpod")?)?;
    cmd.args(["connrate", &format!("{}:{GREET_PORT}", server.ip)])
        .args(["--seconds", &CONNRATE_SECONDS.to_string()])
        .args(["--max", &CONNRATE_MAX.to_string()]);
    let report = last_json_line(&output_within(cmd, COMMAND_TIMEOUT)?)?;
    report["per_second"]
        .as_f64()
        .with_context(|| format!("no per_second in {report}"))
}

/// A server process in a pod; dropping it kills it.
struct Background {
    child: Child,
    /// Its stdout, read by a thread as long as this is kept.
    stdout: mpsc::Receiver<String>,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` and waits until a line of its stdout contains `ready`.
fn start_server(mut cmd: Command, ready: &str) -> Result<Background> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let stdout = line_channel(child.stdout.take().context("no stdout")?);
    let server = Background { child, stdout };
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match server
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(line) if line.contains(ready) => return Ok(server),
            Ok(_) => {}
            Err(_) => bail!("{shown} did not say {ready:?} within {COMMAND_TIMEOUT:?}"),
        }
    }
}

/// Runs `cmd` to completion and returns its stdout; kills it after `timeout`.
fn output_within(mut cmd: Command, timeout: Duration) -> Result<String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    // Read while it runs, so that a full pipe cannot stall it.
    let stdout = read_all(child.stdout.take().context("no stdout")?);
    let stderr = read_all(child.stderr.take().context("no stderr")?);
    let status = wait_within(&mut child, timeout).with_context(|| shown.clone())?;
    let stdout = stdout.join().expect("the reader does not panic");
    let stderr = stderr.join().expect("the reader does not panic");
    ensure!(
        status.success(),
        "{shown} failed ({status}): {}{}",
        stdout.trim(),
        stderr.trim()
    );
    Ok(stdout)
}

fn wait_within(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {timeout:?}, killed");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

fn line_channel(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn last_json_line(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no JSON report in {stdout:?}"))
}

fn print_table(client: &Pod, targets: &[Target], against: Option<&str>, rounds: usize) {
    let other = against.map(|rev| format!("@{rev}"));
    print!(
        "\n{:<34}{:>12}{:>12}{:>8}",
        "metric", "baseline", "warren", "ratio"
    );
    if let Some(other) = &other {
        print!("{:>12}{:>10}", truncate(other, 12), "vs @rev");
    }
    println!();
    for target in targets {
        println!(
            "{} ({} -> {})",
            target.name, client.name, target.server.name
        );
        for (m, metric) in METRICS.iter().enumerate() {
            let (baseline, warren) = (median(&target.baseline[m]), median(&target.warren[m]));
            print!(
                "  {:<32}{baseline:>12.2}{warren:>12.2}{:>8.2}",
                metric.label,
                warren / baseline
            );
            if other.is_some() {
                let then = median(&target.against[m]);
                print!("{then:>12.2}{:>10.3}", warren / then);
            }
            println!();
        }
    }
    println!(
        "Medians of {rounds} rounds. ratio = warren / baseline: higher is better for throughput \
         and connections/s, lower is better for latency."
    );
    if let Some(rev) = against {
        println!("vs @rev = warren / the agent of {rev}, measured in the same rounds.");
    }
}

fn truncate(text: &str, width: usize) -> String {
    text.chars().take(width).collect()
}

fn to_json(client: &Pod, targets: &[Target], against: Option<&str>, rounds: usize) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|target| {
            let metrics: serde_json::Map<String, Value> = METRICS
                .iter()
                .enumerate()
                .map(|(m, metric)| {
                    let (baseline, warren) =
                        (median(&target.baseline[m]), median(&target.warren[m]));
                    let mut value = json!({
                        "baseline": baseline,
                        "warren": warren,
                        "ratio": warren / baseline,
                        "higher_is_better": metric.higher_is_better,
                        "baseline_rounds": target.baseline[m],
                        "warren_rounds": target.warren[m],
                    });
                    if against.is_some() {
                        let then = median(&target.against[m]);
                        value["against"] = json!(then);
                        value["ratio_against"] = json!(warren / then);
                        value["against_rounds"] = json!(target.against[m]);
                    }
                    (metric.key.to_owned(), value)
                })
                .collect();
            json!({
                "name": target.name,
                "client": client.name,
                "server": target.server.name,
                "metrics": metrics,
            })
        })
        .collect();
    json!({
        "rounds": rounds,
        "iperf_seconds": IPERF_SECONDS,
        "rr_count": RR_COUNT,
        "connrate_seconds": CONNRATE_SECONDS,
        "against": against,
        "targets": targets,
    })
}
