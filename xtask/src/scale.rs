//! `cargo xtask scale`: many tunnelled connections at once, and many one
//! after the other, across the lab; the agents' memory read around both.
//!
//! A two-node lab of four pods each: two clients (namespaces `frontend` and
//! `batch`) and two servers (`shop`) per node, every pod in the mesh, each
//! node's clients calling the other node's servers, so that both agents
//! carry both ends. Release builds, production log level, default limits.
//!
//! - **Churn**: each client makes a quarter of `--churn` connections to a
//!   server of the other node (`labpod connrate`, 4 at a time), after a
//!   warm-up of a tenth as many. Each agent's RSS just before and a few
//!   seconds after must be within 10 % of each other.
//! - **Held**: each client holds an eighth of `--connections` to each
//!   server of the other node (`labpod hold` against `labpod keep`), every
//!   one sending a byte and reading it back every `--echo-every-ms`, for
//!   `--hold-seconds`; each agent's RSS and descriptors sampled meanwhile.
//!   Memory per connection is the RSS while held less that just before,
//!   over the connections (each agent carries one end of every one of them:
//!   the clients' half of them, the servers' other half).
//!
//! Any connection that fails, any echo that does not come back, any
//! warning of an agent, and descriptors an agent still holds after a phase
//! beyond the pooled tunnels it opened (a leak) fail the run. An agent's RSS
//! after letting go of the held connections is reported, not checked: the
//! allocator keeps what it freed for the next ones. The report is printed and written to
//! `target/scale/report.json`.

