//! Where a pod of this node lives: its cgroup v2 directory and its network
//! namespace, found from the Pod's UID and IP as the API server reports them.
//!
//! The kubelet names each pod's cgroup after its UID; the pod's containers
//! live in child cgroups. Any of their processes leads to the pod's network
//! namespace (`<proc>/<pid>/ns/net`), but only one that is not the node's,
//! not the agent's, and that actually holds the pod's IP: a container process
//! can be in the pod's cgroup before it has joined the pod's namespace (the
//! runtime's init), and a hostNetwork pod has no namespace of its own.
//!
//! The agent may run in a container, with the host's `/proc` and cgroup
//! filesystem mounted elsewhere ([`HostRoots`]). It must share the host's PID
//! namespace (`cgroup.procs` lists PIDs as the reader sees them, the host's
//! `/proc` names them as the host does) and have `CAP_SYS_PTRACE`: opening
//! another user's `/proc/<pid>/ns/net`, or init's, takes it.
//!
//! Everything here blocks (filesystem, a short-lived thread per namespace
//! looked into): call it from `spawn_blocking` in async code.

use std::{
    collections::HashSet,
    fmt, fs,
    fs::File,
    io,
    net::Ipv4Addr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// How deep below the cgroup root the search for a pod's cgroup goes. The
/// kubelet's own layouts are 2 or 3 deep; kind's nested one is 4.
const SEARCH_DEPTH: usize = 5;

/// Where the host's filesystems are mounted, as the agent sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoots {
    /// The host's procfs (e.g. `/host/proc`).
    pub proc: PathBuf,
    /// The host's cgroup filesystem: the cgroup v2 hierarchy itself, or, on a
    /// hybrid host, the directory holding it as `unified/`.
    pub cgroup: PathBuf,
}

impl Default for HostRoots {
    fn default() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// A network namespace's identity: the (device, inode) of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The namespace `file` (opened from `/proc/<pid>/ns/net` or a bind
    /// mount of it) stands for.
    pub fn of(file: &File) -> io::Result<Self> {
        let metadata = file.metadata()?;
        Ok(Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }

    /// The namespace the file at `path` stands for now.
    pub fn of_path(path: &Path) -> io::Result<Self> {
        Self::of(&File::open(path)?)
    }
}

/// A pod's place on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// The pod's cgroup v2 directory (its containers are in child cgroups).
    pub cgroup: PathBuf,
    /// `<proc>/<pid>/ns/net` of the pod's oldest process in its namespace,
    /// normally the sandbox ("pause") process, which lives as long as the
    /// pod. The path is only good while that process lives: open it soon and
    /// check the file against `netns_id`.
    pub netns: PathBuf,
    /// The process `netns` goes through (0: a namespace file the runtime
    /// reported, see [`locate_reported`]).
    pub pid: u32,
    /// The namespace found, to recognise it when opened again.
    pub netns_id: NsId,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The UID is used in paths, so anything but a UUID is refused.
    #[error("pod UID {uid:?} refused: {problem}")]
    InvalidUid { uid: String, problem: &'static str },
    #[error(
        "{} is not a cgroup v2 hierarchy: neither it nor its unified/ has cgroup.controllers",
        path.display()
    )]
    NotCgroupV2 { path: PathBuf },
    /// The pod's cgroup, processes or namespace are not there (yet): the
    /// kubelet and runtime create them while the pod starts.
    #[error("pod {uid}: not there yet: {problem}")]
    NotYet { uid: String, problem: String },
    /// The pod's processes have a namespace of their own, but none of those
    /// holds the pod's IP: the API's IP lags a sandbox recreation, or the pod
    /// is going away. Retrying after the next pod update settles it.
    #[error(
        "pod {uid}: no network namespace of its processes holds {pod_ip}: {}",
        Held(held)
    )]
    Mismatch {
        uid: String,
        pod_ip: Ipv4Addr,
        /// Each namespace looked into, and the IPv4 addresses it holds.
        held: Vec<(PathBuf, Vec<Ipv4Addr>)>,
    },
    #[error("pod {uid}: several cgroups bear its UID: {}", Paths(paths))]
    Ambiguous { uid: String, paths: Vec<PathBuf> },
    #[error(
        "pod {uid}: {} lists only processes outside this PID namespace: the agent must share the \
         host's PID namespace (hostPID)",
        path.display()
    )]
    ForeignPids { uid: String, path: PathBuf },
    #[error("pod {uid}: cannot {action} {}: {source}", path.display())]
    Io {
        uid: String,
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl SandboxError {
    /// Whether trying again later may succeed without anything else changing.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::NotYet { .. } | Self::Mismatch { .. })
    }
}

/// Finds the cgroup and network namespace of the pod `uid` (the Pod's
/// `metadata.uid`) whose IP is `pod_ip`.
pub fn locate(roots: &HostRoots, uid: &str, pod_ip: Ipv4Addr) -> Result<Sandbox, SandboxError> {
    locate_with(roots, uid, pod_ip, &roots.proc.join("1/ns/net"))
}

