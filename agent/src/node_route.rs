//! The node's address as a pod sees it: the source address the node's kernel
//! picks to reach the pod. The kubelet's probes come from there, whatever the
//! CNI: the node's own IP when pods are routed to directly (Calico, Cilium),
//! or the pod network's gateway on a bridge CNI.

use std::{io, net::Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage},
};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("looking up the route to {dst}: {source}")]
    Lookup {
        dst: Ipv4Addr,
        source: rtnetlink::Error,
    },
    #[error("the kernel answered no route to {0}")]
    NoRoute(Ipv4Addr),
    #[error("the route to {0} names no source address")]
    NoSource(Ipv4Addr),
}

/// The source address the kernel uses to reach `dst`, in the network
/// namespace of the calling thread (where the netlink socket is opened):
/// what `ip route get <dst>` prints as `src`. Needs a tokio runtime.
pub async fn source_address_for(dst: Ipv4Addr) -> Result<Ipv4Addr, RouteError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(RouteError::Socket)?;
    let connection = AbortOnDrop(tokio::spawn(connection));

    // RTM_GETROUTE for the /32, without NLM_F_DUMP (rtnetlink sends a single
    // lookup when the message has a destination): the kernel resolves it as
    // it would for a packet, and reports the source it would pick as
    // RTA_PREFSRC. Table, protocol, scope and type stay 0, as the kernel
    // requires of a lookup under strict checking.
    let mut request = RouteMessage::default();
    request.header.address_family = AddressFamily::Inet;
    request.header.destination_prefix_length = 32;
    request
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
    let reply = handle
        .route()
        .get(request)
        .execute()
        .try_next()
        .await
        .map_err(|source| RouteError::Lookup { dst, source })?
        .ok_or(RouteError::NoRoute(dst))?;
    drop(connection);

    reply
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::PrefSource(RouteAddress::Inet(src)) => Some(*src),
            _ => None,
        })
        .ok_or(RouteError::NoSource(dst))
}

/// The netlink connection's task lives as long as the lookup needs it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::{fs::File, os::fd::AsFd, process::Command};

    use nix::sched::{CloneFlags, setns};

    use super::*;

    #[tokio::test]
    async fn loopback_is_reached_from_loopback() {
        let src = source_address_for(Ipv4Addr::LOCALHOST).await.unwrap();
        assert_eq!(src, Ipv4Addr::LOCALHOST);
    }

    /// A network namespace made for one test, deleted when dropped.
    struct TestNetns(String);

    impl TestNetns {
        fn new(name: &str) -> Self {
            let name = format!("{name}-{}", std::process::id());
            // A namespace left by an earlier, killed run of this test.
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", &name]);
            Self(name)
        }

        /// Runs `ip -n <netns> <args>`.
        fn ip(&self, args: &str) {
            let mut full = vec!["-n", &self.0];
            full.extend(args.split_whitespace());
            ip(&full);
        }

        /// Runs `f` on a thread inside the namespace, with a runtime of its
        /// own there (a netlink socket belongs to the namespace of the thread
        /// that opens it).
        fn run<R: Send>(&self, f: impl AsyncFnOnce() -> R + Send) -> R {
            let path = format!("/run/netns/{}", self.0);
            std::thread::scope(|scope| {
                scope
                    .spawn(move || {
                        let file = File::open(&path).unwrap();
                        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap()
                            .block_on(f())
                    })
                    .join()
                    .unwrap()
            })
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {}: {status}", args.join(" "));
    }

    #[test]
    fn the_source_is_the_address_of_the_device_the_route_leaves_by() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a network namespace of its own)");
            return;
        }
        let netns = TestNetns::new("warren-node-route");
        // Two veths, each with an address and a /32 route through it, as a
        // routing CNI gives a node one device per pod (their peers stay in
        // the namespace: only the routes matter).
        for (device, address) in [("p0", "10.244.1.1"), ("p1", "10.244.9.1")] {
            netns.ip(&format!(
                "link add {device} type veth peer name {device}-peer"
            ));
            netns.ip(&format!("addr add {address}/32 dev {device}"));
            netns.ip(&format!("link set {device} up"));
            netns.ip(&format!("link set {device}-peer up"));
        }
        netns.ip("route add 10.244.1.2/32 dev p0");
        netns.ip("route add 10.244.9.2/32 dev p1");

        let (via_p0, via_p1, nowhere) = netns.run(async || {
            (
                source_address_for(Ipv4Addr::new(10, 244, 1, 2)).await,
                source_address_for(Ipv4Addr::new(10, 244, 9, 2)).await,
                // No default route in a fresh namespace.
                source_address_for(Ipv4Addr::new(192, 0, 2, 1)).await,
            )
        });
        assert_eq!(via_p0.unwrap(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(via_p1.unwrap(), Ipv4Addr::new(10, 244, 9, 1));
        let err = nowhere.unwrap_err();
        assert!(
            matches!(
                &err,
                RouteError::Lookup { source: rtnetlink::Error::NetlinkError(e), .. }
                    if e.raw_code() == -libc::ENETUNREACH
            ),
            "{err:?}"
        );
    }
}
