//! `cargo xtask setup`: make a Debian 12 machine ready to build and test warren.
//!
//! Every step checks cheaply first and acts only when something is missing, so a
//! second run changes nothing and says so. Long installs inherit stdout/stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

// A child module, so that it reports through `Report`'s private methods.
#[path = "kubernetes.rs"]
mod kubernetes;

/// llvm-22-dev and libpolly-22-dev are only needed to build bpf-linker against Debian's
/// LLVM 22; golang-go, rsync and the reflect2 sources to build the tests' Kubernetes
/// control plane (`kubernetes`), which runs etcd (etcd-server, etcd-client for etcdctl).
/// `cargo xtask image`: umoci assembles the images, skopeo writes (and pushes) them,
/// binutils strips the binaries, podman with runc runs them (crun, podman's default,
/// refuses these machines' hybrid cgroup layout). containernetworking-plugins: the
/// primary CNI plugins (bridge, host-local, in /usr/lib/cni) the CNI tests chain
/// warren-cni after.
const PACKAGES: &[&str] = &[
    "iproute2",
    "tcpdump",
    "iperf3",
    "llvm-22-dev",
    "libpolly-22-dev",
    "golang-go",
    "rsync",
    "golang-github-modern-go-reflect2-dev",
    "etcd-server",
    "etcd-client",
    "umoci",
    "skopeo",
    "binutils",
    "podman",
    "runc",
    "containernetworking-plugins",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// The oldest kernel warren is tested on (Debian 12's own, with `cargo xtask
/// vm`); on paper 5.15 would do (sock_ops' netns cookie): docs/kernels.md.
const MIN_KERNEL: (u32, u32) = (6, 1);

/// What `run` did, and what was already in place.
#[derive(Debug, Default)]
pub struct Report {
    /// Actions taken, in order.
    pub done: Vec<String>,
    /// Requirements that were already met.
    pub present: Vec<String>,
    /// Where cgroup v2 is mounted (attach cgroup programs below it).
    pub cgroup2: PathBuf,
}

impl Report {
    pub fn nothing_done(&self) -> bool {
        self.done.is_empty()
    }

    pub(crate) fn action(&mut self, what: String) {
        println!("setup: {what}");
        self.done.push(what);
    }

    pub(crate) fn ok(&mut self, what: String) {
        self.present.push(what);
    }
}

/// Check the machine and install what is missing. `quiet_if_ready`: print a single line when nothing was needed.
pub fn run(quiet_if_ready: bool) -> Result<Report> {
    let mut report = Report::default();
    check_root().context("setup: checking for root")?;
    check_kernel(&mut report).context("setup: checking kernel requirements")?;
    mount_bpffs(&mut report).context("setup: mounting bpffs")?;
    debian_packages(&mut report).context("setup: installing Debian packages")?;
    rust_nightly(&mut report).context("setup: Rust nightly toolchain")?;
    bpf_linker(&mut report).context("setup: installing bpf-linker")?;
    kubernetes::control_plane(&mut report).context("setup: Kubernetes control plane")?;
    kubernetes_validate(&mut report).context("setup: kubernetes-validate")?;
    crate::fuzz::setup(&mut report).context("setup: fuzzing")?;
    crate::vm::setup(&mut report).context("setup: the kernel VM")?;

    if report.nothing_done() {
        if !quiet_if_ready {
            for item in &report.present {
                println!("setup: ok: {item}");
            }
        }
        println!("setup: machine ready, nothing to do");
    } else {
        let n = report.done.len();
        println!("setup: done, {n} action(s): {}", report.done.join("; "));
    }
    Ok(report)
}

fn check_root() -> Result<()> {
    let uid = output("id -u")?;
    if uid != "0" {
        bail!(
            "must run as root (uid is {uid}): loading eBPF programs, creating network \
             namespaces and installing packages need root; try `sudo -E cargo xtask setup`"
        );
    }
    Ok(())
}

fn check_kernel(report: &mut Report) -> Result<()> {
    let mut missing = Vec::new();
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        report.ok("kernel BTF at /sys/kernel/btf/vmlinux".into());
    } else {
        missing.push("BTF: /sys/kernel/btf/vmlinux is absent (CONFIG_DEBUG_INFO_BTF=y)".into());
    }

    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    match parse_mounts(&mounts).find(|&(_, fstype)| fstype == "cgroup2") {
        Some((path, _)) => {
            report.ok(format!("cgroup2 mounted at {path}"));
            report.cgroup2 = PathBuf::from(path);
        }
        None => missing.push("cgroup v2: no cgroup2 mount in /proc/mounts".into()),
    }

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let (major, minor) = MIN_KERNEL;
    match parse_kernel_version(release) {
        Some(v) if v >= MIN_KERNEL => report.ok(format!("kernel {release}")),
        _ => missing.push(format!(
            "kernel {release} is older than {major}.{minor}, the oldest warren is tested on \
             (see docs/kernels.md)"
        )),
    }

    if !missing.is_empty() {
        bail!(
            "kernel requirements not met:\n  - {}",
            missing.join("\n  - ")
        );
    }
    Ok(())
}

/// (mount point, filesystem type) pairs from /proc/mounts text.
fn parse_mounts(mounts: &str) -> impl Iterator<Item = (&str, &str)> {
    mounts.lines().filter_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        Some((fields.next()?, fields.next()?))
    })
}