/// [`locate`], with the node's network namespace at `node_netns`.
fn locate_with(
    roots: &HostRoots,
    uid: &str,
    pod_ip: Ipv4Addr,
    node_netns: &Path,
) -> Result<Sandbox, SandboxError> {
    let uid = PodUid::parse(uid)?;
    let cgroup = cgroup_of(roots, &uid)?;
    let excluded = node_namespaces(&uid, node_netns)?;
    find_netns(&roots.proc, &uid, cgroup, pod_ip, &excluded, addresses_in)
}

/// The namespaces no pod's can be: the node's (at `node_netns`) and the
/// agent's. The agent runs in the node's network namespace (hostNetwork), so
/// its own is never skipped: a hostNetwork pod's processes hold the pod's IP
/// there, and that must not be taken for the pod's namespace. The host's
/// init process is checked too where it can be read; where it cannot (an
/// agent without CAP_SYS_PTRACE over it, or a lab whose "node" is itself a
/// namespace), the agent's own stands for the node's.
fn node_namespaces(uid: &PodUid, node_netns: &Path) -> Result<[NsId; 2], SandboxError> {
    let own = namespace_at(
        uid,
        "open the agent's network namespace",
        Path::new("/proc/self/ns/net"),
    )?;
    let node = match namespace_at(uid, "open the node's network namespace", node_netns) {
        Ok(node) => node,
        Err(SandboxError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            own
        }
        Err(error) => return Err(error),
    };
    Ok([node, own])
}

/// The sandbox the container runtime reported for the pod `uid` (through
/// the CNI plugin): its network namespace file `netns`, which must be a
/// network namespace, not the node's or the agent's, holding `pod_ip`. At
/// that moment the pod's cgroup exists (the kubelet makes it before asking
/// for the sandbox) but may hold no process yet (containerd starts the
/// sandbox process after the network is set up), so nothing is looked up
/// through processes.
pub fn locate_reported(
    roots: &HostRoots,
    uid: &str,
    pod_ip: Ipv4Addr,
    netns: &Path,
) -> Result<Sandbox, SandboxError> {
    let uid = PodUid::parse(uid)?;
    let cgroup = cgroup_of(roots, &uid)?;
    let file = File::open(netns).map_err(|e| io_error(&uid, "open", netns, e))?;
    let id = NsId::of(&file).map_err(|e| io_error(&uid, "inspect", netns, e))?;
    if node_namespaces(&uid, &roots.proc.join("1/ns/net"))?.contains(&id) {
        return Err(SandboxError::NotYet {
            uid: uid.to_string(),
            problem: format!("{} is the node's network namespace", netns.display()),
        });
    }
    // Entering it fails unless it is a network namespace.
    let held = addresses_in(&file).map_err(|e| io_error(&uid, "enter", netns, e))?;
    if !held.contains(&pod_ip) {
        return Err(SandboxError::Mismatch {
            uid: uid.to_string(),
            pod_ip,
            held: vec![(netns.to_owned(), held)],
        });
    }
    Ok(Sandbox {
        cgroup,
        netns: netns.to_owned(),
        pid: 0,
        netns_id: id,
    })
}

/// The cgroup v2 directory of the pod `uid`.
pub fn find_cgroup(roots: &HostRoots, uid: &str) -> Result<PathBuf, SandboxError> {
    cgroup_of(roots, &PodUid::parse(uid)?)
}

/// A pod UID known to be safe in a path: a UUID (`8-4-4-4-12` lowercase hex),
/// or the 32 hex digits the kubelet gives static pods.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodUid(String);

impl PodUid {
    fn parse(uid: &str) -> Result<Self, SandboxError> {
        let refuse = |problem| SandboxError::InvalidUid {
            uid: uid.to_owned(),
            problem,
        };
        if !uid
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'))
        {
            return Err(refuse("only lowercase hex digits and '-' may appear"));
        }
        let dashes: Vec<usize> = uid.match_indices('-').map(|(at, _)| at).collect();
        let shaped = match uid.len() {
            36 => dashes == [8, 13, 18, 23],
            32 => dashes.is_empty(),
            _ => false,
        };
        if !shaped {
            return Err(refuse(
                "not a UUID (8-4-4-4-12 hex digits) nor 32 hex digits",
            ));
        }
        Ok(Self(uid.to_owned()))
    }

    /// `pod<uid>`, as the cgroupfs driver names the pod's cgroup.
    fn cgroupfs_name(&self) -> String {
        format!("pod{}", self.0)
    }

    /// `pod<uid with '_' for '-'>`, as the systemd driver writes it inside
    /// slice names (where '-' means nesting).
    fn systemd_part(&self) -> String {
        format!("pod{}", self.0.replace('-', "_"))
    }

