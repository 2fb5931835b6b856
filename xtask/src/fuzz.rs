//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the fuzz targets
//! (`fuzz/`, cargo-fuzz on nightly) and runs each for a while, one at a time,
//! then prints what each did: executions, speed, coverage, crashes. See
//! docs/fuzzing.md.
//!
//! Each target starts from its corpus (`fuzz/corpus/<target>`, grown by
//! earlier runs, not committed), the seeds kept in the repository
//! (`fuzz/seeds/<target>`), the inputs that once crashed it
//! (`fuzz/regressions/<target>`), the repository's own fixtures of its
//! format (copied into the corpus at each run, so they follow the files),
//! and seeds the target generates itself (HTTP/2 conversations, CSRs).
//!
//! The binaries are run directly rather than through `cargo fuzz run`, so
//! that their output can be read for the figures and every target runs
//! even after one has crashed.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// The cargo-fuzz release `cargo xtask setup` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// A fuzz target: its name (the binary's, under fuzz/fuzz_targets/), the
/// longest input it is given, and repository files that are inputs of its
/// format.
struct Target {
    name: &'static str,
    max_len: usize,
    fixtures: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target {
        name: "hbone_server",
        // Room for a header list over the server's limit (64 KiB).
        max_len: 128 * 1024,
        fixtures: &[],
    },
    Target {
        name: "hbone_request",
        max_len: 16 * 1024,
        fixtures: &[],
    },
    Target {
        name: "policy_files",
        max_len: 64 * 1024,
        fixtures: &[],
    },
    Target {
        name: "agent_config",
        max_len: 16 * 1024,
        fixtures: &[
            "deploy/kustomize/base/agent/config.yaml",
            "deploy/kustomize/examples/custom/config.yaml",
            "deploy/kustomize/uninstall/config.yaml",
            "ca/testdata/agent-config.yaml",
        ],
    },
    Target {
        name: "kubernetes_objects",
        max_len: 64 * 1024,
        fixtures: &[],
    },
    Target {
        name: "ca_csr",
        // Past the CA's limit (16 KiB), which is checked before parsing.
        max_len: 20 * 1024,
        fixtures: &[
            "pki/src/ca/testdata/rsa1024.csr",
            "pki/src/ca/testdata/rsa2048.csr",
            "pki/src/ca/testdata/p521.csr",
        ],
    },
    Target {
        name: "ca_csr_signed",
        max_len: 8 * 1024,
        fixtures: &[],
    },
    Target {
        name: "cni_protocol",
        max_len: 16 * 1024,
        fixtures: &[],
    },
];

#[derive(clap::Args)]
pub struct Args {
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The targets to run (default: all of them).
    targets: Vec<String>,
}

/// Installs cargo-fuzz (nightly itself is `setup`'s).
pub fn setup(report: &mut crate::setup::Report) -> Result<()> {
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    match cargo_fuzz_version() {
        Some(found) if found == wanted => {
            report.ok(found);
            return Ok(());
        }
        Some(found) => report.action(format!("replacing {found} with {wanted}")),
        None => report.action(format!("installing {wanted} (about a minute)")),
    }
    let status = Command::new(cargo())
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--force",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        // Keep this workspace's settings out of the install.
        .current_dir(std::env::temp_dir())
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("`cargo install cargo-fuzz` failed ({status})");
    }
    match cargo_fuzz_version() {
        Some(found) if found == wanted => Ok(()),
        found => bail!("after cargo install, `cargo fuzz --version` gives {found:?}"),
    }
}

