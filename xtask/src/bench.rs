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
//! one kept-alive connection (`labpod rr`), and new connections per second, one after the
//! other and 8 at a time (`labpod connrate`). Release builds; results also go to
//! `target/bench/results.json`.
//!
//! And what the agents themselves cost, which the baseline (no agent) has no figure for:
//! their CPU time (utime + stime in `/proc/<pid>/stat`, all threads, both nodes' agents
//! summed) read just before and after each throughput and connection-rate measurement, per
//! GB moved or per 1000 connections; and their memory (VmRSS, summed) before and while the
//! client pod holds [`HELD_CONNECTIONS`] connections open to the server pod at once
//! (`labpod hold` against `labpod keep`), per held connection, with agents started afresh
//! for each target (an allocator keeps what it once used, so a second target would seem
//! to cost almost nothing).
//!
//! The agents run as in production, with their Prometheus endpoint on and scraped every
//! second, and their access log on. `--against REV` adds a third configuration, the agent
//! built from the git revision REV (in a worktree of its own, with a target directory of its
//! own: the first build takes minutes), taking its turns like the others: how a change moves
//! warren's figures, measured in one run.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use warren_tests::{
    Lab, LabSpec, Pod,
    harness::{Agent, MeshWorkload, agent_config, binary},
    telemetry,
};

use crate::{
    child::{Background, last_json_line, output_within, wait_within},
    procfs,
};

/// `labpod serve`, for round trips.
const ECHO_PORT: u16 = 8080;
/// `labpod greet`, for new connections.
const GREET_PORT: u16 = 8081;
/// `labpod keep`, for the warren agents' [`HELD_CONNECTIONS`]; the `--against` agents'
/// are held on the next port. Not one port for both: the two take turns a few seconds
/// apart, and the first one's connections, closed by the client, leave it as many sockets
/// in TIME_WAIT to that address and port for a minute; the second one's connect()s to the
/// same address and port then search the ephemeral ports for a pair not in use (measured
/// by hand, with no agent at all: 6.6 s of system time for 9 000 connections, against
/// 0.3 s). Rounds of one configuration are minutes apart.
const KEEP_PORT: u16 = 8082;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: u32 = 2;
const RR_COUNT: u32 = 2000;
/// Long enough that the agents' CPU time over it, about a second, is many clock ticks
/// (see [`AgentProcesses::cpu_during`]).
const CONNRATE_SECONDS: f64 = 2.0;
/// A bound, in case connections get very cheap.
const CONNRATE_MAX: u32 = 50_000;
/// Threads of `labpod connrate --parallel`.
const CONCURRENT_CONNECTIONS: u32 = 8;
/// Connections the client pod holds open at once, for the agents' memory per connection.
/// Well within the client pod's ephemeral ports (32768-60999). Not 10 000: an agent that
/// relays both ends (same node) holds two descriptors per connection, and with the agents
/// inheriting the hard limit of 20 000 open files of the machine the bench was written on,
/// it ran out at 9 829 (EMFILE on accept). [`held_memory`] checks the agents' limit first.
const HELD_CONNECTIONS: u32 = 9_000;
/// For any one command of the bench: iperf3 runs for IPERF_SECONDS, connrate for
/// CONNRATE_SECONDS, the others for about 1s.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// For opening all HELD_CONNECTIONS.
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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

/// One measurement, yielding the figures of the [`METRICS`] that name it, in their order:
/// all of them where agents run, and those not [`Metric::agents_only`] where none does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    OneStream,
    FourStreams,
    RoundTrips,
    NewConnections,
    ConcurrentConnections,
    HeldConnections,
}

const PROBES: [Probe; 6] = [
    Probe::OneStream,
    Probe::FourStreams,
    Probe::RoundTrips,
    Probe::NewConnections,
    Probe::ConcurrentConnections,
    Probe::HeldConnections,
];

impl Probe {
    /// Whether all its figures are the agents' own, so that it has nothing to measure
    /// where no agent runs.
    fn agents_only(self) -> bool {
        METRICS
            .iter()
            .filter(|m| m.probe == self)
            .all(|m| m.agents_only)
    }

