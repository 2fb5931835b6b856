//! What the benches read of a process in /proc: its CPU time, its memory, its descriptors.

use std::{fs, process::Command};

use anyhow::{Context, Result};

/// Clock ticks per second, sysconf(_SC_CLK_TCK): the unit of utime and stime in
/// /proc/<pid>/stat.
pub fn clock_ticks() -> Result<f64> {
    let output = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}, not a number"))
}

/// utime + stime of process `pid`, in clock ticks: all its threads', those that ended
/// too. The kernel rounds each down to a whole tick.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields 14 and 15; "(comm)", field 2, may hold spaces, so count after it, from
    // field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: no number in field {n}: {stat:?}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A memory figure of process `pid` from /proc/<pid>/status, in KiB: `VmRSS`, `VmHWM`.
pub fn status_kib(pid: u32, name: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path}: no {name} in kB"))
}

/// How many descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// The soft limit on open files of process `pid`; `None` when unlimited.
pub fn open_files_limit(pid: u32) -> Result<Option<usize>> {
    let path = format!("/proc/{pid}/limits");
    let limits = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // "Max open files            20000                20000                files"
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("{path}: no Max open files"))?;
    if soft == "unlimited" {
        return Ok(None);
    }
    soft.parse()
        .map(Some)
        .with_context(|| format!("{path}: Max open files is {soft:?}"))
}

/// Fails unless process `pid` may open `more` descriptors besides those it
/// has open.
pub fn ensure_room(pid: u32, more: usize) -> Result<()> {
    let open = open_fds(pid)?;
    if let Some(limit) = open_files_limit(pid)? {
        anyhow::ensure!(
            open + more <= limit,
            "it may open {limit} files and has {open} open, and about {more} more are needed: \
             raise the hard limit on open files this runs with (the agents inherit it)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(clock_ticks().unwrap() > 0.0);
        // Spin a little, so that there is CPU time to see.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(30) {}
        assert!(cpu_ticks(pid).unwrap() > 0);
        let rss = status_kib(pid, "VmRSS").unwrap();
        assert!(rss > 0 && rss <= status_kib(pid, "VmHWM").unwrap());
        assert!(status_kib(pid, "VmNothing").is_err());
        let open = open_fds(pid).unwrap();
        assert!(open >= 3, "stdin, stdout and stderr at least: {open}");
        assert!(
            open_files_limit(pid)
                .unwrap()
                .is_none_or(|limit| limit >= open)
        );
        assert!(ensure_room(pid, 1).is_ok());
        let limited = open_files_limit(pid).unwrap().is_some();
        assert_eq!(ensure_room(pid, usize::MAX / 2).is_err(), limited);
    }
}
