//! The eBPF side of capture: loads warren's kernel programs, attaches them to
//! enrolled pods' cgroups and interfaces, keeps the pods' mTLS modes where the
//! ingress program reads them, and answers "where was this connection
//! going?".
//!
//! Links are bpf_link file descriptors owned by this process: when the agent
//! exits, however it exits, the kernel detaches them and capture stops. We do
//! not pin them (yet): a pod whose agent is gone then talks directly rather
//! than to a listener nobody serves. Policy that must hold while the agent is
//! down (STRICT mTLS) will need pinned programs; see ARCHITECTURE.md.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use std::{collections::BTreeMap, os::fd::AsFd};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SockOps, TcAttachType,
        cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId, tc::SchedClassifierLinkId,
    },
};
use nix::sched::{CloneFlags, setns};
use tokio::io::unix::AsyncFd;
use warren_common::{FlowKey, InboundKey, Ipv4Dst, OUTBOUND_PORT, PodInfo, names};

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
    #[error("forwarding eBPF logs: {0}")]
    Log(String),
}

/// What enrolling one pod attached; hand it back to [`Redirector::withdraw`].
#[derive(Debug)]
pub struct Attachment {
    netns_cookie: u64,
    pod_ip: Ipv4Addr,
    links: Vec<Link>,
}

#[derive(Debug)]
enum Link {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    SockOps(SockOpsLinkId),
    Ingress(SchedClassifierLinkId),
}

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
    pods: HashMap<MapData, u64, PodInfo>,
    modes: HashMap<MapData, InboundKey, u32>,
    listeners: SockHash<MapData, u32>,
    /// The ports with a mode of their own, per pod, to remove them later.
    mode_ports: std::collections::HashMap<Ipv4Addr, Vec<u16>>,
    original_dst: OriginalDsts,
}

