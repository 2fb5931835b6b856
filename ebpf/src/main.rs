//! warren's kernel programs.
//!
//! Attached to each enrolled pod's cgroup (and nothing else: no node
//! interface, no node routing, no iptables):
//!
//! - `warren_connect4` (cgroup/connect4) sends an outbound TCP connect() to the
//!   agent's listener on 127.0.0.1 in the pod's own network namespace, and
//!   remembers the original destination under the socket's cookie.
//!   `warren_connect6` does the same for IPv4-mapped IPv6 destinations.
//! - `warren_sock_ops` (sockops, TCP_CONNECT_CB) runs once the source port is
//!   known and just before the SYN leaves; it moves the original destination
//!   to a key the agent can compute after accept(): the client's network
//!   namespace and source port.
//!
//! The fast path: a connect() from an enrolled pod to another pod of the
//! node that the agent has granted (`FAST_GRANTS`: this pod's namespace,
//! that address and port; valid while the agent's `FAST_LEASE` runs) is left
//! alone by connect4 (which marks the socket, `FAST_PENDING`) and goes
//! straight to the other pod, in the node's kernel. `warren_sock_ops`
//! records the connection's addresses in `FAST_FLOWS`, with the client pod's
//! namespace, and counts it in `FAST_OPEN` (past `FAST_OPEN_PER_POD` open,
//! or the node's share, connect4 sends the pod's connections to the agent
//! instead); the destination's ingress program lets in a plaintext SYN only
//! if its addresses are recorded there by the pod that has its source
//! address. When
//! the client socket closes, sock_ops removes the record. Both events go to
//! the agent through the `FAST_EVENTS` ring buffer, for the metrics and the
//! access log.
//!
//! The agent's own sockets are never seen: cgroup programs run for sockets
//! created by processes in the pod's cgroup, and the agent is not in it.
//!
//! And on each enrolled pod's own interface, inside the pod's namespace:
//!
//! - `warren_pod_ingress` (tc ingress) applies the pod's mTLS mode to TCP
//!   connections arriving from the network: HBONE (port 15008) always passes;
//!   under STRICT any other connection attempt is dropped, agent or no agent;
//!   under PERMISSIVE it is handed to the agent's plaintext listener, so that
//!   authorization applies to it too (its local address stays the original
//!   destination), and so are DISABLE pods' connections. The kubelet's
//!   probes (from the node's address, to the ports in `PROBES`) go straight
//!   to the application whatever the mode. IPv6 connection attempts, TCP
//!   fragments and unparsable packets are dropped.
//! - `warren_egress` (cgroup_skb/egress, on the pod's cgroup) drops IPv4
//!   packets a pod sends with a source address that is not its own: a pod
//!   cannot pass for another one (policies match source addresses).
//!
//! Every refusal is counted, by [`DropReason`], in the per-CPU array `DROPS`
//! (pinned with the other maps; the agent reads it).
#![no_std]
#![no_main]
// The BPF target has atomic adds (BPF_ATOMIC) but no compare-and-swap, so
// core's atomic types offer no fetch_add there; the intrinsic emits the add.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core_intrinsics, above")]

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_xadd},
    mem::size_of,
};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, TC_ACT_OK, TC_ACT_SHOT, bpf_sock, bpf_sock_addr,
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_elem,
        bpf_sk_assign, bpf_sk_fullsock, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    macros::{cgroup_skb, cgroup_sock_addr, classifier, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext, TcContext},
};
// Deprecated for CGRP_STORAGE, which needs Linux 6.2 (see EGRESS_POD).
#[allow(deprecated)]
use aya_ebpf::maps::CgroupStorage;
use aya_log_ebpf::debug;
use warren_common::{
    DELIVERY_MARK, DROP_MAP_ENTRIES, DropReason, FAST_EVENT_BYTES, FAST_FLOW_ENTRIES,
    FAST_GRANT_ENTRIES, FAST_OPEN_PER_NODE, FAST_OPEN_PER_POD, FAST_OPEN_SLACK, FLOW_MAP_ENTRIES,
    FastEvent, FlowInfo, FlowKey, GrantKey, HBONE_PORT, INBOUND_MODE_ENTRIES, InboundKey, Ipv4Dst,
    OUTBOUND_PORT, PENDING_PER_NODE, PENDING_PER_POD, POD_MAP_ENTRIES, PROBE_MAP_ENTRIES, PodInfo,
    ProbeKey, Tuple, fast_event, mode,
};

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const LOCALHOST: u32 = 0x7f00_0001;
/// cgroup/connect4 and connect6: 1 lets the (possibly rewritten) connect()
/// proceed, 0 makes it fail with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET6: u32 = 10;

