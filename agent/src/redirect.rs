//! The eBPF side of capture: loads warren's kernel programs, attaches them to
//! enrolled pods' cgroups and interfaces, keeps the pods' mTLS modes (and the
//! kubelet's probes, which bypass them) where the ingress program reads them,
//! and answers "where was this connection going?".
//!
//! Everything that must hold while the agent is not running is pinned in
//! bpffs under the agent's pin directory: the maps, and each pod's links
//! (`pods/<netns cookie>/<program>`). When the agent stops or dies, its pods
//! stay captured and enforced: their outbound connections fail (nothing
//! listens where they are sent) instead of leaving in clear, and STRICT ports
//! still drop plaintext. The next agent reuses the pinned maps and takes over
//! the pinned links without detaching anything. Links go only when a pod is
//! withdrawn (or `warren uninstall` removes them all).
//!
//! Before Linux 6.6 (no TCX) the ingress program is a netlink tc filter
//! instead of a link: its program is pinned where the link would be, and
//! withdrawing a pod removes the filter by name in the pod's namespace
//! (`warren uninstall` cannot: it knows no namespaces). See docs/kernels.md.
//!
//! The programs count what they refuse, by [`DropReason`], in the pinned
//! `DROPS` map ([`Redirector::drop_counter`], [`read_drops`]). Being pinned, the
//! counters survive agent restarts: they are cumulative since the map was
//! created, that is since the first agent on the node, or the first after
//! the last `warren uninstall`.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier, SockOps,
        TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{
            NlOptions, TcAttachOptions, TcError, TcHandle, qdisc_add_clsact, qdisc_detach_program,
        },
    },
    util::KernelVersion,
};
// Deprecated for CGRP_STORAGE, which needs Linux 6.2 (see EGRESS_POD).
#[allow(deprecated)]
use aya::maps::{CgroupStorage, CgroupStorageKey};
use nix::sched::{CloneFlags, setns};
use tokio::io::unix::AsyncFd;
/// The reasons [`DropCounts`] are kept by, for its readers.
pub use warren_common::{
    DropReason, FAST_OPEN_PER_POD, FAST_OPEN_SLACK, PENDING_PER_NODE, PENDING_PER_POD,
};
use warren_common::{
    FastEvent, FlowInfo, FlowKey, GrantKey, InboundKey, Ipv4Dst, OUTBOUND_PORT, PodInfo, ProbeKey,
    Tuple, names,
};

/// The compiled programs, built from ebpf/ by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/warren-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading warren's eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pod network namespace {}: {problem}", path.display())]
    Interface { path: PathBuf, problem: String },
    #[error("bpffs pin {}: {problem}", path.display())]
    Pin { path: PathBuf, problem: String },
    #[error("forwarding eBPF logs: {0}")]
    Log(String),
}

/// What enrolling one pod attached; hand it back to [`Redirector::withdraw`].
#[derive(Debug)]
pub struct Attachment {
    netns_cookie: u64,
    pod_ip: Ipv4Addr,
    /// The pod's namespace file: where its ingress filter is detached from
    /// on kernels without TCX.
    netns: PathBuf,
    /// The directory of the pod's pinned links.
    pins: PathBuf,
    /// Whether the links were found pinned (a previous agent made them).
    pub taken_over: bool,
    /// Whether the pod runs this agent's programs (attached now, or taken
    /// over from an agent of the same build): only then does its ingress
    /// program let in the fast path's connections.
    pub current_programs: bool,
}

/// The programs attached to each pod: four on its cgroup and the ingress
/// program on its interface; the pins in its directory are named after them.
const POD_LINKS: [&str; 5] = [
    names::SOCK_OPS,
    names::CONNECT4,
    names::CONNECT6,
    names::EGRESS,
    names::POD_INGRESS,
];

/// `enum bpf_attach_type`'s value for cgroup_skb egress (uapi, fixed), half
/// of a [`names::EGRESS_POD`] key.
const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// The maps, pinned so that they outlive the agent.
const PINNED_MAPS: [&str; 19] = [
    names::PODS,
    // Pinned like the others so that a next agent's egress program uses the
    // same storage as the links it takes over.
    names::EGRESS_POD,
    names::PENDING,
    names::ORIGINAL_DST,
    names::INBOUND_MODES,
    names::INBOUND_LISTENERS,
    names::PROBES,
    names::DROPS,
    names::FAST_GRANTS,
    names::FAST_FLOWS,
    names::FAST_PENDING,
    names::FAST_LEASE,
    names::FAST_EVENTS,
    names::RECORDED,
    names::TAKEN,
    names::RECORD_TOTALS,
    names::FAST_OPEN,
    names::FAST_FORGOTTEN,
    names::FAST_TOTALS,
];

/// A pod's mTLS modes as the ingress program reads them ([`warren_common::mode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundModes {
    pub default: u32,
    pub ports: BTreeMap<u16, u32>,
}

/// The connect hooks, each attached to every enrolled pod's cgroup.
const SOCK_ADDR_PROGRAMS: [&str; 2] = [names::CONNECT4, names::CONNECT6];