use std::{
    fs,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use warren_tests::{
    Lab, LabSpec, Pod,
    harness::{Agent, MeshWorkload, agent_config, binary},
};

use crate::{
    child::{Background, last_json_line, output_within, wait_within},
    procfs,
};

#[derive(clap::Args)]
pub struct Args {
    /// Connections held open at once, all clients together (a multiple of 8).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// How long they are held, with traffic.
    #[arg(long, default_value_t = 60)]
    hold_seconds: u64,
    /// A round trip on each held connection this often.
    #[arg(long, default_value_t = 5_000)]
    echo_every_ms: u64,
    /// Connections made one after the other, all clients together (a multiple of 4).
    #[arg(long, default_value_t = 100_000)]
    churn: usize,
}

const KEEP_PORT: u16 = 9000;
const GREET_PORT: u16 = 9001;
/// Clients and servers per node.
const CLIENTS: usize = 2;
const SERVERS: usize = 2;
/// Threads of each client's `labpod connrate`.
const CHURN_PARALLEL: usize = 4;
/// How much an agent's RSS may have grown over the churn.
const CHURN_RSS_SLACK: f64 = 0.10;
/// After the churn, before its RSS is read: connections closing, TIME_WAIT.
const SETTLE: Duration = Duration::from_secs(10);
/// Descriptors an agent may hold after a phase beyond what it held before,
/// besides the pooled tunnels the phase opened (they are closed only after
/// five idle minutes). More is a leak.
const FD_SLACK: usize = 16;
/// Streams a pooled tunnel carries at most (the pool's default, as
/// ztunnel's): how many tunnels the held connections take.
const STREAMS_PER_TUNNEL: usize = 100;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// For opening every held connection, and for any one churn.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Each agent's RSS (KiB) and open descriptors at one moment.
#[derive(Clone, Copy)]
struct Reading {
    rss_kib: [u64; 2],
    fds: [usize; 2],
}

fn read(agents: &[Agent]) -> Result<Reading> {
    let mut reading = Reading {
        rss_kib: [0; 2],
        fds: [0; 2],
    };
    for (i, agent) in agents.iter().enumerate() {
        let pid = agent.pid().context("an agent is gone")?;
        reading.rss_kib[i] = procfs::status_kib(pid, "VmRSS")?;
        reading.fds[i] = procfs::open_fds(pid)?;
    }
    Ok(reading)
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        args.connections > 0 && args.connections.is_multiple_of(2 * CLIENTS * SERVERS),
        "--connections must be a positive multiple of {}",
        2 * CLIENTS * SERVERS
    );
    ensure!(
        args.churn > 0 && args.churn.is_multiple_of(2 * CLIENTS),
        "--churn must be a positive multiple of {}",
        2 * CLIENTS
    );
    crate::setup::run(true)?;
    println!("building warren and labpod (release)...");
    let bin_dir = crate::build(crate::Profile::Release)?;
    // SAFETY: no thread has been spawned yet; harness::binary() reads it.
    unsafe { std::env::set_var("WARREN_BIN_DIR", &bin_dir) };
    // SAFETY: as above. Production's log level.
    unsafe { std::env::set_var("WARREN_LOG_LEVEL", "info") };

    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: CLIENTS + SERVERS,
    })?;
    let mesh: Vec<MeshWorkload> = lab
        .nodes()
        .iter()
        .flat_map(|node| {
            let pods = &node.pods;
            [
                MeshWorkload::new(&pods[0], "frontend", "client"),
                MeshWorkload::new(&pods[1], "batch", "client"),
                MeshWorkload::new(&pods[2], "shop", "web"),
                MeshWorkload::new(&pods[3], "shop", "store"),
            ]
        })
        .collect();
    let dir = crate::workspace_root().join("target/scale");
    let _ = fs::remove_dir_all(&dir);
    let mut agents = Vec::new();
    for node in lab.nodes() {
        agents.push(Agent::start(node, &agent_config(node, &mesh), &dir)?);
    }
    check_room(&agents, args.connections)?;
    let clients: Vec<&Pod> = (0..2)
        .flat_map(|n| (0..CLIENTS).map(move |c| (n, c)))
        .map(|(n, c)| lab.pod(n, c))
        .collect();

    let mut _servers = Vec::new();
    for node in 0..2 {
        for s in 0..SERVERS {
            let pod = lab.pod(node, CLIENTS + s);
            let mut greet = pod.try_command(binary("labpod")?)?;
            greet.args([
                "greet",
                "--port",
                &GREET_PORT.to_string(),
                "--name",
                &pod.name,
            ]);
            _servers.push(Background::start(
                greet,
                Stdio::null(),
                "listening",
                START_TIMEOUT,
            )?);
        }
    }

    // Churn.
    let per_client = args.churn / clients.len();
    println!(
        "scale: warm-up, {} connections",
        per_client / 10 * clients.len()
    );
    churn(&lab, &clients, per_client / 10)?;
    thread::sleep(SETTLE);
    let before_churn = read(&agents)?;
    println!(
        "scale: churn, {} connections ({per_client} per client, {CHURN_PARALLEL} at a time)",
        args.churn
    );
    let started = Instant::now();
    let rates = churn(&lab, &clients, per_client)?;
    let churn_seconds = started.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    let after_churn = read(&agents)?;

    // Held.
    let per_pair = args.connections / (clients.len() * SERVERS);
    let mut keepers = Vec::new();
    for node in 0..2 {
        for s in 0..SERVERS {
            let mut keep = lab.pod(node, CLIENTS + s).try_command(binary("labpod")?)?;
            // Every server is held by the other node's clients, one share each.
            keep.args(["keep", "--port", &KEEP_PORT.to_string()])
                .args(["--count", &(per_pair * CLIENTS).to_string()]);
            keepers.push(Background::start(
                keep,
                Stdio::null(),
                "listening",
                START_TIMEOUT,
            )?);
        }
    }
    let before_hold = read(&agents)?;
    println!(
        "scale: holding {} connections ({per_pair} from each client to each server of the \
         other node), a round trip on each every {} ms, for {} s",
        args.connections, args.echo_every_ms, args.hold_seconds
    );
    let opening = Instant::now();
    let mut holders = Vec::new();
    for client in &clients {
        for server in servers_for(&lab, client) {
            let mut hold = client.try_command(binary("labpod")?)?;
            hold.args(["hold", "--addr", &format!("{}:{KEEP_PORT}", server.ip)])
                .args(["--count", &per_pair.to_string()])
                .args(["--echo-every-ms", &args.echo_every_ms.to_string()]);
            holders.push(Background::start(
                hold,
                Stdio::piped(),
                "\"held\"",
                PHASE_TIMEOUT,
            )?);
        }
    }
    let open_seconds = opening.elapsed().as_secs_f64();
    println!(
        "scale: all {} open in {open_seconds:.1} s",
        args.connections
    );
    let held_from = Instant::now();
    let mut samples = Vec::new();
    while held_from.elapsed() < Duration::from_secs(args.hold_seconds) {
        samples.push((held_from.elapsed().as_secs_f64(), read(&agents)?));
        thread::sleep(SAMPLE_EVERY);
    }
    let held = read(&agents)?;
    samples.push((held_from.elapsed().as_secs_f64(), held));
    let mut echoes = 0;
    for mut holder in holders {
        // Its stdin closing lets it go: it closes its connections and reports.
        drop(holder.child.stdin.take());
        let released = finish(&mut holder, "labpod hold")?;
        echoes += released["echoes"]
            .as_u64()
            .context("no echoes in the report")?;
    }
    for mut keeper in keepers {
        finish(&mut keeper, "labpod keep")?;
    }
    thread::sleep(SETTLE);
    let after_hold = read(&agents)?;

    // The lab's agents sign with the development CA, which says so at
    // start, as it should; any other warning is one too many.
    let warnings: Vec<String> = agents
        .iter()
        .flat_map(|a| a.complaints())
        .filter(|line| !line.message().starts_with("USING THE DEVELOPMENT CA"))
        .map(|line| line.0.to_string())
        .collect();
    report(&Figures {
        args,
        churn_seconds,
        rates,
        before_churn,
        after_churn,
        open_seconds,
        before_hold,
        held,
        after_hold,
        samples,
        echoes,
        warnings,
    })
}