/// "cargo-fuzz 0.13.2", if cargo-fuzz runs.
fn cargo_fuzz_version() -> Option<String> {
    let out = Command::new(cargo())
        .args(["fuzz", "--version"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

pub fn run(args: &Args) -> Result<()> {
    let targets: Vec<&Target> = if args.targets.is_empty() {
        TARGETS.iter().collect()
    } else {
        args.targets
            .iter()
            .map(|name| {
                TARGETS.iter().find(|t| t.name == name).with_context(|| {
                    let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
                    format!("no fuzz target {name:?}; there are {}", names.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    setup(&mut crate::setup::Report::default()).context("installing cargo-fuzz")?;
    let fuzz = crate::workspace_root().join("fuzz");
    build(&fuzz, &targets)?;
    let mut results = Vec::new();
    for target in targets {
        println!("\n== fuzzing {} for {} s", target.name, args.seconds);
        results.push(fuzz_one(&fuzz, target, args.seconds)?);
    }
    println!();
    print_table(&results);
    let crashed: Vec<&Outcome> = results.iter().filter(|r| r.failure.is_some()).collect();
    if crashed.is_empty() {
        return Ok(());
    }
    for outcome in &crashed {
        let failure = outcome.failure.as_deref().unwrap_or_default();
        println!("\n{}: {failure}", outcome.target);
        match &outcome.artifact {
            Some(artifact) => println!(
                "  input: {}\n  reproduce: fuzz/{BINARIES}/{} {}\n  once fixed, keep it: \
                 cp {} fuzz/regressions/{}/",
                artifact.display(),
                outcome.target,
                artifact.display(),
                artifact.display(),
                outcome.target,
            ),
            None => println!("  no input was written; see the log above"),
        }
    }
    bail!(
        "{} fuzz target(s) failed: {}",
        crashed.len(),
        crashed
            .iter()
            .map(|o| o.target)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Where `cargo fuzz build` leaves the targets, under fuzz/.
const BINARIES: &str = "target/x86_64-unknown-linux-gnu/release";

/// `cargo +nightly fuzz build`: release, debug assertions and overflow
/// checks on, AddressSanitizer (cargo-fuzz's defaults). The agent's build
/// script compiles the eBPF programs as for any build.
fn build(fuzz: &Path, targets: &[&Target]) -> Result<()> {
    let started = Instant::now();
    let all = targets.len() == TARGETS.len();
    let names: Vec<Option<&str>> = if all {
        vec![None]
    } else {
        targets.iter().map(|t| Some(t.name)).collect()
    };
    for name in names {
        println!(
            "== building fuzz target(s) {} (cargo +nightly fuzz build)",
            name.unwrap_or("(all)")
        );
        let mut cmd = Command::new("rustup");
        cmd.args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "build",
            "--debug-assertions",
        ]);
        cmd.args(name);
        // rustup's nightly cargo, not the one running xtask.
        cmd.env_remove("CARGO").env_remove("RUSTC");
        let status = cmd
            .current_dir(fuzz)
            .status()
            .context("running cargo fuzz build")?;
        if !status.success() {
            bail!("`cargo +nightly fuzz build` failed ({status})");
        }
    }
    println!("== built in {:.0?}", started.elapsed());
    Ok(())
}

/// What one target did.
#[derive(Default)]
struct Outcome {
    target: &'static str,
    /// Inputs executed.
    runs: u64,
    exec_per_sec: u64,
    /// libFuzzer's coverage figures at the end: edges (`cov`) and features
    /// (`ft`), corpus entries.
    cov: u64,
    ft: u64,
    corpus: u64,
    /// Inputs this run added to the corpus.
    new_units: u64,
    peak_rss_mb: u64,
    seconds: f64,
    /// What went wrong (a crash, a timeout, running out of memory), if anything.
    failure: Option<String>,
    /// The input that made it go wrong, as libFuzzer wrote it.
    artifact: Option<PathBuf>,
    /// A panic's first line was read; its message is on the next.
    panic_message_next: bool,
}

fn fuzz_one(fuzz: &Path, target: &Target, seconds: u64) -> Result<Outcome> {
    let root = crate::workspace_root();
    let corpus = fuzz.join("corpus").join(target.name);
    let artifacts = fuzz.join("artifacts").join(target.name);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    fs::create_dir_all(&artifacts)?;
    for fixture in target.fixtures {
        let name = format!("fixture-{}", fixture.replace('/', "-"));
        fs::copy(root.join(fixture), corpus.join(name))
            .with_context(|| format!("copying the fixture {fixture}"))?;
    }
    // The corpus first: libFuzzer adds what it finds to the first directory.
    let dirs: Vec<PathBuf> = [
        corpus.clone(),
        fuzz.join("seeds").join(target.name),
        fuzz.join("regressions").join(target.name),
    ]
    .into_iter()
    .filter(|d| d.is_dir())
    .collect();
    let binary = fuzz.join(BINARIES).join(target.name);
    let log_path = artifacts.join("last-run.log");
    let mut child = Command::new(&binary)
        .args(&dirs)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={}", target.max_len))
        // A single input taking this long is a hang.
        .arg("-timeout=20")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .env(SEEDS_ENV, &corpus)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    let started = Instant::now();
    let stderr = child.stderr.take().context("no stderr")?;
    let mut log = Vec::new();
    let mut outcome = Outcome {
        target: target.name,
        ..Outcome::default()
    };
    let mut last_status = Instant::now();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        read_line(&line, &mut outcome);
        // libFuzzer's own progress lines are many; one every 10 s will do,
        // and everything about a failure.
        let failing = outcome.failure.is_some();
        if failing || (line.starts_with('#') && last_status.elapsed().as_secs() >= 10) {
            println!("{line}");
            last_status = Instant::now();
        }
        log.push(line);
    }
    let status = child.wait()?;
    outcome.seconds = started.elapsed().as_secs_f64();
    fs::write(&log_path, log.join("\n") + "\n")?;
    if !status.success() && outcome.failure.is_none() {
        outcome.failure = Some(format!("exited with {status}; see {}", log_path.display()));
    }
    Ok(outcome)
}

/// The variable a target writes its generated seeds to (see
/// `warren_fuzz::write_seeds`).
const SEEDS_ENV: &str = "WARREN_FUZZ_SEEDS";

/// Takes the figures and failures out of one line of libFuzzer's output.
fn read_line(line: &str, outcome: &mut Outcome) {
    // "#123456\tpulse  cov: 1234 ft: 5678 corp: 90/12Kb lim: 4096 exec/s: 2000 rss: 100Mb"
    if let Some(rest) = line.strip_prefix('#') {
        let mut words = rest.split_whitespace();
        if let Some(Ok(runs)) = words.next().map(str::parse::<u64>) {
            outcome.runs = runs;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        for pair in words.windows(2) {
            let number = || {
                pair[1]
                    .split('/')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            };
            match pair[0] {
                "cov:" => outcome.cov = number().unwrap_or(outcome.cov),
                "ft:" => outcome.ft = number().unwrap_or(outcome.ft),
                "corp:" => outcome.corpus = number().unwrap_or(outcome.corpus),
                _ => {}
            }
        }
        return;
    }
    if std::mem::take(&mut outcome.panic_message_next)
        && let Some(failure) = &mut outcome.failure
    {
        failure.push(' ');
        failure.push_str(line.trim());
        return;
    }
    let stat = |name: &str| {
        line.strip_prefix(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if let Some(n) = stat("stat::number_of_executed_units:") {
        outcome.runs = n;
    } else if let Some(n) = stat("stat::average_exec_per_sec:") {
        outcome.exec_per_sec = n;
    } else if let Some(n) = stat("stat::new_units_added:") {
        outcome.new_units = n;
    } else if let Some(n) = stat("stat::peak_rss_mb:") {
        outcome.peak_rss_mb = n;
    } else if let Some(summary) = line.strip_prefix("SUMMARY: ") {
        outcome.failure.get_or_insert_with(|| summary.to_owned());
    } else if line.starts_with("thread '") && line.contains(" panicked at ") {
        if outcome.failure.is_none() {
            outcome.failure = Some(line.trim().to_owned());
            outcome.panic_message_next = true;
        }
    } else if line.contains("ERROR: libFuzzer:") || line.contains("ERROR: AddressSanitizer:") {
        outcome
            .failure
            .get_or_insert_with(|| line.trim().to_owned());
    } else if let Some((_, path)) = line.split_once("Test unit written to ") {
        outcome.artifact = Some(PathBuf::from(path.trim()));
    }
}

fn print_table(results: &[Outcome]) {
    println!(
        "{:<20} {:>11} {:>8} {:>6} {:>7} {:>7} {:>5} {:>7}  result",
        "target", "executions", "exec/s", "cov", "ft", "corpus", "new", "rss MB"
    );
    for r in results {
        let result = match &r.failure {
            None => format!("ok ({:.0} s)", r.seconds),
            Some(_) => "FAILED".to_owned(),
        };
        println!(
            "{:<20} {:>11} {:>8} {:>6} {:>7} {:>7} {:>5} {:>7}  {result}",
            r.target, r.runs, r.exec_per_sec, r.cov, r.ft, r.corpus, r.new_units, r.peak_rss_mb
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_figures_and_failures() {
        let mut outcome = Outcome::default();
        for line in [
            "INFO: Seed: 1234",
            "#2\tINITED cov: 100 ft: 120 corp: 10/2Kb exec/s: 0 rss: 40Mb",
            "#65536\tpulse  cov: 2345 ft: 6789 corp: 321/45Kb lim: 4096 exec/s: 21845 rss: 120Mb",
            "#70000\tDONE   cov: 2350 ft: 6800 corp: 322/46Kb lim: 4096 exec/s: 1166 rss: 121Mb",
            "stat::number_of_executed_units: 70001",
            "stat::average_exec_per_sec:     1166",
            "stat::new_units_added:          42",
            "stat::peak_rss_mb:              121",
        ] {
            read_line(line, &mut outcome);
        }
        assert_eq!(
            (outcome.runs, outcome.exec_per_sec, outcome.cov, outcome.ft),
            (70001, 1166, 2350, 6800)
        );
        assert_eq!(
            (outcome.corpus, outcome.new_units, outcome.peak_rss_mb),
            (322, 42, 121)
        );
        assert!(outcome.failure.is_none());

        for line in [
            "thread '<unnamed>' panicked at agent/src/fuzzing.rs:10:5:",
            "two workloads at 10.0.0.1",
            "==1234== ERROR: libFuzzer: deadly signal",
            "artifact_prefix='/w/fuzz/artifacts/x/'; Test unit written to /w/fuzz/artifacts/x/crash-abc",
            "SUMMARY: libFuzzer: deadly signal",
        ] {
            read_line(line, &mut outcome);
        }
        assert_eq!(
            outcome.failure.as_deref(),
            Some(
                "thread '<unnamed>' panicked at agent/src/fuzzing.rs:10:5: two workloads at 10.0.0.1"
            )
        );
        let mut timeout = Outcome::default();
        read_line(
            "==77== ERROR: libFuzzer: timeout after 20 seconds",
            &mut timeout,
        );
        assert_eq!(
            timeout.failure.as_deref(),
            Some("==77== ERROR: libFuzzer: timeout after 20 seconds")
        );
        assert_eq!(
            outcome.artifact,
            Some(PathBuf::from("/w/fuzz/artifacts/x/crash-abc"))
        );
    }

    #[test]
    fn every_target_has_a_source_and_kept_fixtures_exist() {
        let root = crate::workspace_root();
        for target in TARGETS {
            let source = root.join(format!("fuzz/fuzz_targets/{}.rs", target.name));
            assert!(source.is_file(), "{}", source.display());
            for fixture in target.fixtures {
                assert!(root.join(fixture).is_file(), "{fixture}");
            }
        }
    }
}
