//! The socket the CNI plugin asks on.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Notify, Semaphore, watch},
};
use tracing::{Instrument, debug, info, info_span, warn};

use warren_cni::{MAX_MESSAGE, PodRef, Request, Response};

use super::Decision;
use crate::{
    fastpath::FastPath,
    kubernetes::{self, Reported},
    mesh::{LocalPod, Snapshot, Workload},
    reconcile::{PodState, States},
    sandbox::NsId,
};

/// How long ADD waits for the source to know the pod: the kubelet asks for
/// the sandbox as soon as it sees the pod, and so does the agent's watch.
const DECIDE_WAIT: Duration = Duration::from_secs(5);

/// How long ADD waits for the pod to be enrolled; with DECIDE_WAIT, less
/// than the plugin waits (30 s by default), so it hears why it failed.
const ENROLL_WAIT: Duration = Duration::from_secs(20);

/// How long a client has to send its request.
const REQUEST_WAIT: Duration = Duration::from_secs(5);

/// Requests served at once: one per sandbox being made on the node.
const CONCURRENT: usize = 64;

/// Where the server learns which pods are in the mesh, and tells the
/// runtime's reports.
#[derive(Clone)]
pub enum Directory {
    /// The API server: labels decide, reports feed the mesh.
    Kubernetes(kubernetes::Source),
    /// The config file: the pods it lists are in the mesh, where it says.
    File(watch::Receiver<Arc<Snapshot>>),
}

impl Directory {
    fn decide(&self, pod: &PodRef) -> Decision {
        match self {
            Self::Kubernetes(source) => source.decide(pod),
            Self::File(snapshot) => {
                let name = pod.to_string();
                let listed = snapshot
                    .borrow()
                    .workloads()
                    .local()
                    .any(|w| w.qualified_name() == name);
                if listed {
                    Decision::InMesh
                } else {
                    Decision::NotInMesh
                }
            }
        }
    }
}

/// Serves the plugin on `socket` until the task is aborted. The socket's
/// directory is made root-only: whoever can connect can have pods enrolled
/// anywhere on the node.
pub async fn serve(
    socket: PathBuf,
    directory: Directory,
    states: watch::Receiver<Arc<States>>,
    mesh: watch::Receiver<Arc<Snapshot>>,
    nudge: Arc<Notify>,
    fast_path: FastPath,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = bind(&socket)?;
    info!(socket = %socket.display(), "serving the CNI plugin");
    let permits = Arc::new(Semaphore::new(CONCURRENT));
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!(%error, "accepting a CNI plugin connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (directory, states, mesh) = (directory.clone(), states.clone(), mesh.clone());
            let (nudge, fast_path) = (nudge.clone(), fast_path.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let context = Context {
                    directory: &directory,
                    mesh: &mesh,
                    nudge: &nudge,
                    fast_path: &fast_path,
                };
                if let Err(error) = answer(stream, &context, states).await {
                    debug!(%error, "CNI plugin connection failed");
                }
            });
        }
    }))
}

/// Makes the socket's directory, or checks the one there: a directory (not
/// a link) of the agent's own, then root-only. Whoever else owned it could
/// put their own socket or membership file there. Done before anything in
/// it is read or written.
pub fn prepare_dir(socket: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = socket
        .parent()
        .ok_or_else(|| std::io::Error::other("the socket path has no directory"))?;
    match std::fs::symlink_metadata(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        }
        Err(error) => return Err(error),
        Ok(meta) if !meta.is_dir() => {
            return Err(std::io::Error::other(format!(
                "{} is not a directory (a symbolic link?)",
                dir.display()
            )));
        }
        Ok(meta) if meta.uid() != nix::unistd::geteuid().as_raw() => {
            return Err(std::io::Error::other(format!(
                "{} belongs to uid {}, not to the agent's",
                dir.display(),
                meta.uid()
            )));
        }
        Ok(_) => {}
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Binds `socket` in a directory only root may enter.
fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    prepare_dir(socket)?;
    // A previous agent's socket: nobody listens on it any more.
    match std::fs::remove_file(socket) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// What answering a request needs besides the states.
struct Context<'a> {
    directory: &'a Directory,
    mesh: &'a watch::Receiver<Arc<Snapshot>>,
    /// Wakes the daemon to look again at once: a sandbox it waits for may be
    /// there now.
    nudge: &'a Notify,
    /// Told when a sandbox goes, before the plugin answers: the pod's
    /// address is free for another pod once it has.
    fast_path: &'a FastPath,
}