pub struct Redirector {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Held while the agent runs: one agent per pin directory.
    _lock: nix::fcntl::Flock<File>,
    pods: HashMap<MapData, u64, PodInfo>,
    /// The egress program's [`PodInfo`], one per pod cgroup it is attached to
    /// ([`names::EGRESS_POD`]).
    #[allow(deprecated)] // its successor (CGRP_STORAGE) needs Linux 6.2
    egress_pods: CgroupStorage<MapData, PodInfo>,
    modes: HashMap<MapData, InboundKey, u32>,
    listeners: SockHash<MapData, u32>,
    /// The kubelet's probes; the values are unused.
    probes: HashMap<MapData, ProbeKey, u8>,
    /// What the programs refused, by [`DropReason`]; per CPU.
    drops: DropCounter,
    original_dst: OriginalDsts,
    /// Until [`take_fast_path`](Self::take_fast_path) hands them out.
    fast_path: Option<FastPathMaps>,
    /// The kernel's hash of this build's programs, by the name their pod
    /// links are pinned under: links taken over run these if theirs have the
    /// same.
    tags: [(&'static str, u64); 3],
}

impl Redirector {
    /// Loads the programs into the kernel (attaching nothing yet), with the
    /// maps pinned in `pin_dir` (reused if a previous agent left them), and
    /// starts forwarding their aya-log records to the agent's log. Needs a
    /// tokio runtime.
    pub fn load(pin_dir: &Path) -> Result<Self, RedirectError> {
        let pin_error = |problem: String| RedirectError::Pin {
            path: pin_dir.to_owned(),
            problem,
        };
        std::fs::create_dir_all(pin_dir.join("pods"))
            .map_err(|e| pin_error(format!("cannot create it: {e}")))?;
        if !on_bpffs(pin_dir) {
            return Err(pin_error(
                "not on a bpf filesystem (`mount -t bpf bpf /sys/fs/bpf`; `cargo xtask setup` does)"
                    .into(),
            ));
        }
        let lock = lock(pin_dir)?;
        let map_pins: Vec<(&str, PathBuf)> = PINNED_MAPS
            .iter()
            .map(|&name| (name, pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        forward_logs(&mut ebpf)?;

        let program_error = |name| move |source| RedirectError::Program { name, source };
        for name in SOCK_ADDR_PROGRAMS {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect.load().map_err(program_error(name))?;
        }
        let connect4_tag = program::<CgroupSockAddr>(&mut ebpf, names::CONNECT4)?
            .info()
            .map_err(program_error(names::CONNECT4))?
            .tag();
        let sock_ops: &mut SockOps = program(&mut ebpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(program_error(names::SOCK_OPS))?;
        let sock_ops_tag = sock_ops
            .info()
            .map_err(program_error(names::SOCK_OPS))?
            .tag();
        let egress_program = egress_program();
        let egress: &mut CgroupSkb = program(&mut ebpf, egress_program)?;
        egress.load().map_err(program_error(egress_program))?;
        let ingress: &mut SchedClassifier = program(&mut ebpf, names::POD_INGRESS)?;
        ingress.load().map_err(program_error(names::POD_INGRESS))?;
        let ingress_tag = ingress
            .info()
            .map_err(program_error(names::POD_INGRESS))?
            .tag();
        let map_error = |name| move |source| RedirectError::Map { name, source };
        let modes = HashMap::try_from(take_map(&mut ebpf, names::INBOUND_MODES)?)
            .map_err(map_error(names::INBOUND_MODES))?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, names::INBOUND_LISTENERS)?)
            .map_err(map_error(names::INBOUND_LISTENERS))?;
        let probes = HashMap::try_from(take_map(&mut ebpf, names::PROBES)?)
            .map_err(map_error(names::PROBES))?;
        let drops = PerCpuArray::try_from(take_map(&mut ebpf, names::DROPS)?)
            .map(|map| DropCounter(Arc::new(map)))
            .map_err(map_error(names::DROPS))?;

        let pods = HashMap::try_from(take_map(&mut ebpf, names::PODS)?).map_err(|source| {
            RedirectError::Map {
                name: names::PODS,
                source,
            }
        })?;
        #[allow(deprecated)]
        let egress_pods = CgroupStorage::try_from(take_map(&mut ebpf, names::EGRESS_POD)?)
            .map_err(map_error(names::EGRESS_POD))?;
        let recorded = HashMap::try_from(take_map(&mut ebpf, names::RECORDED)?)
            .map_err(map_error(names::RECORDED))?;
        let taken = HashMap::try_from(take_map(&mut ebpf, names::TAKEN)?)
            .map_err(map_error(names::TAKEN))?;
        let totals: Array<MapData, i64> =
            Array::try_from(take_map(&mut ebpf, names::RECORD_TOTALS)?)
                .map_err(map_error(names::RECORD_TOTALS))?;
        let original_dst =
            HashMap::try_from(take_map(&mut ebpf, names::ORIGINAL_DST)?).map_err(|source| {
                RedirectError::Map {
                    name: names::ORIGINAL_DST,
                    source,
                }
            })?;
        let mut fast_path = FastPathMaps {
            grants: HashMap::try_from(take_map(&mut ebpf, names::FAST_GRANTS)?)
                .map_err(map_error(names::FAST_GRANTS))?,
            flows: HashMap::try_from(take_map(&mut ebpf, names::FAST_FLOWS)?)
                .map_err(map_error(names::FAST_FLOWS))?,
            lease: Array::try_from(take_map(&mut ebpf, names::FAST_LEASE)?)
                .map_err(map_error(names::FAST_LEASE))?,
            events: RingBuf::try_from(take_map(&mut ebpf, names::FAST_EVENTS)?)
                .map_err(map_error(names::FAST_EVENTS))?,
            open: HashMap::try_from(take_map(&mut ebpf, names::FAST_OPEN)?)
                .map_err(map_error(names::FAST_OPEN))?,
            forgotten: HashMap::try_from(take_map(&mut ebpf, names::FAST_FORGOTTEN)?)
                .map_err(map_error(names::FAST_FORGOTTEN))?,
            totals: Array::try_from(take_map(&mut ebpf, names::FAST_TOTALS)?)
                .map_err(map_error(names::FAST_TOTALS))?,
        };
        // Grants are this agent's to make: none of a previous agent's holds
        // (its lease may not have run out yet).
        fast_path.set_lease(0)?;
        fast_path.clear_grants()?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            _lock: lock,
            pods,
            egress_pods,
            modes,
            listeners,
            probes,
            drops,
            original_dst: OriginalDsts(Arc::new(Mutex::new(Records {
                taken_total: totals.get(&1, 0).unwrap_or(0),
                map: original_dst,
                recorded,
                taken,
                totals,
                taken_by_pod: std::collections::HashMap::new(),
                ages: Ages::default(),
            }))),
            fast_path: Some(fast_path),
            tags: [
                (names::POD_INGRESS, ingress_tag),
                (names::CONNECT4, connect4_tag),
                (names::SOCK_OPS, sock_ops_tag),
            ],
        })
    }

    /// The fast path's maps, for its one owner (the first caller).
    pub fn take_fast_path(&mut self) -> Option<FastPathMaps> {
        self.fast_path.take()
    }

    /// Where captured connections' original destinations are looked up.
    pub fn original_dsts(&self) -> OriginalDsts {
        self.original_dst.clone()
    }

    /// The programs' drop counters, to read while the agent runs (the
    /// metrics, at each scrape).
    pub fn drop_counter(&self) -> DropCounter {
        self.drops.clone()
    }

    /// Starts capturing the outbound TCP connections of the pod whose cgroup
    /// is `cgroup` and whose network namespace (file `netns`) has
    /// `netns_cookie`, and applying `modes` to connections arriving at it.
    /// Its outbound listener and its plaintext listener (`plaintext`) must
    /// already be up. Links a previous agent pinned for this pod are taken
    /// over as they are: the pod is never left unenforced.
    #[allow(clippy::too_many_arguments)] // each is one fact about the pod
    pub fn enroll(
        &mut self,
        pod: &str,
        cgroup: &Path,
        netns: &Path,
        netns_cookie: u64,
        pod_ip: Ipv4Addr,
        modes: &InboundModes,
        plaintext: &impl AsFd,
    ) -> Result<Attachment, RedirectError> {
        let pins = self
            .pin_dir
            .join("pods")
            .join(PinName::new(netns_cookie, pod).to_string());
        let taken_over = POD_LINKS.iter().all(|name| pins.join(name).exists());
        // Links taken over run the programs they were made with: an earlier
        // build's ingress program would refuse the fast path's connections,
        // its connect4 and sock_ops would not count them.
        let current_programs = !taken_over
            || self
                .tags
                .iter()
                .all(|&(name, tag)| link_program_tag(&pins.join(name), name) == Some(tag));
        let attachment = Attachment {
            netns_cookie,
            pod_ip,
            netns: netns.to_owned(),
            pins,
            taken_over,
            current_programs,
        };
        // The plaintext listener and the modes first: the ingress program
        // enforces from the moment it is attached.
        let prepared = self
            .listeners
            .insert(u32::from(pod_ip), plaintext.as_fd(), 0)
            .map_err(|source| RedirectError::Map {
                name: names::INBOUND_LISTENERS,
                source,
            })
            .and_then(|()| self.set_modes(pod_ip, modes))
            .and_then(|()| {
                if taken_over {
                    // The previous agent wrote the egress program's storage
                    // (it is pinned, and stays while the link does); this
                    // writes it again. It fails only when the link runs an
                    // earlier build's program, which does not read it.
                    if egress_program() == names::EGRESS
                        && let Err(e) = self.set_egress_pod(cgroup, pod_ip)
                    {
                        tracing::debug!(pod, error = %e, "egress storage not rewritten");
                    }
                    Ok(())
                } else {
                    // Pins of an incomplete set (an agent that died while
                    // enrolling, or of another version) are replaced.
                    let _ = unpin_all(&attachment.pins);
                    self.attach_all(cgroup, netns, pod_ip, &attachment.pins)
                }
            });
        if let Err(e) = prepared {
            // Links a previous agent left stay: the pod keeps failing closed.
            if !taken_over {
                let _ = self.withdraw(attachment);
            }
            return Err(e);
        }
        // The connect hooks capture only once the pod is in this map.
        let info = PodInfo {
            ip: u32::from(pod_ip),
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        };
        if let Err(source) = self.pods.insert(netns_cookie, info, 0) {
            if !taken_over {
                let _ = self.withdraw(attachment);
            }
            return Err(RedirectError::Map {
                name: names::PODS,
                source,
            });
        }
        Ok(attachment)
    }

    /// Attaches every program to the pod and pins each link in `pins`.
    fn attach_all(
        &mut self,
        cgroup: &Path,
        netns: &Path,
        pod_ip: Ipv4Addr,
        pins: &Path,
    ) -> Result<(), RedirectError> {
        let cgroup_path = cgroup;
        let cgroup = File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        std::fs::create_dir_all(pins).map_err(|e| RedirectError::Pin {
            path: pins.to_owned(),
            problem: format!("cannot create it: {e}"),
        })?;
        // aya attaches through bpf_link (kernel >= 5.7), which takes no mode
        // flags and always shares the hook with other programs (the CNI's,
        // say): `Single` is the value that passes no flags.
        let mode = CgroupAttachMode::Single;
        let error = |name| move |source| RedirectError::Program { name, source };
        let name = names::SOCK_OPS;
        let sock_ops: &mut SockOps = program(&mut self.ebpf, name)?;
        let id = sock_ops.attach(&cgroup, mode).map_err(error(name))?;
        let link = sock_ops.take_link(id).map_err(error(name))?;
        pin(link, &pins.join(name))?;
        for name in [names::CONNECT4, names::CONNECT6] {
            let connect: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let id = connect.attach(&cgroup, mode).map_err(error(name))?;
            let link = connect.take_link(id).map_err(error(name))?;
            pin(link, &pins.join(name))?;
        }
        let name = egress_program();
        let egress: &mut CgroupSkb = program(&mut self.ebpf, name)?;
        let id = egress
            .attach(&cgroup, CgroupSkbAttachType::Egress, mode)
            .map_err(error(name))?;
        let link = egress.take_link(id).map_err(error(name))?;
        // Under one name whichever program it is: a next agent finds it so.
        pin(link, &pins.join(names::EGRESS))?;
        if name == names::EGRESS {
            // Attaching made the storage (zero: let everything through); the
            // program checks sources from this write on.
            self.set_egress_pod(cgroup_path, pod_ip)?;
        }
        self.attach_ingress(netns, pod_ip, pins)
    }

    /// Tells the egress program attached to the cgroup at `cgroup` which pod
    /// it runs for ([`names::EGRESS_POD`]).
    fn set_egress_pod(&mut self, cgroup: &Path, pod_ip: Ipv4Addr) -> Result<(), RedirectError> {
        use std::os::unix::fs::MetadataExt as _;
        // A cgroup v2 id, which the storage is keyed by, is its directory's
        // inode number.
        let inode = std::fs::metadata(cgroup)
            .map_err(|source| RedirectError::Cgroup {
                path: cgroup.to_owned(),
                source,
            })?
            .ino();
        #[allow(deprecated)]
        let key = CgroupStorageKey::new(inode, BPF_CGROUP_INET_EGRESS);
        let info = PodInfo {
            ip: u32::from(pod_ip),
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        };
        self.egress_pods
            .insert(key, info, 0)
            .map_err(|source| RedirectError::Map {
                name: names::EGRESS_POD,
                source,
            })
    }

    /// Applies `modes` to connections arriving at the pod `pod_ip`.
    pub fn set_modes(
        &mut self,
        pod_ip: Ipv4Addr,
        modes: &InboundModes,
    ) -> Result<(), RedirectError> {
        let ip = u32::from(pod_ip);
        let map_error = |source| RedirectError::Map {
            name: names::INBOUND_MODES,
            source,
        };
        // The ports this pod has a mode for, as the (pinned) map holds them:
        // a previous agent may have written some.
        let old: Vec<u16> = self
            .mode_keys(ip)
            .into_iter()
            .map(|key| key.port)
            .filter(|&port| port != 0)
            .collect();
        // New entries first, stale ones last: no moment where a port falls
        // back to a default it should not have.
        for (&port, &mode) in &modes.ports {
            self.modes
                .insert(InboundKey::new(ip, port), mode, 0)
                .map_err(map_error)?;
        }
        self.modes
            .insert(InboundKey::new(ip, 0), modes.default, 0)
            .map_err(map_error)?;
        for port in old {
            if !modes.ports.contains_key(&port) {
                let _ = self.modes.remove(&InboundKey::new(ip, port));
            }
        }
        Ok(())
    }

    /// The `INBOUND_MODES` keys of the pod at `ip` (host order).
    fn mode_keys(&self, ip: u32) -> Vec<InboundKey> {
        self.modes
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.ip == ip)
            .collect()
    }

