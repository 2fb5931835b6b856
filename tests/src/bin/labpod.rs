//! A tiny TCP tool that lab tests, the demo and the bench run inside pods. It prints one
//! JSON event per line on stdout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const PATTERN: &[u8] = b"warren-labpod-";

#[derive(Parser)]
#[command(about = "TCP greeter/echo tool for warren lab pods")]
enum Cli {
    /// Greet every connection with NAME, then echo it until the client half-closes.
    Serve {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    /// Greet every connection with NAME and hang up. The server closing first leaves the
    /// TIME_WAIT on its side, so that a client making thousands of connections (`connrate`)
    /// does not run out of ports.
    Greet {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        name: String,
    },
    /// Connect, read the greeting, send a pattern, half-close and check the echo.
    Call {
        /// Server address, ADDR:PORT.
        addr: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Local port to bind before connecting (SO_REUSEADDR).
        #[arg(long)]
        bind_port: Option<u16>,
        /// Local address to bind before connecting.
        #[arg(long)]
        bind_ip: Option<Ipv4Addr>,
        /// Pause between the greeting and sending, to keep connections in flight.
        #[arg(long)]
        hold_ms: Option<u64>,
        /// Send in 64 KiB pieces spread evenly over this long: a long transfer.
        #[arg(long)]
        spread_ms: Option<u64>,
        /// Give up connecting after this long (a dropped SYN is not refused).
        #[arg(long, default_value_t = 5000)]
        connect_timeout_ms: u64,
    },
    /// Request/response latency against `serve`: connect once, read the greeting, then
    /// WARMUP + COUNT round trips of SIZE bytes, timing the last COUNT.
    Rr {
        /// Server address, ADDR:PORT.
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// New-connection rate against `greet`: connect, read the greeting until the server hangs
    /// up, close; one after the other (in each of PARALLEL threads), for SECONDS or MAX
    /// connections, whichever comes first. Reports the connections made and their rate.
    Connrate {
        /// Server address, ADDR:PORT.
        addr: SocketAddr,
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// At most this many connections, all threads together.
        #[arg(long, default_value_t = 100_000)]
        max: usize,
        /// Threads, each making connections one after the other.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        parallel: u16,
    },
    /// Accept connections and keep every one, echoing what it sends, until its client closes
    /// it; thousands at once, on one thread (no thread per connection). With COUNT, exit
    /// once COUNT connections have come and all have gone again.
    Keep {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: Option<usize>,
    },
    /// Open COUNT connections to `keep` and confirm each end to end (one byte sent, the same
    /// byte read back), say so once all are up, then keep them all open until stdin gives a
    /// line or closes.
    Hold {
        /// Server address, ADDR:PORT.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Connections being opened at any one time.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `keep` and `hold` hold a descriptor per connection, thousands of them, and a soft
    // limit is often 1024.
    if let Err(err) = warren_daemon::limits::try_raise_open_files() {
        eprintln!("labpod: {err}");
    }
    let result = match cli {
        Cli::Serve { port, name } => serve(port, &name).map(|()| true),
        Cli::Greet { port, name } => greet(port, &name).map(|()| true),
        Cli::Call {
            addr,
            bytes,
            bind_port,
            bind_ip,
            hold_ms,
            spread_ms,
            connect_timeout_ms,
        } => call(
            addr,
            bytes,
            Bind {
                ip: bind_ip,
                port: bind_port,
            },
            hold_ms.map(Duration::from_millis),
            spread_ms.map(Duration::from_millis),
            Duration::from_millis(connect_timeout_ms),
        ),
        Cli::Rr {
            addr,
            count,
            warmup,
            size,
        } => round_trips(addr, count, warmup, size).map(|()| true),
        Cli::Connrate {
            addr,
            seconds,
            max,
            parallel,
        } => connection_rate(addr, Duration::from_secs_f64(seconds), max, parallel.into())
            .map(|()| true),
        Cli::Keep { port, count } => keep(port, count).map(|()| true),
        Cli::Hold {
            addr,
            count,
            concurrency,
        } => hold(addr, count, concurrency.into()).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("labpod: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn emit(event: serde_json::Value) {
    let mut out = io::stdout().lock();
    // A test may stop reading our events; that is no reason to stop serving.
    let _ = writeln!(out, "{event}").and_then(|()| out.flush());
}

fn serve(port: u16, name: &str) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("listening on port {port}"))?;
    emit(json!({"event": "listening", "port": listener.local_addr()?.port()}));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(err) => {
                eprintln!("labpod: accept: {err}");
                continue;
            }
        };
        let name = name.to_owned();
        thread::spawn(move || {
            let (peer, local) = (stream.peer_addr(), stream.local_addr());
            match greet_and_echo(&stream, &name) {
                Ok(bytes) => emit(json!({
                    "event": "served",
                    "name": name,
                    "peer": peer.map(|a| a.to_string()).unwrap_or_default(),
                    "local": local.map(|a| a.to_string()).unwrap_or_default(),
                    "bytes": bytes,
                })),
                Err(err) => eprintln!("labpod: connection from {peer:?}: {err}"),
            }
        });
    }
    Ok(())
}

fn greet(port: u16, name: &str) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("listening on port {port}"))?;
    emit(json!({"event": "listening", "port": listener.local_addr()?.port()}));
    let greeting = format!("{name}\n");
    for conn in listener.incoming() {
        // The client has sent nothing, so closing sends a FIN, not a reset.
        if let Err(err) = conn.and_then(|mut stream| stream.write_all(greeting.as_bytes())) {
            eprintln!("labpod: greet: {err}");
        }
    }
    Ok(())
}

