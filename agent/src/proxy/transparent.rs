//! Transparent delivery: the destination application sees the client pod's
//! address as its peer, not the agent's.
//!
//! The agent connects to the application from a socket inside the
//! destination pod's namespace, bound to the client pod's address
//! (`IP_TRANSPARENT` allows binding an address that is not local) and marked
//! with [`MARK`]. The application's replies to that address would normally
//! leave the pod by its default route; instead:
//!
//! - `net.ipv4.tcp_fwmark_accept=1` in the pod makes the accepted socket
//!   inherit the mark of the SYN that opened it (ours), so every packet the
//!   application sends on that connection carries the mark;
//! - `net.ipv4.fwmark_reflect=1` gives the kernel's own replies (the RST to
//!   a SYN for a port nobody listens on, ICMP errors) the mark of the packet
//!   they answer: without it the RST leaves for the client pod's address,
//!   our socket never learns the port is closed, and the stream waits for
//!   the tunnel's CONNECT timeout instead of being refused (503) at once;
//! - a policy rule sends marked packets to a routing table whose only route
//!   is `local 0.0.0.0/0 dev lo`, so they are delivered to our socket.
//!
//! Only the pod's own namespace is touched; unmarked traffic is unaffected.
//! The pod may mark its own packets too (SO_MARK takes only CAP_NET_RAW
//! since Linux 5.17): harmless, as the egress check lets out only the pod's
//! own address, so any reply comes back to the pod anyway. Withdrawing a pod
//! leaves these settings in place (streams in flight still need them);
//! enrolling it again finds them done.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use futures_util::TryStreamExt;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::route::{RouteScope, RouteType},
    packet_route::rule::RuleAction,
};
use socket2::Domain;
use tokio::net::TcpStream;

use crate::netns::{NetNs, NetnsError};

/// Mark on the agent's delivery sockets and, through tcp_fwmark_accept, on
/// the application's side of those connections (which the ingress program
/// keeps packets from the network away from).
pub const MARK: u32 = warren_common::DELIVERY_MARK;
/// Routing table (and rule priority) for marked packets.
pub const TABLE: u32 = 15008;

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("setting up delivery routing in {netns}: {step}: {source}")]
    Routing {
        netns: String,
        step: &'static str,
        source: io::Error,
    },
}

/// Prepares the pod's namespace for transparent delivery. Idempotent, so a
/// restarted agent finds it done.
pub async fn prepare_pod(netns: &NetNs) -> Result<(), TransparentError> {
    let name = netns.path().display().to_string();
    netns
        .run(move || {
            let fail = |step| {
                let netns = name.clone();
                move |source| TransparentError::Routing {
                    netns,
                    step,
                    source,
                }
            };
            // /proc/sys/net shows the namespace of the thread that opens it.
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")
                .map_err(fail("net.ipv4.tcp_fwmark_accept"))?;
            std::fs::write("/proc/sys/net/ipv4/fwmark_reflect", "1")
                .map_err(fail("net.ipv4.fwmark_reflect"))?;
            // A throwaway runtime: the netlink socket must be created, and
            // used, on this thread, which is in the pod's namespace.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(fail("runtime"))?;
            runtime.block_on(install_routing()).map_err(fail("netlink"))
        })
        .await?
}

async fn install_routing() -> io::Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let netlink = |e: rtnetlink::Error| io::Error::other(e.to_string());

    let lo = handle
        .link()
        .get()
        .match_name("lo".to_owned())
        .execute()
        .try_next()
        .await
        .map_err(netlink)?
        .ok_or_else(|| io::Error::other("the pod has no lo interface"))?
        .header
        .index;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .table_id(TABLE)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .output_interface(lo)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(netlink)?;

    let rule = handle
        .rule()
        .add()
        .v4()
        .fw_mark(MARK)
        .table_id(TABLE)
        .priority(TABLE)
        .action(RuleAction::ToTable)
        .execute()
        .await;
    match rule {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(netlink(e)),
    }
}