    /// Lets the kubelet's probes of the pod `pod_ip` reach its application
    /// whatever its mTLS mode: plaintext connection attempts from any of
    /// `sources` (the node's addresses as the pod sees them) to any of
    /// `ports`, and no others. Replaces what was set before.
    pub fn set_probes(
        &mut self,
        pod_ip: Ipv4Addr,
        sources: &[Ipv4Addr],
        ports: &BTreeSet<u16>,
    ) -> Result<(), RedirectError> {
        let pod = u32::from(pod_ip);
        let wanted: BTreeSet<ProbeKey> = sources
            .iter()
            .flat_map(|&src| {
                ports
                    .iter()
                    .map(move |&port| ProbeKey::new(pod, u32::from(src), port))
            })
            .collect();
        // What the (pinned) map holds for the pod: a previous agent may have
        // written some.
        let old = self.probe_keys(pod);
        // New entries first, stale ones last: a probe that stays is never
        // dropped in between.
        for key in &wanted {
            self.probes
                .insert(key, 0_u8, 0)
                .map_err(|source| RedirectError::Map {
                    name: names::PROBES,
                    source,
                })?;
        }
        for key in old {
            if !wanted.contains(&key) {
                let _ = self.probes.remove(&key);
            }
        }
        Ok(())
    }

