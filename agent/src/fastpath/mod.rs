//! The same-node fast path: pods of this node that policy allows to talk
//! connect straight to each other, through the node's kernel, instead of
//! through an HBONE tunnel from the agent to itself.
//!
//! How a pair gets there:
//!
//! 1. The first connection goes through the agent as any other. The
//!    outbound side, once a destination on this node accepted the stream,
//!    offers the pair ([`Shortcut`]).
//! 2. [`FastPath`] decides as the destination's inbound side would for an
//!    HBONE stream from the source's identity (both pods served here with
//!    valid certificates, the destination's port not DISABLE, its policies
//!    allowing), and if so writes a grant: (source's network namespace,
//!    destination address, port).
//! 3. The kernel programs do the rest (see the eBPF crate): connect4 leaves
//!    a granted connect() alone, sock_ops records its addresses, and the
//!    destination's ingress program lets in a plaintext SYN only if they are
//!    recorded. The grants hold while the agent's lease runs: an agent that
//!    stops leaves them void (connections go to the agent, that is nowhere:
//!    fail closed).
//! 4. The kernel reports each connection opened and closed; here each
//!    becomes what an HBONE connection would be: the destination's
//!    authorization (its AUDIT and dry-run lines, its decision counted),
//!    Istio's metrics from both reporters, an access line each.
//!
//! What takes a grant back: any change of the mesh (policies, workloads,
//! trust), a certificate expiring, either pod leaving (its sandbox going, at
//! CNI DEL), five minutes unused. A pod holds at most [`GRANTS_PER_POD`];
//! and with [`FAST_OPEN_PER_POD`](warren_common::FAST_OPEN_PER_POD)
//! fast-path connections open (or the node with
//! [`FAST_OPEN_PER_NODE`](warren_common::FAST_OPEN_PER_NODE)), connect4
//! sends its next ones to the agent whatever its grants: the kernel counts
//! them, so a burst faster than the agent reads its events meets the limit
//! all the same. Each grant is decided again; those no longer allowed are
//! revoked, and the open connections they allowed are cut (their sockets
//! destroyed in both pods, so that both applications see it), with a log
//! line naming why.

pub mod destroy;
mod task;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tracing::warn;
use warren_common::{GrantKey, Tuple};
use warren_daemon::logging::Chain;

use crate::{
    mesh::{
        Policies, Snapshot, Workload,
        policy::{Connection as PolicyConnection, MtlsMode},
    },
    metrics::Metrics,
    proxy::{PodProxy, Shortcut},
    redirect::FastPathMaps,
};

use destroy::{DestroyError, Destroyer};
pub use task::Task;

/// Offers waiting for the fast path's task; more are dropped (the next
/// connection of the pair offers again).
pub const SHORTCUT_QUEUE: usize = 1024;
/// Grants one pod may hold at once (pairs it reached: a destination and a
/// port each). More pairs take the agent's path; grants unused for
/// [`GRANT_IDLE`] are taken back, which makes room.
pub const GRANTS_PER_POD: usize = 1024;
/// How long a grant with no open connection lasts.
pub const GRANT_IDLE: Duration = Duration::from_secs(300);
/// The kernel's TCP states (`tcp_states.h`) a client socket can close from.
pub(crate) mod tcp_state {
    pub const SYN_SENT: u32 = 2;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// The application bytes a client socket sent and received, from the
/// kernel's counts at close and the state it closed from: those counts
/// include the SYN the server acknowledged and each FIN (ours once
/// acknowledged, the server's once received), which carry no data. A
/// socket that closes from FIN_WAIT2 because the server never sent its FIN
/// (the orphan timeout) is counted one byte short.
pub fn payload(old_state: u32, acked: u64, received: u64) -> (u64, u64) {
    use tcp_state::*;
    if old_state == SYN_SENT {
        return (0, 0);
    }
    let our_fin_acked = matches!(old_state, FIN_WAIT2 | LAST_ACK | CLOSING);
    let their_fin = matches!(old_state, FIN_WAIT2 | CLOSE_WAIT | LAST_ACK | CLOSING);
    (
        acked.saturating_sub(1 + u64::from(our_fin_acked)),
        received.saturating_sub(u64::from(their_fin)),
    )
}

/// Why a pair may not take the fast path: its connections go (or stay)
/// through the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the source pod is no longer served here")]
    SourceGone,
    #[error("{0} is no longer a pod served here")]
    DestinationGone(Ipv4Addr),
    #[error(
        "{0} runs an ingress program an earlier agent attached, without the fast path's admission"
    )]
    OldPrograms(String),
    /// Not a reason to cut what is open (its records are counted by the
    /// recount, and removed at close as ever): only no new grant.
    #[error(
        "{0} runs connect programs an earlier agent attached, which do not count its connections"
    )]
    OldSourcePrograms(String),
    #[error("{0} has no valid certificate")]
    NoCertificate(String),
    #[error("{0} takes plaintext only on this port (mTLS DISABLE)")]
    Disabled(String),
    #[error("denied by policy: {0}")]
    Denied(String),
}