/// Fails unless each agent may open a descriptor for each end it relays
/// (one per held connection: each agent has one end of every one), and
/// some for the tunnels that carry them.
fn check_room(agents: &[Agent], connections: usize) -> Result<()> {
    for agent in agents {
        let pid = agent.pid().context("an agent is gone")?;
        procfs::ensure_room(pid, connections + connections / 50).with_context(|| {
            format!(
                "the agent on {}, holding {connections} connections (or hold fewer: \
                 --connections)",
                agent.node
            )
        })?;
    }
    Ok(())
}

/// The servers a client calls: the other node's.
fn servers_for<'a>(lab: &'a Lab, client: &Pod) -> Vec<&'a Pod> {
    let other = usize::from(client.node == lab.node(0).name);
    (0..SERVERS).map(|s| lab.pod(other, CLIENTS + s)).collect()
}

/// `labpod connrate` from every client at once, `count` connections each,
/// [`CHURN_PARALLEL`] at a time; each client's rate.
fn churn(lab: &Lab, clients: &[&Pod], count: usize) -> Result<Vec<f64>> {
    let runs: Vec<(String, Result<String>)> = thread::scope(|scope| {
        let threads: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                // The two clients of a node call different servers.
                let server = servers_for(lab, client)[i % SERVERS];
                let name = format!("{} -> {}", client.name, server.name);
                let cmd = client.try_command(binary("labpod")?).map(|mut cmd| {
                    cmd.args(["connrate", &format!("{}:{GREET_PORT}", server.ip)])
                        .args(["--seconds", &PHASE_TIMEOUT.as_secs().to_string()])
                        .args(["--max", &count.to_string()])
                        .args(["--parallel", &CHURN_PARALLEL.to_string()]);
                    cmd
                });
                Ok((
                    name,
                    scope.spawn(move || output_within(cmd?, PHASE_TIMEOUT + START_TIMEOUT)),
                ))
            })
            .collect::<Result<_>>()?;
        Ok::<_, anyhow::Error>(
            threads
                .into_iter()
                .map(|(name, t)| (name, t.join().expect("a churn thread does not panic")))
                .collect(),
        )
    })?;
    let mut rates = Vec::new();
    for (name, run) in runs {
        let report = last_json_line(&run.with_context(|| format!("churn {name}"))?)?;
        let made = report["connections"].as_u64().unwrap_or(0);
        ensure!(
            made == count as u64,
            "churn {name}: {made} connections of {count} made in {PHASE_TIMEOUT:?}: {report}"
        );
        rates.push(report["per_second"].as_f64().unwrap_or(0.0));
    }
    Ok(rates)
}

/// Waits for a tool that was let go, and returns its last report; fails
/// if it failed.
fn finish(process: &mut Background, name: &str) -> Result<Value> {
    let status = wait_within(&mut process.child, START_TIMEOUT)
        .with_context(|| format!("{name}, letting go of its connections"))?;
    // Until its stdout closes: the reader thread may not have passed the
    // last line on yet.
    let stdout: Vec<String> = process.stdout.iter().collect();
    let report =
        last_json_line(&stdout.join("\n")).with_context(|| format!("{name} ({status})"))?;
    ensure!(status.success(), "{name} failed ({status}): {report}");
    Ok(report)
}

struct Figures<'a> {
    args: &'a Args,
    churn_seconds: f64,
    rates: Vec<f64>,
    before_churn: Reading,
    after_churn: Reading,
    open_seconds: f64,
    before_hold: Reading,
    held: Reading,
    after_hold: Reading,
    samples: Vec<(f64, Reading)>,
    echoes: u64,
    warnings: Vec<String>,
}

