//! Types shared by warren's eBPF programs and its agent.
//!
//! Everything here crosses the kernel/user boundary through BPF maps, so every
//! type is `#[repr(C)]`, has no implicit padding, and keeps multi-byte fields in
//! host byte order unless its name says otherwise.
#![no_std]
#![deny(unsafe_code)] // allowed only for aya::Pod, below

/// Port of the outbound listener the agent opens on 127.0.0.1 inside each
/// enrolled pod's network namespace (ztunnel uses the same number).
pub const OUTBOUND_PORT: u16 = 15001;

/// Port of the agent's in-pod listener for plaintext connections arriving at
/// a PERMISSIVE pod (ztunnel uses the same number).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The HBONE port, which the in-pod ingress program always lets through.
pub const HBONE_PORT: u16 = 15008;

/// `SO_MARK` of the agent's delivery sockets (the agent connecting to an
/// application as the client pod), and, by `tcp_fwmark_accept`, of the
/// application's side of those connections. Such a connection runs on the
/// pod's loopback: a packet from the network that matches one is forged, and
/// the ingress program drops it.
pub const DELIVERY_MARK: u32 = 0x7772;

/// mTLS modes, as [`names::INBOUND_MODES`] holds them: a mode in the low
/// byte, and flags.
pub mod mode {
    /// Only HBONE: a plaintext connection attempt is dropped.
    pub const STRICT: u32 = 1;
    /// Plaintext is handed to the agent's plaintext listener, which
    /// authorizes it. DISABLE pods are treated so too (only their peers send
    /// them plaintext instead of HBONE).
    pub const PERMISSIVE: u32 = 2;
    /// The mode bits.
    pub const MASK: u32 = 0xff;
    /// Authorization policies apply to the pod: with no agent listening,
    /// plaintext is dropped rather than let through unchecked.
    pub const AUTHORIZED: u32 = 0x100;
}

