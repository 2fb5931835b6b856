//! The tunnel code over real TLS on real loopback sockets, without eBPF or
//! namespaces: a client workload, a server workload, and an application
//! behind the server.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{
    Trace, check_request,
    client::{Connection, Keepalive},
    connect_request,
    copy::relay,
    pool::{AttemptError, CheckoutError, Pool, PoolKey, Settings, SharedFailure},
    server,
};
use crate::tls::{self, testing};

/// The tests' attempts fail with a text.
impl AttemptError for &str {}

struct Ends {
    _ca: testing::TempCa,
    client: Arc<rustls::ClientConfig>,
    hbone: SocketAddr,
    client_id: warren_pki::identity::SpiffeId,
    server_id: warren_pki::identity::SpiffeId,
}

/// An HBONE server on loopback that delivers every accepted stream to `app`.
/// With `frozen`, it completes the handshakes and then stops reading the
/// connection, as a hung peer would (PINGs go unanswered).
async fn ends(app: SocketAddr, frozen: bool) -> Ends {
    let ca = testing::TempCa::new();
    let client_id = testing::spiffe_id("spiffe://cluster.local/ns/default/sa/sleep");
    let server_id = testing::spiffe_id("spiffe://cluster.local/ns/shop/sa/web");
    let trust = ca.trust_bundle();
    let server_config = tls::server_config(&ca.issue(&server_id).unwrap(), &trust).unwrap();
    let client = tls::client_config(
        &ca.issue(&client_id).unwrap(),
        &trust,
        std::slice::from_ref(&server_id),
    )
    .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_config);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(super::Transport::new(tcp)).await.unwrap();
                super::tune_tls(tls.get_mut().1);
                if frozen {
                    let _connection = h2::server::handshake(tls).await.unwrap();
                    std::future::pending::<()>().await;
                    return;
                }
                let _ = server::serve(
                    tls,
                    std::future::pending(),
                    move |request, mut respond| async move {
                        let dst = check_request(&request, app.ip()).unwrap();
                        let upstream = TcpStream::connect(dst).await.unwrap();
                        let send = server::accept(&mut respond).unwrap();
                        relay(upstream, send, request.into_body()).await.unwrap();
                    },
                )
                .await;
            });
        }
    });
    Ends {
        _ca: ca,
        client,
        hbone,
        client_id,
        server_id,
    }
}

impl Ends {
    /// The pool key of connections from the client workload to the server.
    fn pool_key(&self) -> PoolKey {
        PoolKey {
            src_netns: 1,
            src_ip: "127.0.0.1".parse().unwrap(),
            src: self.client_id.clone(),
            dst: self.server_id.clone(),
            dst_addr: self.hbone,
        }
    }
}

async fn dial(ends: &Ends, keepalive: Keepalive) -> Connection {
    let tcp = TcpStream::connect(ends.hbone).await.unwrap();
    let mut tls = TlsConnector::from(ends.client.clone())
        .connect(
            ServerName::IpAddress(ends.hbone.ip().into()),
            super::Transport::new(tcp),
        )
        .await
        .unwrap();
    super::tune_tls(tls.get_mut().1);
    Connection::handshake(tls, keepalive).await.unwrap()
}

/// FNV-1a: a digest of the bytes and their order, for the far end to say
/// what it got.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An application that reads until EOF, then answers with what it got.
async fn counting_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut received = Vec::new();
                tcp.read_to_end(&mut received).await.unwrap();
                let answer = format!(
                    "got {} bytes, digest {:x}",
                    received.len(),
                    digest(&received)
                );
                tcp.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

/// A socket pair: what a captured application connection looks like to the
/// proxy (`proxy_side`) and to the application (`app_side`).
async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_side = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (proxy_side, _) = listener.accept().await.unwrap();
    (proxy_side, app_side)
}