impl Redirector {
    /// Loads the programs into the kernel (attaching nothing yet) and starts
    /// forwarding their aya-log records to the agent's log. Needs a tokio
    /// runtime.
    pub fn load() -> Result<Self, RedirectError> {
        let mut ebpf = Ebpf::load(PROGRAMS)?;
        forward_logs(&mut ebpf)?;

        for name in SOCK_ADDR_PROGRAMS {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect
                .load()
                .map_err(|source| RedirectError::Program { name, source })?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(|source| RedirectError::Program {
            name: names::SOCK_OPS,
            source,
        })?;
        let ingress: &mut SchedClassifier = program(&mut ebpf, names::POD_INGRESS)?;
        ingress.load().map_err(|source| RedirectError::Program {
            name: names::POD_INGRESS,
            source,
        })?;
        let map_error = |name| move |source| RedirectError::Map { name, source };
        let modes = HashMap::try_from(take_map(&mut ebpf, names::INBOUND_MODES)?)
            .map_err(map_error(names::INBOUND_MODES))?;
        let listeners = SockHash::try_from(take_map(&mut ebpf, names::INBOUND_LISTENERS)?)
            .map_err(map_error(names::INBOUND_LISTENERS))?;

        let pods = HashMap::try_from(take_map(&mut ebpf, names::PODS)?).map_err(|source| {
            RedirectError::Map {
                name: names::PODS,
                source,
            }
        })?;
        let original_dst =
            HashMap::try_from(take_map(&mut ebpf, names::ORIGINAL_DST)?).map_err(|source| {
                RedirectError::Map {
                    name: names::ORIGINAL_DST,
                    source,
                }
            })?;
        Ok(Self {
            ebpf,
            pods,
            modes,
            listeners,
            mode_ports: std::collections::HashMap::new(),
            original_dst: OriginalDsts(Arc::new(Mutex::new(original_dst))),
        })
    }

    /// Where captured connections' original destinations are looked up.
    pub fn original_dsts(&self) -> OriginalDsts {
        self.original_dst.clone()
    }

    /// Starts capturing the outbound TCP connections of the pod whose cgroup
    /// is `cgroup` and whose network namespace (file `netns`) has
    /// `netns_cookie`, and applying `modes` to connections arriving at it.
    /// Its outbound listener and its plaintext listener (`plaintext`) must
    /// already be up.
    pub fn enroll(
        &mut self,
        cgroup: &Path,
        netns: &Path,
        netns_cookie: u64,
        pod_ip: Ipv4Addr,
        modes: &InboundModes,
        plaintext: &impl AsFd,
    ) -> Result<Attachment, RedirectError> {
        let cgroup_dir = File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut attachment = Attachment {
            netns_cookie,
            pod_ip,
            links: Vec::with_capacity(4),
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
            .and_then(|()| self.attach_ingress(netns, pod_ip, &mut attachment));
        if let Err(e) = prepared {
            let _ = self.detach_all(attachment);
            return Err(e);
        }
        if let Err(e) = self.attach_all(&cgroup_dir, &mut attachment) {
            // The attach error is the one worth reporting; undo what we can.
            let _ = self.detach_all(attachment);
            return Err(e);
        }
        // The connect hooks capture only once the pod is in this map.
        let info = PodInfo {
            ip: u32::from(pod_ip),
            outbound_port: OUTBOUND_PORT,
            _pad: 0,
        };
        if let Err(source) = self.pods.insert(netns_cookie, info, 0) {
            let _ = self.detach_all(attachment);
            return Err(RedirectError::Map {
                name: names::PODS,
                source,
            });
        }
        Ok(attachment)
    }

    fn attach_all(
        &mut self,
        cgroup: &File,
        attachment: &mut Attachment,
    ) -> Result<(), RedirectError> {
        // aya attaches through bpf_link (kernel >= 5.7), which takes no mode
        // flags and always shares the hook with other programs (the CNI's,
        // say): `Single` is the value that passes no flags.
        let mode = CgroupAttachMode::Single;
        let name = names::SOCK_OPS;
        let link = program::<SockOps>(&mut self.ebpf, name)?
            .attach(cgroup, mode)
            .map_err(|source| RedirectError::Program { name, source })?;
        attachment.links.push(Link::SockOps(link));
        for name in SOCK_ADDR_PROGRAMS {
            let link = program::<CgroupSockAddr>(&mut self.ebpf, name)?
                .attach(cgroup, mode)
                .map_err(|source| RedirectError::Program { name, source })?;
            attachment.links.push(Link::SockAddr(name, link));
        }
        Ok(())
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
        // Ports first, the default last: while it is being written the pod
        // keeps its old default rather than none.
        let old = self
            .mode_ports
            .insert(pod_ip, modes.ports.keys().copied().collect());
        for port in old.unwrap_or_default() {
            if !modes.ports.contains_key(&port) {
                let _ = self.modes.remove(&InboundKey::new(ip, port));
            }
        }
        for (&port, &mode) in &modes.ports {
            self.modes
                .insert(InboundKey::new(ip, port), mode, 0)
                .map_err(map_error)?;
        }
        self.modes
            .insert(InboundKey::new(ip, 0), modes.default, 0)
            .map_err(map_error)
    }

    /// Attaches the ingress program to the pod's interface (the one holding
    /// `pod_ip`), from a thread inside the pod's namespace: interface names
    /// and indexes are per namespace.
    fn attach_ingress(
        &mut self,
        netns: &Path,
        pod_ip: Ipv4Addr,
        attachment: &mut Attachment,
    ) -> Result<(), RedirectError> {
        let name = names::POD_INGRESS;
        let program: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let interface_error = |problem: String| RedirectError::Interface {
            path: netns.to_owned(),
            problem,
        };
        let link = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(netns).map_err(|e| interface_error(e.to_string()))?;
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| interface_error(format!("cannot enter it: {e}")))?;
                    let interface = interface_with(pod_ip).ok_or_else(|| {
                        interface_error(format!("no interface has the pod's address {pod_ip}"))
                    })?;
                    program
                        .attach(&interface, TcAttachType::Ingress)
                        .map_err(|source| RedirectError::Program { name, source })
                })
                .join()
                .unwrap_or_else(|_| Err(interface_error("attaching panicked".into())))
        })?;
        attachment.links.push(Link::Ingress(link));
        Ok(())
    }

    /// Stops capture for a pod. Connections already captured keep going.
    pub fn withdraw(&mut self, attachment: Attachment) -> Result<(), RedirectError> {
        // Remove the pod first: from that instant the hooks let it be.
        let removed = match self.pods.remove(&attachment.netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                name: names::PODS,
                source,
            }),
        };
        // Detach even if that failed: the links are what capture.
        let pod_ip = attachment.pod_ip;
        let detached = self.detach_all(attachment);
        self.forget_inbound(pod_ip);
        removed.and(detached)
    }

    /// Removes the pod's modes and plaintext listener from the maps.
    fn forget_inbound(&mut self, pod_ip: Ipv4Addr) {
        let ip = u32::from(pod_ip);
        let _ = self.modes.remove(&InboundKey::new(ip, 0));
        for port in self.mode_ports.remove(&pod_ip).unwrap_or_default() {
            let _ = self.modes.remove(&InboundKey::new(ip, port));
        }
        let _ = self.listeners.remove(&ip);
    }

    /// Detaches every link, reporting the first failure.
    fn detach_all(&mut self, attachment: Attachment) -> Result<(), RedirectError> {
        let mut result = Ok(());
        for link in attachment.links {
            let detached = match link {
                Link::Ingress(id) => program::<SchedClassifier>(&mut self.ebpf, names::POD_INGRESS)
                    .and_then(|p| {
                        p.detach(id).map_err(|source| RedirectError::Program {
                            name: names::POD_INGRESS,
                            source,
                        })
                    }),
                Link::SockOps(id) => {
                    program::<SockOps>(&mut self.ebpf, names::SOCK_OPS).and_then(|p| {
                        p.detach(id).map_err(|source| RedirectError::Program {
                            name: names::SOCK_OPS,
                            source,
                        })
                    })
                }
                Link::SockAddr(name, id) => program::<CgroupSockAddr>(&mut self.ebpf, name)
                    .and_then(|p| {
                        p.detach(id)
                            .map_err(|source| RedirectError::Program { name, source })
                    }),
            };
            if result.is_ok() {
                result = detached;
            }
        }
        result
    }
}

/// Original destinations of captured connections, recorded by the kernel
/// programs; shared by every outbound listener.
#[derive(Clone)]
pub struct OriginalDsts(Arc<Mutex<HashMap<MapData, FlowKey, Ipv4Dst>>>);

impl OriginalDsts {
    /// Takes (reads and deletes) the original destination of the connection
    /// that arrived from `port` in the namespace `netns_cookie`.
    pub fn take(&self, netns_cookie: u64, port: u16) -> Option<SocketAddrV4> {
        let key = FlowKey::new(netns_cookie, port);
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dst = map.get(&key, 0).ok()?;
        // A leftover entry would only be overwritten by the next connection
        // from this port; removing it keeps the LRU for live flows.
        let _ = map.remove(&key);
        Some(SocketAddrV4::new(Ipv4Addr::from(dst.ip), dst.port))
    }
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