/// How many packets and connects each program refused, by [`DropReason`].
#[map(name = "DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_MAP_ENTRIES, 0);

/// Counts one refusal for `reason`.
#[inline(always)]
fn count(reason: DropReason) {
    if let Some(slot) = DROPS.get_ptr_mut(reason.index()) {
        // SAFETY: the lookup returned this CPU's slot of an array map, a
        // valid, aligned u64 for the whole run of the program. The slot is
        // shared only with programs on this CPU; one that interrupts this
        // add could lose a count, never corrupt memory.
        unsafe { *slot += 1 };
    }
}

#[map(name = "PODS")]
static PODS: HashMap<u64, PodInfo> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);

#[map(name = "PENDING")]
static PENDING: LruHashMap<u64, Ipv4Dst> = LruHashMap::with_max_entries(FLOW_MAP_ENTRIES, 0);

#[map(name = "ORIGINAL_DST")]
static ORIGINAL_DST: LruHashMap<FlowKey, Ipv4Dst> =
    LruHashMap::with_max_entries(FLOW_MAP_ENTRIES, 0);

/// Original destinations recorded, per pod (by netns cookie) and for the
/// node (slot 0 of RECORD_TOTALS), which only these programs add to; taken,
/// which only the agent writes (TAKEN, and slot 1). The difference is what
/// awaits the agent.
#[map(name = "RECORDED")]
static RECORDED: HashMap<u64, i64> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);
#[map(name = "TAKEN")]
static TAKEN: HashMap<u64, i64> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);
#[map(name = "RECORD_TOTALS")]
static RECORD_TOTALS: Array<i64> = Array::with_max_entries(2, 0);

/// Whether the pod of `netns`, or the node, has as many captured
/// connections awaiting the agent as it may. Read without a lock: connects
/// racing on other CPUs may pass a few over, at most one a CPU.
#[inline(always)]
fn over_capture_quota(netns: u64) -> bool {
    // SAFETY: the values are copied out at once; plain integers.
    let (recorded, taken) = unsafe {
        (
            RECORDED.get(netns).copied().unwrap_or(0),
            TAKEN.get(netns).copied().unwrap_or(0),
        )
    };
    let node =
        RECORD_TOTALS.get(0).copied().unwrap_or(0) - RECORD_TOTALS.get(1).copied().unwrap_or(0);
    recorded - taken >= PENDING_PER_POD || node >= PENDING_PER_NODE
}

/// Counts one original destination recorded for the pod of `netns`.
#[inline(always)]
fn count_recorded(netns: u64) {
    let pod = match RECORDED.get_ptr_mut(netns) {
        Some(pod) => Some(pod),
        // Its first: made here, unless another CPU made it meanwhile.
        None => match RECORDED.insert(netns, 1, u64::from(BPF_NOEXIST)) {
            Ok(()) => None,
            Err(_) => RECORDED.get_ptr_mut(netns),
        },
    };
    if let Some(pod) = pod {
        // SAFETY: a valid, aligned i64 in a map value, which other CPUs
        // change only with atomic adds too.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(pod, 1) };
    }
    if let Some(node) = RECORD_TOTALS.get_ptr_mut(0) {
        // SAFETY: as above, for the array's first slot (the agent writes
        // only the second).
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(node, 1) };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn warren_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands connect4 programs a valid bpf_sock_addr for
    // the duration of the call; the verifier checks every field access.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM || addr.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let ip = u32::from_be(addr.user_ip4);
    let port = u16::from_be(addr.user_port as u16);
    // The fast path only for a well-formed IPv4 connect (one given another
    // family fails after this hook, and its socket may connect again).
    let direct = if addr.user_family == AF_INET {
        Direct::Allowed
    } else {
        Direct::Never
    };
    match capture(&ctx, ip, port, direct) {
        Verdict::Leave => ALLOW,
        Verdict::Deny => DENY,
        Verdict::Redirect(listener_port) => {
            addr.user_ip4 = LOCALHOST.to_be();
            addr.user_port = u32::from(listener_port.to_be());
            ALLOW
        }
    }
}

/// IPv6 sockets reach IPv4 destinations through IPv4-mapped addresses
/// (`::ffff:10.244.2.2`; Java does this by default). Those are captured like
/// connect4's; native IPv6 destinations are not (yet) and pass untouched.
#[cgroup_sock_addr(connect6)]
pub fn warren_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in warren_connect4.
    let addr: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM || addr.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let ip6 = addr.user_ip6;
    if ip6[0] != 0 || ip6[1] != 0 || u32::from_be(ip6[2]) != 0xffff {
        return ALLOW;
    }
    let ip = u32::from_be(ip6[3]);
    let port = u16::from_be(addr.user_port as u16);
    // Its sock_ops reports IPv6 addresses, which the fast path's records do
    // not take: always through the agent.
    match capture(&ctx, ip, port, Direct::Never) {
        Verdict::Leave => ALLOW,
        Verdict::Deny => DENY,
        Verdict::Redirect(listener_port) => {
            addr.user_ip6[3] = LOCALHOST.to_be();
            addr.user_port = u32::from(listener_port.to_be());
            ALLOW
        }
    }
}