async fn answer(
    stream: UnixStream,
    context: &Context<'_>,
    states: watch::Receiver<Arc<States>>,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(reader.take(MAX_MESSAGE as u64));
    let read = reader.read_until(b'\n', &mut line);
    let response = match tokio::time::timeout(REQUEST_WAIT, read).await {
        Err(_) => return Ok(()), // said nothing
        Ok(read) => {
            read?;
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(request, context, states).await,
                Err(error) => {
                    warn!(%error, "unreadable request from the CNI plugin");
                    Response::Refused {
                        reason: format!("unreadable request: {error}"),
                    }
                }
            }
        }
    };
    let mut line = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await
}

async fn handle(
    request: Request,
    context: &Context<'_>,
    states: watch::Receiver<Arc<States>>,
) -> Response {
    let directory = context.directory;
    match request {
        Request::Add {
            pod,
            container_id,
            netns,
            ips,
        } => {
            let span = info_span!("cni_add", pod = %pod, container = %short(&container_id));
            let started = Instant::now();
            let response = add(&pod, container_id, netns, &ips, context, states)
                .instrument(span.clone())
                .await;
            let _enter = span.enter();
            let elapsed_ms = started.elapsed().as_millis() as u64;
            match &response {
                Response::Enrolled => {
                    info!(%pod, elapsed_ms, "CNI ADD: pod enrolled before it runs")
                }
                Response::NotInMesh => debug!(%pod, "CNI ADD: pod not in the mesh"),
                Response::Refused { reason } => warn!(
                    %pod, elapsed_ms, %reason,
                    "CNI ADD refused: the runtime retries the sandbox"
                ),
                Response::Released => {}
            }
            response
        }
        Request::Check { pod, netns, .. } => {
            let response = check(&pod, &netns, directory, &states.borrow());
            if let Response::Refused { reason } = &response {
                warn!(pod = %pod, %reason, "CNI CHECK: the pod is not held");
            }
            response
        }
        Request::Del { pod, container_id } => {
            // The runtime frees the pod's address once this is answered: no
            // pod may connect straight to it, or from it, after that.
            if let Some(pod) = &pod {
                context.fast_path.release(&pod.namespace, &pod.name);
            }
            if let Directory::Kubernetes(source) = directory
                && source.forget(&container_id)
            {
                info!(
                    pod = %pod.map(|p| p.to_string()).unwrap_or_default(),
                    container = %short(&container_id),
                    "CNI DEL: the sandbox is going; withdrawing the pod from it"
                );
            }
            Response::Released
        }
    }
}

async fn add(
    pod: &PodRef,
    container_id: String,
    netns: PathBuf,
    ips: &[std::net::Ipv4Addr],
    context: &Context<'_>,
    mut states: watch::Receiver<Arc<States>>,
) -> Response {
    let directory = context.directory;
    let refuse = |reason: String| Response::Refused { reason };
    let decided = Instant::now() + DECIDE_WAIT;
    let decision = loop {
        match directory.decide(pod) {
            Decision::Unknown if Instant::now() < decided => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            decision => break decision,
        }
    };
    match decision {
        Decision::NotInMesh => return Response::NotInMesh,
        Decision::Unknown => {
            return refuse(format!(
                "the agent's view of the API server does not have pod {pod} on this node after \
                 {DECIDE_WAIT:?}"
            ));
        }
        Decision::InMesh => {}
    }
    let Some(&ip) = ips.first() else {
        return refuse(
            "the previous plugin gave the pod no IPv4 address (the mesh is IPv4)".into(),
        );
    };
    let Some(sandbox) = NsId::of_path(&netns).ok() else {
        return refuse(format!(
            "{} is not a network namespace the agent can open",
            netns.display()
        ));
    };
    if let Directory::Kubernetes(source) = directory {
        let Some(uid) = &pod.uid else {
            return refuse(
                "the runtime gave no K8S_POD_UID in CNI_ARGS (containerd does); without \
                 it the pod's cgroup cannot be found"
                    .into(),
            );
        };
        source.report(
            uid,
            Reported {
                container_id,
                netns: netns.clone(),
                netns_id: sandbox,
                ip,
            },
        );
    }
    let name = pod.to_string();
    // A pod waiting for its next attempt, or held in a namespace its file
    // no longer holds, is looked at now rather than at the next check.
    context.nudge.notify_one();
    let deadline = tokio::time::Instant::now() + ENROLL_WAIT;
    let mut last_error = None;
    loop {
        {
            let states = states.borrow_and_update();
            match states.get(&name) {
                Some(PodState::Enrolled {
                    workload,
                    netns: enrolled,
                }) if held_here(workload, *enrolled, directory, sandbox, ip) => {
                    return Response::Enrolled;
                }
                // The config file's path holds another namespace than the
                // runtime's: waiting would not help.
                Some(PodState::Enrolled { workload, .. })
                    if matches!(directory, Directory::File(_))
                        && !path_holds(workload, sandbox) =>
                {
                    return refuse(format!(
                        "the config file puts pod {name} in another network namespace than {}",
                        netns.display()
                    ));
                }
                Some(PodState::Failing { workload, error })
                    if meant_here(workload, directory, &netns, ip) =>
                {
                    last_error = Some(error.clone());
                }
                _ => {}
            }
        }
        match tokio::time::timeout_at(deadline, states.changed()).await {
            Ok(Ok(())) => {}
            // The daemon stopped, or time is up.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    refuse(match last_error {
        Some(error) => format!("enrolling it failed: {error}"),
        None => not_a_workload(&context.mesh.borrow(), &name, ip),
    })
}

