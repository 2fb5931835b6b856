//! `cargo xtask soak`: the agents under mixed traffic for a while, their
//! memory sampled, to see that it stays flat and nothing fails that should
//! not.
//!
//! A two-node lab (release builds, production log level); node 1's pods call
//! node 2's. All along: short connections one after the other (n1p1 →
//! n2p1), long transfers (n1p2 → n2p2, 16 MiB spread over 20 s each), the
//! policies rewritten every 10 s, the config file every 20 s, certificates of
//! 6 s (renewed every 3 s or so, on both nodes). Halfway, node 2's agent is
//! killed and started again: connections in flight through it then fail,
//! which the report counts apart. Both agents' RSS is sampled every 5 s;
//! the report gives its least-squares slope over the second half (after
//! warm-up), start and end, and every error, and writes
//! `target/soak/report.json`.

use std::{
    fs,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::json;
use warren_tests::{
    Lab, LabSpec,
    harness::{Agent, Call, CallEnd, CallLoop, MeshWorkload, Server, agent_config},
};

use crate::procfs;

#[derive(clap::Args)]
pub struct Args {
    /// How long to run: a few minutes shows the mechanics, an hour a trend.
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
}

const PORT: u16 = 8080;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const POLICY_EVERY: Duration = Duration::from_secs(10);
const CONFIG_EVERY: Duration = Duration::from_secs(20);

/// Two documents that allow everything: rewriting one with the other is a
/// reload that changes policies (an AUDIT rule comes and goes) and denies
/// nothing.
const POLICIES: [&str; 2] = [
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: audit-web, namespace: shop}\n\
     spec: {action: AUDIT, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}\n",
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
     metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n",
];

