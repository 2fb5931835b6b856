//! `cargo xtask vm`: warren's capture and ingress smoke tests on Debian 12's
//! own kernel (6.1, Debian's `linux-image-amd64`), under qemu.
//!
//! Nodes run many kernels, and the programs' verifier, helpers and attach
//! modes differ between them; this runs the agent where it is not developed.
//! The pieces:
//!
//! - An image, made once and kept under `target/vm/`: a bookworm root
//!   filesystem from debootstrap with the kernel package installed in it
//!   (which builds its initramfs there), as an ext4 file, and that kernel and
//!   initramfs beside it. Its PID 1 is a small script ([`STUB_INIT`]) that
//!   mounts the shared directory and runs the `init.sh` it finds there.
//! - A shared directory, `target/vm/share/`, made anew each run (9p): the
//!   agent, the CA and labpod, the end-to-end test binaries, the plan (which
//!   tests), `init.sh` (from `vm/init.sh`), and `results/`, which the VM fills.
//! - qemu boots the kernel with the image as a throwaway snapshot (every run
//!   starts from the same disk), KVM if it works here, else software
//!   emulation (TCG); it powers off when the tests are done.
//!
//! The agent is built in release: under emulation a debug agent is slower
//! than the tests' 10 s of patience for it.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// Debian's release the image is made of, and where from.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The package of the second kernel, from backports.
const BACKPORTS_KERNEL: &str = "linux-image-amd64";

/// What the image holds besides debootstrap's minimal base: the kernel (the
/// package installs initramfs-tools and kmod with it: modules load on
/// demand, veth, bridge, clsact, 9p), and what the tests run (ip, tcpdump),
/// bpftool to record what the kernel offers eBPF, procps for debugging.
const IMAGE_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "iproute2",
    "tcpdump",
    "kmod",
    "bpftool",
    "procps",
];

/// The image's PID 1. It only mounts the shared directory and hands over to
/// the `init.sh` there, so that what the VM does can change without making
/// the image again. It powers the VM off whatever happens.
const STUB_INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "warren-vm: init, up $(cut -d' ' -f1 /proc/uptime) s"
mkdir -p /mnt/warren
if modprobe 9pnet_virtio && modprobe 9p &&
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 warren /mnt/warren; then
    sh /mnt/warren/init.sh
else
    echo "warren-vm: cannot mount the shared directory"
fi
echo o > /proc/sysrq-trigger
sleep 60
"#;

/// Where the stub lives in the image, and so the kernel's `init=`.
const STUB_PATH: &str = "usr/local/sbin/warren-vm-init";

/// What runs in the VM, from the shared directory.
const INIT_SH: &str = include_str!("vm/init.sh");

/// The image's size as a file; sparse, about 700 MB of it used.
const IMAGE_BYTES: &str = "2G";
const MEMORY_MIB: u32 = 3072;
const CPUS: u32 = 2;

/// How long a kernel under KVM gets to reach its init before KVM is taken
/// for unusable here (on some nested hosts it spins without ever booting).
const KVM_PROBE: Duration = Duration::from_secs(45);

/// One end-to-end test run in the VM.
#[derive(Debug)]
struct Smoke {
    /// The test target, `tests/tests/<binary>.rs`.
    binary: &'static str,
    name: &'static str,
}

