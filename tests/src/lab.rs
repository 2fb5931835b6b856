//! A Kubernetes-like lab built from kernel primitives.
//!
//! ```text
//!   wire netns {prefix}w: bridge br0 with ports n1, n2, ...
//!     |
//!   node netns {prefix}n{i}: eth0 10.10.0.{i}/24, ip_forward=1,
//!     |                      routes 10.244.{k}.0/24 via 10.10.0.{k} for the other nodes
//!     | p{j}: 10.244.{i}.1/32, route 10.244.{i}.{j+1}/32 dev p{j}
//!     |
//!   pod netns {prefix}n{i}p{j}: eth0 10.244.{i}.{j+1}/32,
//!                               10.244.{i}.1 dev eth0 scope link, default via 10.244.{i}.1
//! ```
//!
//! Every node and pod also gets a cgroup under `<cgroup2 mount>/warren-lab/{prefix}/`, so
//! that cgroup-attached programs see pod traffic as they would under a kubelet, and so that
//! teardown can kill whatever was started inside the lab.
//!
//! Pods can also come and go while the lab runs ([`Lab::add_pod`], for the stand-in
//! kubelet of [`crate::kubelet`]): same network layout, the next free address of the node,
//! and a cgroup laid out as a real kubelet's (systemd driver on odd nodes, cgroupfs on even
//! ones) under `{node name}-kubelet/`, with a "pause" process holding the sandbox.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sched::{CloneFlags, setns};
use serde::{Deserialize, Serialize};

const NETNS_DIR: &str = "/run/netns";
const STATE_DIR: &str = "/run/warren-lab";
const CGROUP_PARENT: &str = "warren-lab";
const TEST_PREFIX: &str = "wr";
const NAMED_PREFIX: &str = "wrm-";
const CGROUP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The shape of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
}

/// A running lab; dropping it tears everything down unless it was [`Lab::persist`]ed.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    spec: LabSpec,
    name: Option<String>,
    wire_netns: String,
    cgroup: PathBuf,
    nodes: Vec<Node>,
    persisted: bool,
    sandboxes: PodSandboxes,
}

#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based, as in the node's name and addresses.
    pub index: usize,
    pub name: String,
    pub netns: String,
    /// The node's address on the wire.
    pub ip: Ipv4Addr,
    pub pods: Vec<Pod>,
    /// A "system" cgroup for the node's daemons (the agent), not a pod's.
    pub cgroup: PathBuf,
    /// The prefix of the lab the node belongs to.
    pub lab: String,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    /// The name of the node hosting this pod.
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
}

impl Lab {
    /// Fresh lab with a unique prefix for this process and call (`wr{pid}t{counter}`), after
    /// sweeping leftovers of dead runs.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        log_sweep();
        let prefix = format!(
            "{TEST_PREFIX}{}t{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // A dead run that had our pid (pids get reused) may have left this very prefix behind,
        // and the sweep spares it because the pid looks alive.
        teardown(&prefix).context("removing a stale lab with our prefix")?;
        Lab::create(prefix, spec, None)
    }

    /// A named lab (prefix `wrm-{name}`) for people poking by hand; never swept. Call
    /// [`Lab::persist`] to keep it after this process exits.
    pub fn up_named(name: &str, spec: LabSpec) -> Result<Lab> {
        validate_name(name)?;
        log_sweep();
        let prefix = named_prefix(name);
        let leftovers = existing_objects(&prefix)?;
        ensure!(
            leftovers.is_empty(),
            "lab {name} already exists or left leftovers ({}); take it down first",
            leftovers.join(", ")
        );
        write_state(name, &spec)?;
        Lab::create(prefix, spec, Some(name.to_owned()))
    }

    /// Leaves the lab running after this value is gone. A named lab is then taken down with
    /// [`Lab::down_named`]; a lab from [`Lab::up`] is removed by the first sweep after this
    /// process exits.
    pub fn persist(mut self) {
        self.persisted = true;
    }

    /// Tears down a named lab, returning false if there was nothing to remove.
    pub fn down_named(name: &str) -> Result<bool> {
        validate_name(name)?;
        let removed = teardown(&named_prefix(name))?;
        let had_state = match fs::remove_file(state_path(name)) {
            Ok(()) => true,
            Err(err) if err.kind() == ErrorKind::NotFound => false,
            Err(err) => return Err(err).context("removing the lab's state file"),
        };
        Ok(had_state || !removed.is_empty())
    }

    /// Describes a named lab, or returns None if there is no trace of it.
    pub fn status_named(name: &str) -> Result<Option<String>> {
        validate_name(name)?;
        let prefix = named_prefix(name);
        let present = existing_objects(&prefix)?;
        let Some(spec) = read_state(name)? else {
            if present.is_empty() {
                return Ok(None);
            }
            return Ok(Some(format!(
                "lab {name}: no state file, but these leftovers exist:\n  {}\n",
                present.join("\n  ")
            )));
        };
        let lab = Lab::handle(name, spec)?;
        let mut text = lab.describe();
        let missing: Vec<String> = lab
            .netns_names()
            .into_iter()
            .filter(|netns| !present.contains(netns))
            .collect();
        if !missing.is_empty() {
            let _ = writeln!(text, "MISSING namespaces: {}", missing.join(", "));
        }
        Ok(Some(text))
    }

