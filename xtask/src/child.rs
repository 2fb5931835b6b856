//! Processes the xtask commands start in lab pods and wait for: servers
//! that say when they are ready, tools whose last line is a JSON report.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// How long a process that closed its stdout is given to exit.
const EXIT_WAIT: Duration = Duration::from_secs(20);

/// A process in a pod that runs while the caller does other things (a server, a
/// holder); dropping it kills it.
pub struct Background {
    pub child: Child,
    /// Its stdout, line by line, read by a thread as long as this is kept.
    pub stdout: mpsc::Receiver<String>,
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Background {
    /// Starts `cmd` with `stdin` and waits, up to `timeout`, until a line of its stdout
    /// contains `ready`.
    pub fn start(mut cmd: Command, stdin: Stdio, ready: &str, timeout: Duration) -> Result<Self> {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {shown}"))?;
        let stdout = line_channel(child.stdout.take().context("no stdout")?);
        let mut process = Self { child, stdout };
        let deadline = Instant::now() + timeout;
        loop {
            match process
                .stdout
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) if line.contains(ready) => return Ok(process),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = wait_within(&mut process.child, EXIT_WAIT)?;
                    bail!("{shown} exited ({status}) before saying {ready:?} (its stderr is above)")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("{shown} did not say {ready:?} within {timeout:?}")
                }
            }
        }
    }
}

/// Runs `cmd` to completion and returns its stdout; kills it after `timeout`.
pub fn output_within(mut cmd: Command, timeout: Duration) -> Result<String> {
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

pub fn wait_within(child: &mut Child, timeout: Duration) -> Result<ExitStatus> {
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

pub fn last_json_line(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .with_context(|| format!("no JSON report in {stdout:?}"))
}
