//! What the fuzz targets (`fuzz/`, cargo-fuzz and libFuzzer; see
//! docs/fuzzing.md) drive: each entry point takes the fuzzer's bytes to the
//! agent's own parsers the way the agent meets them from outside, and checks
//! what must hold whatever the input. Built for the fuzz targets (feature
//! `fuzzing`) and for this crate's tests, which replay every input kept under
//! `fuzz/regressions/` and `fuzz/seeds/`, so the ordinary suite guards them
//! without nightly.
//!
//! The Kubernetes source's facts, watch tables and builder are open to the
//! crate for this; only the functions the agent calls on what the API server
//! sends are used.

// The Kubernetes source's own modules, opened to the crate for this.
use crate::kubernetes::{build, facts, watch};

/// HBONE's receiving end: the HTTP/2 server and the checks of a CONNECT.
pub mod hbone {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr, SocketAddr},
        pin::Pin,
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Context, Poll},
        time::Duration,
    };

    use bytes::Bytes;
    use h2::{RecvStream, server::SendResponse};
    use tokio::io::{
        AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf,
        WriteHalf,
    };

    use crate::hbone::{
        PROXY_PORTS, Trace, check_request, client, connect_request, copy, forwarded_for, server,
    };

    /// The pod the fuzzed connections arrive at.
    pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 2);
    /// What every HTTP/2 client sends first; the fuzzer's bytes follow it.
    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// Far longer than any input takes: a server still serving a
    /// connection this long after its client closed it would never end it.
    const HANG: Duration = Duration::from_secs(10);

    /// Serves one HTTP/2 connection whose client sends `data` after the
    /// preface, with the agent's server (`hbone::server::serve`, its
    /// settings and limits) and a handler that checks each request as the
    /// inbound proxy does, then relays the stream to an echoing application.
    ///
    /// `data`'s first byte is not sent: its lowest bit winds the connection
    /// down (GOAWAY) as soon as it is up, as a certificate renewal does.
    pub fn server(data: &[u8]) -> Served {
        let served = Served::default();
        let Some((&control, sent)) = data.split_first() else {
            return served;
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let (client, server_side) = tokio::io::duplex(64 * 1024);
            let (mut from_server, mut to_server) = tokio::io::split(client);
            let received = served.received.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 16 * 1024];
                while let Ok(n @ 1..) = from_server.read(&mut buf).await {
                    received.fetch_add(n, Ordering::Relaxed);
                }
            });
            let sent = sent.to_vec();
            let settled = served.clone();
            tokio::spawn(async move {
                // The server may hang up first: that is one of its answers.
                let _ = async {
                    to_server.write_all(PREFACE).await?;
                    to_server.write_all(&sent).await?;
                    // Requests are served while the connection is up, as
                    // they are when a client waits for its answers.
                    settled.settle().await;
                    to_server.shutdown().await
                }
                .await;
            });
            let wind_down = async move {
                if control & 1 == 0 {
                    std::future::pending::<()>().await;
                }
            };
            let handling = served.clone();
            let serving = server::serve(server_side, wind_down, move |request, respond| {
                stream(request, respond, handling.clone())
            });
            if tokio::time::timeout(HANG, serving).await.is_err() {
                panic!(
                    "the HBONE server still serves a connection {HANG:?} after its client closed it"
                );
            }
            let finished = async {
                while served.in_flight.load(Ordering::Relaxed) > 0 {
                    tokio::task::yield_now().await;
                }
            };
            if tokio::time::timeout(HANG, finished).await.is_err() {
                panic!("streams still handled {HANG:?} after their connection ended");
            }
        });
        served
    }

    /// How many requests the handler accepted and refused, and what the
    /// connection is doing.
    #[derive(Debug, Clone, Default)]
    pub struct Served {
        accepted: Arc<AtomicUsize>,
        refused: Arc<AtomicUsize>,
        /// Requests being handled.
        in_flight: Arc<AtomicUsize>,
        /// Bytes the client received.
        received: Arc<AtomicUsize>,
    }

    impl Served {
        /// Returns once the server and its handlers have nothing more to do
        /// with what they were sent (nothing more reaches the client, no
        /// handler starts or ends), or they have been at it for long.
        async fn settle(&self) {
            let state = || {
                [
                    &self.accepted,
                    &self.refused,
                    &self.in_flight,
                    &self.received,
                ]
                .map(|n| n.load(Ordering::Relaxed))
            };
            let mut last = None;
            for _ in 0..1000 {
                let now = state();
                if last == Some(now) {
                    return;
                }
                last = Some(now);
                for _ in 0..16 {
                    tokio::task::yield_now().await;
                }
            }
        }

        pub fn accepted(&self) -> usize {
            self.accepted.load(Ordering::Relaxed)
        }

        pub fn refused(&self) -> usize {
            self.refused.load(Ordering::Relaxed)
        }
    }

    /// One request, as `proxy::inbound` takes it (less authorization and
    /// the connection to the application, which need a pod).
    async fn stream(
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        served: Served,
    ) {
        served.in_flight.fetch_add(1, Ordering::Relaxed);
        // Also when the task is dropped half way.
        let _done = Done(served.in_flight.clone());
        let trace = Trace::of(&request);
        assert!(
            trace.trace_id != 0 && trace.span_id != 0,
            "{trace:?} from {request:?}"
        );
        let _claimed = forwarded_for(&request);
        let dst = match check_request(&request, IpAddr::V4(POD)) {
            Ok(dst) => dst,
            Err(refusal) => {
                assert_eq!(refusal.status(), http::StatusCode::BAD_REQUEST, "{refusal}");
                served.refused.fetch_add(1, Ordering::Relaxed);
                server::refuse(&mut respond, &refusal);
                return;
            }
        };
        assert_accepted(&request, dst);
        served.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(send) = server::accept(&mut respond) else {
            return;
        };
        let _ = copy::relay(Echo::start(), send, request.into_body()).await;
    }

    struct Done(Arc<AtomicUsize>);

    impl Drop for Done {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// What a CONNECT that `check_request` accepts must be.
    fn assert_accepted<B>(request: &http::Request<B>, dst: SocketAddr) {
        assert_eq!(request.method(), http::Method::CONNECT, "{dst}");
        assert_eq!(dst.ip(), IpAddr::V4(POD), "accepted for another pod");
        assert!(!PROXY_PORTS.contains(&dst.port()), "accepted for {dst}");
    }

    /// A CONNECT built from `data`, as lines: the method, the request
    /// target, then `name: value` headers (`name*: value` repeats the value
    /// 4096 times, for absurd sizes), checked by `check_request`,
    /// `forwarded_for` and `Trace::of` directly. Whatever they are told, a
    /// CONNECT is accepted only for this pod on a port that is not the
    /// proxy's, and what the agent's own client writes reads back the same.
    pub fn request(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let mut lines = text.split('\n');
        let (Some(method), Some(target)) = (lines.next(), lines.next()) else {
            return;
        };
        let mut builder = http::Request::builder().method(method).uri(target);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim_start();
            builder = match name.strip_suffix('*') {
                Some(name) => builder.header(name, value.repeat(4096)),
                None => builder.header(name, value),
            };
        }
        let Ok(request) = builder.body(()) else {
            return;
        };
        let trace = Trace::of(&request);
        assert!(trace.trace_id != 0 && trace.span_id != 0, "{trace:?}");
        let some_client: SocketAddr = "10.244.1.2:40000".parse().expect("an address");
        match check_request(&request, IpAddr::V4(POD)) {
            Ok(dst) => {
                assert_accepted(&request, dst);
                let ours = connect_request(dst, some_client, trace);
                assert_eq!(check_request(&ours, IpAddr::V4(POD)), Ok(dst));
                assert_eq!(Trace::of(&ours), trace, "our traceparent reads back");
            }
            Err(refusal) => {
                assert_eq!(refusal.status(), http::StatusCode::BAD_REQUEST, "{refusal}");
            }
        }
        if let Some(claimed) = forwarded_for(&request) {
            let ours = connect_request(SocketAddr::new(IpAddr::V4(POD), 8080), claimed, trace);
            assert_eq!(forwarded_for(&ours), Some(claimed));
        }
    }

    /// The application behind an accepted CONNECT: it sends back what it
    /// reads, and closes its side once the stream's end has come.
    struct Echo {
        reader: ReadHalf<DuplexStream>,
        writer: WriteHalf<DuplexStream>,
    }

    impl Echo {
        fn start() -> Self {
            let (application, socket) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let (mut reader, mut writer) = tokio::io::split(application);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
            let (reader, writer) = tokio::io::split(socket);
            Self { reader, writer }
        }
    }

    struct EchoReader<'a>(&'a mut ReadHalf<DuplexStream>);

    impl AsyncRead for EchoReader<'_> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl copy::Readable for EchoReader<'_> {
        // A read that finds nothing registers for more: that is all the
        // relay needs of readiness.
        fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl copy::Duplex for Echo {
        type Reader<'a> = EchoReader<'a>;
        type Writer<'a> = &'a mut WriteHalf<DuplexStream>;

        fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
            (EchoReader(&mut self.reader), &mut self.writer)
        }
    }

    // HTTP/2 frames (RFC 9113, section 6), for the seeds.
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const PRIORITY: u8 = 0x2;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const WINDOW_UPDATE: u8 = 0x8;
    const CONTINUATION: u8 = 0x9;
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const PADDED: u8 = 0x8;
    const PRIORITY_FLAG: u8 = 0x20;
    /// The largest frame every HTTP/2 peer takes.
    const MIN_MAX_FRAME: usize = 16 * 1024;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).expect("a frame's length fits 24 bits");
        let mut frame = length.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        frame
    }

    /// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
    fn hpack_integer(first: u8, n: u32, value: usize, out: &mut Vec<u8>) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        let mut rest = value - max;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }

    /// A header field block of literals without indexing, new names
    /// (RFC 7541, 6.2.2): no table state to get wrong.
    fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in fields {
            block.push(0x00);
            for text in [name, value] {
                hpack_integer(0, 7, text.len(), &mut block);
                block.extend(text.as_bytes());
            }
        }
        block
    }

    /// HEADERS, and CONTINUATION frames for what does not fit in one.
    fn headers(stream: u32, fields: &[(&str, &str)], end_stream: bool) -> Vec<u8> {
        let block = header_block(fields);
        let mut chunks = block.chunks(MIN_MAX_FRAME).peekable();
        let mut frames = Vec::new();
        let mut kind = HEADERS;
        let end_stream = if end_stream { END_STREAM } else { 0 };
        while let Some(chunk) = chunks.next() {
            let end_headers = if chunks.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            let flags = if kind == HEADERS { end_stream } else { 0 } | end_headers;
            frames.extend(frame(kind, flags, stream, chunk));
            kind = CONTINUATION;
        }
        if block.is_empty() {
            frames.extend(frame(HEADERS, end_stream | END_HEADERS, stream, &[]));
        }
        frames
    }

    fn connect(authority: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "CONNECT".into()),
            (":authority", authority.into()),
            ("forwarded", "for=\"10.244.1.2:40000\"".into()),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into(),
            ),
        ]
    }

    fn borrowed<'a>(fields: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        fields.iter().map(|(n, v)| (*n, v.as_str())).collect()
    }

    /// A conversation: control byte 0, SETTINGS, then `frames`.
    fn conversation(control: u8, frames: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
        let mut bytes = vec![control];
        bytes.extend(frame(SETTINGS, 0, 0, &[]));
        for f in frames {
            bytes.extend(f);
        }
        bytes
    }

    /// Seeds for [`server`]: requests the server must accept or refuse,
    /// written frame by frame, and what the agent's own client sends.
    pub fn server_seeds() -> Vec<(String, Vec<u8>)> {
        let mut seeds = Vec::new();
        let mut seed = |name: &str, bytes: Vec<u8>| seeds.push((name.to_owned(), bytes));
        let request = |authority: &str| {
            [
                headers(1, &borrowed(&connect(authority)), false),
                frame(DATA, END_STREAM, 1, b"hello"),
            ]
        };
        seed("connect", conversation(0, request("10.244.2.2:8080")));
        seed(
            "connect-wound-down",
            conversation(1, request("10.244.2.2:8080")),
        );
        seed("another-pod", conversation(0, request("10.244.2.3:8080")));
        for port in PROXY_PORTS {
            seed(
                &format!("proxy-port-{port}"),
                conversation(0, request(&format!("10.244.2.2:{port}"))),
            );
        }
        for (name, authority) in [
            ("name-authority", "web.shop:8080"),
            ("no-port", "10.244.2.2"),
            ("ipv6", "[fd00::2]:8080"),
            ("userinfo", "u@10.244.2.2:8080"),
        ] {
            seed(name, conversation(0, request(authority)));
        }
        let get = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "10.244.2.2:8080"),
        ];
        seed("get", conversation(0, [headers(1, &get, true)]));
        seed(
            "no-authority",
            conversation(0, [headers(1, &[(":method", "CONNECT")], true)]),
        );
        // Over the server's header list limit (SERVER_MAX_HEADER_LIST), in
        // CONTINUATION frames.
        let big = "x".repeat(100_000);
        let mut huge = connect("10.244.2.2:8080");
        huge.push(("x-big", big));
        seed(
            "huge-header",
            conversation(0, [headers(1, &borrowed(&huge), true)]),
        );
        let mut many = connect("10.244.2.2:8080");
        let names: Vec<String> = (0..3000).map(|i| format!("x-h{i}")).collect();
        for name in &names {
            many.push(("x-many", name.clone()));
        }
        seed(
            "many-headers",
            conversation(0, [headers(1, &borrowed(&many), true)]),
        );
        // More streams at once than the server allows (SERVER_MAX_STREAMS).
        let fields = connect("10.244.2.2:8080");
        let fields = borrowed(&fields);
        seed(
            "many-streams",
            conversation(0, (0..250).map(|i| headers(2 * i + 1, &fields, false))),
        );
        let mut settings = Vec::new();
        for (id, value) in [
            (1u16, 0u32),
            (2, 0),
            (3, 1),
            (4, 65_535),
            (5, 16_384),
            (6, 100),
        ] {
            settings.extend(id.to_be_bytes());
            settings.extend(value.to_be_bytes());
        }
        let mut padded = vec![4u8];
        padded.extend(header_block(&fields));
        padded.extend([0; 4]);
        let mut prioritized = vec![0, 0, 0, 1, 16];
        prioritized.extend(header_block(&fields));
        seed(
            "control-frames",
            conversation(
                0,
                [
                    frame(SETTINGS, 0, 0, &settings),
                    frame(SETTINGS, 1, 0, &[]),
                    frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]),
                    frame(WINDOW_UPDATE, 0, 0, &1_000_000u32.to_be_bytes()),
                    frame(HEADERS, END_HEADERS | PADDED, 1, &padded),
                    frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 3, &prioritized),
                    frame(PRIORITY, 0, 3, &[0, 0, 0, 1, 200]),
                    frame(WINDOW_UPDATE, 0, 1, &65_535u32.to_be_bytes()),
                    frame(DATA, 0, 1, &[0; 1000]),
                    frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()),
                    frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0]),
                ],
            ),
        );
        seed("ours", recorded_client());
        seeds
    }

    /// What the agent's HBONE client sends for two CONNECTs, one accepted
    /// and relayed, one refused, recorded off an in-memory connection to
    /// the server.
    fn recorded_client() -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let sent = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            io: {
                let (client, server_side) = tokio::io::duplex(64 * 1024);
                runtime.spawn(server::serve(
                    server_side,
                    std::future::pending(),
                    |request, respond| stream(request, respond, Served::default()),
                ));
                client
            },
            sent: sent.clone(),
        };
        runtime.block_on(async {
            let connection = client::Connection::handshake(recorder, client::Keepalive::default())
                .await
                .expect("HTTP/2 handshake");
            let src: SocketAddr = "10.244.1.2:40000".parse().expect("an address");
            for dst in ["10.244.2.2:8080", "10.244.2.3:8080"] {
                let dst = dst.parse().expect("an address");
                let request = connect_request(dst, src, Trace::start());
                let Ok((response, mut send)) = connection.send(request).await else {
                    continue;
                };
                if response.status().is_success() {
                    send.send_data(Bytes::from_static(b"hello"), true)
                        .expect("stream open");
                    let mut body = response.into_body();
                    while let Some(Ok(_)) = body.data().await {}
                }
            }
        });
        let sent = sent.lock().expect("not poisoned");
        let mut seed = vec![0];
        seed.extend(sent.strip_prefix(PREFACE).expect("the client's preface"));
        seed
    }

    /// An I/O stream that keeps a copy of what is written to it.
    struct Recorder {
        io: DuplexStream,
        sent: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let written = Pin::new(&mut self.io).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = written {
                self.sent.lock().expect("not poisoned").extend(&buf[..n]);
            }
            written
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }
}