    /// A handle on a running named lab, to run things in it; dropping the
    /// handle leaves the lab up. None if there is no such lab.
    pub fn open_named(name: &str) -> Result<Option<Lab>> {
        validate_name(name)?;
        match read_state(name)? {
            Some(spec) => Ok(Some(Lab::handle(name, spec)?)),
            None => Ok(None),
        }
    }

    fn handle(name: &str, spec: LabSpec) -> Result<Lab> {
        let mut lab = Lab::plan(
            named_prefix(name),
            spec,
            Some(name.to_owned()),
            cgroup2_mount()?,
        );
        // Only a view: dropping it must not tear the real lab down.
        lab.persisted = true;
        Ok(lab)
    }

    /// Removes namespaces and cgroups (killing their processes) left by test runs whose
    /// process is dead. Returns what was removed.
    pub fn sweep_leftovers() -> Result<Vec<String>> {
        let mut candidates = BTreeSet::new();
        for netns in list_netns()? {
            if let Some((prefix, pid)) = test_prefix_of(&netns) {
                candidates.insert((prefix.to_owned(), pid));
            }
        }
        for dir in list_dirs(&cgroup2_mount()?.join(CGROUP_PARENT))? {
            if let Some((prefix, pid)) = test_prefix_of(&dir).filter(|(p, _)| *p == dir) {
                candidates.insert((prefix.to_owned(), pid));
            }
        }
        let mut removed = Vec::new();
        for (prefix, pid) in candidates {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                removed.extend(teardown(&prefix)?);
            }
        }
        Ok(removed)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn spec(&self) -> LabSpec {
        self.spec
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// 0-based.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// 0-based node and pod indexes.
    pub fn pod(&self, node: usize, pod: usize) -> &Pod {
        &self.nodes[node].pods[pod]
    }

    /// The pod called `name` (e.g. `n1p2`), on whichever node.
    pub fn pod_by_name(&self, name: &str) -> Option<&Pod> {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
    }

    /// The namespace holding the bridge that connects the nodes.
    pub fn wire_netns(&self) -> &str {
        &self.wire_netns
    }

    /// The cgroup holding every node and pod cgroup of this lab.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn describe(&self) -> String {
        let mut text = String::new();
        let name = match &self.name {
            Some(name) => format!(" ({name})"),
            None => String::new(),
        };
        let _ = writeln!(
            text,
            "lab {}{name}: {} nodes x {} pods, cgroup {}",
            self.prefix,
            self.spec.nodes,
            self.spec.pods_per_node,
            self.cgroup.display()
        );
        let _ = writeln!(
            text,
            "  wire    netns {}  bridge br0, 10.10.0.0/24",
            self.wire_netns
        );
        for node in &self.nodes {
            let _ = writeln!(
                text,
                "  {:<7} netns {}  eth0 {}  pods 10.244.{}.0/24",
                node.name, node.netns, node.ip, node.index
            );
            for pod in &node.pods {
                let _ = writeln!(
                    text,
                    "    {:<5} netns {}  eth0 {}",
                    pod.name, pod.netns, pod.ip
                );
            }
        }
        text
    }

    /// Lays out names and addresses without touching the system.
    fn plan(prefix: String, spec: LabSpec, name: Option<String>, cgroup2: PathBuf) -> Lab {
        let cgroup = cgroup2.join(CGROUP_PARENT).join(&prefix);
        let nodes: Vec<Node> = (1..=spec.nodes)
            .map(|i| {
                let node_name = format!("node-{i}");
                let pods = (1..=spec.pods_per_node)
                    .map(|j| {
                        let pod_name = format!("n{i}p{j}");
                        Pod {
                            netns: format!("{prefix}{pod_name}"),
                            ip: Ipv4Addr::new(10, 244, i as u8, (j + 1) as u8),
                            cgroup: cgroup.join(&pod_name),
                            node: node_name.clone(),
                            name: pod_name,
                        }
                    })
                    .collect();
                Node {
                    index: i,
                    lab: prefix.clone(),
                    netns: format!("{prefix}n{i}"),
                    ip: Ipv4Addr::new(10, 10, 0, i as u8),
                    pods,
                    cgroup: cgroup.join(&node_name),
                    name: node_name,
                }
            })
            .collect();
        let sandboxes = PodSandboxes {
            prefix: prefix.clone(),
            nodes: nodes.clone(),
            // Pods made at lab-up time hold .2 to .{pods_per_node + 1}.
            first_octet: (spec.pods_per_node + 2).min(255) as u8,
            state: Arc::default(),
            busy: Arc::default(),
        };
        Lab {
            wire_netns: format!("{prefix}w"),
            prefix,
            spec,
            name,
            cgroup,
            nodes,
            persisted: false,
            sandboxes,
        }
    }