enum Verdict {
    /// Not ours to touch.
    Leave,
    /// Send to the agent's listener on this port.
    Redirect(u16),
    /// Refuse the connect(): it should be captured but cannot be.
    Deny,
}

/// Whether a connect() may take the fast path, if granted.
#[derive(PartialEq, Eq)]
enum Direct {
    Allowed,
    Never,
}

/// Decides about a TCP connect() to `ip:port` (host order) and, when it is
/// to be captured, records the original destination.
fn capture(ctx: &SockAddrContext, ip: u32, port: u16, direct: Direct) -> Verdict {
    // SAFETY: plain helper calls on the program's own context.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    // SAFETY: the value is only read, and PODS entries are plain integers.
    let Some(pod) = (unsafe { PODS.get(netns) }).copied() else {
        // Attached but not (or no longer) enrolled: leave it alone.
        return Verdict::Leave;
    };
    // Loopback, the unspecified address and the pod's own IP stay inside the pod.
    if ip >> 24 == 127 || ip == 0 || ip == pod.ip {
        return Verdict::Leave;
    }
    // Granted: straight to the other pod. sock_ops records the connection,
    // without which the destination refuses it; the mark says it is to, and
    // to where (a mark left by a connect() that failed after this hook must
    // not record the socket's next connection).
    if direct == Direct::Allowed
        && granted(netns, ip, port)
        && fast_share_left(netns, 0)
        && FAST_PENDING
            .insert(cookie, original_dst(ip, port), 0)
            .is_ok()
    {
        debug!(
            ctx,
            "connect: fast path to {:i}:{} (socket {})", ip, port, cookie
        );
        return Verdict::Leave;
    }
    if over_capture_quota(netns) {
        count(DropReason::CaptureQuota);
        return Verdict::Deny;
    }
    if PENDING.insert(cookie, original_dst(ip, port), 0).is_err() {
        // Without a record the agent could not forward it, and letting it
        // through would send it in clear: fail closed.
        count(DropReason::FailClosedConnect);
        return Verdict::Deny;
    }
    debug!(
        ctx,
        "connect: captured connect to {:i}:{} (socket {})", ip, port, cookie
    );
    Verdict::Redirect(pod.outbound_port)
}

#[inline(always)]
fn original_dst(ip: u32, port: u16) -> Ipv4Dst {
    Ipv4Dst { ip, port, _pad: 0 }
}

#[sock_ops]
pub fn warren_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => connecting(&ctx),
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
        _ => {}
    }
    0
}

/// The connect() is about to send its SYN: a captured connection's
/// original destination is filed under the key the agent looks it up by; a
/// granted one is recorded for the fast path.
fn connecting(ctx: &SockOpsContext) {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // SAFETY: plain helper calls on the program's own context.
    let (netns, cookie) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_get_socket_cookie(ctx.as_ptr()),
        )
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(original) = (unsafe { PENDING.get(cookie) }).copied() else {
        if family == AF_INET {
            // SAFETY: as above.
            if let Some(marked) = (unsafe { FAST_PENDING.get(cookie) }).copied() {
                let _ = FAST_PENDING.remove(cookie);
                record_fast_flow(ctx, netns, marked);
            }
        }
        return;
    };
    let _ = PENDING.remove(cookie);
    // Only a connect connect4 sent to the agent: one that failed after the
    // hook (a bad address family, say) leaves its record behind, and the
    // socket's next connect, left alone, must not take it.
    if !is_captured(ctx) {
        return;
    }
    // sock_ops reports local_port in host byte order.
    let key = FlowKey::new(netns, ctx.local_port() as u16);
    if ORIGINAL_DST.insert(key, original, 0).is_ok() {
        debug!(
            ctx,
            "sock_ops: source port {} -> original destination {:i}:{}",
            key.port,
            original.ip,
            original.port
        );
        count_recorded(netns);
    }
}

/// Grants for the fast path, which the agent writes.
#[map(name = "FAST_GRANTS")]
static FAST_GRANTS: HashMap<GrantKey, u8> = HashMap::with_max_entries(FAST_GRANT_ENTRIES, 0);

#[map(name = "FAST_LEASE")]
static FAST_LEASE: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "FAST_FLOWS")]
static FAST_FLOWS: HashMap<Tuple, FlowInfo> = HashMap::with_max_entries(FAST_FLOW_ENTRIES, 0);