/// Istio's policy documents, as files.
pub mod policy {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, Ipv4Addr},
        path::PathBuf,
    };

    use serde::Deserialize;

    use crate::mesh::{
        Labels, Policies, Workload,
        policy::{Connection, DEFAULT_ROOT_NAMESPACE, Document, Parsed, PolicyError, parse_object},
    };

    const ORIGIN: &str = "fuzz.yaml";
    const VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

    /// Loads `data` as a policy file, as the agent loads its policy
    /// directory, then asks the policies about workloads they select and
    /// connections they name. What must hold: every document reads the same
    /// as `security.istio.io/v1` and as `v1beta1`; a workload that no
    /// enforced ALLOW or DENY policy applies to is never denied (the fast
    /// path lets such workloads' plaintext bypass the agent); a port's own
    /// mTLS mode is the mode for that port.
    pub fn files(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let loaded = Policies::from_texts(
            [(PathBuf::from(ORIGIN), Ok(text.to_owned()))],
            DEFAULT_ROOT_NAMESPACE,
        );
        for error in &loaded.errors {
            assert_eq!(error.origin, ORIGIN, "{error}");
        }
        both_versions(text);
        ask(&loaded.policies);
    }

    /// What a document read to, comparably.
    #[derive(Debug, PartialEq)]
    enum Read {
        Document(Document),
        Refused(PolicyError, Option<Document>),
        Unreadable(PolicyError),
    }

    fn read(parsed: Parsed) -> Read {
        match parsed {
            Parsed::Document(document) => Read::Document(document),
            Parsed::Refused(refused) => Read::Refused(refused.error, refused.fallback),
            Parsed::Unreadable(error) => Read::Unreadable(error),
        }
    }

    fn both_versions(text: &str) {
        for document in serde_yaml::Deserializer::from_str(text) {
            let Ok(value) = serde_yaml::Value::deserialize(document) else {
                return;
            };
            let items = match value.get("kind").and_then(|k| k.as_str()) {
                Some("List") => value
                    .get("items")
                    .and_then(|i| i.as_sequence())
                    .cloned()
                    .unwrap_or_default(),
                _ => vec![value],
            };
            for item in items {
                let version = item.get("apiVersion").and_then(|v| v.as_str());
                if !version.is_some_and(|v| VERSIONS.contains(&v)) {
                    continue;
                }
                let [v1, v1beta1] = VERSIONS.map(|version| {
                    let mut item = item.clone();
                    item["apiVersion"] = version.into();
                    read(parse_object(ORIGIN, "document", item))
                });
                assert_eq!(v1, v1beta1, "v1 and v1beta1 read differently");
            }
        }
    }

    /// At most this many workloads and connections are asked about, so that
    /// a large input stays fast.
    const ASKED: usize = 8;

    fn ask(policies: &Policies) {
        let mut selectors: Vec<(String, Labels)> = vec![
            ("default".into(), Labels::new()),
            (DEFAULT_ROOT_NAMESPACE.into(), Labels::new()),
        ];
        let mut ports = BTreeSet::from([80]);
        for pa in policies.peer_authentications() {
            selectors.push((
                pa.namespace.clone(),
                pa.selector.clone().unwrap_or_default(),
            ));
            ports.extend(pa.ports.keys());
        }
        for ap in policies.authorization_policies() {
            selectors.push((
                ap.namespace.clone(),
                ap.selector.clone().unwrap_or_default(),
            ));
            for rule in &ap.rules {
                for operation in &rule.to {
                    ports.extend(operation.ports.iter().flatten());
                    ports.extend(operation.not_ports.iter().flatten());
                }
            }
        }
        let workloads: Vec<Workload> = selectors
            .into_iter()
            .filter_map(|(namespace, labels)| workload(&namespace, labels))
            .take(ASKED)
            .collect();
        let identities: Vec<_> = workloads.iter().map(|w| Some(&w.identity)).collect();
        for workload in &workloads {
            let (mode, by_port) = policies.mtls_modes(workload);
            assert_eq!(policies.mtls_mode(workload, 0), mode);
            for (&port, &port_mode) in &by_port {
                assert_eq!(policies.mtls_mode(workload, port), port_mode, "port {port}");
            }
            let enforced = policies.authorization_applies(workload);
            let sources = identities.iter().copied().chain([None]).take(ASKED);
            for (source, &port) in sources.zip(ports.iter().cycle()) {
                let connection = Connection {
                    source,
                    source_ip: IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)),
                    destination_ip: workload.ip,
                    destination_port: port,
                };
                let decision = policies.authorize(workload, &connection);
                assert!(
                    decision.allowed || enforced,
                    "{decision:?} for {connection:?}, though no enforced policy applies"
                );
                if !decision.allowed {
                    assert!(
                        decision.reason.starts_with("DENY ")
                            || decision.reason == "no ALLOW policy matched",
                        "{decision:?}"
                    );
                }
            }
        }
    }

    fn workload(namespace: &str, labels: Labels) -> Option<Workload> {
        let identity = format!("spiffe://cluster.local/ns/{namespace}/sa/default")
            .parse()
            .ok()?;
        Some(Workload {
            name: "pod".into(),
            namespace: namespace.into(),
            workload_name: "pod".into(),
            service_account: "default".into(),
            identity,
            ip: Ipv4Addr::new(10, 244, 2, 2),
            node: "node-2".into(),
            labels,
            local: None,
            probe_ports: Default::default(),
        })
    }
}