/// The smoke set: each of warren's programs, and each of its attach modes,
/// doing its job.
const SMOKE: &[Smoke] = &[
    // connect4 and sock_ops on pods' cgroups (bpf_link), the original
    // destination through the maps, HBONE, the eBPF log ring buffer.
    Smoke {
        binary: "capture",
        name: "captures_connections_to_other_nodes_and_to_the_same_node",
    },
    // Pinned links outlive the agent; the next one takes them over.
    Smoke {
        binary: "capture",
        name: "a_stopped_agent_leaves_its_pods_failing_closed_until_the_next_takes_over",
    },
    // Withdrawing a pod detaches its programs (before 6.6 its ingress
    // filter too, by name, in its namespace); enrolling it again attaches.
    Smoke {
        binary: "capture",
        name: "config_changes_withdraw_and_enroll_pods_while_running",
    },
    // connect6 with IPv4-mapped destinations.
    Smoke {
        binary: "capture",
        name: "ipv6_sockets_to_ipv4_mapped_addresses_are_captured_too",
    },
    // tc ingress: STRICT drops plaintext; cgroup_skb egress drops forged
    // sources; both counted in the per-CPU DROPS map.
    Smoke {
        binary: "drops",
        name: "refused_plaintext_and_forged_sources_are_counted_by_reason",
    },
    // tc ingress under each mode: STRICT drops, PERMISSIVE hands plaintext to
    // the agent (sockhash lookup, bpf_sk_assign), HBONE passes.
    Smoke {
        binary: "policy",
        name: "mtls_modes_decide_what_plaintext_gets_in",
    },
    // The ingress program stays attached and enforcing with no agent.
    Smoke {
        binary: "policy",
        name: "with_its_agent_killed_a_strict_pod_still_takes_no_plaintext",
    },
    // The fast path: sock_ops state callbacks, the FAST_EVENTS ring buffer,
    // ingress admitting recorded connections.
    Smoke {
        binary: "fast_path",
        name: "same_node_pods_connect_straight_with_the_bytes_both_ways_and_their_accounting",
    },
    // ... and after a restart: the next agent recognises the ingress
    // program it takes over as its own (by the tag of the pinned link's
    // program, or before 6.6 of the pinned program).
    Smoke {
        binary: "fast_path",
        name: "a_restarted_agent_keeps_what_policy_allows_and_cuts_what_it_refuses",
    },
];

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    /// KVM if it boots the kernel here, else TCG (the verdict is kept in target/vm/).
    Auto,
    Kvm,
    /// Software emulation: slower, works anywhere.
    Tcg,
}

#[derive(clap::Args)]
pub struct Args {
    /// Run only the smoke tests whose `binary::name` contains this (repeatable).
    #[arg(long = "test", value_name = "PATTERN")]
    tests: Vec<String>,
    /// How qemu runs the VM.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
    /// The kernel to boot, by version: 6.1 (Debian 12's own) or 6.12 (its
    /// backports); repeat to run the tests on each in turn.
    #[arg(long = "kernel", value_name = "VERSION", default_value = "6.1")]
    kernels: Vec<String>,
    /// Make the image (root filesystem, kernels) again, even if one is cached.
    #[arg(long)]
    rebuild_image: bool,
    /// Give up on the VM after this many minutes.
    #[arg(long, default_value_t = 60)]
    timeout_minutes: u64,
}

/// Host packages `cargo xtask vm` needs, with a file each one installs.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    // mkfs.ext4 -d (a file system made from a directory).
    ("e2fsprogs", "/usr/sbin/mkfs.ext4"),
];