    /// Whether each of its measurements needs agents that have carried nothing yet: an
    /// agent's RSS keeps what it once used (its allocator holds on to freed memory), so
    /// agents that had held connections for one target would seem to need almost nothing
    /// more for the next.
    fn fresh_agents(self) -> bool {
        self == Probe::HeldConnections
    }
}

struct Metric {
    label: &'static str,
    key: &'static str,
    higher_is_better: bool,
    probe: Probe,
    /// A figure of the agent processes (CPU, memory): the baseline has none, and a ratio
    /// to it means nothing.
    agents_only: bool,
}

const METRICS: [Metric; 13] = [
    Metric {
        label: "throughput 1 stream (Gbit/s)",
        key: "throughput_1_stream_gbit_s",
        higher_is_better: true,
        probe: Probe::OneStream,
        agents_only: false,
    },
    Metric {
        label: "agent CPU 1 stream (s/GB)",
        key: "agent_cpu_s_per_gb_1_stream",
        higher_is_better: false,
        probe: Probe::OneStream,
        agents_only: true,
    },
    Metric {
        label: "throughput 4 streams (Gbit/s)",
        key: "throughput_4_streams_gbit_s",
        higher_is_better: true,
        probe: Probe::FourStreams,
        agents_only: false,
    },
    Metric {
        label: "agent CPU 4 streams (s/GB)",
        key: "agent_cpu_s_per_gb_4_streams",
        higher_is_better: false,
        probe: Probe::FourStreams,
        agents_only: true,
    },
    Metric {
        label: "latency p50 (us)",
        key: "latency_p50_us",
        higher_is_better: false,
        probe: Probe::RoundTrips,
        agents_only: false,
    },
    Metric {
        label: "latency p99 (us)",
        key: "latency_p99_us",
        higher_is_better: false,
        probe: Probe::RoundTrips,
        agents_only: false,
    },
    Metric {
        label: "connections/s",
        key: "connections_per_s",
        higher_is_better: true,
        probe: Probe::NewConnections,
        agents_only: false,
    },
    Metric {
        label: "agent CPU (ms/1000 conns)",
        key: "agent_cpu_ms_per_1000_connections",
        higher_is_better: false,
        probe: Probe::NewConnections,
        agents_only: true,
    },
    Metric {
        label: "connections/s, 8 concurrent",
        key: "connections_per_s_8_concurrent",
        higher_is_better: true,
        probe: Probe::ConcurrentConnections,
        agents_only: false,
    },
    Metric {
        label: "agent CPU 8 conc. (ms/1000 c.)",
        key: "agent_cpu_ms_per_1000_connections_8_concurrent",
        higher_is_better: false,
        probe: Probe::ConcurrentConnections,
        agents_only: true,
    },
    Metric {
        label: "agent RSS idle (KiB)",
        key: "agent_rss_idle_kib",
        higher_is_better: false,
        probe: Probe::HeldConnections,
        agents_only: true,
    },
    Metric {
        label: "agent RSS, conns held (KiB)",
        key: "agent_rss_held_kib",
        higher_is_better: false,
        probe: Probe::HeldConnections,
        agents_only: true,
    },
    Metric {
        label: "agent KiB per held conn",
        key: "agent_kib_per_held_connection",
        higher_is_better: false,
        probe: Probe::HeldConnections,
        agents_only: true,
    },
];

