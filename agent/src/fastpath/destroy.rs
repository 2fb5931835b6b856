//! Cutting fast-path connections a policy no longer allows: the kernel's
//! sock_diag SOCK_DESTROY (what `ss -K` does) aborts a TCP socket, whose
//! application then sees ECONNABORTED while its peer gets a reset.
//!
//! Needs `CONFIG_INET_DIAG_DESTROY` and CAP_NET_ADMIN in the socket's network
//! namespace. A sock_diag socket sees only the namespace it was made in, so
//! the caller makes a [`Destroyer`] on a thread inside the wanted namespace
//! (`NetNs::run`).
//!
//! The kernel finds the socket to destroy as it finds the socket for an
//! incoming packet: the established table first, then the listeners. A tuple
//! whose connection is already gone (say, reset by the destruction of its
//! other end) would therefore destroy the server's listener. So each destroy
//! first looks the tuple up, refuses anything but that exact connection, and
//! destroys by the socket's cookie, which also keeps a socket that reuses the
//! tuple meanwhile from being destroyed in its place.
//!
//! A server listening on `[::]` (dual-stack, the default of Go, Java and
//! Node) accepts IPv4 connections on AF_INET6 sockets with IPv4-mapped
//! addresses (`::ffff:10.244.1.3`). The kernel's IPv4 lookup finds those too,
//! and describes them as AF_INET6; so does it a `[::]` listener it falls back
//! to. Both families are therefore accepted in answers, a mapped address
//! standing for its IPv4 address.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, Parseable,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_LISTEN,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::{SockDiagDestroy, SockDiagMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};
use nix::errno::Errno;

/// INET_DIAG_NOCOOKIE in both halves of the cookie: match by tuple alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// How long to wait for the kernel's answer; it answers at once, so running
/// out means something is badly wrong, and the caller should hear of it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Room for one answer: a socket's description without extensions, or an
/// error echoing the request, both far smaller.
const RECEIVE_BUFFER: usize = 16 * 1024;

/// One end of an IPv4 TCP connection, as that end's network namespace sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
}

impl Tuple {
    /// The other end of the connection (in the same namespace, or across a
    /// path that does not rewrite addresses).
    pub fn reversed(self) -> Tuple {
        Tuple {
            local: self.remote,
            remote: self.local,
        }
    }

    fn socket_id(self, cookie: [u8; 8]) -> SocketId {
        SocketId {
            source_port: self.local.port(),
            destination_port: self.remote.port(),
            source_address: IpAddr::V4(*self.local.ip()),
            destination_address: IpAddr::V4(*self.remote.ip()),
            // Sockets bound to no device, as the pods' are.
            interface_id: 0,
            cookie,
        }
    }

    /// Whether the kernel's description of a socket is this tuple's: an
    /// AF_INET6 socket's IPv4-mapped addresses stand for their IPv4 ones.
    fn is(self, id: &SocketId) -> bool {
        ipv4_of(id.source_address) == Some(*self.local.ip())
            && id.source_port == self.local.port()
            && ipv4_of(id.destination_address) == Some(*self.remote.ip())
            && id.destination_port == self.remote.port()
    }
}

/// The IPv4 address an address is or stands for (IPv4-mapped IPv6).
fn ipv4_of(address: IpAddr) -> Option<Ipv4Addr> {
    match address {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.local, self.remote)
    }
}