    fn create(prefix: String, spec: LabSpec, name: Option<String>) -> Result<Lab> {
        // The last octets of node and pod addresses must fit, leaving .1 for pod gateways.
        ensure!(
            (1..=254).contains(&spec.nodes) && spec.pods_per_node <= 253,
            "unsupported lab shape {spec:?}: 1-254 nodes and up to 253 pods per node"
        );
        let lab = Lab::plan(prefix, spec, name, cgroup2_mount()?);
        // Dropping `lab` on an error below removes whatever was already built.
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        fs::create_dir_all(&self.cgroup)
            .with_context(|| format!("creating cgroup {}", self.cgroup.display()))?;
        let wire = &self.wire_netns;
        add_netns(wire)?;
        ip(wire, "link add br0 type bridge")?;
        ip(wire, "link set br0 up")?;

        for node in &self.nodes {
            let ns = &node.netns;
            fs::create_dir(&node.cgroup)
                .with_context(|| format!("creating cgroup {}", node.cgroup.display()))?;
            add_netns(ns)?;
            enable_forwarding(ns)?;
            let port = format!("n{}", node.index);
            ip(
                wire,
                &format!("link add {port} type veth peer name eth0 netns {ns}"),
            )?;
            ip(wire, &format!("link set {port} master br0 up"))?;
            ip(ns, &format!("addr add {}/24 dev eth0", node.ip))?;
            ip(ns, "link set eth0 up")?;
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                ip(
                    ns,
                    &format!("route add 10.244.{}.0/24 via {}", other.index, other.ip),
                )?;
            }
            for (j, pod) in (1..).zip(&node.pods) {
                self.build_pod(node, j, pod)?;
            }
        }
        Ok(())
    }

    fn build_pod(&self, node: &Node, j: usize, pod: &Pod) -> Result<()> {
        fs::create_dir(&pod.cgroup)
            .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
        build_pod_network(node, j, &pod.netns, pod.ip)
    }

    /// Makes a pod while the lab runs, as a kubelet would for a Pod scheduled on the node
    /// `node` (0-based, as in [`Lab::node`]): a netns `{prefix}n{i}p{j}` with the next free
    /// address 10.244.{i}.{j+1}, wired as the lab-up pods are, and a kubelet-shaped cgroup
    /// for `uid` and `qos` (`BestEffort`, `Burstable` or `Guaranteed`, as in the Pod's
    /// `status.qosClass`) under [`Node::kubelet_cgroup_root`], with a "pause" process in
    /// the netns and the container cgroup. The returned pod's `name` is `name`, its
    /// `cgroup` the container cgroup.
    pub fn add_pod(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        uid: &str,
        qos: &str,
    ) -> Result<Pod> {
        self.sandboxes.add(node, namespace, name, uid, qos)
    }

    /// Removes a pod made by [`Lab::add_pod`]: kills what runs in its pod cgroup, removes
    /// that cgroup and the netns, and frees its address.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.sandboxes.remove(pod)
    }

    /// A handle that adds and removes pods like [`Lab::add_pod`], for a task that cannot
    /// borrow the lab; it refuses new pods once the lab is dropped.
    pub(crate) fn sandboxes(&self) -> PodSandboxes {
        self.sandboxes.clone()
    }

    fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.wire_netns.clone()];
        for node in &self.nodes {
            names.push(node.netns.clone());
            names.extend(node.pods.iter().map(|pod| pod.netns.clone()));
        }
        names
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.persisted {
            return;
        }
        self.sandboxes.close();
        let teardown_result = teardown(&self.prefix);
        self.sandboxes.reap();
        if let Err(err) = teardown_result {
            eprintln!("warren-lab: tearing down {}: {err:#}", self.prefix);
            // Keep a named lab's state file so that `down_named` can retry.
            return;
        }
        let Some(name) = &self.name else {
            return;
        };
        if let Err(err) = fs::remove_file(state_path(name)) {
            eprintln!("warren-lab: removing the state of lab {name}: {err}");
        }
    }
}

impl Node {
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// A command that runs in this node's netns and its system cgroup.
    ///
    /// # Panics
    /// If the netns or cgroup is gone; see [`Node::try_command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program)
            .unwrap_or_else(|err| panic!("{err:#}"))
    }

    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        placed_command(program, Some(&self.netns_path()), &self.cgroup)
    }

    /// Where this node's kubelet would keep its pods' cgroups: `{lab cgroup}/{name}-kubelet`.
    pub fn kubelet_cgroup_root(&self) -> PathBuf {
        let lab_cgroup = self.cgroup.parent().unwrap_or(Path::new("/"));
        lab_cgroup.join(format!("{}-kubelet", self.name))
    }

    /// The cgroup driver this node's pretend kubelet uses: systemd on odd nodes (node-1),
    /// cgroupfs on even ones (node-2), so that a two-node lab has both layouts.
    pub fn cgroup_driver(&self) -> CgroupDriver {
        if self.index % 2 == 1 {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        }
    }
}

/// How a kubelet names its cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/
    /// cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/besteffort/pod<uid>/<id>`
    Cgroupfs,
}

/// A Pod's quality-of-service class, which picks its cgroup parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl std::str::FromStr for QosClass {
    type Err = anyhow::Error;

    /// The values of a Pod's `status.qosClass`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "Guaranteed" => Ok(QosClass::Guaranteed),
            "Burstable" => Ok(QosClass::Burstable),
            "BestEffort" => Ok(QosClass::BestEffort),
            _ => bail!("unknown QoS class {s:?}: Guaranteed, Burstable or BestEffort"),
        }
    }
}