/// The agent's config file.
pub mod config {
    use std::path::Path;

    use crate::config::{Config, MIN_CERTIFICATE_TTL};

    /// Where the config is said to be read from.
    pub const PATH: &str = "/etc/warren/agent.yaml";

    /// Parses `data` as the agent's config file, also as a DaemonSet's
    /// agent does (the node from `$NODE_NAME`), and returns what the agent
    /// accepts. What must hold: errors name the file; a file that names its
    /// node reads the same with `$NODE_NAME` set; what is accepted is
    /// consistent (its workloads of the trust domain, at distinct
    /// addresses, those of this node local, certificates not shorter lived
    /// than the minimum).
    pub fn parse(data: &[u8]) -> Option<Config> {
        let text = std::str::from_utf8(data).ok()?;
        let path = Path::new(PATH);
        let alone = Config::parse(path, text);
        let with_env = Config::parse_with_env(path, text, Some("node-from-env".into()));
        for result in [&alone, &with_env] {
            match result {
                Ok(config) => check(config),
                Err(error) => {
                    let message = error.to_string();
                    assert!(
                        message.starts_with(&format!("config file {PATH}")),
                        "{message}"
                    );
                }
            }
        }
        if let Ok(config) = &alone {
            assert_eq!(
                with_env.as_ref().ok(),
                Some(config),
                "$NODE_NAME changed it"
            );
        }
        alone.or(with_env).ok()
    }