    /// The `PROBES` keys of the pod at `ip` (host order).
    fn probe_keys(&self, ip: u32) -> Vec<ProbeKey> {
        self.probes
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.pod == ip)
            .collect()
    }

    /// Attaches the ingress program to the pod's interface (the one holding
    /// `pod_ip`), from a thread inside the pod's namespace: interface names
    /// and indexes are per namespace. From Linux 6.6 as a TCX link, pinned;
    /// before, as a netlink filter (see [`attach_filter`]), with the program
    /// pinned in the link's place.
    fn attach_ingress(
        &mut self,
        netns: &Path,
        pod_ip: Ipv4Addr,
        pins: &Path,
    ) -> Result<(), RedirectError> {
        let name = names::POD_INGRESS;
        let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let tcx = has_tcx();
        let link = in_netns(netns, pod_ip, |interface| {
            if tcx {
                program
                    .attach(interface, TcAttachType::Ingress)
                    .and_then(|id| program.take_link(id))
                    .map(Some)
                    .map_err(|source| RedirectError::Program { name, source })
            } else {
                attach_filter(program, interface).map(|()| None)
            }
        })?;
        match link {
            Some(link) => pin(link, &pins.join(name)),
            // The filter holds the program; the pin marks the pod as
            // enrolled for a next agent and gives it the program's tag.
            None => program
                .pin(pins.join(name))
                .map_err(|e| RedirectError::Pin {
                    path: pins.join(name),
                    problem: e.to_string(),
                }),
        }
    }

    /// Stops capture for a pod and removes its pins. Connections already
    /// captured keep going.
    pub fn withdraw(&mut self, attachment: Attachment) -> Result<(), RedirectError> {
        // Remove the pod first: from that instant the hooks let it be.
        let removed = match self.pods.remove(&attachment.netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                name: names::PODS,
                source,
            }),
        };
        self.original_dst.forget(attachment.netns_cookie);
        // Detach even if that failed: the links are what capture. A netlink
        // filter (before Linux 6.6) has no link: it goes by its name.
        let filter = if has_tcx() {
            Ok(())
        } else {
            detach_filter(&attachment.netns, attachment.pod_ip)
        };
        let detached = unpin_all(&attachment.pins).and(filter);
        self.forget_inbound(attachment.pod_ip);
        removed.and(detached)
    }

    /// Removes the pod's modes, probes and plaintext listener from the maps.
    fn forget_inbound(&mut self, pod_ip: Ipv4Addr) {
        let ip = u32::from(pod_ip);
        for key in self.mode_keys(ip) {
            let _ = self.modes.remove(&key);
        }
        for key in self.probe_keys(ip) {
            let _ = self.probes.remove(&key);
        }
        let _ = self.listeners.remove(&ip);
    }

    /// Releases what previous agents pinned for pods that are gone: pods no
    /// longer in the config (`local`: the pods of this node, each with the
    /// netns cookie it is enrolled with, if it is), and earlier namespaces of
    /// pods enrolled now. Pods of the config that could not be enrolled keep
    /// their pins: they go on failing closed. Returns what was released.
    pub fn release_others(
        &mut self,
        local: &std::collections::HashMap<String, Option<u64>>,
    ) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("pods")) else {
            return Vec::new();
        };
        let enrolled: Vec<u64> = local.values().flatten().copied().collect();
        let mut released = Vec::new();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(pin) = file_name.to_str().and_then(PinName::parse) else {
                continue;
            };
            let gone = match local.get(&pin.pod) {
                None => true,
                Some(Some(cookie)) => *cookie != pin.netns_cookie,
                Some(None) => false,
            };
            if !gone {
                continue;
            }
            // Its address may be a pod's enrolled now: leave that pod's
            // entries alone.
            if let Ok(info) = self.pods.get(&pin.netns_cookie, 0) {
                let reused = enrolled
                    .iter()
                    .any(|c| self.pods.get(c, 0).is_ok_and(|i| i.ip == info.ip));
                if !reused {
                    self.forget_inbound(Ipv4Addr::from(info.ip));
                }
            }
            let _ = self.pods.remove(&pin.netns_cookie);
            self.original_dst.forget(pin.netns_cookie);
            let _ = unpin_all(&entry.path());
            released.push(format!("{} (netns cookie {})", pin.pod, pin.netns_cookie));
        }
        released
    }
}

/// A pod's pin directory: `<netns cookie>_<namespace>_<name>` (neither
/// namespaces nor pod names can contain `_`).
struct PinName {
    netns_cookie: u64,
    /// `namespace/name`.
    pod: String,
}

impl PinName {
    fn new(netns_cookie: u64, pod: &str) -> Self {
        Self {
            netns_cookie,
            pod: pod.to_owned(),
        }
    }

    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.splitn(3, '_');
        let netns_cookie = parts.next()?.parse().ok()?;
        let namespace = parts.next()?;
        let pod = parts.next()?;
        Some(Self {
            netns_cookie,
            pod: format!("{namespace}/{pod}"),
        })
    }
}

impl std::fmt::Display for PinName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}_{}",
            self.netns_cookie,
            self.pod.replacen('/', "_", 1)
        )
    }
}

/// What the kernel programs refused, by [`DropReason`]: totals over every
/// CPU, cumulative since the pinned `DROPS` map was created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounts([u64; DropReason::ALL.len()]);

impl DropCounts {
    /// The total for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason.index() as usize]
    }

    /// Every reason with its total, in [`DropReason::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .into_iter()
            .map(|reason| (reason, self.get(reason)))
    }

    /// The sum over every reason.
    pub fn total(&self) -> u64 {
        self.0.iter().fold(0, |sum, &n| sum.saturating_add(n))
    }

    /// How much each counter grew since `earlier` (0 where it did not).
    pub fn since(&self, earlier: &DropCounts) -> DropCounts {
        let mut grown = self.clone();
        for (now, then) in grown.0.iter_mut().zip(earlier.0) {
            *now = now.saturating_sub(then);
        }
        grown
    }

    /// Sums each reason's per-CPU slots.
    fn read(map: &PerCpuArray<MapData, u64>) -> Result<Self, RedirectError> {
        let mut counts = DropCounts::default();
        for reason in DropReason::ALL {
            let per_cpu = match map.get(&reason.index(), 0) {
                Ok(values) => values,
                // A map an older agent created, without a slot for a reason
                // added since: nothing of that kind was counted in it.
                Err(MapError::OutOfBounds { .. } | MapError::KeyNotFound) => continue,
                Err(source) => {
                    return Err(RedirectError::Map {
                        name: names::DROPS,
                        source,
                    });
                }
            };
            counts.0[reason.index() as usize] =
                per_cpu.iter().fold(0, |sum: u64, &n| sum.saturating_add(n));
        }
        Ok(counts)
    }
}

/// The loaded programs' drop counters, shared with whoever reads them.
#[derive(Clone)]
pub struct DropCounter(Arc<PerCpuArray<MapData, u64>>);

impl DropCounter {
    /// How many packets and connects the programs have refused, by reason,
    /// since the pinned map was created (see the module's documentation).
    pub fn read(&self) -> Result<DropCounts, RedirectError> {
        DropCounts::read(&self.0)
    }
}

/// Reads the drop counters an agent pinned in `pin_dir`, without loading
/// anything or taking the agent's lock: for tools and tests, while an agent
/// runs or after it stopped.
pub fn read_drops(pin_dir: &Path) -> Result<DropCounts, RedirectError> {
    let path = pin_dir.join(names::DROPS);
    let data = MapData::from_pin(&path).map_err(|e| RedirectError::Pin {
        path: path.clone(),
        problem: format!("cannot open the pinned drop counters: {e}"),
    })?;
    let map = Map::from_map_data(data)
        .and_then(PerCpuArray::try_from)
        .map_err(|source| RedirectError::Map {
            name: names::DROPS,
            source,
        })?;
    DropCounts::read(&map)
}

/// Releases everything an agent pinned in `pin_dir`: every pod's links
/// (detaching its programs: the pod talks directly again) and the maps (the
/// drop counters start again from zero with the next agent). Returns how
/// many pods were released. For taking warren off a node.
pub fn uninstall(pin_dir: &Path) -> Result<usize, RedirectError> {
    if !pin_dir.exists() {
        return Ok(0);
    }
    let _lock = lock(pin_dir)?;
    let pods = pin_dir.join("pods");
    let mut released = 0;
    let mut result = Ok(());
    if let Ok(entries) = std::fs::read_dir(&pods) {
        for entry in entries.flatten() {
            let unpinned = unpin_all(&entry.path());
            if unpinned.is_ok() {
                released += 1;
            } else if result.is_ok() {
                result = unpinned;
            }
        }
    }
    for name in PINNED_MAPS {
        let _ = std::fs::remove_file(pin_dir.join(name));
    }
    let _ = std::fs::remove_dir(&pods);
    let _ = std::fs::remove_dir(pin_dir);
    result.map(|()| released)
}