/// The pod and container cgroups, relative to the kubelet's root, that a kubelet with
/// `driver` makes for a pod with `uid` and `qos`, and a container with id `container`.
pub fn kubelet_cgroup(
    driver: CgroupDriver,
    qos: QosClass,
    uid: &str,
    container: &str,
) -> (PathBuf, PathBuf) {
    let pod = match driver {
        CgroupDriver::Systemd => {
            // systemd slice names nest by prefix, and "-" separates levels, hence "_".
            let uid = uid.replace('-', "_");
            match qos {
                QosClass::Guaranteed => {
                    PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice"))
                }
                QosClass::Burstable | QosClass::BestEffort => {
                    let class = qos_dir(qos);
                    PathBuf::from(format!(
                        "kubepods.slice/kubepods-{class}.slice/kubepods-{class}-pod{uid}.slice"
                    ))
                }
            }
        }
        CgroupDriver::Cgroupfs => match qos {
            QosClass::Guaranteed => PathBuf::from(format!("kubepods/pod{uid}")),
            QosClass::Burstable | QosClass::BestEffort => {
                PathBuf::from(format!("kubepods/{}/pod{uid}", qos_dir(qos)))
            }
        },
    };
    let container = match driver {
        CgroupDriver::Systemd => pod.join(format!("cri-containerd-{container}.scope")),
        CgroupDriver::Cgroupfs => pod.join(container),
    };
    (pod, container)
}

fn qos_dir(qos: QosClass) -> &'static str {
    match qos {
        QosClass::Guaranteed => "guaranteed",
        QosClass::Burstable => "burstable",
        QosClass::BestEffort => "besteffort",
    }
}

/// Pods made while the lab runs; shared by the lab and whoever holds a handle.
#[derive(Debug, Clone)]
pub(crate) struct PodSandboxes {
    prefix: String,
    nodes: Vec<Node>,
    /// The lowest last octet a pod made after lab-up may take.
    first_octet: u8,
    state: Arc<Mutex<SandboxState>>,
    /// Held while a sandbox is made or removed, so that the lab's teardown waits for one
    /// in progress (a kubelet task dropped mid-way) instead of racing it.
    busy: Arc<Mutex<()>>,
}

#[derive(Debug, Default)]
struct SandboxState {
    /// Set when the lab goes: no sandbox may be made after its teardown.
    closed: bool,
    /// Per node index (1-based): the octets in use and where the next search starts.
    used: HashMap<usize, BTreeSet<u8>>,
    next: HashMap<usize, u8>,
    /// By netns name.
    sandboxes: HashMap<String, Sandbox>,
}

#[derive(Debug)]
struct Sandbox {
    node: usize,
    octet: u8,
    pod_cgroup: PathBuf,
    pause: Child,
}

impl PodSandboxes {
    pub(crate) fn add(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        uid: &str,
        qos: &str,
    ) -> Result<Pod> {
        let node = self
            .nodes
            .get(node)
            .with_context(|| format!("no node {node} (0-based) in lab {}", self.prefix))?;
        let qos: QosClass = qos.parse()?;
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        ensure!(
            !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "pod {namespace}/{name}: uid {uid:?} is not a Kubernetes UID"
        );
        let container_id = random_hex_64()?;
        let (pod_rel, container_rel) =
            kubelet_cgroup(node.cgroup_driver(), qos, uid, &container_id);
        let root = node.kubelet_cgroup_root();
        let (pod_cgroup, container_cgroup) = (root.join(pod_rel), root.join(container_rel));

        let octet = self.allocate(node.index)?;
        let j = usize::from(octet) - 1;
        let pod = Pod {
            name: name.to_owned(),
            node: node.name.clone(),
            netns: format!("{}n{}p{j}", self.prefix, node.index),
            ip: Ipv4Addr::new(10, 244, node.index as u8, octet),
            cgroup: container_cgroup,
        };
        let made = (|| -> Result<Child> {
            fs::create_dir_all(&pod.cgroup)
                .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
            build_pod_network(node, j, &pod.netns, pod.ip)?;
            // As a sandbox's pause container: something in the pod's cgroup and netns, from
            // which the pod's netns can be found.
            let pause = pod
                .try_command("sleep")?
                .arg("infinity")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the pause process")?;
            Ok(pause)
        })();
        let pause = match made {
            Ok(pause) => pause,
            Err(err) => {
                let _ = remove_sandbox_parts(&pod.netns, &pod_cgroup);
                self.release(node.index, octet);
                return Err(err)
                    .with_context(|| format!("making pod {namespace}/{name} on {}", node.name));
            }
        };
        let sandbox = Sandbox {
            node: node.index,
            octet,
            pod_cgroup,
            pause,
        };
        self.lock().sandboxes.insert(pod.netns.clone(), sandbox);
        Ok(pod)
    }