/// Names of the maps and programs in the eBPF object, so both sides agree.
pub mod names {
    /// [`super::PodInfo`] by network-namespace cookie: the enrolled pods.
    pub const PODS: &str = "PODS";
    /// [`super::Ipv4Dst`] by socket cookie, from connect() until the SYN is sent.
    pub const PENDING: &str = "PENDING";
    /// [`super::Ipv4Dst`] by [`super::FlowKey`]: original destinations of
    /// captured connections, waiting for the agent to accept them.
    pub const ORIGINAL_DST: &str = "ORIGINAL_DST";
    /// mTLS mode ([`super::mode`]) by [`super::InboundKey`]: port 0 holds
    /// a pod's default, other ports its overrides.
    pub const INBOUND_MODES: &str = "INBOUND_MODES";
    /// The agent's plaintext listener by pod IPv4 address (host order).
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// The kubelet's probes, as [`super::ProbeKey`]s (the value is unused):
    /// plaintext connection attempts that reach the application whatever
    /// the pod's mTLS mode.
    pub const PROBES: &str = "PROBES";
    /// Per-CPU `u64` counters of what the programs refuse, indexed by
    /// [`super::DropReason`]; [`super::DROP_MAP_ENTRIES`] slots.
    pub const DROPS: &str = "DROPS";
    /// The fast path's grants: [`super::GrantKey`] → `u8` (the value is
    /// unused). A connect() whose key is here goes straight to the other pod.
    pub const FAST_GRANTS: &str = "FAST_GRANTS";
    /// The fast path's open connections: [`super::FlowInfo`] by
    /// [`super::Tuple`], from connect() to close. Only a SYN whose tuple is
    /// here reaches a pod over the fast path.
    pub const FAST_FLOWS: &str = "FAST_FLOWS";
    /// Sockets connect4 let go straight, by socket cookie, until sock_ops
    /// records them in [`FAST_FLOWS`](FAST_FLOWS).
    pub const FAST_PENDING: &str = "FAST_PENDING";
    /// One `u64`: until when (`bpf_ktime_get_ns`) the grants hold. The agent
    /// extends it while it runs; once it lapses, every connect goes to the
    /// agent again (which, dead, refuses it).
    pub const FAST_LEASE: &str = "FAST_LEASE";
    /// A ring buffer of [`super::FastEvent`]s: fast-path connections opened
    /// and closed, for the metrics and the access log.
    pub const FAST_EVENTS: &str = "FAST_EVENTS";
    /// Original destinations recorded, per pod: netns cookie → `i64`, added
    /// to by sock_ops only. Less [`TAKEN`], what awaits the agent.
    pub const RECORDED: &str = "RECORDED";
    /// Original destinations the agent took (or found gone), per pod: netns
    /// cookie → `i64`, written by the agent only.
    pub const TAKEN: &str = "TAKEN";
    /// Two `i64`s: recorded, all pods (sock_ops adds), and taken (the agent
    /// writes).
    pub const RECORD_TOTALS: &str = "RECORD_TOTALS";
    /// Fast-path connections recorded, less those whose record the kernel
    /// removed, per pod: netns cookie → `i64`, changed by sock_ops only
    /// (atomic adds). The agent makes a pod's entry (0) when the fast path
    /// serves it and removes it when the pod goes; a pod without one never
    /// takes the fast path. Less [`FAST_FORGOTTEN`], its open connections.
    pub const FAST_OPEN: &str = "FAST_OPEN";
    /// Fast-path records the agent removed (a connection it cut, a pod that
    /// left), per pod: netns cookie → `i64`, written by the agent only.
    pub const FAST_FORGOTTEN: &str = "FAST_FORGOTTEN";
    /// Two `i64`s, for the node: [`FAST_OPEN`]'s sum (sock_ops adds, also
    /// for pods without an entry) and [`FAST_FORGOTTEN`]'s (the agent
    /// writes).
    pub const FAST_TOTALS: &str = "FAST_TOTALS";
    /// Cgroup storage: the [`super::PodInfo`] of the pod whose cgroup the
    /// egress program is attached to (key: that cgroup's inode and
    /// `BPF_CGROUP_INET_EGRESS`), written by the agent after attaching. The
    /// egress program's way to know its pod without the netns cookie, which
    /// cgroup_skb programs get only from Linux 6.15. All zero: not enrolled.
    pub const EGRESS_POD: &str = "EGRESS_POD";
    pub const POD_INGRESS: &str = "warren_pod_ingress";
    pub const EGRESS: &str = "warren_egress";
    /// The egress check keyed by the socket's network namespace: for
    /// kernels whose cgroup_skb programs may ask for it (6.15 on). Its link
    /// is pinned under [`EGRESS`]'s name.
    pub const EGRESS_NETNS: &str = "warren_egress_netns";
    pub const CONNECT4: &str = "warren_connect4";
    pub const CONNECT6: &str = "warren_connect6";
    pub const SOCK_OPS: &str = "warren_sock_ops";
}

/// Capacity of the per-connection maps. They are LRU maps: an entry the agent
/// never collects (the client gave up before accept) ages out instead of
/// filling the map.
pub const FLOW_MAP_ENTRIES: u32 = 65_536;
/// Capacity of [`names::PODS`]: pods enrolled on one node.
pub const POD_MAP_ENTRIES: u32 = 4_096;
/// Captured connections whose original destination awaits the agent (it
/// takes each as it accepts the connection), per pod and for the node: the
/// table is an LRU of [`FLOW_MAP_ENTRIES`] that all pods share, so that
/// under these a pod spraying connects meets its own limit instead of
/// evicting its neighbours' entries (their connections would fail closed).
pub const PENDING_PER_POD: i64 = 4_096;
pub const PENDING_PER_NODE: i64 = 57_344;
const _: () = assert!(PENDING_PER_NODE < FLOW_MAP_ENTRIES as i64);
/// Capacity of [`names::INBOUND_MODES`]: a default and up to 64 per-port
/// modes (the agent refuses PeerAuthentications with more) for each of
/// about a thousand pods, far above what a node runs. Tenants' policies
/// fill it, and a full map keeps pods from being enrolled.
pub const INBOUND_MODE_ENTRIES: u32 = 65_536;

/// Capacity of [`names::PROBES`]: a few probe ports per pod, usually from a
/// single node address.
pub const PROBE_MAP_ENTRIES: u32 = POD_MAP_ENTRIES * 8;