/// Locks `pin_dir` for this process, or says who holds it.
fn lock(pin_dir: &Path) -> Result<nix::fcntl::Flock<File>, RedirectError> {
    let problem = |problem: String| RedirectError::Pin {
        path: pin_dir.to_owned(),
        problem,
    };
    let dir = File::open(pin_dir).map_err(|e| problem(format!("cannot open it: {e}")))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        problem(match e {
            nix::errno::Errno::EWOULDBLOCK => {
                "a warren agent is using it (one agent per pin directory; stop it first)".into()
            }
            e => format!("cannot lock it: {e}"),
        })
    })
}

/// Pins `link` at `path`; from then on it outlives this process.
fn pin<L>(link: L, path: &Path) -> Result<(), RedirectError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let problem = |problem: String| RedirectError::Pin {
        path: path.to_owned(),
        problem,
    };
    let link = FdLink::try_from(link).map_err(|e| problem(e.to_string()))?;
    link.pin(path).map_err(|e| problem(e.to_string()))?;
    Ok(())
}

/// Detaches and removes every pinned link in `dir`, then `dir`; reports
/// the first failure.
fn unpin_all(dir: &Path) -> Result<(), RedirectError> {
    let mut result = Ok(());
    for name in POD_LINKS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        // Dropping the last reference to an unpinned link detaches it.
        let unpinned = PinnedLink::from_pin(&path)
            .map_err(|e| e.to_string())
            .and_then(|link| link.unpin().map(drop).map_err(|e| e.to_string()));
        if let Err(problem) = unpinned
            && result.is_ok()
        {
            result = Err(RedirectError::Pin { path, problem });
        }
    }
    let _ = std::fs::remove_dir(dir);
    result
}

/// The tag (the kernel's hash of its instructions, the same for every load
/// of one build) of the program the link pinned at `path` runs, or of the
/// program pinned there (an ingress filter's, before Linux 6.6).
fn link_program_tag(path: &Path, name: &str) -> Option<u64> {
    // Which of the two an ingress pin is follows from the kernel (pins do
    // not outlive a reboot): asking a program for link info, or the
    // reverse, "succeeds" with the other's fields. The cgroup programs' are
    // always links.
    if name == names::POD_INGRESS && !has_tcx() {
        return SchedClassifier::from_pin(path)
            .ok()?
            .info()
            .ok()
            .map(|info| info.tag());
    }
    let link = FdLink::from(PinnedLink::from_pin(path).ok()?);
    let id = link.info().ok()?.program_id();
    aya::programs::loaded_programs()
        .flatten()
        .find(|program| program.id() == id)
        .map(|program| program.tag())
}

/// Whether tc programs attach as TCX links (Linux 6.6), as aya decides.
/// The egress check this kernel takes: keyed by the socket's network
/// namespace where cgroup_skb may ask for it (6.15 on; a namespace of its own
/// inside a pod is then let be, as before), by cgroup storage before.
fn egress_program() -> &'static str {
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 15, 0)) {
        names::EGRESS_NETNS
    } else {
        names::EGRESS
    }
}

fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Where the ingress filter goes on kernels without TCX: a fixed priority
/// (first, as a TCX program runs before every tc filter) and handle, so that
/// it is the same filter whichever agent looks.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0x7761);

/// Attaches the ingress program as a netlink tc filter (direct action) on
/// `interface`'s clsact qdisc, replacing a filter of a previous agent's (an
/// incomplete enrolment). The filter stays when the agent goes: the pod
/// keeps failing closed.
fn attach_filter(program: &mut SchedClassifier, interface: &str) -> Result<(), RedirectError> {
    let name = names::POD_INGRESS;
    // Ignored: it fails when the qdisc is there already (a CNI's, or ours
    // from an earlier enrolment); when it is missing, attaching says so.
    let _ = qdisc_add_clsact(interface);
    let _ = qdisc_detach_program(interface, TcAttachType::Ingress, name);
    let options = NlOptions {
        priority: FILTER_PRIORITY,
        handle: FILTER_HANDLE,
        classid: None,
    };
    let id = program
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options),
        )
        .map_err(|source| RedirectError::Program { name, source })?;
    let link = program
        .take_link(id)
        .map_err(|source| RedirectError::Program { name, source })?;
    // Dropping it would remove the filter; it is to outlive the agent.
    std::mem::forget(link);
    Ok(())
}

/// Removes the ingress filter from the pod's interface. A namespace or
/// interface that is gone took the filter with it.
fn detach_filter(netns: &Path, pod_ip: Ipv4Addr) -> Result<(), RedirectError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, pod_ip, |interface| {
        match qdisc_detach_program(interface, TcAttachType::Ingress, names::POD_INGRESS) {
            Ok(()) => Ok(()),
            Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RedirectError::Interface {
                path: netns.to_owned(),
                problem: format!("cannot detach the ingress filter from {interface}: {e}"),
            }),
        }
    })
    .or_else(|e| match e {
        // No interface has the address any more: nothing to detach.
        RedirectError::Interface { ref problem, .. } if problem.starts_with(NO_INTERFACE) => Ok(()),
        e => Err(e),
    })
}

const NO_INTERFACE: &str = "no interface has the pod's address";

/// Runs `f` with the name of the interface holding `pod_ip`, on a thread
/// inside the namespace `netns` (interface names and indexes are per
/// namespace; the agent's own threads stay where they are).
fn in_netns<T: Send>(
    netns: &Path,
    pod_ip: Ipv4Addr,
    f: impl FnOnce(&str) -> Result<T, RedirectError> + Send,
) -> Result<T, RedirectError> {
    let interface_error = |problem: String| RedirectError::Interface {
        path: netns.to_owned(),
        problem,
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(netns).map_err(|e| interface_error(e.to_string()))?;
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| interface_error(format!("cannot enter it: {e}")))?;
                let interface = interface_with(pod_ip)
                    .ok_or_else(|| interface_error(format!("{NO_INTERFACE} {pod_ip}")))?;
                f(&interface)
            })
            .join()
            .unwrap_or_else(|_| Err(interface_error("the namespace's thread panicked".into())))
    })
}

/// Whether `path` is on a bpf filesystem (where pins can be made).
fn on_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// The fast path's maps (see the eBPF programs' documentation): the agent's
/// grants and lease, the kernel's records of open connections and their
/// counts, and its ring of open and close events.
pub struct FastPathMaps {
    grants: HashMap<MapData, GrantKey, u8>,
    flows: HashMap<MapData, Tuple, FlowInfo>,
    lease: Array<MapData, u64>,
    events: RingBuf<MapData>,
    /// Per pod, what sock_ops counted ([`names::FAST_OPEN`]) and what this
    /// agent (or an earlier one) removed ([`names::FAST_FORGOTTEN`]);
    /// for the node, both sums.
    open: HashMap<MapData, u64, i64>,
    forgotten: HashMap<MapData, u64, i64>,
    totals: Array<MapData, i64>,
}

/// What [`FastPathMaps::recount`] read and set.
pub struct Recount {
    pub flows: Vec<(Tuple, FlowInfo)>,
    /// Counts that had drifted from the records (the pod's netns cookie,
    /// none for the node): by how much they were over.
    pub corrected: Vec<(Option<u64>, i64)>,
}

/// How far the node's count may move while the records are read for it to
/// be set to them: the error that leaves (of 8 192 to spare).
const NODE_RECOUNT_SLACK: i64 = 64;

/// Fast-path connections open, as the kernel counts them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FastOpen {
    pub node: i64,
    /// By netns cookie, the pods the fast path serves.
    pub by_pod: std::collections::HashMap<u64, i64>,
}

/// `BPF_EXIST`: an update only of an entry already there.
const BPF_EXIST: u64 = 2;
/// `BPF_NOEXIST`: an update only if the entry is not there yet.
const BPF_NOEXIST: u64 = 1;