/// Carries `payload` from a client application through one stream and
/// returns the application's answer.
async fn exchange(connection: &Connection, app: SocketAddr, payload: &[u8]) -> String {
    let (proxy_side, mut app_side) = socket_pair().await;
    let (response, send) = connection
        .send(connect_request(
            app,
            "127.0.0.1:4000".parse().unwrap(),
            Trace::start(),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let relay = tokio::spawn(relay(proxy_side, send, response.into_body()));
    app_side.write_all(payload).await.unwrap();
    // Half-close: the far application sees EOF, and can still answer.
    app_side.shutdown().await.unwrap();
    let mut answer = String::new();
    app_side.read_to_string(&mut answer).await.unwrap();
    let relayed = relay.await.unwrap().unwrap();
    assert_eq!(relayed.sent, payload.len() as u64);
    assert_eq!(relayed.received, answer.len() as u64);
    answer
}

#[tokio::test]
async fn half_close_reaches_the_far_end_and_the_answer_comes_back() {
    let app = counting_app().await;
    let ends = ends(app, false).await;
    let connection = dial(&ends, Keepalive::default()).await;
    assert_eq!(
        exchange(&connection, app, b"hello").await,
        format!("got 5 bytes, digest {:x}", digest(b"hello"))
    );
}

#[tokio::test]
async fn bulk_data_flows_through_the_windows() {
    let app = counting_app().await;
    let ends = ends(app, false).await;
    let connection = dial(&ends, Keepalive::default()).await;
    // Several times both flow-control windows, so both must be replenished;
    // every byte in its place, through the relay's growing chunks.
    let payload: Vec<u8> = (0..48 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let answer = exchange(&connection, app, &payload).await;
    assert_eq!(
        answer,
        format!("got {} bytes, digest {:x}", payload.len(), digest(&payload))
    );
}

#[tokio::test]
async fn streams_share_connections_up_to_the_limit() {
    let app = counting_app().await;
    let ends = Arc::new(ends(app, false).await);
    let pool = Pool::new(Settings {
        max_streams: 2,
        ..Settings::default()
    });
    let key = ends.pool_key();
    let mut held = Vec::new();
    for _ in 0..5 {
        let ends = ends.clone();
        held.push(
            pool.checkout(&key, || async move {
                Ok::<_, &str>(dial(&ends, Keepalive::default()).await)
            })
            .await
            .unwrap(),
        );
    }
    assert_eq!(
        pool.connection_count().await,
        3,
        "5 streams, 2 per connection"
    );
    let reused: Vec<bool> = held.iter().map(|c| c.reused()).collect();
    assert_eq!(reused, [false, true, false, true, false]);

    // Every held stream works, on whichever connection it got.
    for checkout in &held {
        assert!(
            exchange(checkout.connection(), app, b"x")
                .await
                .starts_with("got 1 bytes")
        );
    }
    // Released slots are reused rather than new connections opened.
    held.clear();
    let again = pool
        .checkout(&key, || async {
            Err::<Connection, _>("should have reused a connection")
        })
        .await
        .unwrap();
    assert!(again.reused());
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let app = counting_app().await;
    let ends = ends(app, false).await;
    let pool = Pool::new(Settings {
        idle_timeout: Duration::from_millis(200),
        ..Settings::default()
    });
    let key = ends.pool_key();
    let checkout = pool
        .checkout(&key, || async {
            Ok::<_, &str>(dial(&ends, Keepalive::default()).await)
        })
        .await
        .unwrap();
    pool.evict_idle();
    assert_eq!(pool.connection_count().await, 1, "busy connections stay");
    drop(checkout);
    tokio::time::sleep(Duration::from_millis(300)).await;
    pool.evict_idle();
    assert_eq!(pool.connection_count().await, 0);
}

#[tokio::test]
async fn a_dead_connection_fails_its_streams_and_is_replaced() {
    let app = counting_app().await;
    let hung = ends(app, true).await;
    let keepalive = Keepalive {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
    };
    let pool = Pool::new(Settings {
        keepalive,
        ..Settings::default()
    });
    let key = hung.pool_key();
    let checkout = pool
        .checkout(&key, || async {
            Ok::<_, &str>(dial(&hung, keepalive).await)
        })
        .await
        .unwrap();
    // The stream waits for an answer that never comes, until the unanswered
    // PING declares the connection dead: then it fails, promptly.
    let started = Instant::now();
    let result = checkout
        .connection()
        .send(connect_request(
            app,
            "127.0.0.1:4000".parse().unwrap(),
            Trace::start(),
        ))
        .await;
    assert!(result.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(checkout.connection().is_closed());
    drop(checkout);

    let replacement = pool
        .checkout(&key, || async {
            Ok::<_, &str>(dial(&hung, keepalive).await)
        })
        .await
        .unwrap();
    assert!(
        !replacement.reused(),
        "a dead connection was handed out again"
    );
}

#[tokio::test]
async fn a_dead_connection_gives_back_its_socket_s_charge_at_once() {
    use crate::limits::{DEFAULT_DRAIN, Direction::Outbound, Limits, NodeBudget};
    let app = counting_app().await;
    let hung = ends(app, true).await;
    let keepalive = Keepalive {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(200),
    };
    let node = NodeBudget::new(Limits {
        per_pod: 10,
        per_peer: 10,
        per_node: 10,
        reserve: 0,
        drain: DEFAULT_DRAIN,
    });
    let pod = node.pod();
    let connection = dial(&hung, keepalive)
        .await
        .charged(pod.admit(Outbound, 1).unwrap());
    assert!(connection.is_charged());
    assert_eq!(pod.used(Outbound), 1);
    // Its PING goes unanswered: the connection ends, its socket is closed,
    // and the pod has its descriptor back while the pool (here, this test)
    // still holds the connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pod.used(Outbound) != 0 {
        assert!(Instant::now() < deadline, "still charged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(connection.is_closed() && !connection.is_charged());
    // A permit handed to a connection that has ended is given back at once.
    let late = connection.charged(pod.admit(Outbound, 1).unwrap());
    assert_eq!((pod.used(Outbound), late.is_charged()), (0, false));
}

#[tokio::test]
async fn streams_waiting_for_a_connection_fail_with_it() {
    let app = counting_app().await;
    let ends = ends(app, false).await;
    let pool = Arc::new(Pool::new(Settings::default()));
    let key = ends.pool_key();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut waiting = Vec::new();
    for _ in 0..20 {
        let (pool, key, attempts) = (pool.clone(), key.clone(), attempts.clone());
        waiting.push(tokio::spawn(async move {
            pool.checkout(&key, || async move {
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err::<Connection, _>("Network is unreachable")
            })
            .await
            .map(drop)
        }));
    }
    let mut shared = 0;
    for waiter in waiting {
        match waiter.await.unwrap() {
            Err(CheckoutError::Connect(error)) => assert_eq!(error, "Network is unreachable"),
            Err(CheckoutError::Shared(error)) => {
                assert_eq!(
                    error,
                    SharedFailure::Failed("Network is unreachable".into())
                );
                shared += 1;
            }
            Ok(()) => panic!("a checkout succeeded without a connection"),
        }
    }
    // One attempt; everyone who waited for it failed with it, rather than
    // each trying again in turn.
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(shared, 19);
    // A caller that comes later tries again.
    let later = pool
        .checkout(&key, || async {
            Ok::<_, &str>(dial(&ends, Keepalive::default()).await)
        })
        .await;
    assert!(later.is_ok_and(|c| !c.reused()));
}