fn greet_and_echo(mut stream: &TcpStream, name: &str) -> io::Result<u64> {
    stream.write_all(format!("{name}\n").as_bytes())?;
    let (mut from, mut to) = (stream, stream);
    io::copy(&mut from, &mut to)
}

fn call(
    addr: SocketAddr,
    bytes: usize,
    bind: Bind,
    hold: Option<Duration>,
    spread: Option<Duration>,
    connect_timeout: Duration,
) -> Result<bool> {
    let stream =
        connect(addr, bind, connect_timeout).with_context(|| format!("connecting to {addr}"))?;
    // Taken now: once both sides have closed, the socket no longer knows its peer.
    let (local, peer) = (stream.local_addr()?, stream.peer_addr()?);
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .context("reading the greeting")?;
    let greeting = greeting.trim_end_matches('\n');
    if let Some(hold) = hold {
        thread::sleep(hold);
    }

    let sent: Vec<u8> = PATTERN.iter().copied().cycle().take(bytes).collect();
    // Writing from another thread while this one reads, so that an echo larger than the
    // socket buffers cannot deadlock both ends.
    let received = thread::scope(|scope| -> Result<Vec<u8>> {
        let writer = scope.spawn(|| -> io::Result<()> {
            match spread {
                None => (&stream).write_all(&sent)?,
                Some(spread) => {
                    const PIECE: usize = 64 * 1024;
                    let pause = spread / sent.len().div_ceil(PIECE).max(1) as u32;
                    for piece in sent.chunks(PIECE) {
                        (&stream).write_all(piece)?;
                        thread::sleep(pause);
                    }
                }
            }
            stream.shutdown(Shutdown::Write)
        });
        let mut received = Vec::new();
        let read = reader.read_to_end(&mut received);
        writer
            .join()
            .expect("the writer thread does not panic")
            .context("sending")?;
        read.context("reading the echo")?;
        Ok(received)
    })?;

    let ok = received == sent;
    emit(json!({
        "event": "called",
        "server": greeting,
        "local": local.to_string(),
        "peer": peer.to_string(),
        "sent": sent.len(),
        "received": received.len(),
        "ok": ok,
    }));
    if !ok {
        eprintln!(
            "labpod: the echo differs from what was sent ({} bytes sent, {} received)",
            sent.len(),
            received.len()
        );
    }
    Ok(ok)
}