impl FastPathMaps {
    fn error(name: &'static str) -> impl FnOnce(MapError) -> RedirectError {
        move |source| RedirectError::Map { name, source }
    }

    /// Lets the pod of `key.netns_cookie` connect straight to `key.ip:port`.
    pub fn grant(&mut self, key: GrantKey) -> Result<(), RedirectError> {
        self.grants
            .insert(key, 1, 0)
            .map_err(Self::error(names::FAST_GRANTS))
    }

    /// Takes a grant back: the next connect() goes through the agent.
    pub fn revoke(&mut self, key: &GrantKey) -> Result<(), RedirectError> {
        match self.grants.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Self::error(names::FAST_GRANTS)(source)),
        }
    }

    /// Takes back every grant.
    fn clear_grants(&mut self) -> Result<(), RedirectError> {
        let keys: Vec<GrantKey> = self.grants.keys().flatten().collect();
        keys.iter().try_for_each(|key| self.revoke(key))
    }

    /// Grants hold until `until` (`CLOCK_MONOTONIC`, ns); 0 voids them.
    pub fn set_lease(&mut self, until: u64) -> Result<(), RedirectError> {
        self.lease
            .set(0, until, 0)
            .map_err(Self::error(names::FAST_LEASE))
    }

    /// The kernel's records of open fast-path connections, each once (the
    /// kernel's next-key walk starts again from the first bucket when the
    /// key it is given went meanwhile: a record can be read twice).
    pub fn flows(&self) -> Vec<(Tuple, FlowInfo)> {
        let once: std::collections::HashMap<Tuple, FlowInfo> =
            self.flows.iter().flatten().collect();
        once.into_iter().collect()
    }

    /// Removes the record of `tuple`: its SYN is refused from now on. Counted
    /// as forgotten for its pod if the kernel had not removed it meanwhile.
    pub fn forget_flow(&mut self, tuple: &Tuple) {
        let Ok(info) = self.flows.get(tuple, 0) else {
            return;
        };
        if self.flows.remove(tuple).is_ok() {
            self.add_forgotten(info.netns_cookie, 1);
        }
    }

    /// Adds `count` to what this agent removed of the pod of `netns`'s (if
    /// the fast path still serves it) and of the node's. The agent is their
    /// only writer, and holds `self` mutably.
    fn add_forgotten(&mut self, netns: u64, count: i64) {
        if let Ok(forgotten) = self.forgotten.get(&netns, 0) {
            let _ = self.forgotten.insert(netns, forgotten + count, BPF_EXIST);
        }
        let node = self.totals.get(&1, 0).unwrap_or(0);
        let _ = self.totals.set(1, node + count, 0);
    }

    /// The pod of `netns` is served: its connections are counted from now
    /// on, and it may take the fast path within its share. An earlier
    /// agent's counts are kept (its connections are still open).
    pub fn count_pod(&mut self, netns: u64) -> Result<(), RedirectError> {
        for (map, name) in [
            (&mut self.forgotten, names::FAST_FORGOTTEN),
            (&mut self.open, names::FAST_OPEN),
        ] {
            match map.insert(netns, 0, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => return Err(Self::error(name)(source)),
            }
        }
        Ok(())
    }

    /// The pod of `netns` left: no count, so no fast path. (Its records are
    /// forgotten first, by the caller.)
    pub fn uncount_pod(&mut self, netns: u64) {
        let _ = self.open.remove(&netns);
        let _ = self.forgotten.remove(&netns);
    }

    /// Fast-path connections open, for the node and each pod served.
    pub fn open(&self) -> FastOpen {
        let node = self.totals.get(&0, 0).unwrap_or(0) - self.totals.get(&1, 0).unwrap_or(0);
        let by_pod = self
            .open
            .iter()
            .flatten()
            .map(|(netns, counted)| (netns, counted - self.forgotten.get(&netns, 0).unwrap_or(0)))
            .collect();
        FastOpen { node, by_pod }
    }

    /// The kernel's records of open fast-path connections, each once, with
    /// the counts set to them where they had drifted: a pod's where its
    /// count did not move while they were read, the node's where it moved
    /// by at most [`NODE_RECOUNT_SLACK`] (it moves with every pod's). Not a
    /// snapshot: records made and removed during the read (a close and an
    /// open leave a count where it was) leave an error of about their
    /// number, undone at the next recount, and far below the table's room
    /// past the limits. Drift comes from records made without a
    /// count (by an agent from before the counts), an add landing on a
    /// reused entry, an agent stopped between a removal and its count. The
    /// entries of pods `departed` names go once they have no records.
    pub fn recount(&mut self, departed: impl Fn(u64) -> bool) -> Recount {
        let counted = |maps: &Self| -> (i64, std::collections::HashMap<u64, i64>) {
            let node = maps.totals.get(&0, 0).unwrap_or(0);
            (node, maps.open.iter().flatten().collect())
        };
        let before = counted(self);
        let flows = self.flows();
        let after = counted(self);
        let mut records = std::collections::HashMap::<u64, i64>::new();
        for (_, info) in &flows {
            *records.entry(info.netns_cookie).or_default() += 1;
        }
        let mut corrected = Vec::new();
        for (&netns, &open) in &after.1 {
            let held = records.get(&netns).copied().unwrap_or(0);
            if departed(netns) && held == 0 {
                self.uncount_pod(netns);
                continue;
            }
            if before.1.get(&netns) != Some(&open) {
                continue;
            }
            let forgotten = self.forgotten.get(&netns, 0).unwrap_or(0);
            if open - forgotten != held
                && self.forgotten.insert(netns, open - held, BPF_EXIST).is_ok()
            {
                corrected.push((Some(netns), open - forgotten - held));
            }
        }
        let (node, held) = (after.0, flows.len() as i64);
        if (node - before.0).abs() <= NODE_RECOUNT_SLACK {
            let forgotten = self.totals.get(&1, 0).unwrap_or(0);
            let drift = node - forgotten - held;
            if drift != 0
                && self.totals.set(1, node - held, 0).is_ok()
                && drift.abs() > NODE_RECOUNT_SLACK
            {
                corrected.push((None, drift));
            }
        }
        Recount { flows, corrected }
    }

    /// The events queued since the last call, oldest first.
    pub fn events(&mut self) -> Vec<FastEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(event) = parse_event(&item) {
                events.push(event);
            }
        }
        events
    }
}

/// A [`FastEvent`] from its bytes (the layout `#[repr(C)]` gives it, in
/// the host's byte order); None if there are too few.
fn parse_event(bytes: &[u8]) -> Option<FastEvent> {
    if bytes.len() < std::mem::size_of::<FastEvent>() {
        return None;
    }
    let u16_at = |at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    Some(FastEvent {
        kind: u32_at(0),
        old_state: u32_at(4),
        tuple: Tuple {
            saddr: u32_at(8),
            daddr: u32_at(12),
            sport: u16_at(16),
            dport: u16_at(18),
        },
        _pad: 0,
        info: FlowInfo {
            netns_cookie: u64_at(24),
            opened_ns: u64_at(32),
        },
        closed_ns: u64_at(40),
        bytes_acked: u64_at(48),
        bytes_received: u64_at(56),
    })
}

/// Original destinations of captured connections, recorded by the kernel
/// programs; shared by every outbound listener. The kernel counts what it
/// records, per pod and for the node; the agent counts what it takes, and
/// connect() is refused to a pod (or all) with too many awaiting it
/// (`PENDING_PER_POD`, `PENDING_PER_NODE`).
#[derive(Clone)]
pub struct OriginalDsts(Arc<Mutex<Records>>);