/// Connects to `dst` (an application in the pod of `netns`) as if from
/// `src` (the client pod's address).
pub async fn connect(netns: &NetNs, src: Ipv4Addr, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = netns.tcp_socket(Domain::IPV4).await?;
    socket.set_ip_transparent(true)?;
    socket.set_mark(MARK)?;
    socket.set_nodelay(true)?;
    bind_source(&socket, netns.cookie(), src)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(dst)
        .await
}

/// Source ports tried in turn for delivery sockets: above the usual
/// ephemeral range (32768-60999), where a pod's own connect()s do not go.
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;
/// How many ports [`SOURCE_PORTS`] holds.
const SPAN: u32 = (*SOURCE_PORTS.end() - *SOURCE_PORTS.start()) as u32 + 1;
/// Ports tried for one delivery socket before the kernel chooses: a quarter
/// of the range, so that a run of ports another agent's deliveries left in
/// TIME_WAIT is crossed (the bench met 256 taken in a row: the agent before
/// this one had delivered hundreds of connections to the pod a few seconds
/// earlier, those past the fast path's per-pod limit). A failed bind costs
/// a microsecond or so.
const BIND_TRIES: u32 = 1_024;
/// Ports tried for a delivery socket before the search is charged to the
/// budgets below: most find one at once.
const FREE_TRIES: u32 = 16;
/// Failed binds the searches for one client address into one pod may cost
/// in a second (past the free tries); past them, the kernel chooses until
/// the second is over. Bounds the agent's CPU (a microsecond a failed
/// bind) for a pod that holds nearly every port of the range itself,
/// leaving a few far apart: every delivery into it would otherwise walk
/// hundreds of taken ports without ever running out. About four searches
/// that find nothing; a client delivering to a pod more than the range
/// holds (about 75 connections a second) meets it too. Per client, so that
/// one client does not send another's deliveries into the kernel's choice.
const FAILED_BINDS_PER_SECOND: u32 = 4 * BIND_TRIES;
/// The same for all clients together into one pod (its address
/// [`Ipv4Addr::UNSPECIFIED`] in [`FAILED`]): a squatting pod costs the agent
/// at most about 16 ms of CPU a second, however many clients call it.
const POD_FAILED_BINDS_PER_SECOND: u32 = 4 * FAILED_BINDS_PER_SECOND;
/// Failed binds for each client address into each destination pod (by netns
/// cookie), and for all clients (the unspecified address), this second:
/// since when, and how many.
static FAILED: std::sync::LazyLock<std::sync::Mutex<FailedBinds>> =
    std::sync::LazyLock::new(Default::default);
type FailedBinds = std::collections::HashMap<(u64, Ipv4Addr), (std::time::Instant, u32)>;
/// Where the next search starts, in [`SOURCE_PORTS`] (see [`source_port`]).
static NEXT: std::sync::LazyLock<std::sync::atomic::AtomicU32> = std::sync::LazyLock::new(|| {
    use std::hash::{BuildHasher, Hasher};
    let random = std::hash::RandomState::new().build_hasher().finish();
    std::sync::atomic::AtomicU32::new(random as u32)
});