/// Installs what the VM needs on the host (qemu, debootstrap), if missing.
pub fn setup(report: &mut crate::setup::Report) -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|&(package, _)| package)
        .collect();
    let all = || HOST_PACKAGES.iter().map(|(p, _)| *p).collect::<Vec<_>>();
    if missing.is_empty() {
        report.ok(format!("VM packages: {}", all().join(" ")));
        return Ok(());
    }
    report.action(format!(
        "installing Debian packages for `cargo xtask vm`: {}",
        missing.join(" ")
    ));
    status(Command::new("apt-get").arg("update"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

pub fn run(args: &Args) -> Result<()> {
    ensure!(
        is_root()?,
        "`cargo xtask vm` needs root (debootstrap, mkfs, the shared directory's files)"
    );
    let plan = plan(&args.tests)?;
    let mut report = crate::setup::Report::default();
    setup(&mut report)?;

    let dir = crate::workspace_root().join("target/vm");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image = Image::ensure(&dir, args.rebuild_image)?;
    let kernels = args
        .kernels
        .iter()
        .map(|version| image.kernel(version))
        .collect::<Result<Vec<_>>>()?;

    println!("\n== building the agent (release) and the end-to-end tests");
    let bin_dir = crate::build(crate::Profile::Release)?;
    let tests = test_binaries()?;

    let timeout = Duration::from_secs(args.timeout_minutes * 60);
    let mut failed = Vec::new();
    for kernel in kernels {
        let share = stage(&dir, &kernel.release, &bin_dir, &tests, &plan)?;
        let accel = choose_accel(args.accel, &dir);
        println!(
            "\n== booting Debian's kernel {} under qemu ({}), {} test(s)",
            kernel.release,
            accel.describe(),
            plan.len()
        );
        let boot = match boot(&image.root, kernel, &share, accel, timeout) {
            Err(BootError::KvmStuck) => {
                let why = format!(
                    "KVM did not bring the kernel to its init (within {} s, or qemu failed)",
                    KVM_PROBE.as_secs()
                );
                println!("vm: {why}; using software emulation (TCG) from now on");
                remember_kvm_unusable(&dir, &why);
                clear_results(&share)?;
                boot(&image.root, kernel, &share, Chosen::Tcg, timeout)
            }
            other => other,
        }
        .map_err(anyhow::Error::from)?;
        if let Err(e) = report_results(kernel, &share, &plan, &boot) {
            println!("vm: {e:#}");
            failed.push(kernel.release.clone());
        }
    }
    if !failed.is_empty() {
        bail!("smoke tests failed on kernel(s) {}", failed.join(", "));
    }
    Ok(())
}

fn is_root() -> Result<bool> {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .context("running id")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// The smoke tests `patterns` select (all of them for none), in order.
fn plan(patterns: &[String]) -> Result<Vec<&'static Smoke>> {
    let chosen: Vec<&Smoke> = SMOKE
        .iter()
        .filter(|t| {
            let id = format!("{}::{}", t.binary, t.name);
            patterns.is_empty() || patterns.iter().any(|p| id.contains(p.as_str()))
        })
        .collect();
    if chosen.is_empty() {
        let all: Vec<String> = SMOKE
            .iter()
            .map(|t| format!("{}::{}", t.binary, t.name))
            .collect();
        bail!(
            "no smoke test matches {patterns:?}; they are:\n  {}",
            all.join("\n  ")
        );
    }
    Ok(chosen)
}

/// The cached image: the root file system and the kernels that boot it.
struct Image {
    root: PathBuf,
    kernels: Vec<Kernel>,
}

/// A kernel and its initramfs, copied out of the image.
struct Kernel {
    /// `uname -r`: "6.1.0-50-amd64".
    release: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

impl Kernel {
    fn at(dir: &Path, release: &str) -> Self {
        Kernel {
            release: release.to_owned(),
            vmlinuz: dir.join(format!("vmlinuz-{release}")),
            initrd: dir.join(format!("initrd.img-{release}")),
        }
    }

    /// "6.1" of "6.1.0-50-amd64", "6.12" of "6.12.95+deb12-amd64".
    fn version(&self) -> String {
        major_minor(&self.release)
    }
}

fn major_minor(release: &str) -> String {
    release.split('.').take(2).collect::<Vec<_>>().join(".")
}

impl Image {
    /// What the image is made of; a cached image made of anything else is
    /// made again.
    fn recipe() -> String {
        format!(
            "suite {SUITE}\npackages {}\nbackports kernel {BACKPORTS_KERNEL}\nstub:\n{STUB_INIT}",
            IMAGE_PACKAGES.join(",")
        )
    }

    fn ensure(dir: &Path, rebuild: bool) -> Result<Self> {
        let stamp = dir.join("image.recipe");
        let releases_file = dir.join("kernel.releases");
        let cached = || -> Option<Image> {
            if fs::read_to_string(&stamp).ok()? != Self::recipe() {
                return None;
            }
            let releases = fs::read_to_string(&releases_file).ok()?;
            let image = Image::at(dir, releases.split_whitespace());
            let present = image.root.exists()
                && !image.kernels.is_empty()
                && (image.kernels.iter()).all(|k| k.vmlinuz.exists() && k.initrd.exists());
            present.then_some(image)
        };
        if !rebuild && let Some(image) = cached() {
            println!(
                "vm: cached image: Debian {SUITE}, kernels {}; {}",
                image.releases(),
                image.sizes()
            );
            return Ok(image);
        }
        let _ = fs::remove_file(&stamp);
        let started = Instant::now();
        let releases = make_image(dir)?;
        fs::write(&releases_file, releases.join("\n") + "\n")?;
        fs::write(&stamp, Self::recipe())?;
        let image = Image::at(dir, releases.iter().map(String::as_str));
        println!(
            "vm: image made in {} s: Debian {SUITE}, kernels {}; {}",
            started.elapsed().as_secs(),
            image.releases(),
            image.sizes()
        );
        Ok(image)
    }

    fn at<'a>(dir: &Path, releases: impl Iterator<Item = &'a str>) -> Self {
        Image {
            root: dir.join("root.ext4"),
            kernels: releases.map(|r| Kernel::at(dir, r)).collect(),
        }
    }

    fn releases(&self) -> String {
        let names: Vec<&str> = self.kernels.iter().map(|k| k.release.as_str()).collect();
        names.join(", ")
    }

    /// The kernel of `version` ("6.1").
    fn kernel(&self, version: &str) -> Result<&Kernel> {
        self.kernels
            .iter()
            .find(|k| k.version() == version)
            .with_context(|| {
                let versions: Vec<String> = self.kernels.iter().map(Kernel::version).collect();
                format!(
                    "no kernel {version} in the image; it has {}",
                    versions.join(", ")
                )
            })
    }

    /// "root.ext4 930 MB on disk (2148 MB sparse), kernels and initramfs 95 MB".
    fn sizes(&self) -> String {
        let on_disk = |p: &Path| fs::metadata(p).map_or(0, |m| m.blocks() * 512);
        let len = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
        let boot: u64 = (self.kernels.iter())
            .map(|k| len(&k.vmlinuz) + len(&k.initrd))
            .sum();
        format!(
            "root.ext4 {} on disk ({} sparse), kernels and initramfs {}",
            megabytes(on_disk(&self.root)),
            megabytes(len(&self.root)),
            megabytes(boot)
        )
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{} MB", bytes.div_ceil(1_000_000))
}

/// debootstrap, the backports kernel, the stub, then the ext4 file and the
/// kernels beside it; the directory tree goes once it is in the file.
/// Returns the kernels' releases.
fn make_image(dir: &Path) -> Result<Vec<String>> {
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        // A debootstrap that was interrupted: start over.
        fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    println!(
        "vm: making the image: debootstrap {SUITE} with {} (about 2 minutes)",
        IMAGE_PACKAGES.join(" ")
    );
    status(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", IMAGE_PACKAGES.join(",")))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(MIRROR),
    )
    .context("debootstrap (are Debian's mirrors reachable?)")?;
    add_backports_kernel(&rootfs)?;

    let stub = rootfs.join(STUB_PATH);
    fs::write(&stub, STUB_INIT)?;
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755))?;
    // The packages' archives and lists are not needed to run.
    for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(rootfs.join(cache))? {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path)?;
            }
        }
    }

    let boot = rootfs.join("boot");
    let mut releases: Vec<String> = fs::read_dir(&boot)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    releases.sort();
    ensure!(!releases.is_empty(), "no vmlinuz-* in {}", boot.display());
    for release in &releases {
        for file in [
            format!("vmlinuz-{release}"),
            format!("initrd.img-{release}"),
        ] {
            fs::copy(boot.join(&file), dir.join(&file))
                .with_context(|| format!("copying {file} out of the image"))?;
        }
    }

    let root = dir.join("root.ext4");
    let _ = fs::remove_file(&root);
    status(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "warren-vm", "-d"])
            .arg(&rootfs)
            .arg(&root)
            .arg(IMAGE_BYTES),
    )?;
    fs::remove_dir_all(&rootfs)?;
    Ok(releases)
}

