//! Sockets inside a pod's network namespace.
//!
//! The agent lives in the node's network namespace but opens its per-pod
//! listeners, and its passthrough connections, inside each pod's: a socket
//! belongs to the namespace of the thread that created it, for its whole
//! life. So each enrolled pod gets one long-lived thread that has joined the
//! pod's namespace and creates sockets on request; the sockets are then
//! driven by tokio like any other. It also keeps a few TCP sockets made
//! ahead of need, so that a new connection does not wait for the thread.

use std::{
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Enter { path: PathBuf, source: nix::Error },
    #[error("the thread for network namespace {} is gone", path.display())]
    Gone { path: PathBuf },
    #[error("cannot read the cookie of network namespace {}: {source}", path.display())]
    Cookie { path: PathBuf, source: io::Error },
}

type Job = Box<dyn FnOnce() + Send>;

/// A handle on a network namespace; cheap to share behind an `Arc`. The
/// namespace's thread ends when the handle is dropped.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    /// The namespace the file held when opened.
    id: crate::sandbox::NsId,
    cookie: u64,
    jobs: mpsc::Sender<Job>,
    spares: Arc<Spares>,
}

/// How many IPv4 TCP sockets a namespace keeps made ahead of need: a burst
/// of new connections this large takes its sockets at once; beyond it they
/// wait for the namespace's thread, as without spares.
const SPARES: usize = 8;

/// Fresh IPv4 TCP sockets of the namespace, not yet bound or connected.
/// Every new connection used to wait for a round trip to the namespace's
/// thread (two cross-thread wake-ups) just to create its socket. A namespace
/// that never connects keeps none: the first request fills them.
#[derive(Debug, Default)]
struct Spares {
    sockets: Mutex<Vec<Socket>>,
    /// A refill is queued on the namespace's thread.
    refilling: AtomicBool,
}

impl NetNs {
    pub async fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let id = crate::sandbox::NsId::of(&file).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered) = oneshot::channel();
        let name = format!(
            "netns-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        thread::Builder::new()
            .name(name)
            .spawn(move || {
                let result = setns(file.as_fd(), CloneFlags::CLONE_NEWNET);
                let ok = result.is_ok();
                let _ = entered_tx.send(result);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Open {
                path: path.to_owned(),
                source,
            })?;
        let gone = || NetnsError::Gone {
            path: path.to_owned(),
        };
        entered
            .await
            .map_err(|_| gone())?
            .map_err(|source| NetnsError::Enter {
                path: path.to_owned(),
                source,
            })?;

        let mut netns = Self {
            path: path.to_owned(),
            id,
            cookie: 0,
            jobs,
            spares: Arc::default(),
        };
        netns.cookie = netns
            .run(|| {
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .and_then(|s| netns_cookie(&s))
            })
            .await?
            .map_err(|source| NetnsError::Cookie {
                path: path.to_owned(),
                source,
            })?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel's cookie for this namespace, as `bpf_get_netns_cookie()`
    /// reports it to the eBPF programs.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace the file held when it was opened.
    pub fn id(&self) -> crate::sandbox::NsId {
        self.id
    }

    /// Runs `f` on the namespace's thread: sockets it creates belong to the
    /// namespace. Keep `f` short (create and configure a socket, no I/O
    /// waits): one thread serves every request for this namespace.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, NetnsError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let gone = || NetnsError::Gone {
            path: self.path.clone(),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

impl NetNs {
    /// A listening TCP socket on `addr` in this namespace.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let listener = self
            .run(move || -> io::Result<std::net::TcpListener> {
                let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                // A restarted agent must be able to bind again while
                // connections of the previous one linger in TIME_WAIT.
                socket.set_reuse_address(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket.listen(1024)?;
                Ok(socket.into())
            })
            .await
            .map_err(io::Error::other)??;
        tokio::net::TcpListener::from_std(listener)
    }

    /// A new nonblocking TCP socket for `domain` in this namespace, not
    /// yet bound or connected: a spare if one is left (IPv4 only, the
    /// mesh's family), otherwise made on the namespace's thread.
    pub async fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        if domain == Domain::IPV4 {
            let spare = self
                .spares
                .sockets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop();
            self.refill();
            if let Some(socket) = spare {
                return Ok(socket);
            }
        }
        self.run(move || new_tcp_socket(domain))
            .await
            .map_err(io::Error::other)?
    }

    /// Queues a refill of the spares on the namespace's thread when they
    /// run low and no refill is queued yet. It stops at the first failure
    /// (out of descriptors, say): `tcp_socket` then makes its own socket,
    /// and reports the error.
    fn refill(&self) {
        let low = self
            .spares
            .sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
            <= SPARES / 2;
        if !low || self.spares.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spares = self.spares.clone();
        let job: Job = Box::new(move || {
            let lock = || {
                spares
                    .sockets
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            };
            // Only this job adds spares, and no other is queued: the room
            // can only grow while the sockets are made.
            let room = SPARES.saturating_sub(lock().len());
            let made: Vec<Socket> = (0..room)
                .map_while(|_| new_tcp_socket(Domain::IPV4).ok())
                .collect();
            lock().extend(made);
            spares.refilling.store(false, Ordering::Release);
        });
        if self.jobs.send(job).is_err() {
            // The thread is gone; tcp_socket reports it on its next call.
            self.spares.refilling.store(false, Ordering::Release);
        }
    }

    /// A TCP connection to `dst` from this namespace (so from the pod's
    /// address, when the namespace is a pod's).
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket(Domain::for_address(dst)).await?;
        socket.set_nodelay(true)?;
        tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(dst)
            .await
    }
}