/// Binds `socket` to `src`, the client pod's address, and a port.
///
/// Not port 0: the kernel would search its whole range for a port that no
/// socket of this address holds, TIME_WAIT ones included, which cost the
/// agent a millisecond and more per connection (`inet_csk_get_port`) once a
/// few seconds of connections had left theirs. Not the port left to
/// `connect()` either (`IP_BIND_ADDRESS_NO_PORT`): it picks from the range
/// the client pod's own `connect()`s pick from, starting where the client's
/// connect() to the same address and port starts (the offset is a hash of
/// the addresses, with a secret the namespaces share), so that a fast-path
/// connection of the same pair would meet this one's socket in the server
/// pod: its SYN dropped as one for an established connection
/// (`TCP_INVALID_SYN`), retried, and timed out.
///
/// So the ports above that range, in turn from where the last one was
/// found, up to [`BIND_TRIES`] of them. From a random start, so that an
/// agent restarted does not begin with the ports the last one's
/// connections left in TIME_WAIT (a restarted agent once found the first 16
/// taken, left the choice to `connect()`, and the pair's next fast-path
/// connections timed out). The range runs out only with thousands of this
/// client's connections delivered in the last minute (TIME_WAIT holds a
/// port that long): then `connect()` chooses, and that is logged. The
/// searches for one client address into one destination pod (`netns`) cost
/// at most [`FAILED_BINDS_PER_SECOND`]: the ports are taken in that pod's
/// namespace, and per client, so that neither a pod that holds them itself
/// nor one client that runs them out sends another's deliveries into the
/// kernel's choice.
fn bind_source(socket: &socket2::Socket, netns: u64, src: Ipv4Addr) -> io::Result<()> {
    use std::{
        sync::{LazyLock, atomic::Ordering::Relaxed},
        time::{Duration, Instant},
    };
    static LOGGED: LazyLock<crate::limits::Throttle> = LazyLock::new(Default::default);
    // Searches `tries` ports from the `from`th: whether one was bound, and
    // how many were taken.
    let search = |from: u32, tries: u32| -> io::Result<(bool, u32)> {
        for tried in 0..tries {
            let n = from.wrapping_add(tried);
            match socket.bind(&SocketAddrV4::new(src, source_port(n)).into()) {
                Ok(()) => {
                    NEXT.store(n % SPAN + 1, Relaxed);
                    return Ok((true, tried));
                }
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((false, tries))
    };
    let start = NEXT.load(Relaxed);
    // Most deliveries find a port within a few tries: those are free.
    if search(start, FREE_TRIES)?.0 {
        return Ok(());
    }
    // A longer search is charged to the client address's budget into the
    // pod and to the pod's: taken before the search (searches run on
    // several threads), what it did not fail given back after, to the same
    // second's count.
    let keys = [(netns, src), (netns, Ipv4Addr::UNSPECIFIED)];
    let caps = [FAILED_BINDS_PER_SECOND, POD_FAILED_BINDS_PER_SECOND];
    let now = Instant::now();
    let (budget, seconds) = {
        let mut failed = failed_binds_lock();
        failed.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(1));
        let counts = keys.map(|key| *failed.entry(key).or_insert((now, 0)));
        let budget = counts
            .iter()
            .zip(caps)
            .map(|((_, spent), cap)| cap.saturating_sub(*spent))
            .fold(BIND_TRIES - FREE_TRIES, u32::min);
        for key in keys {
            // Made just above.
            if let Some((_, spent)) = failed.get_mut(&key) {
                *spent += budget;
            }
        }
        (budget, counts.map(|(since, _)| since))
    };
    let searched = search(start.wrapping_add(FREE_TRIES), budget);
    let unspent = match searched {
        Ok((_, tried)) => budget - tried,
        Err(_) => budget,
    };
    if unspent > 0 {
        let mut failed = failed_binds_lock();
        for (key, second) in keys.into_iter().zip(seconds) {
            if let Some((since, spent)) = failed.get_mut(&key)
                && *since == second
            {
                *spent = spent.saturating_sub(unspent);
            }
        }
    }
    if searched?.0 {
        return Ok(());
    }
    // Every delivery that falls back is counted (the line says how many
    // since the last one), searched or not.
    if let Some(unlogged) = LOGGED.tick() {
        tracing::warn!(
            %src,
            ports = ?SOURCE_PORTS,
            tried = BIND_TRIES,
            failed_per_second = FAILED_BINDS_PER_SECOND,
            since_last_line = unlogged,
            "delivery source ports of this client address in use or in TIME_WAIT in the \
             destination pod (or too many found so this second): the kernel chooses, from \
             the range the client pod's own connections use"
        );
    }
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)?;
    socket.bind(&SocketAddrV4::new(src, 0).into())
}

fn failed_binds_lock() -> std::sync::MutexGuard<'static, FailedBinds> {
    FAILED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Failed binds for `src` into the pod of `netns` this second.