fn round_trips(addr: SocketAddr, count: usize, warmup: usize, size: usize) -> Result<()> {
    ensure!(count > 0 && size > 0, "--count and --size must be positive");
    let stream = connect(addr, Bind::default(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    // Read through this reader from now on: it may hold bytes that came after the greeting.
    let mut reader = BufReader::new(stream);
    let mut greeting = String::new();
    reader
        .read_line(&mut greeting)
        .context("reading the greeting")?;
    ensure!(
        greeting.ends_with('\n'),
        "the server closed before greeting"
    );
    let request: Vec<u8> = PATTERN.iter().copied().cycle().take(size).collect();
    let mut response = vec![0; size];
    let mut micros = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        reader.get_mut().write_all(&request)?;
        reader
            .read_exact(&mut response)
            .with_context(|| format!("reading echo {i}"))?;
        let elapsed = start.elapsed();
        ensure!(response == request, "echo {i} differs from the request");
        if i >= warmup {
            micros.push(elapsed.as_secs_f64() * 1e6);
        }
    }
    micros.sort_by(f64::total_cmp);
    let percentile = |p: f64| micros[((micros.len() - 1) as f64 * p).round() as usize];
    emit(json!({
        "event": "rr",
        "count": count,
        "size": size,
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
        "mean_us": micros.iter().sum::<f64>() / count as f64,
        "max_us": micros[count - 1],
    }));
    Ok(())
}

fn connection_rate(
    addr: SocketAddr,
    duration: Duration,
    max: usize,
    parallel: usize,
) -> Result<()> {
    let start = Instant::now();
    // Connections begun, all threads together: each takes a number before connecting, so
    // that they make no more than `max` between them.
    let begun = AtomicUsize::new(0);
    let connections = thread::scope(|scope| -> Result<usize> {
        let threads: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> Result<usize> {
                    let mut made = 0;
                    while start.elapsed() < duration {
                        let n = begun.fetch_add(1, Ordering::Relaxed);
                        if n >= max {
                            break;
                        }
                        connect_and_greet(addr).with_context(|| format!("connection {n}"))?;
                        made += 1;
                    }
                    Ok(made)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("a connecting thread does not panic"))
            .sum()
    })?;
    let seconds = start.elapsed().as_secs_f64();
    emit(json!({
        "event": "connrate",
        "connections": connections,
        "parallel": parallel,
        "seconds": seconds,
        "per_second": connections as f64 / seconds,
    }));
    Ok(())
}

/// One connection to `greet`: connect, read the greeting until the server hangs up, close.
fn connect_and_greet(addr: SocketAddr) -> Result<()> {
    let mut stream = connect(addr, Bind::default(), CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut greeting = String::new();
    stream
        .read_to_string(&mut greeting)
        .context("reading the greeting")?;
    ensure!(
        greeting.ends_with('\n'),
        "the server hung up without a greeting"
    );
    Ok(())
}

/// A runtime on this one thread: `keep` and `hold` wait on thousands of sockets through
/// epoll rather than a thread each.
fn one_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")
}

fn keep(port: u16, count: Option<usize>) -> Result<()> {
    one_thread_runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("listening on port {port}"))?;
        emit(json!({"event": "listening", "port": listener.local_addr()?.port()}));
        let mut kept = tokio::task::JoinSet::new();
        let (mut accepted, mut failed) = (0, 0);
        while count.is_none_or(|count| accepted < count) {
            tokio::select! {
                conn = listener.accept() => {
                    let (stream, _) =
                        conn.with_context(|| format!("accepting connection {accepted}"))?;
                    accepted += 1;
                    kept.spawn(echo_until_closed(stream));
                }
                Some(ended) = kept.join_next() => {
                    failed += usize::from(connection_failed(ended));
                }
            }
        }
        // All have come: no more are wanted, and waiting for the rest to go is all left.
        drop(listener);
        while let Some(ended) = kept.join_next().await {
            failed += usize::from(connection_failed(ended));
        }
        emit(json!({"event": "released", "connections": accepted, "failed": failed}));
        ensure!(failed == 0, "{failed} of {accepted} connections failed");
        Ok(())
    })
}

/// Says why a kept connection failed, if it did.
fn connection_failed(ended: Result<io::Result<()>, tokio::task::JoinError>) -> bool {
    match ended {
        Ok(Ok(())) => false,
        Ok(Err(err)) => {
            eprintln!("labpod: kept connection: {err}");
            true
        }
        Err(err) => {
            eprintln!("labpod: kept connection: {err}");
            true
        }
    }
}

async fn echo_until_closed(mut stream: tokio::net::TcpStream) -> io::Result<()> {
    // Small: each of thousands of connections has its own, and the client sends one byte.
    let mut buf = [0; 64];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

fn hold(addr: SocketAddr, count: usize, concurrency: usize) -> Result<()> {
    let runtime = one_thread_runtime()?;
    let start = Instant::now();
    let held = runtime.block_on(
        futures::stream::iter(0..count)
            .map(|n| async move {
                open_confirmed(addr)
                    .await
                    .with_context(|| format!("connection {n} of {count} to {addr}"))
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<_>>(),
    )?;
    emit(json!({
        "event": "held",
        "connections": held.len(),
        "seconds": start.elapsed().as_secs_f64(),
    }));
    // Whatever stdin brings, a line or its end, means let go.
    let _ = io::stdin().lock().read_line(&mut String::new());
    // Closed within the runtime, whose reactor they are registered with.
    runtime.block_on(async move { drop(held) });
    emit(json!({"event": "released", "connections": count}));
    Ok(())
}

/// A connection that has carried a byte there and back.
async fn open_confirmed(addr: SocketAddr) -> Result<tokio::net::TcpStream> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .context("connecting: timed out")?
        .context("connecting")?;
    let mut echoed = [0];
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(b"w").await?;
        stream.read_exact(&mut echoed).await
    })
    .await
    .context("the echo: timed out")?
    .context("the echo")?;
    if echoed != *b"w" {
        bail!("the echo is {echoed:?}, not what was sent");
    }
    Ok(stream)
}

/// What to bind a client socket to before connecting, if anything.
#[derive(Default, Clone, Copy)]
struct Bind {
    ip: Option<Ipv4Addr>,
    port: Option<u16>,
}

fn connect(addr: SocketAddr, bind: Bind, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if bind.ip.is_some() || bind.port.is_some() {
        socket.set_reuse_address(true)?;
        let port = bind.port.unwrap_or(0);
        let local: SocketAddr = match (addr, bind.ip) {
            (_, Some(ip)) => (ip, port).into(),
            (SocketAddr::V4(_), None) => (Ipv4Addr::UNSPECIFIED, port).into(),
            (SocketAddr::V6(_), None) => (Ipv6Addr::UNSPECIFIED, port).into(),
        };
        socket.bind(&local.into())?;
    }
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}