/// Per metric, one figure per round (none for the baseline's [`Metric::agents_only`]).
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
        carried: Vec::new(),
        current: None,
        against: against.as_ref().map(|(_, binary)| binary.clone()),
        scraper: None,
        paths: Paths::new(),
    };
    let mut configs = vec![Config::Baseline, Config::Warren];
    if against.is_some() {
        configs.push(Config::Against);
    }

    let ticks_per_second = procfs::clock_ticks()?;
    let rounds = args.rounds as usize;
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        for (k, &probe) in PROBES.iter().enumerate() {
            // Who goes first rotates, so that none always follows another.
            let mut order = configs.clone();
            order.rotate_left((round + k) % configs.len());
            order.retain(|&config| config != Config::Baseline || !probe.agents_only());
            for config in order {
                agents.set(config)?;
                for target in &mut targets {
                    if probe.fresh_agents() {
                        agents.refresh()?;
                    }
                    let processes = agents.processes(ticks_per_second);
                    let figures = measure(probe, config, client, target.server, &processes)
                        .with_context(|| format!("{probe:?}, {config:?}, {}", target.name))?;
                    if !agents.running.is_empty() {
                        agents.carried.push(target.server.ip);
                    }
                    target.record(config, probe, figures);
                }
            }
        }
    }
    agents.set(Config::Baseline)?;

    let against = against.map(|(rev, _)| rev);
    print_table(
        client,
        &targets,
        against.as_deref(),
        rounds,
        ticks_per_second,
    );
    let mut json = to_json(
        client,
        &targets,
        against.as_deref(),
        rounds,
        ticks_per_second,
    );
    // Which path the agents' connections took (the same-node fast path, or HBONE): what
    // the warren figures measured.
    println!("\nconnections by path, as the client's agent logged them:");
    for (i, target) in targets.iter().enumerate() {
        for (config, key) in [
            (Config::Warren, "warren_paths"),
            (Config::Against, "against_paths"),
        ] {
            if let Some(paths) = agents.paths.get(&(config, target.server.ip)) {
                println!("  {} ({config:?}): {paths:?}", target.name);
                json["targets"][i][key] = json!(paths);
            }
        }
    }
    let path = crate::workspace_root().join("target/bench/results.json");
    fs::create_dir_all(path.parent().expect("a file path has a parent"))?;
    fs::write(&path, serde_json::to_string_pretty(&json)?)?;
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
        let slots: Vec<usize> = (0..METRICS.len())
            .filter(|&m| METRICS[m].probe == probe)
            .filter(|&m| config != Config::Baseline || !METRICS[m].agents_only)
            .collect();
        assert_eq!(
            slots.len(),
            figures.len(),
            "{probe:?} under {config:?} measured {figures:?}, one figure per metric it names"
        );
        for (m, figure) in slots.into_iter().zip(figures) {
            series[m].push(figure);
        }
    }
}

/// None for no values: the baseline's figures of the agents.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
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
    /// The servers measured through the running agents (by address).
    carried: Vec<std::net::Ipv4Addr>,
    /// Which configuration runs now.
    current: Option<Config>,
    /// The agent binary of `--against`'s revision.
    against: Option<PathBuf>,
    /// Scrapes the running agents' metrics (this revision's only: an older one may have
    /// none), until dropped.
    scraper: Option<Scraper>,
    /// The paths the client's agent says each configuration's connections took, by
    /// server: how many went through HBONE, how many straight (the same-node fast path).
    paths: Paths,
}

/// Connections by configuration, server address and path (`hbone`, `fast_path`...), from
/// the client's agent's access lines.
type Paths = BTreeMap<(Config, std::net::Ipv4Addr), BTreeMap<String, u64>>;