/// One RSS sample of each agent, in KiB, and when.
struct Sample {
    at_s: f64,
    rss_kib: [u64; 2],
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.minutes > 0.0, "--minutes must be positive");
    crate::setup::run(true)?;
    println!("building warren and labpod (release)...");
    let bin_dir = crate::build(crate::Profile::Release)?;
    // SAFETY: no thread has been spawned yet; harness::binary() reads it.
    unsafe { std::env::set_var("WARREN_BIN_DIR", &bin_dir) };
    // SAFETY: as above. Production's log level.
    unsafe { std::env::set_var("WARREN_LOG_LEVEL", "info") };
    let duration = Duration::from_secs_f64(args.minutes * 60.0);

    let lab = Lab::up(LabSpec {
        nodes: 2,
        pods_per_node: 2,
    })?;
    let mesh = [
        MeshWorkload::new(lab.pod(0, 0), "default", "sleep"),
        MeshWorkload::new(lab.pod(0, 1), "default", "batch"),
        MeshWorkload::new(lab.pod(1, 0), "shop", "web").label("app", "web"),
        MeshWorkload::new(lab.pod(1, 1), "shop", "store"),
    ];
    let dir = crate::workspace_root().join("target/soak");
    let _ = fs::remove_dir_all(&dir);
    let policies = dir.join("policies");
    fs::create_dir_all(&policies)?;
    fs::write(policies.join("policies.yaml"), POLICIES[0])?;
    let configs: Vec<String> = lab
        .nodes()
        .iter()
        .map(|node| {
            agent_config(node, &mesh)
                + &format!(
                    "policyDir: {}\ncertificateTtl: 6s\nlimits:\n  drainDeadline: 60s\n",
                    policies.display()
                )
        })
        .collect();
    let mut agents = Vec::new();
    for (node, config) in lab.nodes().iter().zip(&configs) {
        agents.push(Agent::start(node, config, &dir.join("agents"))?);
    }
    let _servers = [
        Server::start(lab.pod(1, 0), PORT)?,
        Server::start(lab.pod(1, 1), PORT)?,
    ];

    println!(
        "soak: {} min of mixed traffic; RSS sampled every {SAMPLE_EVERY:?}",
        args.minutes
    );
    let start = Instant::now();
    let loads = [
        (
            "short connections",
            CallLoop::start(
                lab.pod(0, 0),
                (lab.pod(1, 0).ip, PORT),
                Call::default(),
                Duration::ZERO,
            ),
        ),
        (
            "long transfers",
            CallLoop::start(
                lab.pod(0, 1),
                (lab.pod(1, 1).ip, PORT),
                Call {
                    bytes: Some(16 << 20),
                    spread_ms: Some(20_000),
                    ..Call::default()
                },
                Duration::ZERO,
            ),
        ),
    ];
    let mut samples = Vec::new();
    let (mut next_policy, mut next_config, mut next_sample) = (start, start, start);
    let mut restart: Option<(Instant, Instant)> = None;
    let mut policy_round = 0;
    while start.elapsed() < duration {
        let now = Instant::now();
        if now >= next_sample {
            let rss = |agent: &Agent| -> Result<u64> {
                procfs::status_kib(agent.pid().context("agent gone")?, "VmRSS")
            };
            samples.push(Sample {
                at_s: start.elapsed().as_secs_f64(),
                rss_kib: [rss(&agents[0])?, rss(&agents[1])?],
            });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_policy {
            policy_round += 1;
            let tmp = policies.join(".policies.yaml.new");
            fs::write(&tmp, POLICIES[policy_round % 2])?;
            fs::rename(&tmp, policies.join("policies.yaml"))?;
            next_policy += POLICY_EVERY;
        }
        if now >= next_config {
            for agent in &agents {
                agent.rewrite_config(&fs::read_to_string(agent.config_path())?)?;
            }
            next_config += CONFIG_EVERY;
        }
        if restart.is_none() && start.elapsed() >= duration / 2 {
            // Killed, not stopped: as a crash or an OOM kill would.
            let killed = Instant::now();
            drop(agents.remove(1));
            let agent = Agent::start(lab.node(1), &configs[1], &dir.join("agents"))?;
            agents.push(agent);
            restart = Some((killed, Instant::now()));
            println!(
                "soak: node-2's agent killed and started again ({:?})",
                killed.elapsed()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    let results: Vec<(&str, Vec<CallEnd>)> = loads
        .into_iter()
        .map(|(name, calls)| (name, calls.finish()))
        .collect();
    report(&dir, duration, &samples, restart, start, &results, &agents)
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

fn report(
    dir: &std::path::Path,
    duration: Duration,
    samples: &[Sample],
    restart: Option<(Instant, Instant)>,
    start: Instant,
    results: &[(&str, Vec<CallEnd>)],
    agents: &[Agent],
) -> Result<()> {
    // Connections in flight through the restarted agent may fail: those
    // that ended from its kill to 30 s after its start (a long transfer
    // started before the kill ends up to 20 s later) are counted apart.
    let around_restart = |at: Instant| {
        restart.is_some_and(|(killed, started)| {
            at >= killed && at <= started + Duration::from_secs(30)
        })
    };
    let mut loads = Vec::new();
    let mut unexpected = 0;
    println!("\nsoak report ({:.1} min)", duration.as_secs_f64() / 60.0);
    for (name, outcomes) in results {
        let failed: Vec<&CallEnd> = outcomes.iter().filter(|o| o.error.is_some()).collect();
        let (near, far): (Vec<&CallEnd>, Vec<&CallEnd>) =
            failed.iter().partition(|o| around_restart(o.at));
        unexpected += far.len();
        println!(
            "  {name}: {} calls, {} failed around the restart, {} failed otherwise",
            outcomes.len(),
            near.len(),
            far.len()
        );
        for outcome in far.iter().take(5) {
            println!(
                "    at {:.1} s: {}",
                outcome.at.duration_since(start).as_secs_f64(),
                outcome.error.as_deref().unwrap_or_default()
            );
        }
        loads.push(json!({
            "name": name,
            "calls": outcomes.len(),
            "failed_around_restart": near.len(),
            "failed_otherwise": far.iter().map(|o| json!({
                "at_s": o.at.duration_since(start).as_secs_f64(),
                "error": o.error,
            })).collect::<Vec<_>>(),
        }));
    }
    // The agents' complaints, besides the calls'.
    let warnings: Vec<String> = agents
        .iter()
        .flat_map(|a| a.complaints())
        .map(|l| format!("{}", l.0))
        .collect();
    let second_half: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at_s >= duration.as_secs_f64() / 2.0)
        .collect();
    let mut agents_json = Vec::new();
    for (i, node) in ["node-1", "node-2"].into_iter().enumerate() {
        let points: Vec<(f64, f64)> = second_half
            .iter()
            .map(|s| (s.at_s / 60.0, s.rss_kib[i] as f64))
            .collect();
        let per_min = slope(&points);
        let first = samples.first().map_or(0, |s| s.rss_kib[i]);
        let last = samples.last().map_or(0, |s| s.rss_kib[i]);
        println!(
            "  {node} agent RSS: {first} KiB at start, {last} KiB at the end; slope over the \
             second half {per_min:+.1} KiB/min{}",
            if i == 1 { " (restarted halfway)" } else { "" }
        );
        agents_json.push(json!({
            "node": node,
            "rss_kib_first": first,
            "rss_kib_last": last,
            "slope_kib_per_min_second_half": per_min,
            "samples": samples.iter().map(|s| json!([s.at_s, s.rss_kib[i]])).collect::<Vec<_>>(),
        }));
    }
    println!("  agent warnings: {}", warnings.len());
    let report = json!({
        "minutes": duration.as_secs_f64() / 60.0,
        "loads": loads,
        "agents": agents_json,
        "agent_warnings": warnings.len(),
    });
    let path: PathBuf = dir.join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("  report: {}", path.display());
    if unexpected > 0 {
        bail!("{unexpected} call(s) failed away from the restart");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_is_least_squares() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(slope(&[(0.0, 7.0)]), 0.0);
        assert!(slope(&[(0.0, 1.0), (1.0, 0.0), (2.0, 1.0), (3.0, 0.0)]).abs() < 0.5);
    }
}
