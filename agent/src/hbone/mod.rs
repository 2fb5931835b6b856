//! HBONE: TCP connections carried as HTTP/2 CONNECT streams inside mutual-TLS
//! connections between node agents, as Istio's ztunnel speaks it
//! (see shared/notes/hbone-wire.md).
//!
//! This module knows HTTP/2 and the HBONE conventions, not pods or eBPF: it is
//! used, and tested, over any TLS stream.
//!
//! - [`server`]: accept CONNECT streams on one TLS connection.
//! - [`client`]: open a TLS + HTTP/2 connection and send CONNECTs on it.
//! - [`pool`]: share client connections between streams.
//! - [`copy`]: relay bytes between a TCP socket and a stream.
//! - [`transport`]: the socket under the TLS, read through a buffer.

pub mod client;
pub mod copy;
pub mod pool;
pub mod server;
pub mod transport;

pub use transport::Transport;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// The HBONE port, on every pod address.
pub const PORT: u16 = warren_common::HBONE_PORT;
/// ztunnel's own ports. A CONNECT to one of them would loop back into the
/// proxy ("recursive call"), so it is refused.
pub const PROXY_PORTS: [u16; 3] = [
    warren_common::OUTBOUND_PORT,
    warren_common::INBOUND_PLAINTEXT_PORT,
    PORT,
];

/// HTTP/2 settings, matching ztunnel's (flow-control windows sized for
/// bulk transfer, frames up to 1 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const SERVER_MAX_STREAMS: u32 = 200;
pub const SERVER_MAX_HEADER_LIST: u32 = 64 * 1024;
pub const CLIENT_MAX_HEADER_LIST: u32 = 16 * 1024;
/// How much of a stream's data h2 holds, sent by the relay but not yet
/// written to TLS: two of the relay's largest chunks, so that reading the
/// socket and writing TLS (on the connection's task) overlap. It is also
/// what a peer that stops reading pins per stream, so no more (h2's default
/// is 400 KiB).
pub const SEND_BUFFER: usize = 512 * 1024;
/// Opening a tunnel connection (TCP, TLS and HTTP/2 handshakes), and
/// waiting for the answer to a CONNECT, take at most this long: a peer that
/// stalls must not hold up the streams queued behind it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive: a connection whose PING is not answered in time is dead.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Lets a TLS connection carrying HBONE take a whole relayed chunk in one
/// write (see [`copy::TLS_SEND_LIMIT`]).
pub fn tune_tls<D>(connection: &mut rustls::ConnectionCommon<D>) {
    connection.set_buffer_limit(Some(copy::TLS_SEND_LIMIT));
}

/// Why a CONNECT request is refused, and the status it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("method {0} is not CONNECT")]
    NotConnect(String),
    #[error("authority {0:?} is not <ip>:<port>")]
    BadAuthority(String),
    #[error("destination {dst} is not the pod this connection arrived at ({pod})")]
    WrongPod { dst: IpAddr, pod: IpAddr },
    #[error("destination port {0} is one of the proxy's own ports")]
    ProxyPort(u16),
    /// Authorization policy said no.
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("connecting to the application at {dst} failed: {reason}")]
    Unreachable { dst: SocketAddr, reason: String },
    /// The stream would take the pod, its peer or the node over a limit.
    #[error("refused: {0}")]
    OverLimit(#[from] crate::limits::OverLimit),
}

impl Refusal {
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::NotConnect(_)
            | Self::BadAuthority(_)
            | Self::WrongPod { .. }
            | Self::ProxyPort(_) => StatusCode::BAD_REQUEST,
            Self::Denied(_) => StatusCode::UNAUTHORIZED,
            Self::Unreachable { .. } | Self::OverLimit(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Checks a CONNECT request that arrived at the pod `pod_ip`: method,
/// authority, that it targets this very pod, and not a proxy port.
pub fn check_request<B>(request: &http::Request<B>, pod_ip: IpAddr) -> Result<SocketAddr, Refusal> {
    if request.method() != http::Method::CONNECT {
        return Err(Refusal::NotConnect(request.method().to_string()));
    }
    let authority = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let dst: SocketAddr = authority
        .parse()
        .map_err(|_| Refusal::BadAuthority(authority.to_owned()))?;
    if dst.ip() != pod_ip {
        return Err(Refusal::WrongPod {
            dst: dst.ip(),
            pod: pod_ip,
        });
    }
    if PROXY_PORTS.contains(&dst.port()) {
        return Err(Refusal::ProxyPort(dst.port()));
    }
    Ok(dst)
}

/// The CONNECT request for `dst`, on behalf of a client at `src`, in the
/// trace `trace`.
pub fn connect_request(dst: SocketAddr, src: SocketAddr, trace: Trace) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(dst.to_string())
        .header("forwarded", format!("for=\"{src}\""))
        .header("traceparent", trace.traceparent())
        .body(())
        .expect("a CONNECT request from valid addresses is well-formed")
}

/// The original client address from a `forwarded: for="ip:port"` header.
pub fn forwarded_for<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let value = request.headers().get("forwarded")?.to_str().ok()?;
    value.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

/// A fresh W3C trace context (version 00, not sampled): a new trace per
/// proxied connection, so logs on both nodes can be joined.
/// Shows the trace id (32 hex digits), what log lines carry.
impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.trace_id)
    }
}