/// Debian 12's newer kernel (6.12 when this was written), from its
/// backports, installed beside its own: a second data point between 6.1 and
/// the kernels warren is developed on. The kernel package's postinst makes
/// its initramfs, in the chroot.
fn add_backports_kernel(rootfs: &Path) -> Result<()> {
    println!("vm: adding {BACKPORTS_KERNEL} from {SUITE}-backports");
    fs::write(
        rootfs.join("etc/apt/sources.list.d/backports.list"),
        format!("deb {MIRROR} {SUITE}-backports main\n"),
    )?;
    let _mounts = ChrootMounts::new(rootfs)?;
    status(
        Command::new("chroot")
            .arg(rootfs)
            .args(["sh", "-c"])
            .arg(format!(
                "apt-get update -q && apt-get install -y -q --no-install-recommends \
                 -t {SUITE}-backports {BACKPORTS_KERNEL}"
            ))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing the backports kernel")
}

/// /proc, /sys and /dev bound into a chroot for as long as this lives.
struct ChrootMounts(Vec<PathBuf>);

impl ChrootMounts {
    fn new(rootfs: &Path) -> Result<Self> {
        let mut mounted = ChrootMounts(Vec::new());
        for fs in ["proc", "sys", "dev"] {
            let target = rootfs.join(fs);
            status(
                Command::new("mount")
                    .arg("--bind")
                    .arg(format!("/{fs}"))
                    .arg(&target),
            )?;
            mounted.0.push(target);
        }
        Ok(mounted)
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = Command::new("umount").arg("--lazy").arg(target).status();
        }
    }
}