    fn check(config: &Config) {
        assert!(config.certificate_ttl >= MIN_CERTIFICATE_TTL);
        let mut addresses = std::collections::BTreeSet::new();
        for workload in &config.workloads {
            assert_eq!(
                workload.identity.trust_domain(),
                &config.trust_domain,
                "{workload:?}"
            );
            assert!(
                addresses.insert(workload.ip),
                "two workloads at {}",
                workload.ip
            );
            assert_eq!(workload.local.is_some(), workload.node == config.node);
        }
    }
}

/// What the API server sends: watch events of the kinds the agent
/// watches, to the facts it keeps and the mesh it builds of them.
pub mod kubernetes {
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
    use kube::{
        api::{DynamicObject, WatchEvent},
        core::GroupVersionKind,
        discovery::ApiResource,
    };
    use serde::de::DeserializeOwned;
    use warren_cni::PodRef;
    use warren_pki::identity::TrustDomain;

    use super::{
        build, facts,
        watch::{Reported, Table, Tables},
    };
    use crate::cni::Decision;
    use crate::kubernetes::Context;

    /// This agent's node.
    pub const NODE: &str = "node-1";

    fn context() -> Context {
        Context {
            node: NODE.into(),
            trust_domain: TrustDomain::new("cluster.local").expect("a trust domain"),
            root_namespace: "istio-system".into(),
            membership_file: None,
            reports_file: None,
        }
    }

