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
    /// Connect COUNT sockets with TCP_FASTOPEN_CONNECT (connect() returns before any SYN,
    /// which leaves with the first write), all of them, and only then write a byte on each:
    /// as an attacker would to pass connect()-time checks with every one at once. Says
    /// `written`, then keeps them open until stdin gives a line or closes.
    Deferred {
        /// Server address, ADDR:PORT.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Open COUNT connections to `keep` and confirm each end to end (one byte sent, the same
    /// byte read back), say so once all are up, then keep them all open until stdin gives a
    /// line or closes; with ECHO_EVERY_MS, each sends a byte and reads it back that often
    /// meanwhile. Says how many round trips were made and how many connections failed.
    Hold {
        /// Server address, ADDR:PORT.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        /// Connections being opened at any one time.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// Traffic on the held connections: a round trip on each this often, the
        /// connections' turns spread evenly over the period.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        echo_every_ms: Option<u64>,
    },
    /// Open COUNT connections at once, as an attacker would, each sending a byte (unless
    /// SILENT) and waiting up to WAIT_MS for its echo (or, silent, for the other end to close);
    /// then say how many were echoed (`connected`), keep those open until HOLD_MS from the
    /// start, close them all, and report how each ended (`sprayed`): echoed and held, cut (by
    /// the other end after its echo), reset, closed (by the other end), still waiting, or not
    /// connected.
    Spray {
        /// Server address, ADDR:PORT.
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 5000)]
        wait_ms: u64,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[arg(long)]
        silent: bool,
    },
    /// Accept connections and read what they send without ever answering (a peer that
    /// stalls a TLS handshake); say when each comes and goes.
    Mute {
        #[arg(long)]
        port: u16,
    },
    /// Send one forged TCP segment (raw socket): from SRC to DST with SEQ, ACK and the
    /// timestamps option, carrying PAYLOAD, flags PSH|ACK.
    Forge {
        #[arg(long)]
        src: std::net::SocketAddrV4,
        #[arg(long)]
        dst: std::net::SocketAddrV4,
        #[arg(long)]
        seq: u32,
        #[arg(long)]
        ack: u32,
        #[arg(long)]
        tsval: u32,
        #[arg(long)]
        tsecr: u32,
        #[arg(long)]
        payload: String,
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
        Cli::Deferred { addr, count } => deferred(addr, count).map(|()| true),
        Cli::Hold {
            addr,
            count,
            concurrency,
            echo_every_ms,
        } => hold(
            addr,
            count,
            concurrency.into(),
            echo_every_ms.map(Duration::from_millis),
        )
        .map(|()| true),
        Cli::Spray {
            addr,
            count,
            wait_ms,
            hold_ms,
            silent,
        } => spray(
            addr,
            count,
            Duration::from_millis(wait_ms),
            Duration::from_millis(hold_ms),
            silent,
        )
        .map(|()| true),
        Cli::Mute { port } => mute(port).map(|()| true),
        Cli::Forge {
            src,
            dst,
            seq,
            ack,
            tsval,
            tsecr,
            payload,
        } => forge(src, dst, [seq, ack, tsval, tsecr], payload.as_bytes()).map(|()| true),
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

fn deferred(addr: SocketAddr, count: usize) -> Result<()> {
    let sockets = (0..count)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::TcpFastOpenConnect,
                &true,
            )
            .map_err(io::Error::from)?;
            // Without a cookie from the server, connect() would send its SYN at once; this
            // option (any user may set it) defers it all the same.
            let on: libc::c_int = 1;
            // SAFETY: a valid socket descriptor, and a pointer to an int that outlives the
            // call, with its size.
            let set = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_TCP,
                    libc::TCP_FASTOPEN_NO_COOKIE,
                    (&raw const on).cast(),
                    std::mem::size_of_val(&on) as libc::socklen_t,
                )
            };
            if set != 0 {
                return Err(io::Error::last_os_error());
            }
            socket.set_nonblocking(true)?;
            // With TCP_FASTOPEN_CONNECT, connect() returns at once, its SYN deferred.
            socket.connect(&addr.into())?;
            Ok(socket)
        })
        .collect::<io::Result<Vec<Socket>>>()
        .with_context(|| format!("connecting {count} deferred sockets to {addr}"))?;
    let mut written = 0;
    for socket in &sockets {
        // The first write sends the SYN; on a non-blocking socket it may report that the
        // connection is in progress rather than the byte sent.
        match (&*socket).write(b"x") {
            Ok(_) => written += 1,
            Err(e)
                if e.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32)
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                written += 1
            }
            Err(_) => {}
        }
    }
    emit(json!({ "event": "written", "connections": written }));
    let _ = io::stdin().lock().read_line(&mut String::new());
    drop(sockets);
    Ok(())
}