impl Agents<'_> {
    fn set(&mut self, config: Config) -> Result<()> {
        if self.current.unwrap_or(Config::Baseline) == config {
            return Ok(());
        }
        self.stop()?;
        self.start(config)
    }

    /// Replaces the running agents with new ones of the same configuration, unless they
    /// have carried nothing yet.
    fn refresh(&mut self) -> Result<()> {
        match self.current {
            Some(config) if !self.carried.is_empty() => {
                self.stop()?;
                self.start(config)
            }
            _ => Ok(()),
        }
    }

    fn stop(&mut self) -> Result<()> {
        if self.running.is_empty() {
            self.carried.clear();
            return Ok(());
        }
        self.check_captured()?;
        self.scraper = None;
        // A stopped agent leaves its pods failing closed (pinned
        // programs): release them, for plain pod-to-pod TCP or the other agent.
        for mut agent in self.running.drain(..) {
            agent.stop()?;
            agent.uninstall()?;
        }
        self.carried.clear();
        Ok(())
    }

    fn start(&mut self, config: Config) -> Result<()> {
        match config {
            Config::Baseline => {}
            Config::Warren => {
                for node in self.lab.nodes() {
                    let agent_config = agent_config(node, &self.mesh)
                        + &format!("metricsListen: {}:{METRICS_PORT}\n", node.ip)
                        + &raised_limits();
                    self.running
                        .push(Agent::start(node, &agent_config, &self.dir.join("warren"))?);
                }
                self.scraper = Some(Scraper::start(self.lab));
            }
            Config::Against => {
                let binary = self.against.clone().context("no --against build")?;
                // The same limits, if that agent has them: one that
                // predates them refuses the key, and runs with none.
                let probe = self.dir.join("against-limits.yaml");
                let takes_limits = takes_limits(
                    &binary,
                    &probe,
                    &agent_config(&self.lab.nodes()[0], &self.mesh),
                )?;
                for node in self.lab.nodes() {
                    let mut agent_config = agent_config(node, &self.mesh);
                    if takes_limits {
                        agent_config += &raised_limits();
                    }
                    self.running.push(Agent::start_binary(
                        binary.clone(),
                        node,
                        &agent_config,
                        &self.dir.join("against"),
                    )?);
                }
            }
        }
        self.current = Some(config);
        Ok(())
    }

    /// The running agents' processes (none for the baseline).
    fn processes(&self, ticks_per_second: f64) -> AgentProcesses {
        AgentProcesses {
            running: self
                .running
                .iter()
                .filter_map(|a| Some((a.node.clone(), a.pid()?)))
                .collect(),
            ticks_per_second,
        }
    }

    /// The warren figures are only warren's if the agent really carried the connections.
    fn check_captured(&mut self) -> Result<()> {
        // The client's node, node-1, was started first.
        let agent = &self.running[0];
        // Each connection's access line, or (an older agent's) capture line.
        let access: Vec<_> = agent
            .lines()
            .into_iter()
            .filter(|l| l.field("target") == "access" && l.field("direction") == "outbound")
            .collect();
        let mut carried: Vec<String> = access
            .iter()
            .map(|l| l.field("dst.addr").to_owned())
            .collect();
        carried.extend(agent.captures().iter().map(|c| c.dst.to_string()));
        for ip in &self.carried {
            let server = format!("{ip}:");
            ensure!(
                carried.iter().any(|dst| dst.starts_with(&server)),
                "the agent ({:?}) on {} captured no connection to {ip}; log: {}",
                self.current,
                agent.node,
                agent.log_path().display()
            );
        }
        if let Some(config) = self.current {
            for line in &access {
                let dst = line.field("dst.addr").parse::<std::net::SocketAddrV4>();
                if let Ok(dst) = dst {
                    let paths = self.paths.entry((config, *dst.ip())).or_default();
                    *paths.entry(line.field("path").to_owned()).or_default() += 1;
                }
            }
        }
        Ok(())
    }
}

/// The `limits:` block of the agents' configs. One pair of pods holds
/// HELD_CONNECTIONS between them: more than a pod's default share of an agent
/// allowed 20 000 open files (a quarter of the node's, and one peer at most
/// half of that), so the limits are raised as a node running such a pair
/// would raise them (README, Limits).
fn raised_limits() -> String {
    let per_pod = 2 * (HELD_CONNECTIONS + HELD_CONNECTIONS / 50);
    format!("limits:\n  connectionsPerPod: {per_pod}\n  streamsPerPeerNamespace: {per_pod}\n")
}