impl Refusal {
    /// A closed set, for the metrics: `policy`, `mode`, `certificate`,
    /// `pod_left`, `old_programs`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SourceGone | Self::DestinationGone(_) => "pod_left",
            Self::OldPrograms(_) | Self::OldSourcePrograms(_) => "old_programs",
            Self::NoCertificate(_) => "certificate",
            Self::Disabled(_) => "mode",
            Self::Denied(_) => "policy",
        }
    }
}

/// What deciding a pair needs to know of each pod.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    /// As the mesh has it now (labels change).
    pub workload: &'a Workload,
    /// Whether it holds a certificate valid now.
    pub certified: bool,
    /// Whether its programs are this build's. Links an earlier agent made
    /// run the programs it loaded until the pod is enrolled anew: an old
    /// ingress program refuses the fast path's connections, an old connect4
    /// and sock_ops do not count them.
    pub current_programs: bool,
}

/// Decides whether `src` may connect straight to `port` of `dst`, exactly
/// as `dst`'s inbound side decides an HBONE stream from `src`'s identity:
/// its policies, its mode (a DISABLE port takes no tunnels and no fast
/// path), and both certificates (no tunnel is made without them). Returns
/// the decision's reason (the policy that allowed it).
pub fn decide(
    policies: &Policies,
    src: End<'_>,
    dst: End<'_>,
    port: u16,
) -> Result<String, Refusal> {
    for end in [&src, &dst] {
        if !end.certified {
            return Err(Refusal::NoCertificate(end.workload.qualified_name()));
        }
    }
    if !dst.current_programs {
        // Its old ingress program would refuse the connection.
        return Err(Refusal::OldPrograms(dst.workload.qualified_name()));
    }
    if policies.mtls_mode(dst.workload, port) == MtlsMode::Disable {
        return Err(Refusal::Disabled(dst.workload.qualified_name()));
    }
    let decision = policies.authorize(
        dst.workload,
        &PolicyConnection {
            source: Some(&src.workload.identity),
            source_ip: IpAddr::V4(src.workload.ip),
            destination_ip: dst.workload.ip,
            destination_port: port,
        },
    );
    if !decision.allowed {
        return Err(Refusal::Denied(decision.reason));
    }
    // Last, so that a denial is not hidden behind it (what is open is cut
    // for a denial, not for this): a source's old connect4 and sock_ops
    // would not count the grant's connections, and nothing would hold the
    // pod to its share of the kernel's table.
    if !src.current_programs {
        return Err(Refusal::OldSourcePrograms(src.workload.qualified_name()));
    }
    Ok(decision.reason)
}

/// A pod this agent serves, as the fast path knows it.
struct Local {
    proxy: Arc<PodProxy>,
    /// Whether its programs are this build's (see [`End::current_programs`]).
    current_programs: bool,
    /// Its sandbox is going (CNI DEL): no new grant to or from it.
    leaving: bool,
    /// Said to have as many fast-path connections open as it may (and not
    /// yet said to be well under).
    at_limit: bool,
}

/// A grant in force.
#[derive(Debug, Clone)]
struct Grant {
    /// The policy that allowed it.
    policy: String,
    /// Its connections open, as the kernel reported them.
    open: usize,
    /// When it was made, or a connection of it last opened.
    used: Instant,
}

/// The pods served and the grants made; one lock, so that a pod leaving
/// and its grants going are one step.
#[derive(Default)]
struct Registry {
    pods: HashMap<u64, Local>,
    by_ip: HashMap<Ipv4Addr, u64>,
    grants: BTreeMap<GrantKey, Grant>,
    /// Pairs refused since the mesh last changed (or the last second): not
    /// decided again per connection.
    refused: BTreeSet<GrantKey>,
    /// Said to have as many fast-path connections open as it may.
    at_limit: bool,
    /// Set once the agent has tried to enroll every pod of the node: only
    /// then is a recorded connection whose pods are not served known to be
    /// stale (before, its pods may just not be enrolled yet).
    settled: bool,
}