    pub(crate) fn remove(&self, pod: &Pod) -> Result<()> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let mut sandbox =
            self.lock().sandboxes.remove(&pod.netns).with_context(|| {
                format!("pod {} ({}) was not made by add_pod", pod.name, pod.netns)
            })?;
        let removed = remove_sandbox_parts(&pod.netns, &sandbox.pod_cgroup);
        // Killed with its cgroup; reaped here so that it does not linger as a zombie.
        let _ = sandbox.pause.kill();
        let _ = sandbox.pause.wait();
        self.release(sandbox.node, sandbox.octet);
        removed.with_context(|| format!("removing pod {} ({})", pod.name, pod.netns))
    }

    /// The lowest free last octet from where the last search stopped, so that addresses
    /// are not reused at once (an agent may still know the last pod that had one).
    fn allocate(&self, node: usize) -> Result<u8> {
        let first = self.first_octet;
        let mut state = self.lock();
        ensure!(!state.closed, "lab {} is being torn down", self.prefix);
        let start = *state.next.get(&node).unwrap_or(&first);
        let used = state.used.entry(node).or_default();
        let octet = (start..=254)
            .chain(first..start)
            .find(|octet| !used.contains(octet))
            .with_context(|| format!("no free pod address left on node-{node}"))?;
        used.insert(octet);
        state
            .next
            .insert(node, if octet == 254 { first } else { octet + 1 });
        Ok(octet)
    }

    fn release(&self, node: usize, octet: u8) {
        if let Some(used) = self.lock().used.get_mut(&node) {
            used.remove(&octet);
        }
    }

    fn close(&self) {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().closed = true;
    }

    /// Waits for the pause processes, killed by the lab's teardown.
    fn reap(&self) {
        for (_, mut sandbox) in self.lock().sandboxes.drain() {
            let _ = sandbox.pause.kill();
            let _ = sandbox.pause.wait();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SandboxState> {
        // A panic while holding the lock leaves plain data behind, still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes a dynamic pod's cgroup (killing what runs there) and netns, whichever exist.
fn remove_sandbox_parts(netns: &str, pod_cgroup: &Path) -> Result<()> {
    if pod_cgroup.exists() {
        remove_cgroup(pod_cgroup)?;
    }
    // The veth goes with the namespace, and the node's route and gateway address with it.
    if netns_path(netns).exists() {
        run(Command::new("ip").args(["netns", "del", netns]))?;
    }
    Ok(())
}

pub(crate) fn random_hex_64() -> Result<String> {
    let mut bytes = [0u8; 32];
    use std::io::Read as _;
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The veth pair `p{j}` (node) / `eth0` (pod) and the routes of a pod at `pod_ip`.
fn build_pod_network(node: &Node, j: usize, pod_ns: &str, pod_ip: Ipv4Addr) -> Result<()> {
    let node_ns = &node.netns;
    let gateway = Ipv4Addr::new(10, 244, node.index as u8, 1);
    add_netns(pod_ns)?;
    ip(
        node_ns,
        &format!("link add p{j} type veth peer name eth0 netns {pod_ns}"),
    )?;
    ip(node_ns, &format!("addr add {gateway}/32 dev p{j}"))?;
    ip(node_ns, &format!("link set p{j} up"))?;
    ip(node_ns, &format!("route add {pod_ip}/32 dev p{j}"))?;
    ip(pod_ns, &format!("addr add {pod_ip}/32 dev eth0"))?;
    ip(pod_ns, "link set eth0 up")?;
    ip(pod_ns, &format!("route add {gateway} dev eth0 scope link"))?;
    ip(pod_ns, &format!("route add default via {gateway}"))?;
    Ok(())
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns)
    }

    /// A command that runs inside this pod's netns and cgroup.
    ///
    /// # Panics
    /// If the netns or cgroup is gone; see [`Pod::try_command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program)
            .unwrap_or_else(|err| panic!("{err:#}"))
    }

    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        placed_command(program, Some(&self.netns_path()), &self.cgroup)
    }
}

/// Builds the `labpod` binary of this crate (a no-op when it is fresh) and returns its path.
///
/// Unit tests and xtask cannot use `CARGO_BIN_EXE_labpod`, which cargo sets only for
/// integration tests.
pub fn build_labpod() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args([
            "--bin",
            "labpod",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit());
    let stdout = run(&mut cmd)?;
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "labpod")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo built no labpod executable")
}

/// A command that starts in `cgroup` and, if given, the network namespace
/// `netns` (else the caller's).
pub(crate) fn placed_command(
    program: impl AsRef<OsStr>,
    netns: Option<&Path>,
    cgroup: &Path,
) -> Result<Command> {
    let netns_file = netns
        .map(|netns| {
            File::open(netns).with_context(|| format!("opening netns {}", netns.display()))
        })
        .transpose()?;
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe
    // work is allowed. It makes at most two syscalls on descriptors opened above and
    // allocates nothing (nix errors convert to raw-errno io::Errors). Writing "0" to
    // cgroup.procs moves the writing process itself (cgroup v2).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(netns_file) = &netns_file {
                setns(netns_file, CloneFlags::CLONE_NEWNET)?;
            }
            nix::unistd::write(&procs, b"0")?;
            Ok(())
        });
    }
    Ok(cmd)
}

/// A directory for files that belong to the lab with `prefix` (agent
/// configs, the development CA), removed with the lab.
pub fn files_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join("warren-lab").join(prefix)
}

/// Where the lab's agents pin their eBPF maps and links (bpffs), removed
/// with the lab: pinned links outlive the agents, by design.
pub fn pin_dir(prefix: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/warren-lab").join(prefix)
}

/// Removes everything a lab with this prefix may have created, whether or not it was built
/// completely, and returns what was removed.
fn teardown(prefix: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let cgroup = cgroup2_mount()?.join(CGROUP_PARENT).join(prefix);
    // Killing first, so that no process keeps a namespace alive.
    if cgroup.exists() {
        remove_cgroup(&cgroup)?;
        removed.push(cgroup.display().to_string());
    }
    for dir in [files_dir(prefix), pin_dir(prefix)] {
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            removed.push(dir.display().to_string());
        }
    }
    for netns in list_netns()? {
        if belongs_to(prefix, &netns) {
            if let Err(err) = run(Command::new("ip").args(["netns", "del", &netns])) {
                // Another sweeper may have got there first.
                if netns_path(&netns).exists() {
                    return Err(err);
                }
            }
            removed.push(netns);
        }
    }
    Ok(removed)
}

