//! The per-pod outbound listener.
//!
//! The kernel programs send an enrolled pod's outbound connect() to
//! 127.0.0.1:15001 inside the pod's own network namespace. Here the agent
//! accepts it, asks the kernel where it was going, and forwards it. For now
//! every destination takes the passthrough path: plain TCP to the original
//! destination, from a socket in the pod's namespace so the source address
//! stays the pod's. (HBONE replaces this for mesh destinations.)

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};
use warren_common::OUTBOUND_PORT;

use crate::{
    config::Workload,
    logging::Chain,
    netns::{NetNs, NetnsError},
    redirect::OriginalDsts,
    state::Snapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot listen on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddrV4,
        netns: String,
        source: io::Error,
    },
    #[error("no original destination recorded for the connection from port {0}")]
    NoOriginalDst(u16),
    #[error("connecting to {dst} failed: {source}")]
    Connect {
        dst: SocketAddrV4,
        source: io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Everything the listener of one enrolled pod needs.
pub struct PodProxy {
    pub workload: Workload,
    pub netns: Arc<NetNs>,
    pub original_dsts: OriginalDsts,
    pub state: watch::Receiver<Arc<Snapshot>>,
}

/// Opens the outbound listener inside the pod's network namespace.
pub async fn bind(netns: &NetNs) -> Result<TcpListener, OutboundError> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT);
    let listener = netns
        .run(move || -> io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            // A restarted agent must be able to bind again while connections
            // of the previous one linger in TIME_WAIT.
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .await?
        .and_then(TcpListener::from_std)
        .map_err(|source| OutboundError::Listen {
            addr,
            netns: netns.path().display().to_string(),
            source,
        })?;
    Ok(listener)
}

/// Accepts captured connections until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                tokio::spawn(async move {
                    let port = peer.port();
                    if let Err(error) = pod.forward(stream, port).await {
                        warn!(
                            workload = %pod.workload.qualified_name(),
                            src_port = port,
                            error = %Chain(&error),
                            "outbound connection failed"
                        );
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                warn!(workload = %pod.workload.qualified_name(), error = %Chain(&error), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl PodProxy {
    async fn forward(&self, mut client: TcpStream, src_port: u16) -> Result<(), OutboundError> {
        let dst = self
            .original_dsts
            .take(self.netns.cookie(), src_port)
            .ok_or(OutboundError::NoOriginalDst(src_port))?;
        let workload = self.workload.qualified_name();
        let src = SocketAddrV4::new(self.workload.ip, src_port);
        let dst_workload = self
            .state
            .borrow()
            .workload_by_ip(*dst.ip())
            .map(Workload::qualified_name);
        info!(
            %workload,
            %src,
            %dst,
            dst_workload = dst_workload.as_deref().unwrap_or("-"),
            path = "passthrough",
            "captured outbound connection"
        );
        let started = Instant::now();
        let mut upstream = self.connect_from_pod(dst).await?;
        let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        info!(
            %workload,
            %src,
            %dst,
            sent,
            received,
            duration_ms = started.elapsed().as_millis() as u64,
            "connection closed"
        );
        Ok(())
    }

    /// Connects to `dst` from a socket in the pod's namespace. The agent is
    /// not in the pod's cgroup, so the kernel programs do not capture it.
    async fn connect_from_pod(&self, dst: SocketAddrV4) -> Result<TcpStream, OutboundError> {
        let std_socket = self
            .netns
            .run(|| -> io::Result<std::net::TcpStream> {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                socket.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(socket))
            })
            .await??;
        let socket = TcpSocket::from_std_stream(std_socket);
        socket.set_nodelay(true)?;
        let stream = socket
            .connect(SocketAddr::V4(dst))
            .await
            .map_err(|source| OutboundError::Connect { dst, source })?;
        debug!(local = ?stream.local_addr().ok(), %dst, "passthrough connected");
        Ok(stream)
    }
}