/// Capacity of [`names::FAST_GRANTS`]: (source pod, destination, port)
/// triples. Full, new pairs take the agent's path (slower, never weaker).
pub const FAST_GRANT_ENTRIES: u32 = 16_384;
/// Capacity of [`names::FAST_FLOWS`]: open fast-path connections on a node.
/// Not an LRU map: a record evicted would be a connection the agent could
/// no longer find to cut. connect4 keeps each pod, and the node, below it
/// ([`FAST_OPEN_PER_POD`], [`FAST_OPEN_PER_NODE`]); should it fill all the
/// same, a connection's record is not kept and the destination refuses it
/// as it refuses any unrecorded plaintext (counted as
/// [`DropReason::FastPathFull`]).
pub const FAST_FLOW_ENTRIES: u32 = 65_536;
/// Fast-path connections one pod may have open at once: past it, connect4
/// sends its new connections to the agent (with the agent's own limits)
/// instead, so that one pod cannot fill the node's table of records. Counted
/// in the kernel ([`names::FAST_OPEN`]) as connections are recorded and
/// closed, so a burst meets it however fast it comes; connects racing on
/// other CPUs between connect4 and their record may pass a few over.
pub const FAST_OPEN_PER_POD: i64 = 8_192;
/// Fast-path connections the node may have open at once: the table less
/// room for connects that race past the count.
pub const FAST_OPEN_PER_NODE: i64 = FAST_FLOW_ENTRIES as i64 - 8_192;
/// How far past those limits sock_ops still records a connection: one that
/// passed connect4 under them (racing on another CPU, or with
/// `TCP_FASTOPEN_CONNECT`, whose SYN waits for the first write). Beyond it,
/// the connection is not recorded ([`DropReason::FastPathFull`]).
pub const FAST_OPEN_SLACK: i64 = 1_024;
const _: () = assert!(FAST_OPEN_PER_POD < FAST_OPEN_PER_NODE);
const _: () = assert!(FAST_OPEN_PER_NODE + FAST_OPEN_SLACK < FAST_FLOW_ENTRIES as i64);
/// Bytes of [`names::FAST_EVENTS`]: at 64 bytes a record, two records a
/// connection, room for 8 000 connections between two reads (the agent
/// reads it every 50 ms).
pub const FAST_EVENT_BYTES: u32 = 1 << 20;

/// Slots of [`names::DROPS`]: more than [`DropReason::ALL`] has, so that
/// programs of a later version, counting reasons added since, still find
/// their slots in a map an earlier agent created and pinned (pinned maps are
/// reused as they are).
pub const DROP_MAP_ENTRIES: u32 = 32;

/// Why a kernel program refused a packet or a connect(): the index of its
/// counter in [`names::DROPS`]. The discriminants are stable (counters
/// outlive agents in the pinned map): new reasons get new numbers, and a
/// number is never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// `warren_pod_ingress`: plaintext for a STRICT port: a connection
    /// attempt (SYN) that is not a kubelet probe, or a packet that belongs
    /// to no connection of the pod.
    StrictPlaintext = 0,
    /// `warren_egress`: an IPv4 packet whose source is neither the pod's
    /// address nor loopback (a pod passing for another).
    SpoofedSource = 1,
    /// `warren_pod_ingress`: an IPv4 TCP fragment (the tiny-fragment trick).
    Fragment = 2,
    /// `warren_pod_ingress`: an IPv6 TCP connection attempt (the mesh is
    /// IPv4, so it could be neither HBONE nor handed to the agent).
    Ipv6Attempt = 3,
    /// A packet too short for the headers its program must read: at
    /// ingress, an IPv4 TCP or IPv6 packet to an enrolled pod; at egress, an
    /// IPv4 packet without a whole source address.
    Unparsable = 4,
    /// `warren_connect4`/`warren_connect6`: a connect() that had to be
    /// captured was refused (EPERM) because its original destination could
    /// not be recorded (the `PENDING` map full or failing): sending it
    /// anyway would have sent it in clear.
    FailClosedConnect = 5,
    /// `warren_pod_ingress`: a plaintext connection attempt to a
    /// PERMISSIVE (or DISABLE) port could not be assigned to the agent's
    /// listener (`bpf_sk_assign` failed).
    AssignFailed = 6,
    /// `warren_pod_ingress`: a plaintext connection attempt to a pod that
    /// authorization policies apply to, while no agent listens for it: it
    /// must not reach the application unchecked.
    NoAgent = 7,
    /// `warren_pod_ingress`: an IPv6 packet whose transport the program does
    /// not look for: behind extension headers, or neither TCP, UDP nor
    /// ICMPv6. This includes the MLD reports the node side of a pod's
    /// interface sends (they carry a hop-by-hop header), so this counter
    /// moves without anyone attacking.
    Ipv6Unchecked = 8,
    /// `warren_sock_ops`: a connect() the fast path let go straight to the
    /// other pod found [`names::FAST_FLOWS`] full, or its pod (or the node)
    /// past its limit by [`FAST_OPEN_SLACK`]: without a record the
    /// destination refuses it, so the connection fails (closed, not open).
    FastPathFull = 9,
    /// `warren_sock_ops`: a fast-path connection's open or close record did
    /// not fit in [`names::FAST_EVENTS`]: the agent's metrics and access log
    /// miss it.
    FastPathEventLost = 10,
    /// `warren_pod_ingress`: a packet from the network for a connection the
    /// agent delivered inside the pod (its socket carries
    /// [`DELIVERY_MARK`]): those never cross the pod's interface, so it is
    /// forged, an injection into a peer's stream.
    ForgedDelivery = 11,
    /// `warren_connect4`/`warren_connect6`: a connect() refused (EPERM)
    /// because its pod, or the node, has [`PENDING_PER_POD`] (or
    /// [`PENDING_PER_NODE`]) captured connections awaiting the agent.
    CaptureQuota = 12,
}