fn remove_cgroup(cgroup: &Path) -> Result<()> {
    // cgroup.kill applies to the whole subtree.
    fs::write(cgroup.join("cgroup.kill"), "1")
        .with_context(|| format!("killing the processes of {}", cgroup.display()))?;
    let deadline = Instant::now() + CGROUP_DRAIN_TIMEOUT;
    while is_populated(cgroup)? {
        ensure!(
            Instant::now() < deadline,
            "processes in {} survived cgroup.kill for {CGROUP_DRAIN_TIMEOUT:?}",
            cgroup.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_cgroup_dirs(cgroup, deadline)
}

/// Whether any process is left in the cgroup or below it.
fn is_populated(cgroup: &Path) -> Result<bool> {
    let events = fs::read_to_string(cgroup.join("cgroup.events"))
        .with_context(|| format!("reading {}/cgroup.events", cgroup.display()))?;
    Ok(events.lines().any(|line| line == "populated 1"))
}

fn remove_cgroup_dirs(cgroup: &Path, deadline: Instant) -> Result<()> {
    for child in list_dirs(cgroup)? {
        remove_cgroup_dirs(&cgroup.join(child), deadline)?;
    }
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
            // Killed tasks can keep a cgroup busy for a moment after it reads as empty.
            Err(err)
                if err.raw_os_error() == Some(nix::libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => {
                return Err(err).with_context(|| format!("removing cgroup {}", cgroup.display()));
            }
        }
    }
}

fn enable_forwarding(netns: &str) -> Result<()> {
    let file = File::open(netns_path(netns)).with_context(|| format!("opening netns {netns}"))?;
    // /proc/sys/net follows the netns of the calling thread, so a short-lived thread can
    // switch namespaces without moving the rest of the process.
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                setns(&file, CloneFlags::CLONE_NEWNET)?;
                fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                Ok(())
            })
            .join()
            .expect("the ip_forward thread does not panic")
    })
    .with_context(|| format!("enabling ip_forward in {netns}"))
}

fn add_netns(netns: &str) -> Result<()> {
    run(Command::new("ip").args(["netns", "add", netns]))?;
    ip(netns, "link set lo up")
}

/// Runs `ip -n NETNS ARGS...`, with ARGS split on whitespace.
pub(crate) fn ip(netns: &str, args: &str) -> Result<()> {
    run(Command::new("ip")
        .args(["-n", netns])
        .args(args.split_whitespace()))?;
    Ok(())
}

/// Runs a command to completion, returning its stdout; the error names the command and
/// carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let output = cmd.output().with_context(|| format!("running `{shown}`"))?;
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn log_sweep() {
    match Lab::sweep_leftovers() {
        Ok(removed) => {
            for what in removed {
                eprintln!("warren-lab: swept leftover {what}");
            }
        }
        // A stuck leftover of another run is no reason to refuse a new lab.
        Err(err) => eprintln!("warren-lab: sweeping leftovers: {err:#}"),
    }
}

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(netns)
}

fn list_netns() -> Result<Vec<String>> {
    list_entries(Path::new(NETNS_DIR), |_| true)
}

fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    list_entries(dir, |entry| entry.file_type().is_ok_and(|t| t.is_dir()))
}

/// Names of the entries of `dir` that pass `keep`; none if `dir` does not exist.
fn list_entries(dir: &Path, keep: impl Fn(&fs::DirEntry) -> bool) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if keep(&entry) {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// The lab cgroup and namespaces that exist for a prefix.
fn existing_objects(prefix: &str) -> Result<Vec<String>> {
    let mut found: Vec<String> = list_netns()?
        .into_iter()
        .filter(|netns| belongs_to(prefix, netns))
        .collect();
    let cgroup = cgroup2_mount()?.join(CGROUP_PARENT).join(prefix);
    if cgroup.exists() {
        found.push(cgroup.display().to_string());
    }
    found.sort();
    Ok(found)
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    find_cgroup2(&mounts).context("no cgroup2 filesystem is mounted")
}

fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let target = fields.nth(1)?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(target))
    })
}

/// Whether `netns` is one of the namespaces a lab with this prefix creates: `{prefix}w`,
/// `{prefix}n{i}` or `{prefix}n{i}p{j}`. Exact, so that prefixes that extend one another
/// (`wr1t1`, `wr1t12`) never claim each other's namespaces.
fn belongs_to(prefix: &str, netns: &str) -> bool {
    netns.strip_prefix(prefix).is_some_and(is_lab_suffix)
}