/// "6.18.44-fc-v669" -> (6, 18).
fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn mount_bpffs(report: &mut Report) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if parse_mounts(&mounts).any(|m| m == ("/sys/fs/bpf", "bpf")) {
        report.ok("bpffs mounted at /sys/fs/bpf".into());
        return Ok(());
    }
    report.action("mounting bpffs at /sys/fs/bpf".into());
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    status(command("mount -t bpf bpf /sys/fs/bpf"))
}

fn debian_packages(report: &mut Report) -> Result<()> {
    let not_installed = |pkg: &&str| {
        let status = output(&format!("dpkg-query -W -f=${{Status}} {pkg}"));
        !status.is_ok_and(|s| s == "install ok installed")
    };
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(not_installed).collect();
    if missing.is_empty() {
        report.ok(format!("Debian packages: {}", PACKAGES.join(" ")));
        return Ok(());
    }
    report.action(format!("installing Debian packages: {}", missing.join(" ")));
    status(command("apt-get update"))?;
    let mut install = command("apt-get install -y --no-install-recommends");
    install.args(&missing);
    install.env("DEBIAN_FRONTEND", "noninteractive");
    status(install)
}

fn rust_nightly(report: &mut Report) -> Result<()> {
    let toolchains = output("rustup toolchain list").context("is rustup installed?")?;
    // The channel toolchain "nightly-<host>"; dated ones ("nightly-2026-05-19-...") do not count.
    let has_nightly = toolchains
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || (name.strip_prefix("nightly-"))
                    .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
        });
    if has_nightly {
        report.ok("rustup toolchain nightly".into());
    } else {
        report.action("installing rustup toolchain nightly (minimal profile)".into());
        let install = command("rustup toolchain install nightly --profile minimal");
        status(install).context(
            "the eBPF crate is built with nightly (-Z build-std=core) and it could not be \
             installed; run `rustup toolchain install nightly` by hand",
        )?;
    }

    let components = output("rustup component list --toolchain nightly --installed")?;
    if components.lines().any(|c| c.starts_with("rust-src")) {
        report.ok("rust-src component for nightly".into());
        return Ok(());
    }
    report.action("adding the rust-src component to nightly (about 80 MB)".into());
    status(command("rustup component add rust-src --toolchain nightly"))
}

fn bpf_linker(report: &mut Report) -> Result<()> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let in_cargo_home = cargo_home.join("bin/bpf-linker").display().to_string();
    // The first that runs, as rustc would find it; it prints "bpf-linker 0.13.0".
    let version = || {
        ["bpf-linker", &in_cargo_home]
            .into_iter()
            .find_map(|bin| output(&format!("{bin} --version")).ok())
    };
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    match version() {
        Some(found) if found.ends_with(BPF_LINKER_VERSION) => {
            report.ok(found);
            return Ok(());
        }
        Some(found) => report.action(format!("replacing {found} with {wanted} (LLVM 22)")),
        None => report.action(format!(
            "installing {wanted} against LLVM 22 (about a minute)"
        )),
    }
    let install = |locked: bool| {
        let mut cmd = command(&format!(
            "cargo install bpf-linker --force --version {BPF_LINKER_VERSION} \
             --no-default-features --features llvm-22"
        ));
        if locked {
            cmd.arg("--locked");
        }
        // Without it the build script searches /usr/lib64: `unable to find library -lLLVM`.
        cmd.env("LLVM_PREFIX", LLVM_PREFIX);
        // Keep this workspace's .cargo/config.toml out of the install.
        cmd.current_dir(std::env::temp_dir());
        status(cmd)
    };
    if let Err(err) = install(true) {
        println!("setup: {err:#}; retrying without --locked");
        install(false)?;
    }
    match version() {
        Some(found) if found.ends_with(BPF_LINKER_VERSION) => Ok(()),
        found => bail!("after cargo install, `bpf-linker --version` gives {found:?}"),
    }
}

/// The Kubernetes schemas the manifests test validates against, offline.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// `kubernetes-validate` from PyPI (it carries the schemas of Kubernetes
/// 1.25 to 1.37), for tests/tests/manifests.rs.
fn kubernetes_validate(report: &mut Report) -> Result<()> {
    let wanted = format!("kubernetes-validate {KUBERNETES_VALIDATE_VERSION}");
    match output("kubernetes-validate --version") {
        Ok(found) if found.contains(KUBERNETES_VALIDATE_VERSION) => {
            report.ok(wanted);
            return Ok(());
        }
        Ok(found) => report.action(format!("replacing {found} with {wanted}")),
        Err(_) => report.action(format!("installing {wanted} (pip)")),
    }
    status(command(&format!(
        "python3 -m pip install --quiet kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
    )))
}

/// A command from a whitespace-separated line (no quoting needed by any caller).
fn command(line: &str) -> Command {
    let mut words = line.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or_default());
    cmd.args(words);
    cmd
}

/// Run quietly and return trimmed stdout; error if it cannot start or fails.
fn output(line: &str) -> Result<String> {
    let out = command(line)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run with inherited stdout/stderr so the user sees progress.
fn status(mut cmd: Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_release() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    #[test]
    fn parses_mounts() {
        let text = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n";
        let mounts: Vec<_> = parse_mounts(text).collect();
        assert_eq!(
            mounts,
            [
                ("/sys/fs/cgroup/unified", "cgroup2"),
                ("/sys/fs/bpf", "bpf")
            ]
        );
    }
}