/// Sockets connect4 let go straight, by cookie, with where to, until
/// sock_ops records them. An entry evicted before then leaves a connection
/// unrecorded: refused by its destination, as any plaintext.
#[map(name = "FAST_PENDING")]
static FAST_PENDING: LruHashMap<u64, Ipv4Dst> = LruHashMap::with_max_entries(FLOW_MAP_ENTRIES, 0);

#[map(name = "FAST_EVENTS")]
static FAST_EVENTS: RingBuf = RingBuf::with_byte_size(FAST_EVENT_BYTES, 0);

/// Fast-path connections open, per pod (by netns cookie) and for the node
/// (slot 0 of FAST_TOTALS): what sock_ops recorded less what it removed;
/// less what the agent removed (FAST_FORGOTTEN, and slot 1), which only it
/// writes. The agent makes and removes a pod's entries.
#[map(name = "FAST_OPEN")]
static FAST_OPEN: HashMap<u64, i64> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);
#[map(name = "FAST_FORGOTTEN")]
static FAST_FORGOTTEN: HashMap<u64, i64> = HashMap::with_max_entries(POD_MAP_ENTRIES, 0);
#[map(name = "FAST_TOTALS")]
static FAST_TOTALS: Array<i64> = Array::with_max_entries(2, 0);

/// Whether the pod of `netns` may open one more fast-path connection with
/// `slack` past its limit and the node's: the agent counts it (it has an
/// entry), and neither it nor the node has that many open. Read without a
/// lock, as the capture quota: connects racing on other CPUs may pass a few
/// over.
#[inline(always)]
fn fast_share_left(netns: u64, slack: i64) -> bool {
    // SAFETY: the values are copied out at once; plain integers.
    let Some(open) = (unsafe { FAST_OPEN.get(netns) }).copied() else {
        return false;
    };
    // SAFETY: as above.
    let forgotten = (unsafe { FAST_FORGOTTEN.get(netns) }).copied().unwrap_or(0);
    let node = FAST_TOTALS.get(0).copied().unwrap_or(0) - FAST_TOTALS.get(1).copied().unwrap_or(0);
    open - forgotten < FAST_OPEN_PER_POD + slack && node < FAST_OPEN_PER_NODE + slack
}

/// Adds `delta` to the fast-path connections open of the pod of `netns`
/// (if it still has an entry: one that left has none) and of the node.
#[inline(always)]
fn count_fast(netns: u64, delta: i64) {
    if let Some(pod) = FAST_OPEN.get_ptr_mut(netns) {
        // SAFETY: a valid, aligned i64 in a map value, which other CPUs
        // change only with atomic adds too (the agent only makes and
        // removes entries). An entry removed meanwhile may have had its
        // element reused for another pod's (a preallocated hash map): the
        // add then lands there, a count one off until the agent's next
        // recount; memory stays valid either way.
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(pod, delta) };
    }
    if let Some(node) = FAST_TOTALS.get_ptr_mut(0) {
        // SAFETY: as above, for the array's first slot (the agent writes
        // only the second).
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(node, delta) };
    }
}

/// Records `tuple`, counted for the pod of `info`. A record already there
/// is stale (no live socket has these addresses: the source address is the
/// pod's own): replaced, and no longer counted for its pod. False if the
/// table is full.
#[inline(always)]
fn insert_flow(tuple: Tuple, info: FlowInfo) -> bool {
    let noexist = u64::from(BPF_NOEXIST);
    if FAST_FLOWS.insert(tuple, info, noexist).is_err() {
        // SAFETY: the value is copied out before the entry is removed.
        let Some(stale) = (unsafe { FAST_FLOWS.get(tuple) }).copied() else {
            return false; // full
        };
        if FAST_FLOWS.remove(tuple).is_ok() {
            count_fast(stale.netns_cookie, -1);
        }
        if FAST_FLOWS.insert(tuple, info, noexist).is_err() {
            return false;
        }
    }
    count_fast(info.netns_cookie, 1);
    true
}

/// Removes the record of `tuple`, counted for the pod of `netns`, unless
/// it went meanwhile (the agent removed it, and counted that).
#[inline(always)]
fn remove_flow(tuple: Tuple, netns: u64) {
    if FAST_FLOWS.remove(tuple).is_ok() {
        count_fast(netns, -1);
    }
}

/// Whether the pod of namespace `netns` may connect straight to `ip:port`:
/// a grant, while the agent's lease runs. No lease (an agent that stopped,
/// or one with the fast path off) leaves every grant void.
#[inline(always)]
fn granted(netns: u64, ip: u32, port: u16) -> bool {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match FAST_LEASE.get(0) {
        Some(&until) if now < until => {}
        _ => return false,
    }
    // SAFETY: only whether the key is there is used.
    unsafe { FAST_GRANTS.get(GrantKey::new(netns, ip, port)) }.is_some()
}