fn is_lab_suffix(suffix: &str) -> bool {
    if suffix == "w" {
        return true;
    }
    let Some(rest) = suffix.strip_prefix('n') else {
        return false;
    };
    match rest.split_once('p') {
        Some((node, pod)) => is_number(node) && is_number(pod),
        None => is_number(rest),
    }
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Splits a test-run lab object name (`wr{pid}t{counter}` plus an optional lab suffix) into
/// its prefix and pid.
fn test_prefix_of(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix(TEST_PREFIX)?;
    let (pid, rest) = rest.split_once('t')?;
    let counter_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    let suffix = &rest[counter_len..];
    if !is_number(pid) || counter_len == 0 || !(suffix.is_empty() || is_lab_suffix(suffix)) {
        return None;
    }
    let prefix = &name[..name.len() - suffix.len()];
    Some((prefix, pid.parse().ok()?))
}

fn named_prefix(name: &str) -> String {
    format!("{NAMED_PREFIX}{name}")
}

fn validate_name(name: &str) -> Result<()> {
    ensure!(
        (1..=32).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "invalid lab name {name:?}: use 1-32 letters, digits, '-' or '_'"
    );
    Ok(())
}

fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

/// Records a named lab before anything is built, so that `down_named` can clean up after a
/// process that died halfway.
fn write_state(name: &str, spec: &LabSpec) -> Result<()> {
    let path = state_path(name);
    fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Err(err) if err.kind() == ErrorKind::AlreadyExists => {
            bail!(
                "lab {name} already exists ({}); take it down first",
                path.display()
            )
        }
        file => file.with_context(|| format!("creating {}", path.display()))?,
    };
    if let Err(err) = serde_json::to_writer(file, spec) {
        let _ = fs::remove_file(&path);
        return Err(err).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

fn read_state(name: &str) -> Result<Option<LabSpec>> {
    let path = state_path(name);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    let spec =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::ExitStatusExt;

    const HYBRID_MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn finds_the_cgroup2_mount_in_hybrid_and_unified_layouts() {
        assert_eq!(
            find_cgroup2(HYBRID_MOUNTS),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev 0 0\n";
        assert_eq!(find_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn claims_only_its_own_namespaces() {
        for own in ["wr7t1w", "wr7t1n1", "wr7t1n12p3"] {
            assert!(belongs_to("wr7t1", own), "{own}");
        }
        for other in [
            "wr7t12w",
            "wr7t1",
            "wr7t1n",
            "wr7t1n1p",
            "wr7t1x",
            "wr7t1n1p2w",
        ] {
            assert!(!belongs_to("wr7t1", other), "{other}");
        }
        // Named labs whose names extend each other stay apart too.
        assert!(!belongs_to("wrm-a", "wrm-an1w"));
        assert!(!belongs_to("wrm-a", "wrm-an1n1"));
    }

    #[test]
    fn parses_test_run_prefixes() {
        assert_eq!(test_prefix_of("wr123t4n2p1"), Some(("wr123t4", 123)));
        assert_eq!(test_prefix_of("wr123t45w"), Some(("wr123t45", 123)));
        assert_eq!(test_prefix_of("wr123t4"), Some(("wr123t4", 123)));
        for not_ours in [
            "wrm-demon1",
            "wr123t",
            "wrt4w",
            "wr12x3t4w",
            "wr1t2q",
            "cni-1234",
        ] {
            assert_eq!(test_prefix_of(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn plans_kubernetes_like_names_and_addresses() {
        let spec = LabSpec {
            nodes: 2,
            pods_per_node: 3,
        };
        let mut lab = Lab::plan("wr9t0".into(), spec, None, "/cg".into());
        // Planning touched nothing, so neither may dropping.
        lab.persisted = true;
        assert_eq!(lab.wire_netns(), "wr9t0w");
        let node = lab.node(1);
        assert_eq!((node.index, node.name.as_str()), (2, "node-2"));
        assert_eq!(node.netns, "wr9t0n2");
        assert_eq!(node.ip, Ipv4Addr::new(10, 10, 0, 2));
        assert_eq!(node.cgroup, Path::new("/cg/warren-lab/wr9t0/node-2"));
        assert_eq!(
            node.kubelet_cgroup_root(),
            Path::new("/cg/warren-lab/wr9t0/node-2-kubelet")
        );
        assert_eq!(node.cgroup_driver(), CgroupDriver::Cgroupfs);
        assert_eq!(lab.node(0).cgroup_driver(), CgroupDriver::Systemd);
        let pod = lab.pod(1, 2);
        assert_eq!((pod.name.as_str(), pod.node.as_str()), ("n2p3", "node-2"));
        assert_eq!(pod.netns, "wr9t0n2p3");
        assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 2, 4));
        assert_eq!(pod.cgroup, Path::new("/cg/warren-lab/wr9t0/n2p3"));
        assert_eq!(lab.netns_names().len(), 1 + 2 * (1 + 3));
        assert!(
            lab.describe()
                .contains("n2p3  netns wr9t0n2p3  eth0 10.244.2.4")
        );
    }

    #[test]
    fn lays_out_pod_cgroups_as_kubelets_do() {
        let uid = "4a1e-b2";
        let id = "c0ffee";
        let layout = |driver, qos| {
            let (pod, container) = kubelet_cgroup(driver, qos, uid, id);
            assert_eq!(container.parent(), Some(pod.as_path()));
            container.display().to_string()
        };
        use CgroupDriver::{Cgroupfs, Systemd};
        use QosClass::{BestEffort, Burstable, Guaranteed};
        assert_eq!(
            layout(Systemd, BestEffort),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod4a1e_b2.slice/\
             cri-containerd-c0ffee.scope"
        );
        assert_eq!(
            layout(Systemd, Burstable),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod4a1e_b2.slice/\
             cri-containerd-c0ffee.scope"
        );
        assert_eq!(
            layout(Systemd, Guaranteed),
            "kubepods.slice/kubepods-pod4a1e_b2.slice/cri-containerd-c0ffee.scope"
        );
        assert_eq!(
            layout(Cgroupfs, BestEffort),
            "kubepods/besteffort/pod4a1e-b2/c0ffee"
        );
        assert_eq!(
            layout(Cgroupfs, Burstable),
            "kubepods/burstable/pod4a1e-b2/c0ffee"
        );
        assert_eq!(layout(Cgroupfs, Guaranteed), "kubepods/pod4a1e-b2/c0ffee");
        assert!("besteffort".parse::<QosClass>().is_err());
    }

    #[test]
    fn rejects_lab_names_that_are_not_plain_words() {
        assert!(validate_name("demo-1_b").is_ok());
        for bad in ["", "a/b", "a b", "../x", &"x".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    fn is_root() -> bool {
        // /proc/self belongs to our effective uid.
        if fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0) {
            return true;
        }
        eprintln!("skipping: this test needs root (network namespaces and cgroups)");
        false
    }

    fn routes(netns: &str) -> String {
        run(Command::new("ip").args(["-n", netns, "route", "show"])).unwrap()
    }

    fn assert_route(netns: &str, route: &str) {
        let table = routes(netns);
        assert!(
            table.lines().any(|line| line.trim() == route),
            "no route `{route}` in {netns}:\n{table}"
        );
    }

    fn json_line(reader: &mut impl BufRead) -> serde_json::Value {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|err| panic!("{err}: {line:?}"))
    }

    #[test]
    fn lab_routes_tcp_between_pods_of_two_nodes_and_leaves_nothing_behind() {
        if !is_root() {
            return;
        }
        let labpod = build_labpod().unwrap();
        let lab = Lab::up(LabSpec {
            nodes: 2,
            pods_per_node: 2,
        })
        .unwrap();
        println!("{}", lab.describe());

        let (node1, node2) = (&lab.node(0).netns, &lab.node(1).netns);
        assert_route(node1, "10.244.2.0/24 via 10.10.0.2 dev eth0");
        assert_route(node1, "10.244.1.3 dev p2 scope link");
        assert_route(node2, "10.244.1.0/24 via 10.10.0.1 dev eth0");
        let pod_ns = &lab.pod(0, 0).netns;
        assert_route(pod_ns, "default via 10.244.1.1 dev eth0");
        assert_route(pod_ns, "10.244.1.1 dev eth0 scope link");

        let server_pod = lab.pod(1, 0);
        let mut server = server_pod
            .command(&labpod)
            .args(["serve", "--port", "7000", "--name", &server_pod.name])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut events = BufReader::new(server.stdout.take().unwrap());
        assert_eq!(json_line(&mut events)["event"], "listening");

        let cgroup_line = fs::read_to_string(format!("/proc/{}/cgroup", server.id())).unwrap();
        let expected = format!("/warren-lab/{}/n2p1", lab.prefix());
        assert!(
            cgroup_line
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&expected)),
            "server is not in its pod cgroup: {cgroup_line}"
        );
        let netns_inode = |path: PathBuf| fs::metadata(path).unwrap().ino();
        assert_eq!(
            netns_inode(format!("/proc/{}/ns/net", server.id()).into()),
            netns_inode(server_pod.netns_path())
        );

        let call = lab
            .pod(0, 0)
            .command(&labpod)
            .args(["call", "10.244.2.2:7000", "--bytes", "100000"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&call.stdout);
        assert!(
            call.status.success(),
            "labpod call failed: {stdout}{}",
            String::from_utf8_lossy(&call.stderr)
        );
        let called: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(called["server"], "n2p1");
        assert_eq!(called["received"], 100000);
        assert!(called["local"].as_str().unwrap().starts_with("10.244.1.2:"));
        let served = json_line(&mut events);
        assert_eq!(served["event"], "served");
        assert_eq!(served["local"], "10.244.2.2:7000");
        assert_eq!(served["peer"], called["local"]);

        let prefix = lab.prefix().to_owned();
        let cgroup = lab.cgroup().to_owned();
        drop(lab);
        let status = server.wait().unwrap();
        assert_eq!(status.signal(), Some(nix::libc::SIGKILL), "{status}");
        assert!(!cgroup.exists(), "{} survived teardown", cgroup.display());
        let left: Vec<_> = list_netns()
            .unwrap()
            .into_iter()
            .filter(|netns| belongs_to(&prefix, netns))
            .collect();
        assert!(left.is_empty(), "namespaces survived teardown: {left:?}");
    }

    #[test]
    fn named_lab_persists_until_taken_down() {
        if !is_root() {
            return;
        }
        let name = format!("selftest-{}", std::process::id());
        let spec = LabSpec {
            nodes: 1,
            pods_per_node: 1,
        };
        Lab::up_named(&name, spec).unwrap().persist();
        let status = Lab::status_named(&name);
        let again = Lab::up_named(&name, spec).map(Lab::persist);
        let down = Lab::down_named(&name);
        let after = Lab::status_named(&name);

        let status = status.unwrap().expect("a persisted lab has a status");
        assert!(status.contains(&format!("wrm-{name}n1p1")), "{status}");
        assert!(!status.contains("MISSING"), "{status}");
        assert!(again.is_err(), "a second lab with the same name came up");
        assert!(down.unwrap());
        assert_eq!(after.unwrap(), None);
        assert!(!Lab::down_named(&name).unwrap());
    }
}