impl DropReason {
    /// Every reason, in discriminant order (`ALL[i] as u32 == i`).
    pub const ALL: [DropReason; 13] = [
        DropReason::StrictPlaintext,
        DropReason::SpoofedSource,
        DropReason::Fragment,
        DropReason::Ipv6Attempt,
        DropReason::Unparsable,
        DropReason::FailClosedConnect,
        DropReason::AssignFailed,
        DropReason::NoAgent,
        DropReason::Ipv6Unchecked,
        DropReason::FastPathFull,
        DropReason::FastPathEventLost,
        DropReason::ForgedDelivery,
        DropReason::CaptureQuota,
    ];

    /// Its slot in [`names::DROPS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// The reason counted at `index`, if this version knows it.
    pub const fn from_index(index: u32) -> Option<Self> {
        let i = index as usize;
        if i < Self::ALL.len() {
            Some(Self::ALL[i])
        } else {
            None
        }
    }

    /// A stable snake_case name, for metric labels and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::StrictPlaintext => "strict_plaintext",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Fragment => "fragment",
            DropReason::Ipv6Attempt => "ipv6_attempt",
            DropReason::Unparsable => "unparsable",
            DropReason::FailClosedConnect => "fail_closed_connect",
            DropReason::AssignFailed => "assign_failed",
            DropReason::NoAgent => "no_agent",
            DropReason::Ipv6Unchecked => "ipv6_unchecked",
            DropReason::FastPathFull => "fast_path_full",
            DropReason::FastPathEventLost => "fast_path_event_lost",
            DropReason::ForgedDelivery => "forged_delivery",
            DropReason::CaptureQuota => "capture_quota",
        }
    }
}

// Every reason has a slot, with room to spare for later ones.
const _: () = assert!(DropReason::ALL.len() < DROP_MAP_ENTRIES as usize);

/// An enrolled pod, as the kernel programs need to know it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's IPv4 address, host byte order. Connections to it stay local.
    pub ip: u32,
    /// Port of the agent's outbound listener in the pod, host byte order.
    pub outbound_port: u16,
    pub _pad: u16,
}

/// An IPv4 socket address, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Dst {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// A pod's address and one of its ports (0: the pod's default), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl InboundKey {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// A plaintext connection attempt the kubelet makes for a probe: to the pod
/// at `pod`, from the node's address `src` as the pod sees it, to `port`.
/// Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeKey {
    pub pod: u32,
    pub src: u32,
    pub port: u16,
    pub _pad: u16,
}

impl ProbeKey {
    pub const fn new(pod: u32, src: u32, port: u16) -> Self {
        Self {
            pod,
            src,
            port,
            _pad: 0,
        }
    }
}