/// The end-to-end test binaries the plan needs, by target name, built if
/// stale (`cargo test --no-run` names each executable).
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "test",
            "-p",
            "warren-tests",
            "--tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the end-to-end tests failed ({})",
        out.status
    );
    let found = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| {
            let name = m["target"]["name"].as_str()?.to_owned();
            Some((name, PathBuf::from(m["executable"].as_str()?)))
        })
        .collect();
    Ok(found)
}

/// Lays out the shared directory for this run on kernel `release`
/// (`target/vm/runs/<release>/`); returns it.
fn stage(
    dir: &Path,
    release: &str,
    bin_dir: &Path,
    tests: &[(String, PathBuf)],
    plan: &[&Smoke],
) -> Result<PathBuf> {
    let share = dir.join("runs").join(release);
    if share.exists() {
        fs::remove_dir_all(&share).with_context(|| format!("clearing {}", share.display()))?;
    }
    for sub in ["bin", "tests", "results"] {
        fs::create_dir_all(share.join(sub))?;
    }
    for name in ["warren", "warren-ca", "labpod"] {
        link_or_copy(&bin_dir.join(name), &share.join("bin").join(name))?;
    }
    let mut lines = String::new();
    for smoke in plan {
        let staged = share.join("tests").join(smoke.binary);
        if !staged.exists() {
            let (_, built) = tests
                .iter()
                .find(|(name, _)| name == smoke.binary)
                .with_context(|| format!("cargo built no test binary {}", smoke.binary))?;
            link_or_copy(built, &staged)?;
        }
        lines.push_str(&format!("{} {}\n", smoke.binary, smoke.name));
    }
    fs::write(share.join("plan"), lines)?;
    fs::write(share.join("init.sh"), INIT_SH)?;
    Ok(share)
}

/// A hard link where possible (same file system, instant); a copy otherwise.
/// cargo replaces rather than rewrites its outputs, so a link keeps this
/// run's binary even if a build happens meanwhile.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn clear_results(share: &Path) -> Result<()> {
    let results = share.join("results");
    fs::remove_dir_all(&results)?;
    fs::create_dir_all(&results)?;
    Ok(())
}

/// The accelerator a run uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chosen {
    /// KVM, falling back to TCG if the kernel does not reach its init.
    KvmOrTcg,
    Kvm,
    Tcg,
}

impl Chosen {
    fn describe(self) -> &'static str {
        match self {
            Chosen::KvmOrTcg => "KVM, or TCG if KVM does not boot it",
            Chosen::Kvm => "KVM",
            Chosen::Tcg => "TCG, software emulation",
        }
    }
}