impl Registry {
    fn pod_at(&self, ip: Ipv4Addr) -> Option<&Local> {
        self.pods.get(self.by_ip.get(&ip)?)
    }

    /// Decides `key` with the pods and the mesh as they are now.
    fn decide(&self, key: &GrantKey) -> Result<String, Refusal> {
        let src = self
            .pods
            .get(&key.netns_cookie)
            .filter(|pod| !pod.leaving)
            .ok_or(Refusal::SourceGone)?;
        let dst_ip = Ipv4Addr::from(key.ip);
        let dst = self
            .pod_at(dst_ip)
            .filter(|pod| !pod.leaving)
            .ok_or(Refusal::DestinationGone(dst_ip))?;
        let state = dst.proxy.state.borrow();
        let current = |proxy: &PodProxy| {
            state
                .workload_by_ip(proxy.workload.ip)
                .filter(|w| w.same_pod(&proxy.workload))
                .cloned()
        };
        let src_workload = current(&src.proxy).ok_or(Refusal::SourceGone)?;
        let dst_workload = current(&dst.proxy).ok_or(Refusal::DestinationGone(dst_ip))?;
        decide(
            state.policies(),
            End {
                workload: &src_workload,
                certified: src.proxy.valid_certificate().is_some(),
                current_programs: src.current_programs,
            },
            End {
                workload: &dst_workload,
                certified: dst.proxy.valid_certificate().is_some(),
                current_programs: dst.current_programs,
            },
            key.port,
        )
    }

    /// Whether a grant for `key` may be made: its source is served and holds
    /// fewer than [`GRANTS_PER_POD`].
    fn may_grant(&self, key: &GrantKey) -> bool {
        let cookie = key.netns_cookie;
        let held = self
            .grants
            .range(GrantKey::new(cookie, 0, 0)..=GrantKey::new(cookie, u32::MAX, u16::MAX))
            .count();
        self.pods.contains_key(&cookie) && held < GRANTS_PER_POD
    }

    /// Takes back the grants `which` picks, in the kernel first.
    fn revoke(&mut self, kernel: &mut FastPathMaps, which: impl Fn(&GrantKey) -> bool) {
        let keys: Vec<GrantKey> = self.grants.keys().filter(|k| which(k)).copied().collect();
        for key in keys {
            self.grants.remove(&key);
            if let Err(error) = kernel.revoke(&key) {
                warn!(error = %Chain(&error), "cannot revoke a fast-path grant");
            }
        }
    }
}

struct Shared {
    enabled: bool,
    kernel: Mutex<FastPathMaps>,
    registry: Mutex<Registry>,
    /// Pods came or went, or the node's pods were all tried.
    changed: Notify,
}