/// Why a pod the labels put in the mesh never became one of its workloads
/// here.
fn not_a_workload(mesh: &Snapshot, name: &str, ip: std::net::Ipv4Addr) -> String {
    if mesh.workloads().is_conflicted(ip) {
        format!("several live pods claim {ip}; no pod at that address is believed")
    } else if mesh.services().is_vip(ip) {
        format!("its address {ip} is a Service's virtual address")
    } else if !mesh.workloads().local().any(|w| w.qualified_name() == name) {
        "it is not a workload of the mesh on this node (the agent's log says why: a service \
         account name that makes no valid identity?)"
            .to_owned()
    } else {
        format!("not enrolled within {ENROLL_WAIT:?}")
    }
}

/// Whether the pod enrolled as `workload` in the namespace `enrolled` is
/// held in the runtime's `sandbox`, at `ip` (the config file's pods are
/// where the file says, at its address).
fn held_here(
    workload: &Workload,
    enrolled: Option<NsId>,
    directory: &Directory,
    sandbox: NsId,
    ip: std::net::Ipv4Addr,
) -> bool {
    let there = enrolled == Some(sandbox);
    match directory {
        Directory::File(_) => there,
        Directory::Kubernetes(_) => there && workload.ip == ip,
    }
}

/// Whether `workload`, failing to enroll, is the one meant for the runtime's
/// sandbox (so its error is the answer).
fn meant_here(
    workload: &Workload,
    directory: &Directory,
    netns: &Path,
    ip: std::net::Ipv4Addr,
) -> bool {
    match directory {
        Directory::File(_) => true,
        Directory::Kubernetes(_) => {
            workload.ip == ip
                && matches!(&workload.local, Some(LocalPod::Kubelet { netns: Some(n), .. }) if n == netns)
        }
    }
}

/// Whether the config file's path for `workload` holds `sandbox` now.
fn path_holds(workload: &Workload, sandbox: NsId) -> bool {
    match &workload.local {
        Some(LocalPod::Paths { netns, .. }) => NsId::of_path(netns).is_ok_and(|id| id == sandbox),
        _ => false,
    }
}

fn check(pod: &PodRef, netns: &Path, directory: &Directory, states: &States) -> Response {
    let refuse = |reason: String| Response::Refused { reason };
    match directory.decide(pod) {
        Decision::NotInMesh => Response::NotInMesh,
        Decision::Unknown => refuse(format!("the agent does not know pod {pod} on this node")),
        Decision::InMesh => match states.get(&pod.to_string()) {
            Some(PodState::Enrolled {
                workload,
                netns: enrolled,
            }) if NsId::of_path(netns).ok().is_some_and(|sandbox| {
                held_here(workload, *enrolled, directory, sandbox, workload.ip)
            }) =>
            {
                Response::Enrolled
            }
            Some(PodState::Enrolled { .. }) => {
                refuse("the agent holds the pod in another network namespace".into())
            }
            Some(PodState::Failing { error, .. }) => refuse(format!("not enrolled: {error}")),
            None => refuse("the agent does not hold the pod".into()),
        },
    }
}

/// Container IDs are 64 hex digits; 12 say which.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