/// Where the finding that KVM does not work on this host is kept.
fn kvm_verdict(dir: &Path) -> PathBuf {
    dir.join("kvm-unusable")
}

fn host_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn remember_kvm_unusable(dir: &Path, why: &str) {
    let _ = fs::write(kvm_verdict(dir), format!("{}\n{why}\n", host_release()));
}

fn choose_accel(wanted: Accel, dir: &Path) -> Chosen {
    match wanted {
        Accel::Kvm => Chosen::Kvm,
        Accel::Tcg => Chosen::Tcg,
        Accel::Auto => {
            let usable = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            // Found unusable on this very host kernel before: not tried again.
            let known_bad = fs::read_to_string(kvm_verdict(dir))
                .is_ok_and(|v| v.lines().next() == Some(host_release().as_str()));
            if known_bad {
                println!(
                    "vm: KVM found unusable on this host before ({}); `--accel kvm` tries it anyway",
                    kvm_verdict(dir).display()
                );
            }
            if usable && !known_bad {
                Chosen::KvmOrTcg
            } else {
                Chosen::Tcg
            }
        }
    }
}

/// Why a boot gave no results.
#[derive(Debug)]
enum BootError {
    /// Under KVM the kernel did not reach its init in time, or qemu failed
    /// before it did (this machine's KVM once refused an MSR qemu sets, and
    /// qemu aborted): worth a try under TCG.
    KvmStuck,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for BootError {
    fn from(e: anyhow::Error) -> Self {
        BootError::Other(e)
    }
}

impl From<BootError> for anyhow::Error {
    fn from(e: BootError) -> Self {
        match e {
            BootError::Other(e) => e,
            BootError::KvmStuck => anyhow::anyhow!("under KVM the kernel did not reach its init"),
        }
    }
}

/// What a boot took.
struct Boot {
    accel: &'static str,
    /// From starting qemu to the kernel handing over to init.sh.
    to_init: Duration,
    /// From there to the VM powering off.
    tests: Duration,
}

/// Boots the VM, prints its "warren-vm:" lines as they come, keeps the whole
/// console in the run's `console.log`, and waits for it to power off.
fn boot(
    root: &Path,
    kernel: &Kernel,
    share: &Path,
    accel: Chosen,
    timeout: Duration,
) -> Result<Boot, BootError> {
    let console_path = share.join("console.log");
    let mut console = fs::File::create(&console_path)
        .with_context(|| format!("creating {}", console_path.display()))?;
    let mut qemu = Command::new("qemu-system-x86_64");
    match accel {
        Chosen::KvmOrTcg | Chosen::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        Chosen::Tcg => qemu.args(["-accel", "tcg"]),
    };
    qemu.args(["-m", &MEMORY_MIB.to_string(), "-smp", &CPUS.to_string()])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .arg("-append")
        .arg(format!(
            "root=/dev/vda rw console=ttyS0 init=/{STUB_PATH} panic=-1 quiet"
        ))
        // A snapshot: what the tests write never reaches the cached image.
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            root.display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=warren,security_model=none",
            share.display()
        ))
        .args(["-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu has no stdout")?;

    // The console, line by line, to the log and (its own lines) to a channel.
    let (lines, events) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let _ = console.write_all(&raw);
            let line = String::from_utf8_lossy(&raw);
            if let Some(at) = line.find("warren-vm:") {
                // Read on to the end even if nobody listens any more: qemu
                // must never block on a full pipe.
                let _ = lines.send(line[at..].trim_end().to_owned());
            }
        }
    });

    let mut to_init = None;
    let mut ended = Ended::PoweredOff;
    loop {
        let deadline = match (accel, to_init) {
            (Chosen::KvmOrTcg, None) => KVM_PROBE,
            _ => timeout,
        };
        let left = deadline.saturating_sub(started.elapsed());
        match events.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                if to_init.is_none() && line.starts_with("warren-vm: init") {
                    to_init = Some(started.elapsed());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ended = if accel == Chosen::KvmOrTcg && to_init.is_none() {
                    Ended::KvmStuck
                } else {
                    Ended::TimedOut
                };
                break;
            }
        }
    }
    if ended != Ended::PoweredOff {
        // Only the qemu this run started, by its pid.
        let _ = child.kill();
    }
    let _ = reader.join();
    let status = child.wait().context("waiting for qemu")?;
    match ended {
        Ended::KvmStuck => return Err(BootError::KvmStuck),
        Ended::TimedOut => {
            return Err(anyhow::anyhow!(
                "the VM was still running after {} minutes; console in {}",
                timeout.as_secs() / 60,
                console_path.display()
            )
            .into());
        }
        Ended::PoweredOff => {}
    }
    if !status.success() {
        if accel == Chosen::KvmOrTcg && to_init.is_none() {
            println!("vm: qemu failed under KVM before the kernel's init ({status})");
            return Err(BootError::KvmStuck);
        }
        return Err(anyhow::anyhow!(
            "qemu failed ({status}); console in {}",
            console_path.display()
        )
        .into());
    }
    let Some(to_init) = to_init else {
        return Err(anyhow::anyhow!(
            "the VM stopped before its init ran; console in {}",
            console_path.display()
        )
        .into());
    };
    Ok(Boot {
        accel: match accel {
            Chosen::Tcg => "TCG",
            _ => "KVM",
        },
        to_init,
        tests: started.elapsed().saturating_sub(to_init),
    })
}