/// Which request of a destroy went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Lookup,
    Destroy,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Lookup => "look up",
            Step::Destroy => "destroy",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("cannot open a sock_diag netlink socket: {source}")]
    Socket { source: io::Error },
    #[error("cannot send the sock_diag request to {step} TCP socket {tuple}: {source}")]
    Send {
        step: Step,
        tuple: Tuple,
        source: io::Error,
    },
    #[error(
        "no sock_diag answer to the request to {step} TCP socket {tuple} (waited {REPLY_TIMEOUT:?}): {source}"
    )]
    Receive {
        step: Step,
        tuple: Tuple,
        source: io::Error,
    },
    #[error(
        "the kernel's sock_diag answer to the request to {step} TCP socket {tuple} is unexpected: {reason}"
    )]
    Answer {
        step: Step,
        tuple: Tuple,
        reason: String,
    },
    #[error("the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY)")]
    Unsupported,
    /// EPERM: no CAP_NET_ADMIN in the socket's namespace.
    #[error("the kernel refused to {step} TCP socket {tuple}: {errno}")]
    Refused {
        step: Step,
        tuple: Tuple,
        errno: Errno,
    },
}

/// A sock_diag netlink socket in the calling thread's network namespace (the
/// namespace is fixed when the socket is made).
pub struct Destroyer {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

/// What the kernel answered a request with.
enum Answer {
    /// The socket the lookup found.
    Found(InetResponseHeader),
    /// NLMSG_ERROR: 0 acknowledges, otherwise a negated errno.
    Code(i32),
}

impl Destroyer {
    pub fn new() -> Result<Self, DestroyError> {
        let open = || -> io::Result<Socket> {
            let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
            socket.bind_auto()?;
            // Only the kernel (port 0) may answer.
            socket.connect(&SocketAddr::new(0, 0))?;
            socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
            Ok(socket)
        };
        Ok(Self {
            socket: open().map_err(|source| DestroyError::Socket { source })?,
            sequence: 0,
            buffer: Vec::with_capacity(RECEIVE_BUFFER),
        })
    }

    /// Destroys the TCP socket with exactly this 4-tuple, in any state but
    /// LISTEN. Ok(true) destroyed, Ok(false) no such socket here.
    pub fn destroy(&mut self, tuple: Tuple) -> Result<bool, DestroyError> {
        let lookup = SockDiagMessage::InetRequest(request(tuple, NO_COOKIE));
        let found = match self.exchange(Step::Lookup, tuple, lookup, NLM_F_REQUEST)? {
            Answer::Found(found) => found,
            Answer::Code(code) if code == -(Errno::ENOENT as i32) => return Ok(false),
            Answer::Code(code) => return Err(refused_or_unexpected(Step::Lookup, tuple, code)),
        };
        // The lookup falls back to a listener on the local address, IPv4 or
        // dual-stack `[::]`: that is no connection of this tuple (see the
        // module's comment).
        if found.state == TCP_LISTEN || !tuple.is(&found.socket_id) {
            return Ok(false);
        }
        let destroy = SockDiagDestroy::new(SockDiagMessage::InetRequest(request(
            tuple,
            found.socket_id.cookie,
        )));
        match self.exchange(Step::Destroy, tuple, destroy, NLM_F_REQUEST | NLM_F_ACK)? {
            Answer::Code(0) => Ok(true),
            // Gone since the lookup (ESTALE: its tuple now names another
            // socket, which the cookie spares).
            Answer::Code(code)
                if code == -(Errno::ENOENT as i32) || code == -(Errno::ESTALE as i32) =>
            {
                Ok(false)
            }
            Answer::Code(code) => Err(refused_or_unexpected(Step::Destroy, tuple, code)),
            Answer::Found(_) => Err(unexpected(Step::Destroy, tuple, "a socket, not an ACK")),
        }
    }