fn report(f: &Figures) -> Result<()> {
    let connections = f.args.connections as f64;
    let mut problems = Vec::new();
    let mut agents_json = Vec::new();
    println!("\nscale report");
    println!(
        "  churn: {} connections in {:.1} s ({:.0}/s all clients together)",
        f.args.churn,
        f.churn_seconds,
        f.args.churn as f64 / f.churn_seconds
    );
    println!(
        "  held: {} connections opened in {:.1} s, held {} s, {} round trips, all answered",
        f.args.connections, f.open_seconds, f.args.hold_seconds, f.echoes
    );
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        // Each agent has its clients' tunnels to each server and the other
        // node's clients' tunnels to its servers; the churn's were opened by
        // the warm-up already.
        let per_pair = f.args.connections / (2 * CLIENTS * SERVERS);
        let held_tunnels = 2 * CLIENTS * SERVERS * per_pair.div_ceil(STREAMS_PER_TUNNEL);
        for (phase, before, after, tunnels) in [
            ("the churn", f.before_churn, f.after_churn, 0),
            ("letting go", f.before_hold, f.after_hold, held_tunnels),
        ] {
            if after.fds[i] > before.fds[i] + tunnels + FD_SLACK {
                problems.push(format!(
                    "{node}'s agent: {} descriptors before {phase}, {} after (the pooled \
                     tunnels account for {tunnels})",
                    before.fds[i], after.fds[i]
                ));
            }
        }
        let (start, end) = (f.before_churn.rss_kib[i], f.after_churn.rss_kib[i]);
        let churn_growth = end as f64 / start as f64 - 1.0;
        if churn_growth > CHURN_RSS_SLACK {
            problems.push(format!(
                "{node}'s agent: RSS {start} KiB before the churn, {end} KiB after (+{:.1} %)",
                churn_growth * 100.0
            ));
        }
        let peak_rss = f
            .samples
            .iter()
            .map(|(_, r)| r.rss_kib[i])
            .max()
            .unwrap_or(0);
        let peak_fds = f.samples.iter().map(|(_, r)| r.fds[i]).max().unwrap_or(0);
        let per_connection =
            (f.held.rss_kib[i] as f64 - f.before_hold.rss_kib[i] as f64) / connections;
        println!(
            "  {node} agent: churn RSS {start} -> {end} KiB ({:+.1} %), descriptors {} -> {}; \
             held RSS {} -> {} KiB (peak {peak_rss}), {per_connection:.1} KiB per connection \
             end, descriptors {} -> {} (peak {peak_fds}); after letting go {} KiB, {} \
             descriptors",
            churn_growth * 100.0,
            f.before_churn.fds[i],
            f.after_churn.fds[i],
            f.before_hold.rss_kib[i],
            f.held.rss_kib[i],
            f.before_hold.fds[i],
            f.held.fds[i],
            f.after_hold.rss_kib[i],
            f.after_hold.fds[i],
        );
        agents_json.push(json!({
            "node": node,
            "churn": {
                "rss_kib_before": start,
                "rss_kib_after": end,
                "growth": churn_growth,
                "fds_before": f.before_churn.fds[i],
                "fds_after": f.after_churn.fds[i],
            },
            "held": {
                "rss_kib_before": f.before_hold.rss_kib[i],
                "rss_kib_held": f.held.rss_kib[i],
                "rss_kib_peak": peak_rss,
                "kib_per_connection_end": per_connection,
                "fds_before": f.before_hold.fds[i],
                "fds_held": f.held.fds[i],
                "fds_peak": peak_fds,
                "rss_kib_after": f.after_hold.rss_kib[i],
                "fds_after": f.after_hold.fds[i],
                "samples": f.samples.iter()
                    .map(|(at, r)| json!([at, r.rss_kib[i], r.fds[i]]))
                    .collect::<Vec<_>>(),
            },
        }));
    }
    let both: f64 = (0..2)
        .map(|i| f.held.rss_kib[i] as f64 - f.before_hold.rss_kib[i] as f64)
        .sum::<f64>()
        / connections;
    println!("  both agents: {both:.1} KiB per tunnelled connection (its two ends)");
    println!("  agent warnings: {}", f.warnings.len());
    for warning in f.warnings.iter().take(5) {
        println!("    {warning}");
    }
    if !f.warnings.is_empty() {
        problems.push(format!("{} agent warning(s)", f.warnings.len()));
    }
    let dir = crate::workspace_root().join("target/scale");
    fs::create_dir_all(&dir)?;
    let path = dir.join("report.json");
    let report = json!({
        "connections": f.args.connections,
        "hold_seconds": f.args.hold_seconds,
        "echo_every_ms": f.args.echo_every_ms,
        "churn": f.args.churn,
        "churn_seconds": f.churn_seconds,
        "churn_rates_per_client": f.rates,
        "open_seconds": f.open_seconds,
        "round_trips": f.echoes,
        "kib_per_tunnelled_connection": both,
        "agents": agents_json,
        "agent_warnings": f.warnings,
    });
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("  report: {}", path.display());
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}