/// How a VM's run ended.
#[derive(PartialEq, Eq)]
enum Ended {
    PoweredOff,
    KvmStuck,
    TimedOut,
}

/// One test's outcome as the VM recorded it.
enum Outcome {
    Passed(u64),
    Failed(u64),
    NotRun,
}

/// Prints each test's result, and why a failed one failed; errors if any
/// did not pass.
fn report_results(kernel: &Kernel, share: &Path, plan: &[&Smoke], boot: &Boot) -> Result<()> {
    let results = share.join("results");
    let running = fs::read_to_string(results.join("kernel"))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| kernel.release.clone());
    println!("\n== results on kernel {running} ({})", boot.accel);
    let (mut passed, mut failed) = (0, 0);
    for smoke in plan {
        let stem = format!("{}.{}", smoke.binary, smoke.name);
        let outcome = match fs::read_to_string(results.join(format!("{stem}.status"))) {
            Ok(text) => {
                let mut words = text.split_whitespace();
                let status = words.next().unwrap_or("?");
                let seconds = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                if status == "0" {
                    Outcome::Passed(seconds)
                } else {
                    Outcome::Failed(seconds)
                }
            }
            Err(_) => Outcome::NotRun,
        };
        let id = format!("{}::{}", smoke.binary, smoke.name);
        match outcome {
            Outcome::Passed(s) => {
                passed += 1;
                println!("vm: {id} ... ok ({s} s)");
            }
            Outcome::Failed(s) => {
                failed += 1;
                println!("vm: {id} ... FAILED ({s} s)");
                let log = results.join(format!("{stem}.log"));
                for reason in failure_reasons(&log) {
                    println!("      {reason}");
                }
                println!("      log: {}", log.display());
            }
            Outcome::NotRun => {
                failed += 1;
                println!("vm: {id} ... NOT RUN (the VM stopped before it)");
            }
        }
    }
    println!(
        "vm: boot to init {:.1} s, tests {:.0} s; console in {}, results in {}",
        boot.to_init.as_secs_f64(),
        boot.tests.as_secs_f64(),
        share.join("console.log").display(),
        results.display()
    );
    println!("vm: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} smoke test(s) failed on kernel {running}");
    }
    Ok(())
}