struct Records {
    map: HashMap<MapData, FlowKey, Ipv4Dst>,
    /// Added to by the kernel only.
    recorded: HashMap<MapData, u64, i64>,
    /// Written by the agent only.
    taken: HashMap<MapData, u64, i64>,
    /// Slot 0: recorded, all pods (the kernel's); slot 1: taken (ours).
    totals: Array<MapData, i64>,
    /// What `taken` holds, so that a take writes without reading.
    taken_by_pod: std::collections::HashMap<u64, i64>,
    taken_total: i64,
    /// Entries of the table, and for how many reconciliations in a row
    /// each has been there unchanged.
    ages: Ages,
}

/// Reconciliations an entry may stay in the table before it is taken for
/// stale: 140 s, more than a connect() retries its SYN (127 s by default)
/// while nothing accepts it. Its client has given up.
const STALE_ROUNDS: u32 = 14;

/// For how many reconciliations in a row each entry of the table has been
/// there with the same destination.
#[derive(Debug, Default)]
struct Ages(std::collections::HashMap<FlowKey, (Ipv4Dst, u32)>);

impl Ages {
    /// Ages what is in the table now (`entries`), forgets what is not, and
    /// returns the entries that have grown stale.
    fn update(&mut self, entries: impl IntoIterator<Item = (FlowKey, Ipv4Dst)>) -> Vec<FlowKey> {
        let mut next = std::collections::HashMap::new();
        let mut stale = Vec::new();
        for (key, dst) in entries {
            let rounds = match self.0.get(&key) {
                // The same connection still waiting (another one from the
                // same port would most likely go elsewhere).
                Some((seen, rounds)) if *seen == dst => rounds + 1,
                _ => 1,
            };
            if rounds >= STALE_ROUNDS {
                stale.push(key);
            } else {
                next.insert(key, (dst, rounds));
            }
        }
        self.0 = next;
        stale
    }
}

impl Records {
    fn set_taken(&mut self, netns_cookie: u64, taken: i64) {
        self.taken_by_pod.insert(netns_cookie, taken);
        let _ = self.taken.insert(netns_cookie, taken, 0);
    }

    fn set_taken_total(&mut self, taken: i64) {
        self.taken_total = taken;
        let _ = self.totals.set(1, taken, 0);
    }
}

impl OriginalDsts {
    /// Takes (reads and deletes) the original destination of the connection
    /// that arrived from `port` in the namespace `netns_cookie`.
    pub fn take(&self, netns_cookie: u64, port: u16) -> Option<SocketAddrV4> {
        let key = FlowKey::new(netns_cookie, port);
        let mut records = self.lock();
        let dst = records.map.get(&key, 0).ok()?;
        // A leftover entry would only be overwritten by the next connection
        // from this port; removing it keeps the LRU for live flows.
        let _ = records.map.remove(&key);
        let taken = match records.taken_by_pod.get(&netns_cookie) {
            Some(taken) => *taken,
            // An earlier agent's count, if any.
            None => records.taken.get(&netns_cookie, 0).unwrap_or(0),
        };
        records.set_taken(netns_cookie, taken + 1);
        let total = records.taken_total + 1;
        records.set_taken_total(total);
        Some(SocketAddrV4::new(Ipv4Addr::from(dst.ip), dst.port))
    }

    /// Sets what counts as taken to what the table no longer holds: an
    /// entry the agent never took (its client gave up before it was
    /// accepted, the LRU evicted it, no agent was running) would otherwise
    /// count against its pod for good; an entry that has waited longer than
    /// any connect() does ([`STALE_ROUNDS`]) is removed. Returns what awaits
    /// the agent, all pods. The kernel's counts are read before the table, so that one
    /// recorded meanwhile counts as awaiting until the next time.
    pub fn reconcile(&self) -> i64 {
        let mut records = self.lock();
        let recorded_total = records.totals.get(&0, 0).unwrap_or(0);
        let recorded: Vec<(u64, i64)> = records.recorded.iter().filter_map(Result::ok).collect();
        let entries: Vec<(FlowKey, Ipv4Dst)> = records.map.iter().filter_map(Result::ok).collect();
        let stale = records.ages.update(entries.iter().copied());
        for key in &stale {
            let _ = records.map.remove(key);
        }
        let mut waiting = std::collections::HashMap::<u64, i64>::new();
        for (key, _) in &entries {
            if !stale.contains(key) {
                *waiting.entry(key.netns_cookie).or_default() += 1;
            }
        }
        for (netns_cookie, recorded) in recorded {
            let waiting = waiting.get(&netns_cookie).copied().unwrap_or(0);
            records.set_taken(netns_cookie, recorded - waiting);
        }
        let waiting: i64 = waiting.values().sum();
        records.set_taken_total(recorded_total - waiting);
        waiting
    }

    /// Forgets the counts of a pod that left.
    pub fn forget(&self, netns_cookie: u64) {
        let mut records = self.lock();
        records.taken_by_pod.remove(&netns_cookie);
        let _ = records.recorded.remove(&netns_cookie);
        let _ = records.taken.remove(&netns_cookie);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Fast-path connections open, as the kernel counts them, and its records
/// of them by client pod, from the maps pinned in `pin_dir` (for tests and
/// tools).
pub fn read_fast_open(
    pin_dir: &Path,
) -> Result<(FastOpen, std::collections::HashMap<u64, i64>), RedirectError> {
    fn pinned<T>(
        pin_dir: &Path,
        name: &'static str,
        convert: impl FnOnce(Map) -> Result<T, MapError>,
    ) -> Result<T, RedirectError> {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| RedirectError::Pin {
            path: path.clone(),
            problem: format!("cannot open the pinned map: {e}"),
        })?;
        Map::from_map_data(data)
            .and_then(convert)
            .map_err(|source| RedirectError::Map { name, source })
    }
    let maps = FastPathMaps {
        grants: pinned(pin_dir, names::FAST_GRANTS, HashMap::try_from)?,
        flows: pinned(pin_dir, names::FAST_FLOWS, HashMap::try_from)?,
        lease: pinned(pin_dir, names::FAST_LEASE, Array::try_from)?,
        events: pinned(pin_dir, names::FAST_EVENTS, RingBuf::try_from)?,
        open: pinned(pin_dir, names::FAST_OPEN, HashMap::try_from)?,
        forgotten: pinned(pin_dir, names::FAST_FORGOTTEN, HashMap::try_from)?,
        totals: pinned(pin_dir, names::FAST_TOTALS, Array::try_from)?,
    };
    let mut records = std::collections::HashMap::new();
    for (_, info) in maps.flows() {
        *records.entry(info.netns_cookie).or_default() += 1;
    }
    Ok((maps.open(), records))
}

/// Captured connections whose original destination awaits the agent, all
/// pods, from the maps pinned in `pin_dir` (for tests and tools).
pub fn read_pending(pin_dir: &Path) -> Result<i64, RedirectError> {
    let path = pin_dir.join(names::RECORD_TOTALS);
    let data = MapData::from_pin(&path).map_err(|e| RedirectError::Pin {
        path: path.clone(),
        problem: format!("cannot open the pinned record counts: {e}"),
    })?;
    let totals: Array<MapData, i64> =
        Map::from_map_data(data)
            .and_then(Array::try_from)
            .map_err(|source| RedirectError::Map {
                name: names::RECORD_TOTALS,
                source,
            })?;
    let count = |slot| totals.get(&slot, 0).unwrap_or(0);
    Ok(count(0) - count(1))
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, RedirectError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(RedirectError::Missing(name))?
        .try_into()
        .map_err(|source| RedirectError::Program { name, source })
}

/// The name of the interface holding `ip`, in this thread's namespace.
fn interface_with(ip: Ipv4Addr) -> Option<String> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let address = ifa.address?;
        let v4 = address.as_sockaddr_in()?;
        (v4.ip() == ip).then_some(ifa.interface_name)
    })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, RedirectError> {
    ebpf.take_map(name).ok_or(RedirectError::Missing(name))
}