/// A W3C trace context (`traceparent`): the trace a connection belongs
/// to. The source's agent starts one per connection and sends it with the
/// CONNECT; the destination's agent continues it, so both agents' log lines
/// of one connection carry the same trace id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: u128,
    /// The sender's span (what the receiver calls its parent).
    pub span_id: u64,
}

impl Trace {
    /// A new trace.
    pub fn start() -> Self {
        Self {
            // Zero is invalid in both (W3C trace context).
            trace_id: rand::random::<u128>().max(1),
            span_id: rand::random::<u64>().max(1),
        }
    }

    /// The trace of a CONNECT's `traceparent` header (version 00), if it
    /// carries a valid one; a new trace otherwise.
    pub fn of<B>(request: &http::Request<B>) -> Self {
        request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
            .unwrap_or_else(Self::start)
    }

    fn parse(header: &str) -> Option<Self> {
        let mut parts = header.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.next().is_some()
            || version != "00"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self { trace_id, span_id })
    }

    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-00", self.trace_id, self.span_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, authority: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(authority)
            .body(())
            .unwrap()
    }

    #[test]
    fn accepts_a_connect_to_this_pod() {
        let pod: IpAddr = "10.244.2.2".parse().unwrap();
        let dst = check_request(&request("CONNECT", "10.244.2.2:8080"), pod).unwrap();
        assert_eq!(dst, "10.244.2.2:8080".parse().unwrap());
    }

    #[test]
    fn refuses_what_ztunnel_refuses() {
        let pod: IpAddr = "10.244.2.2".parse().unwrap();
        let cases = [
            (request("GET", "http://10.244.2.2:8080/"), 400),
            (request("CONNECT", "web.shop:8080"), 400),
            (request("CONNECT", "10.244.2.3:8080"), 400),
            (request("CONNECT", "10.244.2.2:15008"), 400),
            (request("CONNECT", "10.244.2.2:15001"), 400),
        ];
        for (req, status) in cases {
            let refusal = check_request(&req, pod).unwrap_err();
            assert_eq!(refusal.status().as_u16(), status, "{refusal}");
        }
        assert_eq!(Refusal::Denied("x".into()).status().as_u16(), 401);
        let unreachable = Refusal::Unreachable {
            dst: "10.244.2.2:8080".parse().unwrap(),
            reason: "connection refused".into(),
        };
        assert_eq!(unreachable.status().as_u16(), 503);
    }

    #[test]
    fn connect_request_carries_forwarded_and_traceparent() {
        let trace = Trace::start();
        let req = connect_request(
            "10.0.0.2:80".parse().unwrap(),
            "10.0.0.1:4000".parse().unwrap(),
            trace,
        );
        assert_eq!(req.method(), http::Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.2:80");
        assert_eq!(forwarded_for(&req), Some("10.0.0.1:4000".parse().unwrap()));
        let tp = req.headers()["traceparent"].to_str().unwrap();
        let parts: Vec<_> = tp.split('-').collect();
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        // The destination reads back the same trace.
        assert_eq!(Trace::of(&req), trace);
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_new_trace() {
        let with = |value: &str| {
            http::Request::builder()
                .header("traceparent", value)
                .body(())
                .unwrap()
        };
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = Trace::of(&with(valid));
        assert_eq!(trace.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.span_id, 0x00f0_67aa_0ba9_02b7);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "garbage",
        ] {
            let fresh = Trace::of(&with(bad));
            assert_ne!(
                fresh.to_string(),
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "{bad}"
            );
            assert_ne!(fresh.trace_id, 0, "{bad}");
        }
        assert_ne!(Trace::of(&http::Request::new(())).trace_id, 0);
    }
}

#[cfg(test)]
mod loopback_tests;