    /// Whether this kernel can destroy sockets at all. A kernel without
    /// `CONFIG_INET_DIAG_DESTROY` refuses before looking for the socket; one
    /// with it looks and finds none. Does not check CAP_NET_ADMIN, which the
    /// kernel checks only once it has found a socket.
    pub fn probe(&mut self) -> Result<(), DestroyError> {
        // No socket, listener or not, has local port 0, and no socket has
        // cookie 0: this request cannot destroy anything.
        let nobody = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
        let tuple = Tuple {
            local: nobody,
            remote: nobody,
        };
        let destroy = SockDiagDestroy::new(SockDiagMessage::InetRequest(request(tuple, [0; 8])));
        match self.exchange(Step::Destroy, tuple, destroy, NLM_F_REQUEST | NLM_F_ACK)? {
            Answer::Code(code) if code == -(Errno::ENOENT as i32) => Ok(()),
            Answer::Code(0) => Err(unexpected(
                Step::Destroy,
                tuple,
                "destroyed a socket that cannot exist",
            )),
            Answer::Code(code) => Err(refused_or_unexpected(Step::Destroy, tuple, code)),
            Answer::Found(_) => Err(unexpected(Step::Destroy, tuple, "a socket, not an ACK")),
        }
    }

    /// Sends one request and waits for the answer carrying its sequence
    /// number; answers to earlier requests that timed out are skipped.
    fn exchange<M: NetlinkSerializable>(
        &mut self,
        step: Step,
        tuple: Tuple,
        message: M,
        flags: u16,
    ) -> Result<Answer, DestroyError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|source| DestroyError::Send {
                step,
                tuple,
                source,
            })?;

        loop {
            self.buffer.clear();
            let received =
                self.socket
                    .recv(&mut self.buffer, 0)
                    .map_err(|source| DestroyError::Receive {
                        step,
                        tuple,
                        source,
                    })?;
            let datagram = &self.buffer[..received.min(self.buffer.len())];
            let mut offset = 0;
            while offset < datagram.len() {
                let reply = NetlinkMessage::<Found>::deserialize(&datagram[offset..])
                    .map_err(|e| unexpected(step, tuple, &e.to_string()))?;
                let length = reply.header.length as usize;
                if length == 0 {
                    break;
                }
                // Messages in a datagram start 4-byte aligned.
                offset += length.next_multiple_of(4);
                if reply.header.sequence_number != self.sequence {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(error) => return Ok(Answer::Code(error.raw_code())),
                    NetlinkPayload::InnerMessage(Found(found)) => return Ok(Answer::Found(found)),
                    // Not sent for single requests; nothing to learn.
                    _ => continue,
                }
            }
        }
    }
}

impl fmt::Debug for Destroyer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destroyer")
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

/// An inet_diag_req_v2 for exactly this IPv4 TCP tuple.
fn request(tuple: Tuple, cookie: [u8; 8]) -> InetRequest {
    InetRequest {
        family: AF_INET,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        // The kernel ignores the states of a request for one socket (a
        // listener is found all the same); `destroy` checks the state.
        states: StateFlags::all().difference(StateFlags::LISTEN),
        socket_id: tuple.socket_id(cookie),
    }
}

fn refused_or_unexpected(step: Step, tuple: Tuple, code: i32) -> DestroyError {
    match code {
        0 => unexpected(step, tuple, "an ACK without the socket"),
        code if code == -(Errno::EOPNOTSUPP as i32) => DestroyError::Unsupported,
        code => DestroyError::Refused {
            step,
            tuple,
            errno: Errno::from_raw(-code),
        },
    }
}

fn unexpected(step: Step, tuple: Tuple, reason: &str) -> DestroyError {
    DestroyError::Answer {
        step,
        tuple,
        reason: reason.to_owned(),
    }
}

/// The kernel's description of a socket: only the inet_diag_msg header,
/// which has the state, tuple and cookie; the attributes after it are not
/// asked for and not parsed.
struct Found(InetResponseHeader);

impl NetlinkDeserializable for Found {
    type Error = DecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, DecodeError> {
        if header.message_type != SOCK_DIAG_BY_FAMILY {
            return Err(format!("message type {}", header.message_type).into());
        }
        let found = InetResponseHeader::parse(payload)?;
        // AF_INET6: a dual-stack socket, found by its IPv4-mapped addresses.
        if found.family != AF_INET && found.family != AF_INET6 {
            return Err(format!(
                "address family {}, neither AF_INET nor AF_INET6",
                found.family
            )
            .into());
        }
        Ok(Found(found))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr as StdSocketAddr, TcpListener, TcpStream};
    use std::process::Command;
    use std::thread;