#[cfg(test)]
fn failed_binds(netns: u64, src: Ipv4Addr) -> u32 {
    failed_binds_lock()
        .get(&(netns, src))
        .map_or(0, |(_, count)| *count)
}

/// The port `n` places into [`SOURCE_PORTS`], round and round.
fn source_port(n: u32) -> u16 {
    // Below SPAN, so within the range's u16 ports.
    SOURCE_PORTS.start() + (n % SPAN) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> socket2::Socket {
        socket2::Socket::new(Domain::IPV4, socket2::Type::STREAM, None).unwrap()
    }

    #[test]
    fn a_delivery_socket_skips_a_run_of_taken_ports_and_stays_above_the_clients_range() {
        // The ports where the search starts taken, 200 in a row (as a
        // restarted agent could find them, in TIME_WAIT after the last
        // one's connections): the socket still gets one of the range, not
        // one of those a client pod's connect()s choose from.
        let src = Ipv4Addr::LOCALHOST;
        let start = NEXT.load(std::sync::atomic::Ordering::Relaxed);
        let run: Vec<u16> = (0..200)
            .map(|n| source_port(start.wrapping_add(n)))
            .collect();
        let taken: Vec<socket2::Socket> = run
            .iter()
            .filter_map(|&port| {
                let taker = socket();
                // A port another socket holds already stays taken: as well.
                taker.bind(&SocketAddrV4::new(src, port).into()).ok()?;
                Some(taker)
            })
            .collect();
        assert!(taken.len() > 150, "{} ports taken", taken.len());
        let delivery = socket();
        bind_source(&delivery, 1, src).unwrap();
        let port = delivery.local_addr().unwrap().as_socket().unwrap().port();
        assert!(SOURCE_PORTS.contains(&port), "port {port}");
        assert!(!run.contains(&port), "port {port} was taken");
    }

    #[test]
    fn searches_into_a_pod_whose_ports_are_taken_stop_at_their_budget() {
        // Every port of the range taken (what a pod squatting them, bar a
        // few far apart, costs each search): the searches are charged until
        // the client's budget is spent, then try only the free ports;
        // another pod is searched as ever, and so is the same pod for
        // another client address.
        let take_all = |addr| -> Vec<socket2::Socket> {
            let taken: Vec<socket2::Socket> = SOURCE_PORTS
                .filter_map(|port| {
                    let taker = socket();
                    taker.bind(&SocketAddrV4::new(addr, port).into()).ok()?;
                    Some(taker)
                })
                .collect();
            assert!(taken.len() > 4_000, "{} ports taken", taken.len());
            taken
        };
        let src = Ipv4Addr::new(127, 0, 0, 2);
        let taken = take_all(src);
        let (squatted, other) = (7, 8);
        let deliver = |netns, src| {
            let delivery = socket();
            bind_source(&delivery, netns, src).unwrap();
            // Port 0: left to connect() (IP_BIND_ADDRESS_NO_PORT).
            let port = delivery.local_addr().unwrap().as_socket().unwrap().port();
            assert_eq!(port, 0, "a port of the range was free");
        };
        // What a search past the free tries costs when it finds nothing.
        let charged = BIND_TRIES - FREE_TRIES;
        for searches in 1..=6 {
            deliver(squatted, src);
            assert_eq!(
                failed_binds(squatted, src),
                (charged * searches).min(FAILED_BINDS_PER_SECOND)
            );
        }
        deliver(other, src);
        assert_eq!(failed_binds(other, src), charged);
        // Another client address, its ports taken too: searched all the same.
        let client = Ipv4Addr::new(127, 0, 0, 3);
        let also_taken = take_all(client);
        deliver(squatted, client);
        assert_eq!(failed_binds(squatted, client), charged);
        // Both charged to the pod's budget too.
        assert_eq!(
            failed_binds(squatted, Ipv4Addr::UNSPECIFIED),
            FAILED_BINDS_PER_SECOND + charged
        );
        drop((taken, also_taken));
    }
}