/// A connect() of the pod of `netns` that connect4 let go straight: records
/// it so that its destination lets it in, asks to hear of its close, and
/// tells the agent. Its grant is not checked again: one revoked since
/// connect4 read it is the agent's to find (it searches the records again
/// after each revocation) and cut, rather than a SYN left to be dropped.
fn record_fast_flow(ctx: &SockOpsContext, netns: u64, marked: Ipv4Dst) {
    let tuple = Tuple {
        saddr: u32::from_be(ctx.local_ip4()),
        daddr: u32::from_be(ctx.remote_ip4()),
        sport: ctx.local_port() as u16,
        // The port in network order, in the field's upper half.
        dport: u16::from_be((ctx.remote_port() >> 16) as u16),
    };
    // The connection connect4 let go, from the pod's own address (a socket
    // bound to another's, IP_TRANSPARENT, must not replace its record; the
    // egress check drops what it sends anyway).
    // SAFETY: the value is copied out at once; PodInfo is plain integers.
    let own = unsafe { PODS.get(netns) }.is_some_and(|pod| pod.ip == tuple.saddr);
    if !own || marked.ip != tuple.daddr || marked.port != tuple.dport {
        return;
    }
    let info = FlowInfo {
        netns_cookie: netns,
        // SAFETY: a plain helper call.
        opened_ns: unsafe { bpf_ktime_get_ns() },
    };
    // connect4 checked the count, but a connect() with TCP_FASTOPEN_CONNECT
    // returns before its SYN, which comes with the first write: a pod could
    // pass connect4 with thousands before any is recorded. Past its limit
    // and some slack (and the node's), not recorded: its SYN is refused.
    if !fast_share_left(netns, FAST_OPEN_SLACK) || !insert_flow(tuple, info) {
        count(DropReason::FastPathFull);
        return;
    }
    // Without the close callback the record would outlive the connection.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        remove_flow(tuple, netns);
        return;
    }
    report(FastEvent {
        kind: fast_event::OPENED,
        old_state: 0,
        tuple,
        _pad: 0,
        info,
        closed_ns: 0,
        bytes_acked: 0,
        bytes_received: 0,
    });
}

/// `sk_state` a socket ends in.
const TCP_CLOSE: u32 = 7;

/// A fast-path client socket changed state: once closed, its record goes,
/// and the agent hears what it carried.
fn state_changed(ctx: &SockOpsContext) {
    if ctx.arg(1) != TCP_CLOSE || ctx.family() != AF_INET {
        return;
    }
    let tuple = Tuple {
        saddr: u32::from_be(ctx.local_ip4()),
        daddr: u32::from_be(ctx.remote_ip4()),
        sport: ctx.local_port() as u16,
        dport: u16::from_be((ctx.remote_port() >> 16) as u16),
    };
    // SAFETY: the value is copied out before the entry is removed.
    let Some(info) = (unsafe { FAST_FLOWS.get(tuple) }).copied() else {
        return; // the agent cut it, or it was never recorded
    };
    // SAFETY: a plain helper call on the program's own context.
    if info.netns_cookie != unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } {
        return; // another pod's record of these addresses: not this socket's
    }
    remove_flow(tuple, info.netns_cookie);
    // SAFETY: the kernel hands sock_ops programs a valid bpf_sock_ops for
    // the duration of the call; the verifier checks the field accesses.
    let (acked, received) = unsafe { ((*ctx.ops).bytes_acked, (*ctx.ops).bytes_received) };
    report(FastEvent {
        kind: fast_event::CLOSED,
        old_state: ctx.arg(0),
        tuple,
        _pad: 0,
        info,
        // SAFETY: a plain helper call.
        closed_ns: unsafe { bpf_ktime_get_ns() },
        bytes_acked: acked,
        bytes_received: received,
    });
}

/// Whether the socket is connecting to the agent's outbound listener, as
/// connect4 (or connect6, IPv4-mapped) sent it.
#[inline(always)]
fn is_captured(ctx: &SockOpsContext) -> bool {
    if u16::from_be((ctx.remote_port() >> 16) as u16) != OUTBOUND_PORT {
        return false;
    }
    match ctx.family() {
        AF_INET => u32::from_be(ctx.remote_ip4()) == LOCALHOST,
        AF_INET6 => {
            let ip6 = ctx.remote_ip6();
            ip6[0] == 0
                && ip6[1] == 0
                && u32::from_be(ip6[2]) == 0xffff
                && u32::from_be(ip6[3]) == LOCALHOST
        }
        _ => false,
    }
}