    use netlink_packet_sock_diag::constants::{TCP_ESTABLISHED, TCP_SYN_SENT};
    use nix::sched::{CloneFlags, unshare};

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root (network namespaces, CAP_NET_ADMIN)");
        false
    }

    /// Moves the calling thread into a new network namespace with `lo` up;
    /// the host's namespace is untouched.
    fn enter_fresh_namespace() {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        ip(&["link", "set", "lo", "up"]);
    }

    /// `ip` runs in the calling thread's namespace: the child is forked from it.
    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?}: {status}");
    }

    /// Runs `f` on a thread of its own in a fresh network namespace.
    fn in_fresh_namespace<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        thread::spawn(move || {
            enter_fresh_namespace();
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn v4(addr: StdSocketAddr) -> SocketAddrV4 {
        match addr {
            StdSocketAddr::V4(addr) => addr,
            StdSocketAddr::V6(addr) => panic!("{addr} is not IPv4"),
        }
    }

    fn tuple_of(stream: &TcpStream) -> Tuple {
        Tuple {
            local: v4(stream.local_addr().unwrap()),
            remote: v4(stream.peer_addr().unwrap()),
        }
    }

    /// A loopback connection: the listener, the client end, the accepted end.
    fn connection() -> (TcpListener, TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        for end in [&client, &accepted] {
            end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (listener, client, accepted)
    }

    fn errno_of<T: fmt::Debug>(result: io::Result<T>) -> Errno {
        let error = result.expect_err("the operation should fail");
        Errno::from_raw(error.raw_os_error().unwrap_or_else(|| panic!("{error}")))
    }

    /// Bytes go both ways over the connection.
    fn carries_bytes(a: &mut TcpStream, b: &mut TcpStream) {
        let mut byte = [0u8; 1];
        a.write_all(b"a").unwrap();
        b.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"a");
        b.write_all(b"b").unwrap();
        a.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"b");
    }

    /// The listener still accepts, and the new connection works.
    fn still_listening(listener: &TcpListener) {
        still_accepting(listener, listener.local_addr().unwrap());
    }

    /// The listener still accepts a connection to `to`, which works.
    fn still_accepting(listener: &TcpListener, to: StdSocketAddr) {
        let mut client = TcpStream::connect(to).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        accepted
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        carries_bytes(&mut client, &mut accepted);
    }

    #[test]
    fn destroying_the_client_aborts_it_and_resets_the_accepted_end() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let (listener, mut client, mut accepted) = connection();
            carries_bytes(&mut client, &mut accepted);
            let tuple = tuple_of(&client);
            let mut destroyer = Destroyer::new().unwrap();

            assert!(destroyer.destroy(tuple).unwrap());
            let mut buf = [0u8; 16];
            assert_eq!(errno_of(client.read(&mut buf)), Errno::ECONNABORTED);
            // The error is reported once; the socket is closed after it.
            assert_eq!(errno_of(client.write(b"x")), Errno::EPIPE);
            assert_eq!(errno_of(accepted.read(&mut buf)), Errno::ECONNRESET);

            assert!(!destroyer.destroy(tuple).unwrap(), "already destroyed");
            still_listening(&listener);
        });
    }

    #[test]
    fn destroying_the_accepted_end_aborts_it_and_spares_the_listener() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let (listener, mut client, mut accepted) = connection();
            let tuple = tuple_of(&client).reversed();
            assert_eq!(tuple, tuple_of(&accepted));
            let mut destroyer = Destroyer::new().unwrap();

            assert!(destroyer.destroy(tuple).unwrap());
            let mut buf = [0u8; 16];
            assert_eq!(errno_of(accepted.read(&mut buf)), Errno::ECONNABORTED);
            assert_eq!(errno_of(client.read(&mut buf)), Errno::ECONNRESET);

            // The tuple's local address is the listener's: the kernel's
            // lookup now finds the listener, which must survive.
            assert!(!destroyer.destroy(tuple).unwrap(), "already destroyed");
            still_listening(&listener);
        });
    }

    /// A dual-stack listener on `[::]` (std leaves IPV6_V6ONLY off, as do
    /// Go, Java and Node), an IPv4 client connected to it through 127.0.0.1,
    /// and the accepted end: an AF_INET6 socket with IPv4-mapped addresses.
    fn dual_stack_connection() -> (TcpListener, SocketAddrV4, TcpStream, TcpStream) {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, listener.local_addr().unwrap().port());
        let client = TcpStream::connect(to).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        for end in [&client, &accepted] {
            end.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let mapped = |addr: StdSocketAddr| match addr {
            StdSocketAddr::V6(addr) => SocketAddrV4::new(
                addr.ip().to_ipv4_mapped().expect("an IPv4-mapped address"),
                addr.port(),
            ),
            StdSocketAddr::V4(addr) => panic!("{addr}: the accepted end should be AF_INET6"),
        };
        let accepted_tuple = Tuple {
            local: mapped(accepted.local_addr().unwrap()),
            remote: mapped(accepted.peer_addr().unwrap()),
        };
        assert_eq!(accepted_tuple, tuple_of(&client).reversed());
        (listener, to, client, accepted)
    }

    /// The address family the kernel reports for the socket with this tuple.
    fn family_of(destroyer: &mut Destroyer, tuple: Tuple) -> Option<u8> {
        let lookup = SockDiagMessage::InetRequest(request(tuple, NO_COOKIE));
        match destroyer
            .exchange(Step::Lookup, tuple, lookup, NLM_F_REQUEST)
            .unwrap()
        {
            Answer::Found(found) => Some(found.family),
            Answer::Code(code) => {
                assert_eq!(code, -(Errno::ENOENT as i32));
                None
            }
        }
    }

    #[test]
    fn the_accepted_end_of_a_dual_stack_listener_is_destroyed_by_its_ipv4_tuple() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let (listener, to, mut client, mut accepted) = dual_stack_connection();
            carries_bytes(&mut client, &mut accepted);
            let tuple = tuple_of(&client).reversed();
            let mut destroyer = Destroyer::new().unwrap();
            // The premise: the IPv4 lookup finds the mapped AF_INET6 socket.
            assert_eq!(family_of(&mut destroyer, tuple), Some(AF_INET6));

            assert!(destroyer.destroy(tuple).unwrap());
            let mut buf = [0u8; 16];
            assert_eq!(errno_of(accepted.read(&mut buf)), Errno::ECONNABORTED);
            assert_eq!(errno_of(client.read(&mut buf)), Errno::ECONNRESET);

            // The lookup now falls back to the `[::]` listener (AF_INET6,
            // LISTEN), which must survive.
            assert_eq!(family_of(&mut destroyer, tuple), Some(AF_INET6));
            assert!(!destroyer.destroy(tuple).unwrap(), "already destroyed");
            still_accepting(&listener, to.into());
        });
    }

    #[test]
    fn the_client_of_a_dual_stack_listener_is_destroyed_as_before() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let (listener, to, mut client, mut accepted) = dual_stack_connection();
            let tuple = tuple_of(&client);
            let mut destroyer = Destroyer::new().unwrap();
            assert_eq!(family_of(&mut destroyer, tuple), Some(AF_INET));

            assert!(destroyer.destroy(tuple).unwrap());
            let mut buf = [0u8; 16];
            assert_eq!(errno_of(client.read(&mut buf)), Errno::ECONNABORTED);
            assert_eq!(errno_of(accepted.read(&mut buf)), Errno::ECONNRESET);

            assert!(!destroyer.destroy(tuple).unwrap(), "already destroyed");
            // The reset closed the accepted end too: its tuple now reaches
            // only the `[::]` listener.
            assert!(!destroyer.destroy(tuple.reversed()).unwrap());
            still_accepting(&listener, to.into());
        });
    }

    #[test]
    fn a_tuple_nobody_has_is_not_found_and_the_probe_passes() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut destroyer = Destroyer::new().unwrap();
            destroyer.probe().unwrap();

            let nobody = Tuple {
                local: "127.0.0.1:1".parse().unwrap(),
                remote: "127.0.0.1:2".parse().unwrap(),
            };
            assert!(!destroyer.destroy(nobody).unwrap());
            // A listener matches no connection's tuple, even its own address.
            let to_listener = Tuple {
                local: v4(listener.local_addr().unwrap()),
                remote: "127.0.0.1:9".parse().unwrap(),
            };
            assert!(!destroyer.destroy(to_listener).unwrap());
            assert!(!destroyer.destroy(to_listener.reversed()).unwrap());
            still_listening(&listener);
            destroyer.probe().unwrap();
        });
    }

    #[test]
    fn a_destroyer_reaches_only_its_own_namespace() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            // Made in namespace A, then the thread moves on to namespace B.
            let mut in_a = Destroyer::new().unwrap();
            enter_fresh_namespace();
            let (_listener, mut client, mut accepted) = connection();
            let tuple = tuple_of(&client);

            assert!(!in_a.destroy(tuple).unwrap());
            assert!(!in_a.destroy(tuple.reversed()).unwrap());
            carries_bytes(&mut client, &mut accepted);

            // The same request from B's own namespace does destroy it.
            let mut in_b = Destroyer::new().unwrap();
            assert!(in_b.destroy(tuple).unwrap());
            let mut buf = [0u8; 16];
            assert_eq!(errno_of(client.read(&mut buf)), Errno::ECONNABORTED);
        });
    }

    /// The state the kernel reports for the socket with this tuple.
    fn state_of(destroyer: &mut Destroyer, tuple: Tuple) -> Option<u8> {
        let lookup = SockDiagMessage::InetRequest(request(tuple, NO_COOKIE));
        match destroyer
            .exchange(Step::Lookup, tuple, lookup, NLM_F_REQUEST)
            .unwrap()
        {
            Answer::Found(found) => Some(found.state),
            Answer::Code(code) => {
                assert_eq!(code, -(Errno::ENOENT as i32));
                None
            }
        }
    }

    #[test]
    fn a_connection_still_in_syn_sent_is_destroyed() {
        if !is_root() {
            return;
        }
        in_fresh_namespace(|| {
            // A listener whose accept queue is full drops SYNs: the next
            // client stays in SYN_SENT.
            let listener =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            listener
                .bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
                .unwrap();
            listener.listen(0).unwrap();
            let remote = v4(listener.local_addr().unwrap().as_socket().unwrap());
            let mut destroyer = Destroyer::new().unwrap();
            let queued = TcpStream::connect(remote).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while state_of(&mut destroyer, tuple_of(&queued).reversed()) != Some(TCP_ESTABLISHED) {
                assert!(std::time::Instant::now() < deadline, "never queued");
                thread::sleep(Duration::from_millis(5));
            }

            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            assert_eq!(errno_of(socket.connect(&remote.into())), Errno::EINPROGRESS);
            let local = v4(socket.local_addr().unwrap().as_socket().unwrap());
            let tuple = Tuple { local, remote };
            assert_eq!(state_of(&mut destroyer, tuple), Some(TCP_SYN_SENT));

            assert!(destroyer.destroy(tuple).unwrap());
            let error = socket.take_error().unwrap().expect("a pending error");
            assert_eq!(error.raw_os_error(), Some(Errno::ECONNABORTED as i32));
            assert_eq!(state_of(&mut destroyer, tuple), None);
        });
    }
}