/// Whether the agent `binary` (of `--against`) takes a `limits:` block:
/// `check-config` of `config` with one, written to `probe`, refuses only an
/// agent that predates them ("unknown field `limits`"). Without the block,
/// an agent that has limits holds only its default share and refuses the
/// rest of the hold (a 503, "over the limit").
fn takes_limits(binary: &std::path::Path, probe: &std::path::Path, config: &str) -> Result<bool> {
    fs::write(probe, config.to_owned() + &raised_limits())
        .with_context(|| format!("writing {}", probe.display()))?;
    let output = Command::new(binary)
        .arg("check-config")
        .arg(probe)
        .output()
        .with_context(|| format!("running {} check-config", binary.display()))?;
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    Ok(output.status.success() || !said.contains("unknown field `limits`"))
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

/// Runs `probe` from `client` to `server`, with `agents` (of `config`) carrying the
/// connections, or none.
fn measure(
    probe: Probe,
    config: Config,
    client: &Pod,
    server: &Pod,
    agents: &AgentProcesses,
) -> Result<Vec<f64>> {
    // The probe's figure, then (where agents run) their CPU seconds per unit of `work`, in
    // the metric's unit: `cpu_s / work * scale`.
    let with_cpu = |figure: f64, cpu_s: Option<f64>, work: f64, scale: f64| {
        std::iter::once(figure)
            .chain(cpu_s.map(|cpu_s| cpu_s / work * scale))
            .collect()
    };
    Ok(match probe {
        Probe::OneStream | Probe::FourStreams => {
            let streams = if probe == Probe::OneStream { 1 } else { 4 };
            let (transfer, cpu_s) = agents.cpu_during(|| iperf(client, server, streams))?;
            with_cpu(transfer.gbit_per_s, cpu_s, transfer.bytes / 1e9, 1.0)
        }
        Probe::RoundTrips => {
            let (p50, p99) = latency(client, server)?;
            vec![p50, p99]
        }
        Probe::NewConnections | Probe::ConcurrentConnections => {
            let parallel = if probe == Probe::NewConnections {
                1
            } else {
                CONCURRENT_CONNECTIONS
            };
            let (rate, cpu_s) = agents.cpu_during(|| connection_rate(client, server, parallel))?;
            // Milliseconds per 1000 connections.
            with_cpu(rate.per_second, cpu_s, rate.connections / 1000.0, 1000.0)
        }
        Probe::HeldConnections => {
            let port = KEEP_PORT + u16::from(config == Config::Against);
            let (idle, held) = held_memory(client, server, port, agents)?;
            vec![idle, held, (held - idle) / f64::from(HELD_CONNECTIONS)]
        }
    })
}

/// The agent processes of a configuration, whose own CPU time and memory the bench reads.
struct AgentProcesses {
    /// Each agent's node and process ID.
    running: Vec<(String, u32)>,
    /// The unit of utime and stime in /proc/<pid>/stat.
    ticks_per_second: f64,
}

impl AgentProcesses {
    /// Runs `measurement`; with agents running, also returns the CPU time they took
    /// meanwhile, all together. The kernel gives each process's utime and stime in whole
    /// clock ticks (see [`procfs::clock_ticks`]), rounded down, so the figure is within two ticks
    /// per agent of the truth.
    fn cpu_during<T>(&self, measurement: impl FnOnce() -> Result<T>) -> Result<(T, Option<f64>)> {
        if self.running.is_empty() {
            return Ok((measurement()?, None));
        }
        let before = self.cpu_seconds()?;
        let outcome = measurement()?;
        let after = self.cpu_seconds()?;
        Ok((outcome, Some(after - before)))
    }

    /// utime + stime of every agent, summed.
    fn cpu_seconds(&self) -> Result<f64> {
        let mut ticks = 0;
        for (_, pid) in &self.running {
            ticks += procfs::cpu_ticks(*pid)?;
        }
        Ok(ticks as f64 / self.ticks_per_second)
    }

    /// Fails unless every agent may open enough files to relay [`HELD_CONNECTIONS`]
    /// connections from `client` to `server`: one descriptor per end it relays (two on a
    /// node with both pods), and some for the pooled HBONE connections that carry them.
    fn check_room_to_hold(&self, client: &Pod, server: &Pod) -> Result<()> {
        for (node, pid) in &self.running {
            let ends = u32::from(client.node == *node) + u32::from(server.node == *node);
            let needed = ends * (HELD_CONNECTIONS + HELD_CONNECTIONS / 50);
            procfs::ensure_room(*pid, needed as usize).with_context(|| {
                format!(
                    "the agent on {node}, relaying {HELD_CONNECTIONS} connections {} -> {} \
                     (or lower HELD_CONNECTIONS)",
                    client.name, server.name
                )
            })?;
        }
        Ok(())
    }

    /// VmRSS of every agent, summed, in KiB.
    fn rss_kib(&self) -> Result<f64> {
        let mut kib = 0;
        for (_, pid) in &self.running {
            kib += procfs::status_kib(*pid, "VmRSS")?;
        }
        Ok(kib as f64)
    }
}

/// What one iperf3 run moved.
struct Transfer {
    gbit_per_s: f64,
    /// Received by the server.
    bytes: f64,
}

/// What an iperf3 server in `server` received from `streams` parallel streams.
fn iperf(client: &Pod, server: &Pod, streams: u32) -> Result<Transfer> {
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
    let field = |name: &str| {
        report["end"]["sum_received"][name]
            .as_f64()
            .with_context(|| format!("no end.sum_received.{name} in {report}"))
    };
    let bytes = field("bytes")?;
    ensure!(bytes > 0.0, "iperf3 moved no bytes: {report}");
    Ok(Transfer {
        gbit_per_s: field("bits_per_second")? / 1e9,
        bytes,
    })
}

/// Median and 99th percentile round trip, in microseconds.
fn latency(client: &Pod, server: &Pod) -> Result<(f64, f64)> {
    // The round trips share one connection. The first connection of a pair of pods of one
    // node goes through the agent, which then lets the pair go straight (the same-node
    // fast path): one call first, so that what is measured is what the pair gets from then
    // on, as the other probes' thousands of connections do.
    let mut warm = client.try_command(binary("labpod")?)?;
    warm.args(["call", &format!("{}:{ECHO_PORT}", server.ip)]);
    output_within(warm, COMMAND_TIMEOUT).context("the call before the round trips")?;
    thread::sleep(Duration::from_millis(200));
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

/// What one `labpod connrate` made.
struct Rate {
    per_second: f64,
    connections: f64,
}

/// New connections per second, `parallel` threads each making one after the other.
fn connection_rate(client: &Pod, server: &Pod, parallel: u32) -> Result<Rate> {
    let mut cmd = client.try_command(binary("labpod")?)?;
    cmd.args(["connrate", &format!("{}:{GREET_PORT}", server.ip)])
        .args(["--seconds", &CONNRATE_SECONDS.to_string()])
        .args(["--max", &CONNRATE_MAX.to_string()])
        .args(["--parallel", &parallel.to_string()]);
    let report = last_json_line(&output_within(cmd, COMMAND_TIMEOUT)?)?;
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("no {name} in {report}"))
    };
    let connections = field("connections")?;
    ensure!(connections > 0.0, "no connection made: {report}");
    Ok(Rate {
        per_second: field("per_second")?,
        connections,
    })
}