/// Queues `event` for the agent, which reads the ring on a timer: no
/// wake-up per record (one per connection halved the connection rate).
fn report(event: FastEvent) {
    if FAST_EVENTS
        .output::<FastEvent>(&event, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count(DropReason::FastPathEventLost);
    }
}

#[map(name = "INBOUND_MODES")]
static INBOUND_MODES: HashMap<InboundKey, u32> = HashMap::with_max_entries(INBOUND_MODE_ENTRIES, 0);

#[map(name = "INBOUND_LISTENERS")]
static INBOUND_LISTENERS: SockHash<u32> = SockHash::with_max_entries(POD_MAP_ENTRIES, 0);

/// The kubelet's probes; only the keys matter.
#[map(name = "PROBES")]
static PROBES: HashMap<ProbeKey, u8> = HashMap::with_max_entries(PROBE_MAP_ENTRIES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
/// A connection attempt has SYN and none of these: SYN|RST, say, is no
/// attempt, and must meet the socket checks below like any other packet.
const ATTEMPT_FLAGS: u8 = TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN;
/// `sk_state` of a listening socket.
const TCP_LISTEN: u32 = 10;
/// bpf_skc_lookup_tcp: the namespace of the packet's device.
const CURRENT_NETNS: u64 = 0xffff_ffff;

#[classifier]
pub fn warren_pod_ingress(ctx: TcContext) -> i32 {
    match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(ETH_P_IP) => ipv4(&ctx),
        Ok(ETH_P_IPV6) => tc_action(ipv6(&ctx)),
        _ => TC_ACT_OK,
    }
}