/// The fast path's handle, for the pods' enrollment: register pods as they
/// are served, unregister them as they leave.
#[derive(Clone)]
pub struct FastPath(Arc<Shared>);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FastPath {
    /// The fast path over the kernel's `maps`; `enabled` false (the config
    /// says so, or the kernel cannot cut connections) makes no grants, and
    /// connections recorded by an earlier agent are still accounted for and
    /// checked. Returns the handle and the task to run, which `shortcuts`
    /// (given to each pod's proxy) feeds.
    pub fn new(
        maps: FastPathMaps,
        enabled: bool,
        state: watch::Receiver<Arc<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> (Self, Option<mpsc::Sender<Shortcut>>, Task) {
        let shared = Arc::new(Shared {
            enabled,
            kernel: Mutex::new(maps),
            registry: Mutex::new(Registry::default()),
            changed: Notify::new(),
        });
        let (tx, rx) = mpsc::channel(SHORTCUT_QUEUE);
        let task = Task::new(shared.clone(), rx, state, metrics);
        (Self(shared), enabled.then_some(tx), task)
    }

    /// Whether the kernel here can destroy sockets (`CONFIG_INET_DIAG_DESTROY`),
    /// without which a connection could outlive the policy that allowed
    /// it: the fast path is then off.
    pub fn kernel_can_cut() -> Result<(), DestroyError> {
        Destroyer::new()?.probe()
    }

    /// `proxy`'s pod is served from now on: the kernel counts its fast-path
    /// connections, without which it never takes the fast path.
    pub fn register(&self, proxy: &Arc<PodProxy>, current_programs: bool) {
        let mut registry = lock(&self.0.registry);
        let cookie = proxy.netns.cookie();
        if let Err(error) = lock(&self.0.kernel).count_pod(cookie) {
            warn!(
                workload = %proxy.workload.qualified_name(), error = %Chain(&error),
                "fast path: cannot count the pod's connections; they all go through the agent"
            );
        }
        registry.by_ip.insert(proxy.workload.ip, cookie);
        registry.pods.insert(
            cookie,
            Local {
                proxy: proxy.clone(),
                current_programs,
                leaving: false,
                at_limit: false,
            },
        );
        registry.refused.clear();
        drop(registry);
        self.0.changed.notify_one();
    }

    /// The sandbox of the pod `namespace/name` is going (CNI DEL): its
    /// address may be another pod's as soon as this returns. Its grants,
    /// both ways, and the kernel's records of its connections go now; the
    /// pod is withdrawn later, as usual.
    pub fn release(&self, namespace: &str, name: &str) {
        let mut registry = lock(&self.0.registry);
        let leaving: Vec<(u64, Ipv4Addr)> = registry
            .pods
            .iter_mut()
            .filter(|(_, pod)| {
                pod.proxy.workload.namespace == namespace && pod.proxy.workload.name == name
            })
            .map(|(&cookie, pod)| {
                pod.leaving = true;
                (cookie, pod.proxy.workload.ip)
            })
            .collect();
        for (cookie, ip) in leaving {
            self.forget(&mut registry, cookie, ip);
        }
        drop(registry);
        // A record made as this ran is searched for.
        self.0.changed.notify_one();
    }

    /// `proxy`'s pod is no longer served. Its grants, both ways, go now,
    /// before its address can be another pod's; so do the kernel's records
    /// of its connections (its programs are detached: no close would remove
    /// them, and a later connection with the same addresses must not find
    /// them). Its open connections are left to finish, as its tunnels are.
    pub fn unregister(&self, proxy: &PodProxy) {
        let cookie = proxy.netns.cookie();
        let ip = proxy.workload.ip;
        let mut registry = lock(&self.0.registry);
        if registry.pods.remove(&cookie).is_none() {
            return;
        }
        if registry.by_ip.get(&ip) == Some(&cookie) {
            registry.by_ip.remove(&ip);
        }
        self.forget(&mut registry, cookie, ip);
        lock(&self.0.kernel).uncount_pod(cookie);
        drop(registry);
        self.0.changed.notify_one();
    }

    /// Takes back the grants from the pod of `cookie` and to `ip`, and the
    /// kernel's records of their connections.
    fn forget(&self, registry: &mut Registry, cookie: u64, ip: Ipv4Addr) {
        let ip = u32::from(ip);
        let mut kernel = lock(&self.0.kernel);
        registry.revoke(&mut kernel, |key| {
            key.netns_cookie == cookie || key.ip == ip
        });
        for (tuple, info) in kernel.flows() {
            if info.netns_cookie == cookie || tuple.daddr == ip {
                kernel.forget_flow(&tuple);
            }
        }
    }

    /// Every pod of the node has been tried: connections the kernel recorded
    /// for pods not served now are stale.
    pub fn settle(&self) {
        lock(&self.0.registry).settled = true;
        self.0.changed.notify_one();
    }

    /// The agent is stopping (its task stopped): grants are void from now
    /// on, not when the lease runs out (connections go to the agent, which
    /// is gone: fail closed). Recorded connections live on; the next agent
    /// checks them.
    pub fn stop(&self) {
        if let Err(error) = lock(&self.0.kernel).set_lease(0) {
            warn!(error = %Chain(&error), "cannot void the fast path's lease");
        }
    }
}

/// The client's and the server's addresses.
fn endpoints(tuple: &Tuple) -> (SocketAddrV4, SocketAddrV4) {
    (
        SocketAddrV4::new(tuple.saddr.into(), tuple.sport),
        SocketAddrV4::new(tuple.daddr.into(), tuple.dport),
    )
}

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    (now.tv_sec() as u64) * 1_000_000_000 + now.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::mesh::policy::DEFAULT_ROOT_NAMESPACE;

    fn workload(ns: &str, sa: &str, ip: [u8; 4]) -> Workload {
        Workload {
            name: sa.into(),
            namespace: ns.into(),
            workload_name: sa.into(),
            service_account: sa.into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
                .parse()
                .unwrap(),
            ip: Ipv4Addr::from(ip),
            node: "node-1".into(),
            labels: [("app".to_owned(), sa.to_owned())].into_iter().collect(),
            local: None,
            probe_ports: Default::default(),
        }
    }

    fn policies(yaml: &str) -> Policies {
        let loaded = Policies::from_texts(
            [(Path::new("p.yaml").to_owned(), Ok(yaml.to_owned()))],
            DEFAULT_ROOT_NAMESPACE,
        );
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        loaded.policies
    }