/// The agents' memory (VmRSS summed, KiB) before `client` opens [`HELD_CONNECTIONS`]
/// connections to `server`, and while it holds them all. All are closed, and the server
/// gone, when this returns.
fn held_memory(
    client: &Pod,
    server: &Pod,
    port: u16,
    agents: &AgentProcesses,
) -> Result<(f64, f64)> {
    ensure!(
        !agents.running.is_empty(),
        "no agent runs, no memory of its own to read"
    );
    agents.check_room_to_hold(client, server)?;
    let count = HELD_CONNECTIONS.to_string();
    let mut keeper = server.try_command(binary("labpod")?)?;
    keeper.args(["keep", "--port", &port.to_string(), "--count", &count]);
    let mut keeper = Background::start(keeper, Stdio::null(), "listening", COMMAND_TIMEOUT)?;
    let idle = agents.rss_kib()?;
    let mut holder = client.try_command(binary("labpod")?)?;
    holder
        .args(["hold", "--addr", &format!("{}:{port}", server.ip)])
        .args(["--count", &count]);
    let mut holder = Background::start(holder, Stdio::piped(), "\"held\"", HOLD_TIMEOUT)?;
    let held = agents.rss_kib()?;
    // Its stdin closing lets the holder go: it closes every connection and exits, and the
    // keeper exits once all have closed on its side too.
    drop(holder.child.stdin.take());
    for (name, process) in [("labpod hold", &mut holder), ("labpod keep", &mut keeper)] {
        let status = wait_within(&mut process.child, COMMAND_TIMEOUT)
            .with_context(|| format!("{name}, letting go of the connections"))?;
        ensure!(status.success(), "{name} failed ({status})");
    }
    Ok((idle, held))
}