/// The tc verdict for a packet that is let through (`Ok`), or dropped and
/// counted (`Err`).
fn tc_action(verdict: Result<(), DropReason>) -> i32 {
    match verdict {
        Ok(()) => TC_ACT_OK,
        Err(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

/// Reads a `T` at `offset` of the packet; one that is too short for it is
/// unparsable.
#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, DropReason> {
    ctx.load(offset).map_err(|_| DropReason::Unparsable)
}

fn ipv4(ctx: &TcContext) -> i32 {
    let Ok(daddr) = ctx.load::<u32>(ETH_HLEN + 16) else {
        return TC_ACT_OK; // too short to be anyone's IPv4 packet
    };
    let pod = u32::from_be(daddr);
    // SAFETY: lookups only read plain integers.
    let Some(&default) = (unsafe { INBOUND_MODES.get(InboundKey::new(pod, 0)) }) else {
        return TC_ACT_OK; // not an enrolled pod's address
    };
    // For an enrolled pod, what cannot be parsed does not get in.
    tc_action(ipv4_tcp(ctx, pod, default))
}

fn ipv4_tcp(ctx: &TcContext, pod: u32, default: u32) -> Result<(), DropReason> {
    let version_ihl: u8 = load(ctx, ETH_HLEN)?;
    let protocol: u8 = load(ctx, ETH_HLEN + 9)?;
    if protocol != IPPROTO_TCP as u8 {
        return Ok(());
    }
    // A fragment's TCP header may be cut short or missing (the tiny-fragment
    // trick); TCP does not fragment in practice, so fragments are not let in.
    let fragment = u16::from_be(load(ctx, ETH_HLEN + 6)?);
    if fragment & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    let saddr: u32 = load(ctx, ETH_HLEN + 12)?;
    let tcp = ETH_HLEN + usize::from(version_ihl & 0x0f) * 4;
    let sport: u16 = load(ctx, tcp)?;
    let dport: u16 = load(ctx, tcp + 2)?;
    let flags: u8 = load(ctx, tcp + 13)?;
    let port = u16::from_be(dport);
    if port == HBONE_PORT {
        return Ok(());
    }
    // SAFETY: the value is copied out at once, and INBOUND_MODES values are
    // plain integers.
    let value = unsafe { INBOUND_MODES.get(InboundKey::new(pod, port)) }
        .copied()
        .unwrap_or(default);
    let strict = value & mode::MASK == mode::STRICT;
    let skb = ctx.skb.skb.cast::<c_void>();

    if flags & ATTEMPT_FLAGS != TCP_SYN {
        // Not a connection attempt. A packet of a connection that exists, or
        // of a handshake under way, reaches its socket by the normal lookup.
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr,
                    daddr: pod.to_be(),
                    sport,
                    dport,
                },
            },
        };
        // SAFETY: the helper reads `tuple` (the size given is the IPv4
        // part's) and returns a referenced socket or null, released here.
        let sk = unsafe {
            bpf_skc_lookup_tcp(
                skb,
                &mut tuple,
                size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
                CURRENT_NETNS,
                0,
            )
        };
        if !sk.is_null() {
            // SAFETY: `sk` is a valid socket reference until released.
            let state = unsafe { (*sk).state };
            // A full socket (not a TIME_WAIT or request one) has a mark.
            // SAFETY: `sk` is a valid reference; the helper returns it as a
            // full socket or null, valid as long as `sk` is.
            let full = unsafe { bpf_sk_fullsock(sk) };
            // SAFETY: `full`, when not null, is valid until `sk` is released.
            let mark = if full.is_null() {
                0
            } else {
                unsafe { (*full).mark }
            };
            // SAFETY: `sk` is the non-null reference the lookup returned,
            // released once, and neither it nor `full` is used after.
            unsafe { bpf_sk_release(sk.cast()) };
            // A connection the agent delivered runs on the pod's loopback;
            // a packet for it from the network is an injection.
            if mark == DELIVERY_MARK {
                return Err(DropReason::ForgedDelivery);
            }
            if state != TCP_LISTEN {
                return Ok(());
            }
            // Only a listener: the final ACK of a SYN-cookie handshake. A
            // probe's and a fast-path connection's are the application's,
            // like their SYNs (below).
            if is_probe(pod, saddr, port) || is_fast_flow(pod, saddr, sport, port) {
                return Ok(());
            }
        }
        // No connection: at most the ACK of a SYN-cookie handshake with the
        // agent's listener; under STRICT, nothing.
        if strict {
            return Err(DropReason::StrictPlaintext);
        }
        let _ = assign_to_agent(skb, pod);
        return Ok(());
    }

    // A connection attempt never takes the path above: one that matches a
    // TIME_WAIT socket would reach the application's listener.

    // The kubelet probes the application itself, in plaintext, whatever the
    // mode (as Istio rewrites probes to bypass its proxy): from the node's
    // address, to a port a probe names, it goes to the application's socket
    // by the normal lookup.
    if is_probe(pod, saddr, port) {
        debug!(
            ctx,
            "ingress: pod {:i}: probe from {:i} to port {} let through to the application",
            pod,
            u32::from_be(saddr),
            port
        );
        return Ok(());
    }
    // A fast-path connection: granted by the agent, made from the client
    // pod's own cgroup, to the application itself whatever the mode.
    if is_fast_flow(pod, saddr, sport, port) {
        return Ok(());
    }
    if strict {
        debug!(
            ctx,
            "ingress: STRICT pod {:i}: dropped plaintext SYN to port {}", pod, port
        );
        return Err(DropReason::StrictPlaintext);
    }
    // PERMISSIVE (and DISABLE): to the agent, which authorizes it. With no
    // agent listening, the application takes it unless authorization
    // applies to the pod: then it must not bypass the agent.
    match assign_to_agent(skb, pod) {
        Assigned::Yes => Ok(()),
        Assigned::NoListener if value & mode::AUTHORIZED == 0 => Ok(()),
        Assigned::NoListener => Err(DropReason::NoAgent),
        Assigned::Failed => Err(DropReason::AssignFailed),
    }
}

/// Whether a packet from `saddr` (network order) to `port` of `pod` belongs to
/// one of the kubelet's probes.
fn is_probe(pod: u32, saddr: u32, port: u16) -> bool {
    let key = ProbeKey::new(pod, u32::from_be(saddr), port);
    // SAFETY: only whether the key is there is used; the value is not read.
    unsafe { PROBES.get(key) }.is_some()
}

/// Whether a packet from `saddr:sport` (network order) to `port` of `pod`
/// belongs to a connection recorded for the fast path, by the pod that has
/// that source address now (a record left behind by a pod that is gone
/// admits nothing, whoever has its address since).
fn is_fast_flow(pod: u32, saddr: u32, sport: u16, port: u16) -> bool {
    let tuple = Tuple {
        saddr: u32::from_be(saddr),
        daddr: pod,
        sport: u16::from_be(sport),
        dport: port,
    };
    // SAFETY: the value is copied out at once; FlowInfo is plain integers.
    let Some(info) = (unsafe { FAST_FLOWS.get(tuple) }).copied() else {
        return false;
    };
    // SAFETY: as above, for PodInfo.
    unsafe { PODS.get(info.netns_cookie) }.is_some_and(|client| client.ip == tuple.saddr)
}

enum Assigned {
    Yes,
    NoListener,
    Failed,
}

