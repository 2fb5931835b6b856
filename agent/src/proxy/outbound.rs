//! The per-pod outbound listener.
//!
//! The kernel programs send an enrolled pod's outbound connect() to
//! 127.0.0.1:15001 inside the pod's own network namespace. Here the agent
//! accepts it, asks the kernel where it was going, and forwards it:
//!
//! - to a mesh workload: as an HBONE stream (mutual TLS, presenting this
//!   pod's certificate, expecting the destination's identity) on a pooled
//!   connection to `<destination>:15008`;
//! - anywhere else: passthrough, plain TCP to the original destination.
//!
//! Either way the agent's socket is made in the pod's namespace, so traffic
//! leaves from the pod's own address. The agent is not in the pod's cgroup,
//! so its sockets are not captured again.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};
use warren_common::OUTBOUND_PORT;

use super::PodProxy;
use crate::{
    config::Workload,
    hbone::{
        self,
        client::Connection,
        copy::{Relayed, relay},
        pool::PoolKey,
    },
    logging::Chain,
    policy::MtlsMode,
    tls::{self, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("cannot listen on {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddrV4,
        netns: String,
        source: io::Error,
    },
    #[error("connecting to {dst} failed: {source}")]
    Connect { dst: SocketAddr, source: io::Error },
    #[error("the workload has no valid certificate; no tunnel without one")]
    NoCertificate,
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS handshake with {dst} failed: {reason}")]
    Handshake { dst: SocketAddr, reason: String },
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the destination's agent refused the tunnel: {0}")]
    Refused(http::StatusCode),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Opens the outbound listener inside the pod's network namespace.
pub async fn bind(pod: &PodProxy) -> Result<TcpListener, OutboundError> {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT);
    pod.netns
        .listen(addr.into())
        .await
        .map_err(|source| OutboundError::Listen {
            addr,
            netns: pod.netns.path().display().to_string(),
            source,
        })
}

/// Accepts captured connections until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(pod.clone().forward(stream, peer.port()));
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
    async fn forward(self: Arc<Self>, client: TcpStream, src_port: u16) {
        let workload = self.workload.qualified_name();
        let src = SocketAddrV4::new(self.workload.ip, src_port);
        let Some(dst) = self.original_dsts.take(self.netns.cookie(), src_port) else {
            // Evicted from the kernel's table before we got to it: we do not
            // know where it was going, so it goes nowhere.
            warn!(%workload, %src, "outbound connection dropped: no original destination recorded");
            return;
        };
        let _ = client.set_nodelay(true);
        let (dst_workload, mode) = {
            let state = self.state.borrow();
            let dst_workload = state.workload_by_ip(*dst.ip()).cloned();
            let mode = dst_workload
                .as_ref()
                .map(|w| state.policies().mtls_mode(w, dst.port()));
            (dst_workload, mode)
        };
        let started = Instant::now();
        let result = match &dst_workload {
            // The destination takes plaintext only: as Istio, send it so.
            Some(dst_workload) if mode == Some(MtlsMode::Disable) => {
                info!(
                    %workload, %src, %dst,
                    dst_workload = %dst_workload.qualified_name(),
                    path = "passthrough",
                    mtls = "DISABLE",
                    "captured outbound connection"
                );
                self.passthrough(client, dst).await
            }
            Some(dst_workload) => self.tunnel(client, src, dst, dst_workload).await,
            None => {
                info!(%workload, %src, %dst, dst_workload = "-", path = "passthrough", "captured outbound connection");
                self.passthrough(client, dst).await
            }
        };
        match result {
            Ok(relayed) => info!(
                %workload,
                %src,
                %dst,
                sent = relayed.sent,
                received = relayed.received,
                duration_ms = started.elapsed().as_millis() as u64,
                "connection closed"
            ),
            Err(error) => {
                warn!(%workload, %src, %dst, error = %Chain(&error), "outbound connection failed")
            }
        }
    }

    async fn passthrough(
        &self,
        mut client: TcpStream,
        dst: SocketAddrV4,
    ) -> Result<Relayed, OutboundError> {
        let mut upstream =
            self.netns
                .connect(dst.into())
                .await
                .map_err(|source| OutboundError::Connect {
                    dst: dst.into(),
                    source,
                })?;
        let (sent, received) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok(Relayed { sent, received })
    }

    async fn tunnel(
        &self,
        client: TcpStream,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        dst_workload: &Workload,
    ) -> Result<Relayed, OutboundError> {
        let key = PoolKey {
            src_netns: self.netns.cookie(),
            src_ip: self.workload.ip.into(),
            src: self.workload.identity.clone(),
            dst: dst_workload.identity.clone(),
            dst_addr: SocketAddr::new((*dst.ip()).into(), hbone::PORT),
        };
        // The connection may turn out to be going away (its peer renewed its
        // certificate a moment ago, say); then one more is tried.
        let mut attempts = 0;
        let (checkout, response, send) = loop {
            attempts += 1;
            let checkout = self
                .pool
                .checkout(&key, || self.open_connection(&key))
                .await?;
            let request = hbone::connect_request(dst.into(), src.into());
            match timeout(hbone::CONNECT_TIMEOUT, checkout.connection().send(request)).await {
                Ok(Ok((response, send))) => break (checkout, response, send),
                Ok(Err(e)) if attempts == 1 && checkout.connection().is_closed() => {
                    debug!(connection = checkout.connection_id(), error = %e, "tunnel connection went away; trying another");
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(OutboundError::Timeout("waiting for the answer to CONNECT")),
            }
        };
        info!(
            workload = %self.workload.qualified_name(),
            %src,
            %dst,
            dst_workload = %dst_workload.qualified_name(),
            identity = %key.src,
            dst_identity = %key.dst,
            path = "hbone",
            connection = checkout.connection_id(),
            reused = checkout.reused(),
            "captured outbound connection"
        );
        if response.status() != http::StatusCode::OK {
            return Err(OutboundError::Refused(response.status()));
        }
        Ok(relay(client, send, response.into_body()).await?)
    }

    /// A new mutual-TLS HTTP/2 connection to the destination's HBONE port,
    /// presenting this pod's certificate and accepting only the expected
    /// destination identity.
    async fn open_connection(&self, key: &PoolKey) -> Result<Connection, OutboundError> {
        timeout(hbone::CONNECT_TIMEOUT, self.handshakes(key))
            .await
            .map_err(|_| OutboundError::Timeout("opening the tunnel connection"))?
    }

    async fn handshakes(&self, key: &PoolKey) -> Result<Connection, OutboundError> {
        let certificate = self
            .valid_certificate()
            .ok_or(OutboundError::NoCertificate)?;
        let config =
            tls::client_config(&certificate, &self.trust(), std::slice::from_ref(&key.dst))?;
        let tcp =
            self.netns
                .connect(key.dst_addr)
                .await
                .map_err(|source| OutboundError::Connect {
                    dst: key.dst_addr,
                    source,
                })?;
        let tls = TlsConnector::from(config)
            .connect(ServerName::IpAddress(key.dst_addr.ip().into()), tcp)
            .await
            .map_err(|e| OutboundError::Handshake {
                dst: key.dst_addr,
                reason: tls::handshake_error(&e),
            })?;
        // No stream rides it once either end's certificate has expired.
        let valid_until = tls::peer_not_after(tls.get_ref().1)
            .map_or(certificate.not_after(), |peer| {
                peer.min(certificate.not_after())
            });
        Ok(Connection::handshake(tls, self.pool.settings().keepalive)
            .await?
            .valid_until(valid_until))
    }
}