    /// Whether `name` is this pod's cgroup under either driver.
    fn names(&self, name: &str) -> bool {
        name == self.cgroupfs_name()
            || name
                .strip_suffix(".slice")
                .and_then(|stem| stem.strip_suffix(&self.systemd_part()))
                .is_some_and(|prefix| prefix.ends_with('-'))
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` is one of the kubelet's cgroups above pods: the systemd
/// driver's slices all say so, the cgroupfs driver's QoS classes do not.
fn is_kubelet_cgroup(name: &str) -> bool {
    name.contains("kubepods")
        || name.contains("kubelet")
        || name == "besteffort"
        || name == "burstable"
}

/// Whether `name` is some pod's cgroup: the search does not go into pods,
/// whose insides their containers may shape.
fn is_pod_cgroup(name: &str) -> bool {
    name.starts_with("pod") || name.contains("-pod")
}

/// The cgroup v2 hierarchy under `cgroup`: itself, or `unified/` on a hybrid
/// host.
fn cgroup_v2_root(cgroup: &Path) -> Result<PathBuf, SandboxError> {
    [cgroup.to_owned(), cgroup.join("unified")]
        .into_iter()
        .find(|root| root.join("cgroup.controllers").is_file())
        .ok_or_else(|| SandboxError::NotCgroupV2 {
            path: cgroup.to_owned(),
        })
}

fn cgroup_of(roots: &HostRoots, uid: &PodUid) -> Result<PathBuf, SandboxError> {
    let root = cgroup_v2_root(&roots.cgroup)?;
    let (fs, sd) = (uid.cgroupfs_name(), uid.systemd_part());
    let direct = [
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-{sd}.slice"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{sd}.slice"),
        format!("kubepods.slice/kubepods-{sd}.slice"),
        format!("kubepods/besteffort/{fs}"),
        format!("kubepods/burstable/{fs}"),
        format!("kubepods/{fs}"),
    ]
    .map(|relative| root.join(relative));
    let mut found = Vec::new();
    for path in &direct {
        match fs::symlink_metadata(path) {
            Ok(metadata) if metadata.is_dir() => found.push(path.clone()),
            Ok(_) => {}
            Err(e) if vanished(&e) => {}
            Err(source) => return Err(io_error(uid, "look at", path, source)),
        }
    }
    if found.is_empty() {
        found = search(&root, uid)?;
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(SandboxError::NotYet {
            uid: uid.to_string(),
            problem: format!(
                "no cgroup: none of {} exists, nor a cgroup named after the pod within {} \
                 levels of {}, under the kubelet's cgroups",
                Paths(&direct),
                SEARCH_DEPTH,
                root.display()
            ),
        }),
        _ => Err(SandboxError::Ambiguous {
            uid: uid.to_string(),
            paths: found,
        }),
    }
}

/// Breadth-first, at most `SEARCH_DEPTH` deep, into the root's children
/// (`--cgroup-root`) and below them only into the kubelet's cgroups, never
/// into pods.
fn search(root: &Path, uid: &PodUid) -> Result<Vec<PathBuf>, SandboxError> {
    let mut found = Vec::new();
    let mut level = vec![root.to_owned()];
    for depth in 1..=SEARCH_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            let entries = match fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if vanished(&e) => continue,
                Err(source) => return Err(io_error(uid, "list", dir, source)),
            };
            for entry in entries {
                let entry = entry.map_err(|source| io_error(uid, "list", dir, source))?;
                // cgroupfs has no symlinks; a symlink here is not a cgroup.
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let name = entry.file_name();
                let Some(name) = name.to_str().filter(|_| is_dir) else {
                    continue;
                };
                if uid.names(name) {
                    found.push(entry.path());
                } else if !is_pod_cgroup(name) && (depth == 1 || is_kubelet_cgroup(name)) {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    found.sort();
    Ok(found)
}

/// Finds the network namespace of the pod in `cgroup` holding `pod_ip`,
/// through its processes' `<proc>/<pid>/ns/net`, oldest process first.
/// Namespaces in `excluded` (the node's, the agent's) are never taken;
/// `addresses` lists the IPv4 addresses a namespace holds.
fn find_netns(
    proc: &Path,
    uid: &PodUid,
    cgroup: PathBuf,
    pod_ip: Ipv4Addr,
    excluded: &[NsId],
    addresses: impl Fn(&File) -> io::Result<Vec<Ipv4Addr>>,
) -> Result<Sandbox, SandboxError> {
    let pids = processes(uid, &cgroup)?;
    let mut by_age = Vec::new();
    for &pid in &pids {
        let stat = proc.join(pid.to_string()).join("stat");
        match fs::read_to_string(&stat) {
            Ok(text) => {
                let started = start_time(&text).ok_or_else(|| {
                    let problem = io::Error::new(io::ErrorKind::InvalidData, "no start time");
                    io_error(uid, "read", &stat, problem)
                })?;
                by_age.push((started, pid));
            }
            Err(e) if vanished(&e) => {}
            Err(source) => return Err(io_error(uid, "read", &stat, source)),
        }
    }
    by_age.sort_unstable();

    let mut seen = HashSet::new();
    let mut held = Vec::new();
    let mut in_excluded = 0;
    let mut denied = None;
    for (_, pid) in by_age {
        let path = proc.join(pid.to_string()).join("ns/net");
        // The opened file, not the path, is inspected: the PID may be
        // reused meanwhile, but this file stays the namespace it was.
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if vanished(&e) => continue,
            // A process the agent may not inspect (another user's without
            // CAP_SYS_PTRACE, a non-dumpable one) must not hide the others.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied.get_or_insert((path, e));
                continue;
            }
            Err(source) => return Err(io_error(uid, "open", &path, source)),
        };
        let id = NsId::of(&file).map_err(|source| io_error(uid, "stat", &path, source))?;
        if excluded.contains(&id) {
            in_excluded += 1;
            continue;
        }
        if !seen.insert(id) {
            continue;
        }
        let ips = addresses(&file)
            .map_err(|source| io_error(uid, "list the addresses of", &path, source))?;
        if ips.contains(&pod_ip) {
            return Ok(Sandbox {
                cgroup,
                netns: path,
                pid,
                netns_id: id,
            });
        }
        held.push((path, ips));
    }

    if held.is_empty()
        && let Some((path, source)) = denied
    {
        return Err(io_error(uid, "open", &path, source));
    }
    let uid = uid.to_string();
    if !held.is_empty() {
        return Err(SandboxError::Mismatch { uid, pod_ip, held });
    }
    let problem = if in_excluded > 0 {
        format!(
            "the processes in {} and below are all in the node's or the agent's network namespace",
            cgroup.display()
        )
    } else {
        format!("no process in {} or below", cgroup.display())
    };
    Err(SandboxError::NotYet { uid, problem })
}

/// The PIDs in `cgroup` and its descendants. Cgroups that vanish meanwhile
/// (a container exiting) are skipped.
fn processes(uid: &PodUid, cgroup: &Path) -> Result<Vec<u32>, SandboxError> {
    let mut pids = Vec::new();
    let mut foreign = false;
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let procs = dir.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => {
                for line in text.lines() {
                    let pid: u32 = line.trim().parse().map_err(|_| {
                        let problem =
                            io::Error::new(io::ErrorKind::InvalidData, format!("bad PID {line:?}"));
                        io_error(uid, "read", &procs, problem)
                    })?;
                    // The kernel writes 0 for a process this PID namespace
                    // does not see.
                    if pid == 0 {
                        foreign = true;
                    } else {
                        pids.push(pid);
                    }
                }
            }
            Err(e) if vanished(&e) => continue,
            Err(source) => return Err(io_error(uid, "read", &procs, source)),
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if vanished(&e) => continue,
            Err(source) => return Err(io_error(uid, "list", &dir, source)),
        };
        for entry in entries {
            let entry = entry.map_err(|source| io_error(uid, "list", &dir, source))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    if pids.is_empty() && foreign {
        return Err(SandboxError::ForeignPids {
            uid: uid.to_string(),
            path: cgroup.to_owned(),
        });
    }
    Ok(pids)
}

/// A process's start time (clock ticks after boot), field 22 of
/// `/proc/<pid>/stat`; counted after the command name, which may hold
/// spaces and parentheses.
fn start_time(stat: &str) -> Option<u64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(19)?.parse().ok()
}

fn namespace_at(uid: &PodUid, action: &'static str, path: &Path) -> Result<NsId, SandboxError> {
    NsId::of_path(path).map_err(|source| io_error(uid, action, path, source))
}

/// The IPv4 addresses in the network namespace `netns`, listed from a thread
/// that joins it (joining changes only the calling thread's namespace).
fn addresses_in(netns: &File) -> io::Result<Vec<Ipv4Addr>> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("sandbox-netns".into())
            .spawn_scoped(scope, || {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)?;
                let addresses = nix::ifaddrs::getifaddrs()?
                    .filter_map(|ifa| Some(ifa.address?.as_sockaddr_in()?.ip()))
                    .collect();
                Ok(addresses)
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace's thread panicked")))
    })
}

/// Errors that mean the thing looked at is gone (or not yet there): a
/// process that exited, a cgroup removed.
fn vanished(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
        || matches!(error.raw_os_error(), Some(libc::ESRCH | libc::ENODEV))
}

fn io_error(uid: &PodUid, action: &'static str, path: &Path, source: io::Error) -> SandboxError {
    SandboxError::Io {
        uid: uid.to_string(),
        action,
        path: path.to_owned(),
        source,
    }
}

struct Paths<'a>(&'a [PathBuf]);

impl fmt::Display for Paths<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, path) in self.0.iter().enumerate() {
            let separator = if i == 0 { "" } else { ", " };
            write!(f, "{separator}{}", path.display())?;
        }
        Ok(())
    }
}

struct Held<'a>(&'a [(PathBuf, Vec<Ipv4Addr>)]);

impl fmt::Display for Held<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (path, ips)) in self.0.iter().enumerate() {
            let separator = if i == 0 { "" } else { "; " };
            let ips: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
            let ips = if ips.is_empty() {
                "no IPv4 address".to_owned()
            } else {
                ips.join(", ")
            };
            write!(f, "{separator}{} holds {ips}", path.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, os::unix::fs::symlink};

    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const UID_: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";
    const OTHER_UID_: &str = "11111111_2222_3333_4444_555555555555";

    /// A cgroup v2 root in a tempdir (just its `cgroup.controllers`).
    fn cgroup_root() -> (tempfile::TempDir, HostRoots) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.controllers"), "").unwrap();
        let roots = HostRoots {
            proc: dir.path().join("proc"),
            cgroup: dir.path().to_owned(),
        };
        (dir, roots)
    }

    fn mkdir(root: &Path, relative: &str) -> PathBuf {
        let path = root.join(relative);
        fs::create_dir_all(&path).unwrap();
        path
    }

    fn not_yet(result: Result<PathBuf, SandboxError>) -> String {
        match result {
            Err(e @ SandboxError::NotYet { .. }) => {
                assert!(e.is_transient());
                e.to_string()
            }
            other => panic!("expected NotYet, got {other:?}"),
        }
    }

    #[test]
    fn finds_each_kubelet_layout_directly() {
        let layouts = [
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
            format!("kubepods.slice/kubepods-pod{UID_}.slice"),
            format!("kubepods/besteffort/pod{UID}"),
            format!("kubepods/burstable/pod{UID}"),
            format!("kubepods/pod{UID}"),
        ];
        for layout in layouts {
            let (dir, roots) = cgroup_root();
            // Another pod beside it, which must not be taken.
            mkdir(
                dir.path(),
                &layout.replace(UID_, OTHER_UID_).replace(UID, "x"),
            );
            let pod = mkdir(dir.path(), &layout);
            assert_eq!(find_cgroup(&roots, UID).unwrap(), pod, "{layout}");
        }
    }

    #[test]
    fn finds_nested_layouts_by_searching() {
        let layouts = [
            // kind
            format!(
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{UID_}.slice"
            ),
            // --cgroup-root=/custom, cgroupfs driver
            format!("custom/kubepods/burstable/pod{UID}"),
            format!("custom/kubepods/pod{UID}"),
            // five levels deep
            format!("kubelet.slice/a-kubelet/kubepods/kubepods-x/kubepods-pod{UID_}.slice"),
        ];
        for layout in layouts {
            let (dir, roots) = cgroup_root();
            mkdir(dir.path(), "system.slice/containerd.service");
            let pod = mkdir(dir.path(), &layout);
            assert_eq!(find_cgroup(&roots, UID).unwrap(), pod, "{layout}");
        }
    }

    #[test]
    fn takes_cgroup_v2_from_unified_on_a_hybrid_host() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("unified")).unwrap();
        fs::write(dir.path().join("unified/cgroup.controllers"), "").unwrap();
        let pod = mkdir(dir.path(), &format!("unified/kubepods/pod{UID}"));
        let roots = HostRoots {
            proc: PathBuf::from("/proc"),
            cgroup: dir.path().to_owned(),
        };
        assert_eq!(find_cgroup(&roots, UID).unwrap(), pod);
    }

    #[test]
    fn refuses_a_root_that_is_not_cgroup_v2() {
        let dir = tempfile::tempdir().unwrap();
        mkdir(dir.path(), &format!("kubepods/pod{UID}"));
        let roots = HostRoots {
            proc: PathBuf::from("/proc"),
            cgroup: dir.path().to_owned(),
        };
        let err = find_cgroup(&roots, UID).unwrap_err();
        assert!(matches!(err, SandboxError::NotCgroupV2 { .. }), "{err:?}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn a_missing_pod_is_not_there_yet() {
        let (dir, roots) = cgroup_root();
        mkdir(
            dir.path(),
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{OTHER_UID_}.slice"
            ),
        );
        let message = not_yet(find_cgroup(&roots, UID));
        assert!(message.contains(UID), "{message}");
        assert!(message.contains("no cgroup"), "{message}");
        assert!(
            message.contains(&dir.path().join("kubepods/pod").display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn the_search_stays_within_its_bounds() {
        // Too deep, or under a directory not named after kubepods or the
        // kubelet, or inside another pod (whose containers may shape it).
        let layouts = [
            format!(
                "kubelet.slice/kubelet-a/kubelet-b/kubelet-c/kubelet-d/kubepods-pod{UID_}.slice"
            ),
            format!("system.slice/docker.scope/kubepods/pod{UID}"),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{OTHER_UID_}.slice/\
                 kubepods-x/kubepods-besteffort-pod{UID_}.slice"
            ),
        ];
        for layout in layouts {
            let (dir, roots) = cgroup_root();
            mkdir(dir.path(), &layout);
            not_yet(find_cgroup(&roots, UID));
        }
    }

    #[test]
    fn a_symlink_is_not_a_cgroup() {
        let (dir, roots) = cgroup_root();
        let elsewhere = tempfile::tempdir().unwrap();
        mkdir(dir.path(), "kubepods");
        symlink(
            elsewhere.path(),
            dir.path().join(format!("kubepods/pod{UID}")),
        )
        .unwrap();
        not_yet(find_cgroup(&roots, UID));
    }

    #[test]
    fn two_cgroups_for_one_pod_are_refused() {
        let (dir, roots) = cgroup_root();
        let a = mkdir(dir.path(), &format!("kubepods/besteffort/pod{UID}"));
        let b = mkdir(dir.path(), &format!("kubepods/burstable/pod{UID}"));
        match find_cgroup(&roots, UID).unwrap_err() {
            SandboxError::Ambiguous { uid, paths } => {
                assert_eq!(uid, UID);
                assert_eq!(paths, [a, b]);
            }
            other => panic!("expected Ambiguous, got {other:?}"),
        }
    }

    #[test]
    fn uids_that_are_not_uuids_are_refused() {
        let (dir, roots) = cgroup_root();
        // Something a traversal would reach, were it attempted.
        mkdir(dir.path(), "kubepods/pod");
        let refused = [
            "",
            "../../../../etc",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0/../x",
            "../0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1",
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0",
            "0f1e2d3c-4b5a-6978-8796a-5b4c3d2e1f0",
            "------------------------------------",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f00",
        ];
        for uid in refused {
            let err = find_cgroup(&roots, uid).unwrap_err();
            assert!(
                matches!(&err, SandboxError::InvalidUid { uid: u, .. } if u == uid),
                "{uid:?}: {err:?}"
            );
            assert!(!err.is_transient());
            assert!(err.to_string().contains(&format!("{uid:?}")), "{err}");
            let err = locate(&roots, uid, Ipv4Addr::new(10, 0, 0, 1)).unwrap_err();
            assert!(matches!(err, SandboxError::InvalidUid { .. }), "{err:?}");
        }
        // A static pod's UID (an MD5 in hex) is accepted.
        let static_uid = "6b2a1e0f9c8d7e6f5a4b3c2d1e0f9a8b";
        let pod = mkdir(dir.path(), &format!("kubepods/burstable/pod{static_uid}"));
        assert_eq!(find_cgroup(&roots, static_uid).unwrap(), pod);
    }

    /// A fake procfs: each process has a `stat` (with its start time) and an
    /// `ns/net` file whose content is the addresses its namespace holds;
    /// processes of one namespace share the file (a hard link).
    struct FakeProc {
        root: PathBuf,
    }

    impl FakeProc {
        fn new(root: &Path) -> Self {
            let proc = Self {
                root: root.to_owned(),
            };
            proc.process(1, 1, "192.168.0.10");
            proc
        }

        /// A process in a namespace of its own holding `addresses`.
        fn process(&self, pid: u32, started: u64, addresses: &str) -> PathBuf {
            let ns = mkdir(&self.root, &format!("{pid}/ns")).join("net");
            fs::write(&ns, addresses).unwrap();
            self.stat(pid, started);
            ns
        }

        /// A process in the namespace of `with`.
        fn joining(&self, pid: u32, started: u64, with: u32) {
            let ns = mkdir(&self.root, &format!("{pid}/ns")).join("net");
            fs::hard_link(self.root.join(format!("{with}/ns/net")), ns).unwrap();
            self.stat(pid, started);
        }

        fn stat(&self, pid: u32, started: u64) {
            // A command name with spaces and a parenthesis, as programs may
            // choose; fields 3 to 21 are filler, 22 is the start time.
            let filler = vec!["0"; 18].join(" ");
            let stat = format!("{pid} (a) b) S {filler} {started} 0 0\n");
            fs::write(self.root.join(format!("{pid}/stat")), stat).unwrap();
        }

        fn host(&self) -> NsId {
            NsId::of(&File::open(self.root.join("1/ns/net")).unwrap()).unwrap()
        }
    }

    fn held_addresses(file: &File) -> io::Result<Vec<Ipv4Addr>> {
        let text = io::read_to_string(file)?;
        Ok(text
            .split_whitespace()
            .map(|ip| ip.parse().unwrap())
            .collect())
    }

    fn pod_cgroup(root: &Path, containers: &[(&str, &[u32])]) -> PathBuf {
        let pod = mkdir(root, &format!("kubepods/pod{UID}"));
        fs::write(pod.join("cgroup.procs"), "").unwrap();
        for (container, pids) in containers {
            let dir = mkdir(&pod, container);
            let procs: String = pids.iter().map(|pid| format!("{pid}\n")).collect();
            fs::write(dir.join("cgroup.procs"), procs).unwrap();
        }
        pod
    }

    fn uid() -> PodUid {
        PodUid::parse(UID).unwrap()
    }

    const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    #[test]
    fn takes_the_oldest_process_of_the_namespace_holding_the_ip() {
        let (dir, _) = cgroup_root();
        let proc = FakeProc::new(&dir.path().join("proc"));
        // The runtime's init, still in the node's namespace, oldest of all.
        proc.joining(100, 10, 1);
        // The sandbox and an application container in the pod's namespace.
        proc.process(300, 20, "127.0.0.1 10.244.1.5");
        proc.joining(200, 50, 300);
        // A container that made a namespace of its own, with two processes
        // older than the sandbox (as if the runtime had reused PIDs).
        proc.process(150, 15, "127.0.0.1 10.99.0.1");
        proc.joining(160, 16, 150);
        let pod = pod_cgroup(
            dir.path(),
            &[
                ("cri-containerd-init.scope", &[100]),
                ("cri-containerd-pause.scope", &[300]),
                ("cri-containerd-app.scope", &[200, 150, 160]),
                ("cri-containerd-app.scope/nested", &[999]), // vanished
            ],
        );
        let looked_into = Cell::new(0);
        let sandbox = find_netns(
            &proc.root,
            &uid(),
            pod.clone(),
            POD_IP,
            &[proc.host()],
            |f| {
                looked_into.set(looked_into.get() + 1);
                held_addresses(f)
            },
        )
        .unwrap();
        assert_eq!(sandbox.cgroup, pod);
        assert_eq!(sandbox.netns, proc.root.join("300/ns/net"));
        assert_eq!(sandbox.pid, 300);
        let expected = NsId::of(&File::open(proc.root.join("200/ns/net")).unwrap()).unwrap();
        assert_eq!(sandbox.netns_id, expected);
        // The node's namespace is never looked into, the other one once.
        assert_eq!(looked_into.get(), 2);
    }

    #[test]
    fn processes_only_in_excluded_namespaces_are_not_there_yet() {
        let (dir, _) = cgroup_root();
        let proc = FakeProc::new(&dir.path().join("proc"));
        proc.joining(100, 10, 1);
        let agent_ns = proc.process(101, 11, "10.244.1.5");
        let agent = NsId::of(&File::open(agent_ns).unwrap()).unwrap();
        let pod = pod_cgroup(dir.path(), &[("a", &[100]), ("b", &[101])]);
        let err = find_netns(
            &proc.root,
            &uid(),
            pod.clone(),
            POD_IP,
            &[proc.host(), agent],
            |_| panic!("an excluded namespace was looked into"),
        )
        .unwrap_err();
        assert!(matches!(err, SandboxError::NotYet { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(UID), "{message}");
        assert!(message.contains("node's or the agent's"), "{message}");
        assert!(message.contains(&pod.display().to_string()), "{message}");
    }

    #[test]
    fn a_pod_without_processes_is_not_there_yet() {
        let (dir, _) = cgroup_root();
        let proc = FakeProc::new(&dir.path().join("proc"));
        // Listed, but gone before its stat was read.
        let pod = pod_cgroup(dir.path(), &[("cri-containerd-pause.scope", &[4242])]);
        let err = find_netns(
            &proc.root,
            &uid(),
            pod,
            POD_IP,
            &[proc.host()],
            held_addresses,
        )
        .unwrap_err();
        assert!(matches!(err, SandboxError::NotYet { .. }), "{err:?}");
        assert!(err.to_string().contains("no process"), "{err}");
    }

    #[test]
    fn a_namespace_without_the_pod_ip_is_a_mismatch() {
        let (dir, _) = cgroup_root();
        let proc = FakeProc::new(&dir.path().join("proc"));
        let ns = proc.process(300, 20, "127.0.0.1 10.244.1.6");
        let pod = pod_cgroup(dir.path(), &[("pause", &[300])]);
        let err = find_netns(
            &proc.root,
            &uid(),
            pod,
            POD_IP,
            &[proc.host()],
            held_addresses,
        )
        .unwrap_err();
        assert!(err.is_transient());
        match &err {
            SandboxError::Mismatch { uid, pod_ip, held } => {
                assert_eq!(uid, UID);
                assert_eq!(*pod_ip, POD_IP);
                let expected = vec![Ipv4Addr::LOCALHOST, Ipv4Addr::new(10, 244, 1, 6)];
                assert_eq!(held, &[(ns.clone(), expected)]);
            }
            other => panic!("expected Mismatch, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("10.244.1.6") && message.contains("10.244.1.5"),
            "{message}"
        );
        assert!(message.contains(&ns.display().to_string()), "{message}");
    }

    #[test]
    fn pids_from_another_pid_namespace_are_explained() {
        let (dir, _) = cgroup_root();
        let proc = FakeProc::new(&dir.path().join("proc"));
        let pod = pod_cgroup(dir.path(), &[("pause", &[0]), ("app", &[0, 0])]);
        let err = find_netns(
            &proc.root,
            &uid(),
            pod,
            POD_IP,
            &[proc.host()],
            held_addresses,
        )
        .unwrap_err();
        assert!(matches!(err, SandboxError::ForeignPids { .. }), "{err:?}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains("hostPID"), "{err}");
    }

    #[test]
    fn reads_the_start_time_after_the_command_name() {
        let filler = vec!["7"; 18].join(" ");
        assert_eq!(
            start_time(&format!("12 (x) (y z) R {filler} 98765 1 2")),
            Some(98765)
        );
        assert_eq!(start_time("12 (x) R 1 2"), None);
    }

    /// Real namespaces, processes and cgroups, cleaned up when dropped.
    #[derive(Default)]
    struct Lab {
        children: Vec<std::process::Child>,
        /// In creation order; removed in reverse.
        cgroups: Vec<PathBuf>,
        netns: Option<String>,
    }

    impl Lab {
        fn cgroup(&mut self, path: PathBuf) -> PathBuf {
            fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
            self.cgroups.push(path.clone());
            path
        }

        /// A `sleep` in `cgroup`, in the network namespace `netns` or in ours.
        fn process(&mut self, cgroup: &Path, netns: Option<&str>) -> u32 {
            let mut command = match netns {
                Some(name) => {
                    let mut ip = std::process::Command::new("ip");
                    // `ip netns exec` joins the namespace and execs: the PID
                    // becomes the sleep's.
                    ip.args(["netns", "exec", name, "sleep", "600"]);
                    ip
                }
                None => {
                    let mut sleep = std::process::Command::new("sleep");
                    sleep.arg("600");
                    sleep
                }
            };
            let child = command.spawn().expect("start sleep");
            let pid = child.id();
            self.children.push(child);
            fs::write(cgroup.join("cgroup.procs"), format!("{pid}\n"))
                .unwrap_or_else(|e| panic!("move {pid} to {}: {e}", cgroup.display()));
            pid
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for cgroup in self.cgroups.iter().rev() {
                if let Err(e) = fs::remove_dir(cgroup) {
                    eprintln!("cannot remove {}: {e}", cgroup.display());
                }
            }
            if let Some(name) = &self.netns {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", name])
                    .status();
            }
        }
    }

    fn ip(args: &[&str]) {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip {args:?}: {status}");
    }

    /// Where this machine mounts cgroup v2.
    fn cgroup2_mount() -> PathBuf {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
        mounts
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
            })
            .expect("no cgroup2 mount")
    }

    #[test]
    fn a_reported_sandbox_must_be_a_pods_network_namespace_holding_the_address() {
        let (dir, roots) = cgroup_root();
        let pod = mkdir(
            dir.path(),
            &format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ),
        );
        let ip = Ipv4Addr::new(10, 251, 0, 9);
        // The host's init is in the test's own namespace here.
        fs::create_dir_all(roots.proc.join("1/ns")).unwrap();
        symlink("/proc/self/ns/net", roots.proc.join("1/ns/net")).unwrap();
        // The agent's own (here: the node's) namespace is never a pod's.
        let error = locate_reported(&roots, UID, ip, Path::new("/proc/self/ns/net"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("is the node's network namespace"), "{error}");
        // A file that is no namespace at all cannot be entered.
        let plain = dir.path().join("not-a-namespace");
        fs::write(&plain, "").unwrap();
        let error = locate_reported(&roots, UID, ip, &plain).unwrap_err();
        assert!(
            matches!(
                &error,
                SandboxError::Io {
                    action: "enter",
                    ..
                }
            ),
            "{error}"
        );
        // No pod cgroup for the UID (yet): not there.
        fs::remove_dir(&pod).unwrap();
        assert!(
            locate_reported(&roots, UID, ip, &plain)
                .unwrap_err()
                .is_transient()
        );
        // A UID that is no UID never becomes a path.
        assert!(matches!(
            locate_reported(&roots, "../etc", ip, &plain),
            Err(SandboxError::InvalidUid { .. })
        ));
    }

    #[test]
    fn finds_a_real_pod_namespace_and_refuses_the_wrong_ones() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (network namespaces, cgroups)");
            return;
        }
        const OTHER_UID: &str = "22222222-3333-4444-5555-666666666666";
        let pod_ip = Ipv4Addr::new(10, 251, 0, 7);
        let tag = format!("warren-sandbox-test-{}", std::process::id());
        let mut lab = Lab::default();

        ip(&["netns", "add", &tag]);
        lab.netns = Some(tag.clone());
        ip(&["-n", &tag, "link", "set", "lo", "up"]);
        ip(&["-n", &tag, "addr", "add", "10.251.0.7/32", "dev", "lo"]);
        let netns_id = NsId::of(&File::open(format!("/run/netns/{tag}")).unwrap()).unwrap();

        // A cgroup of our own stands for the node's cgroup root.
        let root = lab.cgroup(cgroup2_mount().join(&tag));
        let slice = lab.cgroup(root.join("kubepods.slice"));
        let qos = lab.cgroup(slice.join("kubepods-besteffort.slice"));
        let pod = lab.cgroup(qos.join(format!("kubepods-besteffort-pod{UID_}.slice")));
        let init = lab.cgroup(pod.join("cri-containerd-init.scope"));
        let pause = lab.cgroup(pod.join("cri-containerd-pause.scope"));
        let cgroupfs = lab.cgroup(root.join("kubepods"));
        let host_pod = lab.cgroup(cgroupfs.join(format!("pod{OTHER_UID}")));
        let host_container = lab.cgroup(host_pod.join("c"));

        // In the pod's cgroup but the node's namespace, and older than the
        // pod's process.
        lab.process(&init, None);
        let pid = lab.process(&pause, Some(&tag));
        lab.process(&host_container, None);
        let ns_of_pid = || {
            File::open(format!("/proc/{pid}/ns/net"))
                .and_then(|file| NsId::of(&file))
                .ok()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while ns_of_pid() != Some(netns_id) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never joined {tag}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }

        let roots = HostRoots {
            proc: PathBuf::from("/proc"),
            cgroup: root.clone(),
        };
        // Where PID 1 is not ours to inspect (as in some VMs' init), the
        // node's namespace is the one we run in.
        let node_netns = match File::open("/proc/1/ns/net") {
            Ok(_) => Path::new("/proc/1/ns/net"),
            Err(e) => {
                eprintln!("/proc/1/ns/net: {e}; taking /proc/self/ns/net for the node's");
                Path::new("/proc/self/ns/net")
            }
        };
        let locate = |uid, pod_ip| locate_with(&roots, uid, pod_ip, node_netns);
        let sandbox = locate(UID, pod_ip).unwrap();
        assert_eq!(sandbox.cgroup, pod);
        assert_eq!(sandbox.netns, PathBuf::from(format!("/proc/{pid}/ns/net")));
        assert_eq!(sandbox.pid, pid);
        assert_eq!(sandbox.netns_id, netns_id);

        let err = locate(UID, Ipv4Addr::new(10, 251, 0, 8)).unwrap_err();
        assert!(matches!(err, SandboxError::Mismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("10.251.0.7"), "{err}");

        let err = locate(OTHER_UID, pod_ip).unwrap_err();
        assert!(matches!(err, SandboxError::NotYet { .. }), "{err:?}");
        assert!(err.to_string().contains("node's or the agent's"), "{err}");
    }
}