/// Identifies a captured connection as the agent sees it after accept():
/// the client's network namespace and its local port. Within one namespace
/// only one connection to the outbound listener can use a given source port,
/// and the namespace tells apart pods that use the same port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    /// Client's local port, host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

impl FlowKey {
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            _pad: [0; 3],
        }
    }
}

/// A fast-path grant: the pod whose network namespace has `netns_cookie`
/// may connect straight to `ip:port` (host order), another pod of the node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GrantKey {
    pub netns_cookie: u64,
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl GrantKey {
    pub const fn new(netns_cookie: u64, ip: u32, port: u16) -> Self {
        Self {
            netns_cookie,
            ip,
            port,
            _pad: 0,
        }
    }
}

/// A TCP connection's addresses, from its client's side, host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// What the kernel records of an open fast-path connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowInfo {
    /// The client pod's network namespace.
    pub netns_cookie: u64,
    /// When its connect() was granted (`bpf_ktime_get_ns`).
    pub opened_ns: u64,
}

/// [`FastEvent::kind`]s.
pub mod fast_event {
    /// A connect() went over the fast path (its SYN is about to leave).
    pub const OPENED: u32 = 1;
    /// Its client socket closed.
    pub const CLOSED: u32 = 2;
}

/// A record in [`names::FAST_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastEvent {
    /// One of [`fast_event`].
    pub kind: u32,
    /// At close: the TCP state the client socket left (`SYN_SENT`: the
    /// connection was never established).
    pub old_state: u32,
    pub tuple: Tuple,
    pub _pad: u32,
    pub info: FlowInfo,
    /// At close: when (`bpf_ktime_get_ns`).
    pub closed_ns: u64,
    /// At close: the client's bytes the server acknowledged, and the
    /// server's bytes the client received (SYN and FIN not counted).
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

// No implicit padding, as the records are read as bytes on the other side.
const _: () = assert!(core::mem::size_of::<FastEvent>() == 64);
const _: () = assert!(core::mem::size_of::<Tuple>() == 12);

#[cfg(feature = "user")]
mod user {
    // SAFETY (for each impl): plain #[repr(C)] integers with explicit padding
    // fields, so every bit pattern is valid and there are no hidden bytes.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::PodInfo {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Ipv4Dst {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FlowKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::InboundKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ProbeKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::GrantKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Tuple {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::FlowInfo {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;

    use super::DropReason;

    #[test]
    fn drop_reasons_are_numbered_by_their_place_in_all() {
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index() as usize, i, "{reason:?}");
            assert_eq!(DropReason::from_index(i as u32), Some(reason));
        }
        assert_eq!(DropReason::from_index(DropReason::ALL.len() as u32), None);
        assert_eq!(DropReason::from_index(u32::MAX), None);
    }

    #[test]
    fn drop_reason_names_are_distinct_snake_case_labels() {
        let names: BTreeSet<&str> = DropReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for name in names {
            assert!(
                !name.is_empty()
                    && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name:?} is not a snake_case label value"
            );
        }
    }

    /// The numbers index counters that outlive agents: they must not change.
    #[test]
    fn drop_reason_numbers_are_stable() {
        let pinned: [(DropReason, u32, &str); 13] = [
            (DropReason::StrictPlaintext, 0, "strict_plaintext"),
            (DropReason::SpoofedSource, 1, "spoofed_source"),
            (DropReason::Fragment, 2, "fragment"),
            (DropReason::Ipv6Attempt, 3, "ipv6_attempt"),
            (DropReason::Unparsable, 4, "unparsable"),
            (DropReason::FailClosedConnect, 5, "fail_closed_connect"),
            (DropReason::AssignFailed, 6, "assign_failed"),
            (DropReason::NoAgent, 7, "no_agent"),
            (DropReason::Ipv6Unchecked, 8, "ipv6_unchecked"),
            (DropReason::FastPathFull, 9, "fast_path_full"),
            (DropReason::FastPathEventLost, 10, "fast_path_event_lost"),
            (DropReason::ForgedDelivery, 11, "forged_delivery"),
            (DropReason::CaptureQuota, 12, "capture_quota"),
        ];
        for (reason, index, name) in pinned {
            assert_eq!((reason.index(), reason.name()), (index, name));
        }
    }
}