/// Starts `cmd` and waits until a line of its stdout contains `ready`.
fn start_server(cmd: Command, ready: &str) -> Result<Background> {
    Background::start(cmd, Stdio::null(), ready, COMMAND_TIMEOUT)
}

fn print_table(
    client: &Pod,
    targets: &[Target],
    against: Option<&str>,
    rounds: usize,
    ticks_per_second: f64,
) {
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
            let figures = Figures::of(target, m);
            print!(
                "  {:<32}{}{}{}",
                metric.label,
                cell(figures.baseline, 12, 2),
                cell(figures.warren, 12, 2),
                cell(figures.ratio, 8, 2),
            );
            if other.is_some() {
                print!(
                    "{}{}",
                    cell(figures.against, 12, 2),
                    cell(figures.ratio_against, 10, 3)
                );
            }
            println!();
        }
    }
    println!(
        "Medians of {rounds} rounds. ratio = warren / baseline: higher is better for throughput \
         and connections/s, lower is better for latency."
    );
    println!(
        "agent figures: both nodes' agents summed, CPU (utime + stime, read in 1/{ticks_per_second} \
         s ticks: each figure within 2 ticks per agent of the truth) per GB received or per 1000 \
         connections, VmRSS before and while the client holds {HELD_CONNECTIONS} connections \
         open at once; the baseline runs no agent (-)."
    );
    if let Some(rev) = against {
        println!("vs @rev = warren / the agent of {rev}, measured in the same rounds.");
    }
}

/// A right-aligned figure, or "-" for none.
fn cell(figure: Option<f64>, width: usize, precision: usize) -> String {
    match figure {
        Some(figure) => format!("{figure:>width$.precision$}"),
        None => format!("{:>width$}", "-"),
    }
}

/// One metric's medians for one target, and their ratios where they mean something.
struct Figures {
    baseline: Option<f64>,
    warren: Option<f64>,
    against: Option<f64>,
    /// warren / baseline; none for the agents' own figures, which the baseline lacks.
    ratio: Option<f64>,
    ratio_against: Option<f64>,
}

impl Figures {
    fn of(target: &Target, m: usize) -> Self {
        let baseline = median(&target.baseline[m]);
        let warren = median(&target.warren[m]);
        let against = median(&target.against[m]);
        let ratio = |other: Option<f64>| warren.zip(other).map(|(warren, other)| warren / other);
        Self {
            baseline,
            warren,
            against,
            ratio: if METRICS[m].agents_only {
                None
            } else {
                ratio(baseline)
            },
            ratio_against: ratio(against),
        }
    }
}

fn truncate(text: &str, width: usize) -> String {
    text.chars().take(width).collect()
}