/// aya-log records from the kernel arrive in a ring buffer; relay them to the
/// `log` facade, which tracing-subscriber bridges into the agent's log.
fn forward_logs(ebpf: &mut Ebpf) -> Result<(), RedirectError> {
    let logger = aya_log::EbpfLogger::init(ebpf).map_err(|e| RedirectError::Log(e.to_string()))?;
    // SAFETY: the logger owns its ring buffer's fd and returns that same fd
    // from as_raw_fd() for as long as it lives, which is as long as the
    // AsyncFd that owns it.
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| RedirectError::Log(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stopped forwarding eBPF logs");
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use aya::maps::PerCpuValues;

    use super::*;

    #[test]
    fn an_entry_left_in_the_table_unchanged_for_too_long_is_stale() {
        let dst = |port| Ipv4Dst {
            ip: 0x0af4_0202,
            port,
            _pad: 0,
        };
        let (waiting, reused, gone) = (
            FlowKey::new(1, 40_000),
            FlowKey::new(1, 40_001),
            FlowKey::new(2, 40_000),
        );
        let mut ages = Ages::default();
        for round in 1..STALE_ROUNDS {
            // `reused`'s port carries another connection every other round;
            // `gone` is taken after the first.
            let mut entries = vec![(waiting, dst(80)), (reused, dst(80 + (round % 2) as u16))];
            if round == 1 {
                entries.push((gone, dst(80)));
            }
            assert_eq!(ages.update(entries), [], "round {round}");
        }
        assert_eq!(
            ages.update([(waiting, dst(80)), (reused, dst(99)), (gone, dst(80))]),
            [waiting],
            "only the one there all along"
        );
        assert!(!ages.0.contains_key(&waiting), "forgotten once removed");
        assert_eq!(ages.0[&gone].1, 1, "back, counted from one again");
    }

    fn counts(values: &[(DropReason, u64)]) -> DropCounts {
        let mut counts = DropCounts::default();
        for &(reason, n) in values {
            counts.0[reason.index() as usize] = n;
        }
        counts
    }

    /// The reader's offsets are the ones `#[repr(C)]` gives the programs.
    #[test]
    fn fast_events_are_read_at_their_layouts_offsets() {
        use std::mem::offset_of;
        let mut bytes = vec![0u8; std::mem::size_of::<FastEvent>()];
        let mut put = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
        put(offset_of!(FastEvent, kind), &2u32.to_ne_bytes());
        put(offset_of!(FastEvent, old_state), &2u32.to_ne_bytes());
        let tuple = offset_of!(FastEvent, tuple);
        put(
            tuple + offset_of!(Tuple, saddr),
            &0x0a00_0001u32.to_ne_bytes(),
        );
        put(
            tuple + offset_of!(Tuple, daddr),
            &0x0a00_0002u32.to_ne_bytes(),
        );
        put(tuple + offset_of!(Tuple, sport), &40000u16.to_ne_bytes());
        put(tuple + offset_of!(Tuple, dport), &8080u16.to_ne_bytes());
        let info = offset_of!(FastEvent, info);
        put(
            info + offset_of!(FlowInfo, netns_cookie),
            &77u64.to_ne_bytes(),
        );
        put(
            info + offset_of!(FlowInfo, opened_ns),
            &1_000u64.to_ne_bytes(),
        );
        put(offset_of!(FastEvent, closed_ns), &5_000u64.to_ne_bytes());
        put(offset_of!(FastEvent, bytes_acked), &123u64.to_ne_bytes());
        put(offset_of!(FastEvent, bytes_received), &456u64.to_ne_bytes());
        let event = parse_event(&bytes).expect("a whole record");
        assert_eq!(
            event,
            FastEvent {
                kind: 2,
                old_state: 2,
                tuple: Tuple {
                    saddr: 0x0a00_0001,
                    daddr: 0x0a00_0002,
                    sport: 40000,
                    dport: 8080
                },
                _pad: 0,
                info: FlowInfo {
                    netns_cookie: 77,
                    opened_ns: 1_000
                },
                closed_ns: 5_000,
                bytes_acked: 123,
                bytes_received: 456,
            }
        );
        assert_eq!(
            parse_event(&bytes[..63]),
            None,
            "a short record is not read"
        );
    }

    #[test]
    fn drop_counts_say_each_reason_and_what_grew() {
        let before = counts(&[(DropReason::StrictPlaintext, 3), (DropReason::Fragment, 1)]);
        let after = counts(&[
            (DropReason::StrictPlaintext, 5),
            (DropReason::Fragment, 1),
            (DropReason::SpoofedSource, 2),
        ]);
        assert_eq!(after.get(DropReason::StrictPlaintext), 5);
        assert_eq!(after.total(), 8);
        let grown = after.since(&before);
        assert_eq!(
            grown.iter().filter(|&(_, n)| n > 0).collect::<Vec<_>>(),
            [
                (DropReason::StrictPlaintext, 2),
                (DropReason::SpoofedSource, 2)
            ]
        );
        // Counters only grow; a map made again (after an uninstall) starts
        // from zero, which reads as no growth rather than a wrap.
        assert_eq!(before.since(&after).total(), 0);
        assert_eq!(
            DropCounts::default()
                .iter()
                .map(|(r, _)| r)
                .collect::<Vec<_>>(),
            DropReason::ALL
        );
    }

    #[test]
    fn reading_drops_without_a_pinned_map_names_the_pin() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_drops(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&dir.path().join(names::DROPS).display().to_string()),
            "{err}"
        );
    }

    /// A pinned map with per-CPU values, as the programs leave it; it has
    /// fewer slots than there are reasons, as one an older agent created
    /// would.
    #[test]
    fn pinned_drop_counters_are_summed_over_cpus() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (creates a BPF map)");
            return;
        }
        let bpffs = Path::new("/sys/fs/bpf");
        if !on_bpffs(bpffs) {
            eprintln!("skipped: no bpf filesystem at /sys/fs/bpf");
            return;
        }
        let dir = bpffs.join(format!("warren-drops-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        let slots = 3;
        let mut map = PerCpuArray::<MapData, u64>::create(slots, 0).unwrap();
        // CPU i counted i + 1 strict drops, and the last CPU 7 spoofs.
        let strict: Vec<u64> = (1..=cpus as u64).collect();
        let mut spoofed = vec![0; cpus];
        spoofed[cpus - 1] = 7;
        for (reason, values) in [
            (DropReason::StrictPlaintext, strict.clone()),
            (DropReason::SpoofedSource, spoofed),
        ] {
            map.set(reason.index(), PerCpuValues::try_from(values).unwrap(), 0)
                .unwrap();
        }
        map.pin(dir.join(names::DROPS)).unwrap();

        let read = read_drops(&dir);
        let _ = std::fs::remove_file(dir.join(names::DROPS));
        let _ = std::fs::remove_dir(&dir);
        let read = read.unwrap();
        assert_eq!(
            read.get(DropReason::StrictPlaintext),
            strict.iter().sum::<u64>()
        );
        assert_eq!(read.get(DropReason::SpoofedSource), 7);
        // Beyond the map's slots: nothing counted, not an error.
        assert_eq!(read.get(DropReason::Ipv6Unchecked), 0);
        assert_eq!(read.total(), strict.iter().sum::<u64>() + 7);
    }
}