fn hold(
    addr: SocketAddr,
    count: usize,
    concurrency: usize,
    echo_every: Option<Duration>,
) -> Result<()> {
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
    // Whatever stdin brings, a line or its end, means let go. Read on a thread of its
    // own: the runtime's one thread is busy with the connections' round trips meanwhile.
    let (let_go, released) = tokio::sync::watch::channel(false);
    thread::spawn(move || {
        let _ = io::stdin().lock().read_line(&mut String::new());
        let _ = let_go.send(true);
    });
    let (echoes, errors) = runtime.block_on(async move {
        let mut talking = tokio::task::JoinSet::new();
        for (n, stream) in held.into_iter().enumerate() {
            // Each connection's turn comes at its own offset in the period, so that the
            // round trips are spread over it rather than all at once.
            let turns = echo_every.map(|every| (every, every * n as u32 / count as u32));
            let released = released.clone();
            talking.spawn(async move {
                keep_talking(stream, turns, released)
                    .await
                    .with_context(|| format!("held connection {n} to {addr}"))
            });
        }
        let (mut echoes, mut errors) = (0, Vec::new());
        while let Some(ended) = talking.join_next().await {
            match ended.context("a held connection's task") {
                Ok(Ok(made)) => echoes += made,
                Ok(Err(err)) | Err(err) => errors.push(format!("{err:#}")),
            }
        }
        (echoes, errors)
    });
    emit(json!({
        "event": "released",
        "connections": count,
        "echoes": echoes,
        "failed": errors.len(),
        "errors": errors.iter().take(5).collect::<Vec<_>>(),
    }));
    ensure!(
        errors.is_empty(),
        "{} of {count} held connections failed; the first: {}",
        errors.len(),
        errors[0]
    );
    Ok(())
}

/// Keeps `stream` until `released`, with `turns` (every, offset) a round trip of a byte
/// every `every`, the first after `offset`; how many were made. The stream is closed when
/// this returns.
async fn keep_talking(
    mut stream: tokio::net::TcpStream,
    turns: Option<(Duration, Duration)>,
    mut released: tokio::sync::watch::Receiver<bool>,
) -> Result<u64> {
    let Some((every, offset)) = turns else {
        let _ = released.wait_for(|go| *go).await;
        return Ok(0);
    };
    let mut turns = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    // A turn missed (the machine was busy) is not made up for in a burst.
    turns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut made = 0;
    loop {
        tokio::select! {
            _ = released.wait_for(|go| *go) => return Ok(made),
            _ = turns.tick() => {}
        }
        let mut echoed = [0];
        tokio::time::timeout(IO_TIMEOUT, async {
            stream.write_all(b"w").await?;
            stream.read_exact(&mut echoed).await
        })
        .await
        .with_context(|| format!("round trip {}: timed out", made + 1))?
        .with_context(|| format!("round trip {}", made + 1))?;
        ensure!(
            echoed == *b"w",
            "round trip {}: {echoed:?} came back",
            made + 1
        );
        made += 1;
    }
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

/// How a sprayed connection ended.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Ended {
    Echoed,
    Cut,
    Reset,
    Closed,
    Waiting,
    NotConnected,
}

impl Ended {
    fn name(self) -> &'static str {
        match self {
            Ended::Echoed => "echoed",
            Ended::Cut => "cut",
            Ended::Reset => "reset",
            Ended::Closed => "closed",
            Ended::Waiting => "waiting",
            Ended::NotConnected => "not_connected",
        }
    }
}