fn to_json(
    client: &Pod,
    targets: &[Target],
    against: Option<&str>,
    rounds: usize,
    ticks_per_second: f64,
) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .map(|target| {
            let metrics: serde_json::Map<String, Value> = METRICS
                .iter()
                .enumerate()
                .map(|(m, metric)| {
                    let figures = Figures::of(target, m);
                    let mut value = json!({
                        "baseline": figures.baseline,
                        "warren": figures.warren,
                        "ratio": figures.ratio,
                        "higher_is_better": metric.higher_is_better,
                        "agents_only": metric.agents_only,
                        "baseline_rounds": (!metric.agents_only).then_some(&target.baseline[m]),
                        "warren_rounds": target.warren[m],
                    });
                    if against.is_some() {
                        value["against"] = json!(figures.against);
                        value["ratio_against"] = json!(figures.ratio_against);
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
        "concurrent_connections": CONCURRENT_CONNECTIONS,
        "held_connections": HELD_CONNECTIONS,
        "clock_ticks_per_s": ticks_per_second,
        "agents_only": "Metrics with agents_only are the agent processes' own (both nodes' \
            agents summed): CPU time (utime + stime, counted in clock ticks: each figure within \
            2 ticks per agent of the truth) per GB received or per 1000 connections, VmRSS before and \
            while the client holds held_connections connections open at once. The baseline runs \
            no agent: its figures and ratio are null.",
        "against": against,
        "targets": targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            name: name.to_owned(),
            node: "node-1".to_owned(),
            netns: name.to_owned(),
            ip: ip.into(),
            cgroup: PathBuf::from("/sys/fs/cgroup/none"),
        }
    }

    /// Every probe measured once per configuration, each figure its metric's index + 1
    /// (times 2 under `--against`).
    fn measured<'a>(server: &'a Pod, against: bool) -> Target<'a> {
        let mut target = Target::new("same-node", server);
        let mut configs = vec![(Config::Baseline, 1.0), (Config::Warren, 1.0)];
        if against {
            configs.push((Config::Against, 2.0));
        }
        for (config, scale) in configs {
            for probe in PROBES {
                let figures = (0..METRICS.len())
                    .filter(|&m| METRICS[m].probe == probe)
                    .filter(|&m| config != Config::Baseline || !METRICS[m].agents_only)
                    .map(|m| (m + 1) as f64 * scale)
                    .collect();
                target.record(config, probe, figures);
            }
        }
        target
    }

    #[test]
    fn the_agents_own_figures_have_no_baseline_and_no_ratio_to_it() {
        let (client, server) = (pod("n1p1", [10, 244, 1, 2]), pod("n1p2", [10, 244, 1, 3]));
        let json = to_json(&client, &[measured(&server, true)], Some("v1"), 1, 100.0);
        let metrics = &json["targets"][0]["metrics"];
        let held = &metrics["agent_kib_per_held_connection"];
        assert_eq!(held["agents_only"], true);
        assert_eq!(held["baseline"], Value::Null);
        assert_eq!(held["baseline_rounds"], Value::Null);
        assert_eq!(held["ratio"], Value::Null);
        assert_eq!(held["warren_rounds"], json!([13.0]));
        assert_eq!(held["against_rounds"], json!([26.0]));
        assert_eq!(held["ratio_against"], 0.5);
        let rate = &metrics["connections_per_s_8_concurrent"];
        assert_eq!(rate["agents_only"], false);
        assert_eq!(rate["baseline_rounds"], json!([9.0]));
        assert_eq!(rate["ratio"], 1.0);
        assert_eq!(metrics.as_object().unwrap().len(), METRICS.len());
    }

    #[test]
    #[should_panic(expected = "one figure per metric")]
    fn a_probe_must_yield_one_figure_per_metric_it_names() {
        let server = pod("n2p1", [10, 244, 2, 2]);
        let mut target = Target::new("cross-node", &server);
        // The baseline has no agent CPU to give.
        target.record(Config::Baseline, Probe::OneStream, vec![1.0, 2.0]);
    }

    #[test]
    fn only_the_held_connections_probe_is_left_out_without_agents() {
        let agents_only: Vec<Probe> = PROBES.into_iter().filter(|p| p.agents_only()).collect();
        assert_eq!(agents_only, [Probe::HeldConnections]);
    }

    #[test]
    fn a_median_of_nothing_is_none() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