    const DENY_SLEEP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-sleep, namespace: shop}\n\
        spec: {action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {ports: [\"8080\"]}}]}]}\n";

    const WEB_DISABLE_ON_9090: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
        metadata: {name: web, namespace: shop}\n\
        spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {\"9090\": {mode: DISABLE}}}\n";

    #[test]
    fn a_pair_is_decided_as_the_destination_decides_a_tunnel() {
        let sleep = workload("default", "sleep", [10, 244, 1, 2]);
        let admin = workload("ops", "admin", [10, 244, 1, 4]);
        let web = workload("shop", "web", [10, 244, 1, 3]);
        let end = |workload| End {
            workload,
            certified: true,
            current_programs: true,
        };
        let none = Policies::default();
        assert_eq!(
            decide(&none, end(&sleep), end(&web), 8080),
            Ok("no policy".into())
        );

        // The destination's policies, by the source's identity and the port.
        let deny = policies(DENY_SLEEP);
        assert_eq!(
            decide(&deny, end(&sleep), end(&web), 8080),
            Err(Refusal::Denied("DENY shop/no-sleep".into()))
        );
        assert!(decide(&deny, end(&admin), end(&web), 8080).is_ok());
        assert!(decide(&deny, end(&sleep), end(&web), 9090).is_ok());

        // A DISABLE port takes no tunnel, so no fast path either.
        let modes = policies(WEB_DISABLE_ON_9090);
        assert_eq!(
            decide(&modes, end(&sleep), end(&web), 9090),
            Err(Refusal::Disabled("shop/web".into()))
        );
        assert!(decide(&modes, end(&sleep), end(&web), 8080).is_ok());

        // No tunnel without both certificates; no admission without the
        // destination's current ingress program.
        let expired = |workload| End {
            workload,
            certified: false,
            current_programs: true,
        };
        let old = |workload| End {
            workload,
            certified: true,
            current_programs: false,
        };
        assert_eq!(
            decide(&none, expired(&sleep), end(&web), 8080),
            Err(Refusal::NoCertificate("default/sleep".into()))
        );
        assert_eq!(
            decide(&none, end(&sleep), expired(&web), 8080),
            Err(Refusal::NoCertificate("shop/web".into()))
        );
        assert_eq!(
            decide(&none, end(&sleep), old(&web), 8080),
            Err(Refusal::OldPrograms("shop/web".into()))
        );
        assert_eq!(
            decide(&none, old(&sleep), end(&web), 8080),
            Err(Refusal::OldSourcePrograms("default/sleep".into()))
        );
        // An old source's denial is a denial (its open connections are
        // cut), not hidden behind its programs.
        assert_eq!(
            decide(&deny, old(&sleep), end(&web), 8080),
            Err(Refusal::Denied("DENY shop/no-sleep".into()))
        );
        assert_eq!(
            decide(&modes, old(&sleep), end(&web), 9090),
            Err(Refusal::Disabled("shop/web".into()))
        );
    }

    #[test]
    fn payload_leaves_out_what_syn_and_fin_add_to_the_kernels_counts() {
        use tcp_state::*;
        const ESTABLISHED: u32 = 1;
        const FIN_WAIT1: u32 = 4;
        // The client half-closed, the server answered and closed.
        assert_eq!(payload(FIN_WAIT2, 1 + 100 + 1, 50 + 1), (100, 50));
        // The server closed first; the client closed after.
        assert_eq!(payload(LAST_ACK, 1 + 100 + 1, 50 + 1), (100, 50));
        // Both at once.
        assert_eq!(payload(CLOSING, 1 + 100 + 1, 50 + 1), (100, 50));
        // A reset after the server's FIN; a reset mid-stream; a reset
        // before our FIN was acknowledged.
        assert_eq!(payload(CLOSE_WAIT, 1 + 100, 50 + 1), (100, 50));
        assert_eq!(payload(ESTABLISHED, 1 + 100, 50), (100, 50));
        assert_eq!(payload(FIN_WAIT1, 1 + 100, 50), (100, 50));
        // Never established: nothing, whatever the counters say.
        assert_eq!(payload(SYN_SENT, 0, 0), (0, 0));
        assert_eq!(payload(SYN_SENT, 1, 0), (0, 0));
        // Counters that are short (a kernel counting otherwise) do not wrap.
        assert_eq!(payload(FIN_WAIT2, 0, 0), (0, 0));
    }
}