fn spray(
    addr: SocketAddr,
    count: usize,
    wait: Duration,
    hold: Duration,
    silent: bool,
) -> Result<()> {
    let runtime = one_thread_runtime()?;
    let start = tokio::time::Instant::now();
    let waited = AtomicUsize::new(0);
    let echoed = AtomicUsize::new(0);
    let outcomes = runtime.block_on(async {
        let (waited, echoed) = (&waited, &echoed);
        let tries = (0..count).map(|_| async move {
            let Ok(Ok(mut stream)) =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
            else {
                if waited.fetch_add(1, Ordering::SeqCst) + 1 == count {
                    emit(json!({"event": "connected", "echoed": echoed.load(Ordering::SeqCst)}));
                }
                return Ended::NotConnected;
            };
            let mut byte = [0];
            let ended = match tokio::time::timeout(wait, async {
                if !silent {
                    stream.write_all(b"w").await?;
                }
                stream.read(&mut byte).await
            })
            .await
            {
                Ok(Ok(1)) => Ended::Echoed,
                Ok(Ok(_)) => Ended::Closed,
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Ended::Reset,
                Ok(Err(_)) => Ended::Closed,
                Err(_) => Ended::Waiting,
            };
            if ended == Ended::Echoed {
                echoed.fetch_add(1, Ordering::SeqCst);
            }
            if waited.fetch_add(1, Ordering::SeqCst) + 1 == count {
                emit(json!({"event": "connected", "echoed": echoed.load(Ordering::SeqCst)}));
            }
            match ended {
                // Held open; cut if the other end closes it meanwhile.
                Ended::Echoed => {
                    match tokio::time::timeout_at(start + hold, stream.read(&mut byte)).await {
                        Err(_) => Ended::Echoed,
                        Ok(_) => Ended::Cut,
                    }
                }
                Ended::Waiting => {
                    tokio::time::sleep_until(start + hold).await;
                    Ended::Waiting
                }
                ended => ended,
            }
        });
        futures::future::join_all(tries).await
    });
    let mut counts = serde_json::Map::new();
    for ended in [
        Ended::Echoed,
        Ended::Cut,
        Ended::Reset,
        Ended::Closed,
        Ended::Waiting,
        Ended::NotConnected,
    ] {
        let n = outcomes.iter().filter(|e| **e == ended).count();
        counts.insert(ended.name().into(), n.into());
    }
    counts.insert("event".into(), "sprayed".into());
    emit(serde_json::Value::Object(counts));
    Ok(())
}

fn mute(port: u16) -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("listening on port {port}"))?;
    emit(json!({"event": "listening", "port": port}));
    for stream in listener.incoming() {
        let mut stream = stream.context("accepting")?;
        let peer = stream.peer_addr()?;
        emit(json!({"event": "accepted", "peer": peer.to_string()}));
        thread::spawn(move || {
            let _ = io::copy(&mut stream, &mut io::sink());
            emit(json!({"event": "closed", "peer": peer.to_string()}));
        });
    }
    Ok(())
}

/// Sends one IPv4 TCP segment built by hand: `numbers` are the sequence and
/// acknowledgement numbers and the timestamps option's value and echo.
fn forge(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    numbers: [u32; 4],
    payload: &[u8],
) -> Result<()> {
    let [seq, ack, tsval, tsecr] = numbers;
    // TCP: 20 bytes, then NOP NOP TIMESTAMP(10) = 12 bytes of options.
    let mut tcp = Vec::with_capacity(32 + payload.len());
    tcp.extend_from_slice(&src.port().to_be_bytes());
    tcp.extend_from_slice(&dst.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push(8 << 4); // data offset: 8 words
    tcp.push(0x18); // PSH | ACK
    tcp.extend_from_slice(&65535u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&[1, 1, 8, 10]);
    tcp.extend_from_slice(&tsval.to_be_bytes());
    tcp.extend_from_slice(&tsecr.to_be_bytes());
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&u16::try_from(tcp.len())?.to_be_bytes());
    pseudo.extend_from_slice(&tcp);
    let checksum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());

    let total = u16::try_from(20 + tcp.len())?;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]); // id, DF, TTL, TCP, checksum
    ip.extend_from_slice(&src.ip().octets());
    ip.extend_from_slice(&dst.ip().octets());
    let checksum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    ip.extend_from_slice(&tcp);

    // IPPROTO_RAW: the header is ours (IP_HDRINCL).
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_RAW)))
        .context("a raw socket (needs CAP_NET_RAW)")?;
    let sent = socket
        .send_to(&ip, &SocketAddr::from(dst).into())
        .context("sending the forged segment")?;
    emit(json!({"event": "forged", "bytes": sent}));
    Ok(())
}

/// A raw socket whose packets carry their own IP header.
const IPPROTO_RAW: i32 = 255;

/// RFC 1071's one's-complement sum.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