/// Hands the packet to the agent's plaintext listener for `pod`.
fn assign_to_agent(skb: *mut c_void, pod: u32) -> Assigned {
    // SAFETY: a sockhash lookup from tc returns a referenced socket or null;
    // it is released below.
    let listener = unsafe {
        bpf_map_lookup_elem(
            (&raw const INBOUND_LISTENERS).cast_mut().cast(),
            (&raw const pod).cast(),
        )
    }
    .cast::<bpf_sock>();
    if listener.is_null() {
        return Assigned::NoListener;
    }
    // SAFETY: `skb` is the program's own packet and `listener` the non-null
    // socket reference from the lookup above; the helper takes a reference
    // of its own if it keeps the socket, ours stays ours.
    let assigned = unsafe { bpf_sk_assign(skb, listener.cast(), 0) };
    // SAFETY: `listener` is that reference, released once, not used after.
    unsafe { bpf_sk_release(listener.cast()) };
    if assigned == 0 {
        Assigned::Yes
    } else {
        Assigned::Failed
    }
}

/// cgroup_skb: 1 lets the packet go, 0 drops it.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// The pod the egress program runs for: one value per cgroup it is attached
/// to, which the agent writes after attaching. Not the netns cookie and
/// `PODS`: cgroup_skb programs may call `bpf_get_netns_cookie` only from
/// Linux 6.15, while cgroup storage is there for them on every kernel warren
/// runs on. (Deprecated in aya for `BPF_MAP_TYPE_CGRP_STORAGE`, which needs
/// 6.2 and is keyed by the socket's cgroup, not the attachment's.)
#[allow(deprecated)]
#[map(name = "EGRESS_POD")]
static EGRESS_POD: CgroupStorage<PodInfo> = CgroupStorage::new();

/// The egress check for kernels before 6.15, whose cgroup_skb programs
/// cannot ask for the socket's network namespace: the pod is the one the
/// agent wrote for this cgroup (its sub-cgroups, the containers, included).
#[cgroup_skb(egress)]
pub fn warren_egress(ctx: SkBuffContext) -> i32 {
    // __sk_buff.protocol holds the big-endian ethertype in its low 16 bits.
    if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IP {
        return PASS;
    }
    // SAFETY: bpf_get_local_storage never returns null for a program that
    // uses the map; the value is plain integers, read once.
    #[allow(deprecated)]
    let pod = unsafe { *EGRESS_POD.get_ptr_mut() };
    if pod.ip == 0 {
        return PASS; // not (yet) enrolled: the agent has not written it
    }
    check_source(&ctx, pod)
}

/// The egress check from 6.15 on: the pod is the one whose network
/// namespace the socket is in. A namespace of its own inside the pod (a
/// container runtime run in the pod, say) is not the pod's, and is let be.
#[cgroup_skb(egress)]
pub fn warren_egress_netns(ctx: SkBuffContext) -> i32 {
    if u16::from_be(ctx.skb.protocol() as u16) != ETH_P_IP {
        return PASS;
    }
    // SAFETY: a plain helper call on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is only read, and PODS entries are plain integers.
    let Some(pod) = (unsafe { PODS.get(netns) }).copied() else {
        return PASS; // not (or no longer) enrolled
    };
    check_source(&ctx, pod)
}

/// Lets out an IPv4 packet from `pod`'s own address (or loopback) only.
#[inline(always)]
fn check_source(ctx: &SkBuffContext, pod: PodInfo) -> i32 {
    // cgroup_skb sees the packet from its IP header on.
    let Ok(saddr) = ctx.load::<u32>(12) else {
        count(DropReason::Unparsable);
        return DROP;
    };
    let saddr = u32::from_be(saddr);
    if saddr == pod.ip || saddr >> 24 == 127 {
        return PASS;
    }
    debug!(
        ctx,
        "egress: dropped a packet from {:i}, which is not the pod's address {:i}", saddr, pod.ip
    );
    count(DropReason::SpoofedSource);
    DROP
}

const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_UDP: u8 = 17;
const IPV6_HLEN: usize = 40;

/// The mesh is IPv4: an IPv6 connection can be neither HBONE nor handed to
/// the agent. The program runs only on enrolled pods' interfaces, so IPv6
/// connection attempts there are dropped, and so is whatever hides its
/// transport behind extension headers.
fn ipv6(ctx: &TcContext) -> Result<(), DropReason> {
    let next: u8 = load(ctx, ETH_HLEN + 6)?;
    match next {
        IPPROTO_ICMPV6 | IPPROTO_UDP => Ok(()),
        n if n == IPPROTO_TCP as u8 => {
            let flags: u8 = load(ctx, ETH_HLEN + IPV6_HLEN + 13)?;
            if flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                Err(DropReason::Ipv6Attempt)
            } else {
                Ok(())
            }
        }
        _ => Err(DropReason::Ipv6Unchecked),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the loader reads the license from this section; nothing else is
// placed there, and no other symbol is named LICENSE.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