/// The lines that say why a test failed: its panic message and the agent's
/// errors (a verifier's refusal arrives as one).
fn failure_reasons(log: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(log) else {
        return vec!["(no log)".into()];
    };
    let clip = |s: &str| {
        let s = s.trim();
        match s.char_indices().nth(400) {
            Some((at, _)) => format!("{}...", &s[..at]),
            None => s.to_owned(),
        }
    };
    let mut reasons = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.contains("panicked at") {
            reasons.push(clip(line));
            if let Some(next) = lines.next() {
                reasons.push(clip(next));
            }
        } else if line.contains(r#""level":"ERROR""#) {
            // The agent's JSON log: its message and error fields.
            let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            let message = value["message"].as_str().unwrap_or("");
            let error = value["error"].as_str().unwrap_or("");
            // A verifier's log is long; its refusal is in its last lines,
            // before the statistics.
            match error.split_once("Verifier output:") {
                Some((what, log)) => {
                    reasons.push(clip(&format!("agent: {message}: {what}")));
                    let refusal: Vec<&str> = log
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .filter(|l| {
                            !["verification time", "stack depth", "processed "]
                                .iter()
                                .any(|stat| l.starts_with(stat))
                        })
                        .collect();
                    let last = &refusal[refusal.len().saturating_sub(2)..];
                    reasons.extend(last.iter().map(|l| clip(&format!("verifier: {l}"))));
                }
                None => reasons.push(clip(&format!("agent: {message}: {error}"))),
            }
        }
    }
    reasons.dedup();
    reasons.truncate(8);
    reasons
}

/// Runs a command with inherited output; errors if it fails.
fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_pick_smoke_tests_and_an_unknown_one_lists_them() {
        assert_eq!(plan(&[]).unwrap().len(), SMOKE.len());
        let picked = plan(&["policy::".into()]).unwrap();
        assert!(picked.iter().all(|t| t.binary == "policy"));
        assert_eq!(picked.len(), 2);
        let err = plan(&["no_such_test".into()]).unwrap_err().to_string();
        assert!(err.contains("no smoke test matches"), "{err}");
        assert!(err.contains("drops::refused_plaintext"), "{err}");
    }

    #[test]
    fn failure_reasons_give_the_panic_and_the_agents_error() {
        let dir = std::env::temp_dir().join(format!("xtask-vm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("t.log");
        let agent_line = serde_json::json!({
            "level": "ERROR",
            "message": "warren agent failed",
            "error": "eBPF program warren_egress: load failed. Verifier output: 0: R1=ctx()\n\
                      6: (85) call bpf_get_netns_cookie#122\nunknown func bpf_get_netns_cookie#122\n\
                      verification time 643 usec\nstack depth 0\nprocessed 7 insns\n",
        });
        fs::write(
            &log,
            format!(
                "running 1 test\nthread 't' panicked at tests/tests/capture.rs:39:71:\n\
                 agent start: agent on node-1 exited\n{agent_line}\nStack backtrace:\n"
            ),
        )
        .unwrap();
        let reasons = failure_reasons(&log);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            reasons,
            [
                "thread 't' panicked at tests/tests/capture.rs:39:71:",
                "agent start: agent on node-1 exited",
                "agent: warren agent failed: eBPF program warren_egress: load failed.",
                "verifier: 6: (85) call bpf_get_netns_cookie#122",
                "verifier: unknown func bpf_get_netns_cookie#122",
            ]
        );
    }

    #[test]
    fn kernels_are_chosen_by_major_and_minor_version() {
        assert_eq!(major_minor("6.1.0-50-amd64"), "6.1");
        assert_eq!(major_minor("6.12.95+deb12-amd64"), "6.12");
        let image = Image::at(
            Path::new("/nowhere"),
            ["6.1.0-50-amd64", "6.12.95+deb12-amd64"].into_iter(),
        );
        assert_eq!(image.kernel("6.1").unwrap().release, "6.1.0-50-amd64");
        assert_eq!(image.kernel("6.12").unwrap().release, "6.12.95+deb12-amd64");
        let err = image.kernel("5.10").err().unwrap().to_string();
        assert!(err.contains("it has 6.1, 6.12"), "{err}");
    }

    #[test]
    fn the_recipe_changes_with_the_stub() {
        assert!(Image::recipe().contains("linux-image-amd64"));
        assert!(INIT_SH.contains("results"));
    }
}