    /// One line of `data`: a watch event (`{"type": "ADDED", "object":
    /// {...}}`, newline-delimited as the API server streams them) of a
    /// kind the agent watches, told by the object's `kind`; or a sandbox
    /// the runtime reported through the CNI plugin (`{"type": "SANDBOX",
    /// "uid": ..., "object": {...}}`).
    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
    enum Kind {
        Namespace,
        Pod,
        Service,
        EndpointSlice,
        PeerAuthentication,
        AuthorizationPolicy,
        Sandbox,
    }

    /// Feeds `data`'s events to the agent's facts, in order, as its watches
    /// do, then builds the mesh. What must hold: the mesh is the same
    /// whatever order the tables hold their objects in (every node must
    /// build the same mesh of the same objects); no workload holds a
    /// Service's virtual address; what the agent answers the CNI plugin
    /// about a pod agrees with the membership file the plugin reads while
    /// the agent is away.
    pub fn objects(data: &[u8]) -> Mesh {
        let Ok(text) = std::str::from_utf8(data) else {
            return Mesh::default();
        };
        let mut tables = Tables::default();
        for line in text.lines() {
            apply(&mut tables, line);
        }
        // As once every kind has been listed: only then does the agent
        // build the mesh or decide about pods.
        tables.namespaces.synced = true;
        tables.pods.synced = true;
        tables.services.synced = true;
        tables.slices.synced = true;
        tables.peer_authentications.synced = true;
        tables.authorization_policies.synced = true;
        let context = context();
        let built = build::build(&tables, &context);
        let again = build::build(&reordered(&tables), &context);
        assert_eq!(
            built.workloads, again.workloads,
            "workloads depend on order"
        );
        assert_eq!(built.policies, again.policies, "policies depend on order");
        assert_eq!(built.vip_claims, again.vip_claims);
        if !shared_vips(&tables) {
            assert_eq!(built.services, again.services, "services depend on order");
        }
        for workload in built.workloads.iter() {
            assert!(!built.services.is_vip(workload.ip), "{workload:?}");
        }
        let membership = build::membership(&tables, &context);
        let _ = build::mesh_pods_here(&tables, &context);
        for pod in tables.pods.objects.values() {
            let asked = PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: Some(pod.uid.clone()),
            };
            let decision = build::decide(&tables, &context, &asked);
            let held = membership.must_hold(&asked);
            match decision {
                Decision::InMesh => {
                    assert!(held, "{asked} in the mesh, not held without the agent")
                }
                Decision::NotInMesh => {
                    assert!(!held, "{asked} outside the mesh, held without the agent")
                }
                Decision::Unknown => {}
            }
        }
        let (peer_authentications, authorization_policies) = built.policies.counts();
        Mesh {
            workloads: built.workloads.len(),
            conflicts: built.workloads.conflicts().count(),
            service_ports: built.services.len(),
            policies: peer_authentications + authorization_policies,
        }
    }

    /// What the mesh built of the objects holds.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Mesh {
        pub workloads: usize,
        pub conflicts: usize,
        pub service_ports: usize,
        pub policies: usize,
    }

    fn apply(tables: &mut Tables, line: &str) {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            return;
        };
        let kind = match event["object"]["kind"].as_str() {
            _ if event["type"] == "SANDBOX" => Kind::Sandbox,
            Some("Namespace") => Kind::Namespace,
            Some("Pod") => Kind::Pod,
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("PeerAuthentication") => Kind::PeerAuthentication,
            Some("AuthorizationPolicy") => Kind::AuthorizationPolicy,
            _ => return,
        };
        // The API server sends no object whose name it would not have
        // taken, nor a namespaced one without its namespace.
        let metadata = &event["object"]["metadata"];
        let named = |field: &str| metadata[field].as_str().is_some_and(dns_subdomain);
        let namespaced = !matches!(kind, Kind::Namespace | Kind::Sandbox);
        if kind != Kind::Sandbox && !named("name") || namespaced && !named("namespace") {
            return;
        }
        let version = event["object"]["apiVersion"].as_str().unwrap_or_default();
        match kind {
            Kind::Namespace => {
                typed::<Namespace, _>(line, &mut tables.namespaces, facts::namespace)
            }
            Kind::Pod => typed::<Pod, _>(line, &mut tables.pods, facts::pod),
            Kind::Service => typed::<Service, _>(line, &mut tables.services, facts::service),
            Kind::EndpointSlice => {
                let resource = resource("discovery.k8s.io", "v1", "EndpointSlice");
                dynamic(line, &mut tables.slices, |o| {
                    facts::endpoint_slice(&resource, o)
                });
            }
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => {
                // Whichever version the API server serves: the object's.
                let served = if version.ends_with("/v1beta1") {
                    "v1beta1"
                } else {
                    "v1"
                };
                let name = format!("{kind:?}");
                let resource = resource("security.istio.io", served, &name);
                let table = if kind == Kind::PeerAuthentication {
                    &mut tables.peer_authentications
                } else {
                    &mut tables.authorization_policies
                };
                dynamic(line, table, |o| facts::policy(&resource, o, "istio-system"));
            }
            Kind::Sandbox => {
                let (Some(uid), Ok(report)) = (
                    event["uid"].as_str(),
                    serde_json::from_value::<Reported>(event["object"].clone()),
                ) else {
                    return;
                };
                tables.sandboxes.insert(uid.to_owned(), report);
            }
        }
    }

    /// A name Kubernetes takes for objects (RFC 1123 subdomain).
    fn dns_subdomain(name: &str) -> bool {
        let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        (1..=253).contains(&name.len())
            && name
                .bytes()
                .all(|b| alphanumeric(b) || b == b'-' || b == b'.')
            && name.bytes().next().is_some_and(alphanumeric)
            && name.bytes().last().is_some_and(alphanumeric)
    }

    fn resource(group: &str, version: &str, kind: &str) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
    }

    /// A watch event applied to `table`, as `watch::run` applies it.
    fn typed<K, F>(line: &str, table: &mut Table<F>, facts: fn(&K) -> Option<F>)
    where
        K: kube::Resource + DeserializeOwned,
    {
        if let Ok(event) = serde_json::from_str::<WatchEvent<K>>(line) {
            applied(event, table, facts);
        }
    }

    fn dynamic<F>(line: &str, table: &mut Table<F>, facts: impl Fn(&DynamicObject) -> Option<F>) {
        if let Ok(event) = serde_json::from_str::<WatchEvent<DynamicObject>>(line) {
            applied(event, table, facts);
        }
    }

    fn applied<K: kube::Resource, F>(
        event: WatchEvent<K>,
        table: &mut Table<F>,
        facts: impl Fn(&K) -> Option<F>,
    ) {
        use kube::ResourceExt;
        // As the API server sends them: namespaced objects name their
        // namespace, in the key as in the object.
        let key = |object: &K| match object.namespace() {
            Some(namespace) => format!("{namespace}/{}", object.name_any()),
            None => object.name_any(),
        };
        match event {
            WatchEvent::Added(object) | WatchEvent::Modified(object) => match facts(&object) {
                Some(facts) => {
                    table.objects.insert(key(&object), facts);
                }
                None => {
                    table.objects.remove(&key(&object));
                }
            },
            WatchEvent::Deleted(object) => {
                table.objects.remove(&key(&object));
            }
            WatchEvent::Bookmark(_) | WatchEvent::Error(_) => {}
        }
    }

    /// The same objects, put into new tables in the reverse order of their
    /// keys (each table's iteration order is its own anyway).
    fn reordered(tables: &Tables) -> Tables {
        fn copy<F: Clone>(table: &Table<F>) -> Table<F> {
            let mut copy = Table::default();
            let sorted: BTreeMap<_, _> = table.objects.iter().collect();
            for (key, facts) in sorted.into_iter().rev() {
                copy.objects.insert(key.clone(), facts.clone());
            }
            copy.synced = table.synced;
            copy
        }
        Tables {
            namespaces: copy(&tables.namespaces),
            pods: copy(&tables.pods),
            sandboxes: tables.sandboxes.clone(),
            services: copy(&tables.services),
            slices: copy(&tables.slices),
            peer_authentications: copy(&tables.peer_authentications),
            authorization_policies: copy(&tables.authorization_policies),
        }
    }

    /// Whether two Services claim one virtual address and port: the API
    /// server never allocates one twice, and which one wins is then
    /// arbitrary.
    fn shared_vips(tables: &Tables) -> bool {
        let mut seen = BTreeSet::new();
        tables.services.objects.values().any(|service| {
            service.vips.iter().any(|vip| {
                let ports: BTreeSet<u16> = service.ports.iter().map(|(p, _)| *p).collect();
                ports.into_iter().any(|port| !seen.insert((*vip, port)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, panic, path::Path};

    /// Feeds `run` every input kept for `target`: the crashes found and
    /// fixed (`fuzz/regressions/`) and the seeds (`fuzz/seeds/`). Returns
    /// how many.
    fn replay(target: &str, run: fn(&[u8])) -> usize {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut replayed = 0;
        for kept in ["regressions", "seeds"] {
            let Ok(entries) = fs::read_dir(fuzz.join(kept).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a directory entry").path();
                let input = fs::read(&path).expect("a kept input");
                if let Err(panic) = panic::catch_unwind(|| run(&input)) {
                    eprintln!("{target}: {} fails", path.display());
                    panic::resume_unwind(panic);
                }
                replayed += 1;
            }
        }
        replayed
    }

    #[test]
    fn hbone_server_inputs() {
        replay("hbone_server", |data| {
            super::hbone::server(data);
        });
        // The generated seeds reach the handler, which decides as the
        // inbound proxy does.
        let seeds: std::collections::BTreeMap<_, _> =
            super::hbone::server_seeds().into_iter().collect();
        let served = |name: &str| {
            let served = super::hbone::server(&seeds[name]);
            (served.accepted(), served.refused())
        };
        assert_eq!(served("connect"), (1, 0));
        assert_eq!(served("connect-wound-down"), (1, 0));
        assert_eq!(served("another-pod"), (0, 1));
        assert_eq!(served("proxy-port-15008"), (0, 1));
        assert_eq!(served("get"), (0, 1));
        // Over the header list limit: h2 refuses it before any handler.
        assert_eq!(served("huge-header"), (0, 0));
        assert_eq!(served("ours"), (1, 1));
        for name in seeds.keys() {
            eprintln!("seed {name}: {:?}", served(name));
        }
    }

    #[test]
    fn hbone_request_inputs() {
        assert!(replay("hbone_request", super::hbone::request) > 0);
    }

    #[test]
    fn policy_files_inputs() {
        assert!(replay("policy_files", super::policy::files) > 0);
    }

    #[test]
    fn agent_config_inputs() {
        assert!(replay("agent_config", |data| drop(super::config::parse(data))) > 0);
    }

    #[test]
    fn kubernetes_objects_inputs() {
        let objects = |data: &[u8]| {
            super::kubernetes::objects(data);
        };
        assert!(replay("kubernetes_objects", objects) > 0);
        let seed = fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/kubernetes_objects/mesh.jsonl"),
        )
        .expect("the seed");
        let mesh = super::kubernetes::objects(&seed);
        eprintln!("{mesh:?}");
        assert!(
            mesh.workloads > 0 && mesh.service_ports > 0 && mesh.policies > 0,
            "{mesh:?}"
        );
    }
}
