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
    bind_source(&socket, src)?;
    tokio::net::TcpSocket::from_std_stream(socket.into())
        .connect(dst)
        .await
}

/// Source ports tried in turn for delivery sockets: above the usual
/// ephemeral range (32768-60999), where a pod's own connect()s do not go.
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;
/// Ports tried before the kernel is left to choose.
const BIND_TRIES: usize = 16;

/// Binds `socket` to `src`, the client pod's address, and a port.
///
/// Not port 0: the kernel would search its whole range for a port that no
/// socket of this address holds, TIME_WAIT ones included, which cost the
/// agent a millisecond and more per connection (`inet_csk_get_port`) once a
/// few seconds of connections had left theirs. Not the port left to
/// `connect()` either (`IP_BIND_ADDRESS_NO_PORT`): it picks from the range
/// the client pod's own `connect()`s pick from, and a fast-path connection
/// of the same pair from the same port would meet this one's socket in the
/// server pod (its SYN answered as a stray, one connection or the other
/// lost). Ports above that range in turn, each checked once, are neither;
/// after a few taken in a row, `connect()` chooses.
fn bind_source(socket: &socket2::Socket, src: Ipv4Addr) -> io::Result<()> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    for _ in 0..BIND_TRIES {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % span;
        let port = SOURCE_PORTS.start() + n as u16;
        match socket.bind(&SocketAddrV4::new(src, port).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
            Err(e) => return Err(e),
        }
    }
    nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(io::Error::from)?;
    socket.bind(&SocketAddrV4::new(src, 0).into())
}