/// A nonblocking TCP socket in the calling thread's namespace.
fn new_tcp_socket(domain: Domain) -> io::Result<Socket> {
    // Nonblocking from the start: no fcntl calls afterwards.
    Socket::new(domain, Type::STREAM.nonblocking(), None)
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the namespace cookie of a socket.
fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is a
    // live u64 of exactly that size; the fd is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn joins_our_own_namespace_and_reads_its_cookie() {
        // Joining the namespace we are already in needs CAP_SYS_ADMIN; skip
        // (loudly) where the tests do not run as root.
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let netns = NetNs::open(Path::new("/proc/self/ns/net")).await.unwrap();
        let here =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        assert_eq!(netns.cookie(), netns_cookie(&here).unwrap());
        assert_eq!(netns.run(|| 6 * 7).await.unwrap(), 42);
    }

    /// A new, empty network namespace, alive while the returned sender is.
    fn fresh_namespace() -> (PathBuf, mpsc::Sender<()>) {
        let (path_tx, path_rx) = mpsc::channel();
        let (done, wait) = mpsc::channel::<()>();
        thread::spawn(move || {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            let tid = nix::unistd::gettid();
            let pid = std::process::id();
            path_tx
                .send(PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net")))
                .unwrap();
            let _ = wait.recv();
        });
        (path_rx.recv().unwrap(), done)
    }

    #[tokio::test]
    async fn sockets_come_from_the_namespace_and_spares_refill() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (path, _alive) = fresh_namespace();
        let netns = NetNs::open(&path).await.unwrap();
        let here = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        assert_ne!(netns.cookie(), netns_cookie(&here).unwrap());
        let spares = || netns.spares.sockets.lock().unwrap().len();
        assert_eq!(spares(), 0, "none made before the first request");
        // More than there are spares: the first waits for the thread, the
        // rest come from the spares it made meanwhile, or from the thread.
        for _ in 0..3 * SPARES {
            let socket = netns.tcp_socket(Domain::IPV4).await.unwrap();
            assert_eq!(netns_cookie(&socket).unwrap(), netns.cookie());
            assert!(socket.nonblocking().unwrap());
            assert_eq!(socket.local_addr().unwrap().as_socket().unwrap().port(), 0);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while spares() < SPARES / 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!((SPARES / 2..=SPARES).contains(&spares()), "{}", spares());
        // Other families are made on demand, in the namespace too.
        let v6 = netns.tcp_socket(Domain::IPV6).await.unwrap();
        assert_eq!(netns_cookie(&v6).unwrap(), netns.cookie());
    }

    #[tokio::test]
    async fn a_missing_namespace_is_named_in_the_error() {
        let err = NetNs::open(Path::new("/run/netns/does-not-exist"))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("/run/netns/does-not-exist"),
            "{err}"
        );
    }
}
