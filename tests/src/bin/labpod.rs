//! A tiny TCP tool that lab tests and the demo run inside pods. It prints one JSON event
//! per line on stdout.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

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
    /// Connect, read the greeting, send a pattern, half-close and check the echo.
    Call {
        /// Server address, ADDR:PORT.
        addr: SocketAddr,
        #[arg(long, default_value_t = 1024)]
        bytes: usize,
        /// Local port to bind before connecting (SO_REUSEADDR).
        #[arg(long)]
        bind_port: Option<u16>,
        /// Pause between the greeting and sending, to keep connections in flight.
        #[arg(long)]
        hold_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Serve { port, name } => serve(port, &name).map(|()| true),
        Cli::Call {
            addr,
            bytes,
            bind_port,
            hold_ms,
        } => call(addr, bytes, bind_port, hold_ms.map(Duration::from_millis)),
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

fn greet_and_echo(mut stream: &TcpStream, name: &str) -> io::Result<u64> {
    stream.write_all(format!("{name}\n").as_bytes())?;
    let (mut from, mut to) = (stream, stream);
    io::copy(&mut from, &mut to)
}

fn call(
    addr: SocketAddr,
    bytes: usize,
    bind_port: Option<u16>,
    hold: Option<Duration>,
) -> Result<bool> {
    let stream = connect(addr, bind_port).with_context(|| format!("connecting to {addr}"))?;
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
            (&stream).write_all(&sent)?;
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

fn connect(addr: SocketAddr, bind_port: Option<u16>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(port) = bind_port {
        socket.set_reuse_address(true)?;
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
        };
        socket.bind(&local.into())?;
    }
    socket.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
    Ok(socket.into())
}
