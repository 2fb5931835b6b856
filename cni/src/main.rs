//! `warren-cni`: a chained CNI plugin (CNI spec 1.0.0, and the 0.3/0.4
//! results before it). Placed last in the node's network configuration, it
//! runs after the primary plugin has given the pod its addresses and, for a
//! pod of the mesh, returns success only once the warren agent has captured
//! it: no container of the pod runs before then, so none can send a byte in
//! clear. Pods outside the mesh pass straight through.
//!
//! The configuration entry (keys besides the spec's):
//!
//! ```json
//! {"type": "warren-cni", "socket": "/var/run/warren/cni.sock", "timeoutSeconds": 30}
//! ```
//!
//! Both are optional (those are the defaults). The agent answers within 25 s
//! (5 s to learn the pod, 20 s to enroll it); a shorter timeout fails the
//! ADD without the agent's reason.
//!
//! Everything it prints on stdout is the spec's (a result, or an error
//! object); diagnostics go to stderr, which runtimes log.

mod spec;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use spec::{CniError, Command, Env, NetConf};
use warren_cni::{MAX_MESSAGE, MEMBERSHIP_FILE, Membership, PodRef, Request, Response};

/// Where the agent listens unless the configuration says otherwise.
const DEFAULT_SOCKET: &str = "/var/run/warren/cni.sock";

/// How long ADD waits for the agent by default: enrollment includes the
/// pod's first certificate (the agent waits up to 5 s for the CA), and the
/// kubelet gives the whole sandbox two minutes.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// CHECK and DEL need no enrollment: a short wait.
const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let env = Env::from_process();
    match run(&env) {
        Ok(output) => {
            if let Some(output) = output {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("warren-cni: {}", error.msg);
            println!("{}", error.to_json());
            ExitCode::FAILURE
        }
    }
}

/// What to print on success.
fn run(env: &Env) -> Result<Option<String>, CniError> {
    let command = env.command()?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(spec::MAX_CONFIG as u64 + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::io(format!("reading the configuration from stdin: {e}")))?;
    match command {
        Command::Version => return spec::version(&stdin).map(Some),
        // Ready whether or not the agent is (while it is away, ADD decides
        // alone): the runtime marks the node's network not ready on a
        // failure, which would stop pods outside the mesh too. Unready only
        // with a configuration every ADD would refuse.
        Command::Status => {
            return NetConf::parse(&stdin)
                .map(|_| None)
                .map_err(|e| CniError::unavailable(e.msg));
        }
        // Nothing of ours to collect: DEL releases each sandbox.
        Command::Gc => return Ok(None),
        Command::Del => {
            // Always succeeds: a configuration this plugin cannot read must
            // not keep a sandbox from going away. The socket is read from it
            // leniently.
            let socket = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|conf| Some(PathBuf::from(conf.get("socket")?.as_str()?)))
                .filter(|path| path.is_absolute())
                .unwrap_or_else(|| DEFAULT_SOCKET.into());
            del(env, &socket);
            return Ok(None);
        }
        Command::Add | Command::Check => {}
    }
    let conf = NetConf::parse(&stdin)?;
    let socket = conf.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into());
    let result = match command {
        Command::Add => add(env, &conf, &socket).map(Some),
        Command::Check => check(env, &conf, &socket).map(|()| None),
        _ => unreachable!("answered above"),
    };
    result.map_err(|mut error| {
        error.cni_version = Some(conf.cni_version);
        error
    })
}

fn add(env: &Env, conf: &NetConf, socket: &Path) -> Result<String, CniError> {
    let container_id = env.required("CNI_CONTAINERID")?;
    let netns = PathBuf::from(env.required("CNI_NETNS")?);
    env.required("CNI_IFNAME")?;
    let previous = conf.previous_result()?;
    let Some(pod) = env.pod()? else {
        // Not a Kubernetes pod (a runtime used by hand): nothing of ours.
        return previous.output(&conf.cni_version);
    };
    let ips = previous.ipv4_in(&netns);
    let request = Request::Add {
        pod: pod.clone(),
        container_id,
        netns,
        ips,
    };
    let timeout = conf.timeout.unwrap_or(DEFAULT_TIMEOUT);
    match ask(socket, &request, timeout) {
        Ok(Response::Enrolled | Response::NotInMesh) => previous.output(&conf.cni_version),
        Ok(Response::Refused { reason }) => Err(CniError::refused(format!(
            "the warren agent cannot enroll pod {pod} yet: {reason}"
        ))),
        Ok(other) => Err(CniError::protocol(format!(
            "the warren agent answered ADD for pod {pod} with {other:?}"
        ))),
        Err(Unanswered::Later(problem)) => Err(CniError::agent_away(format!(
            "the warren agent at {} did not answer for pod {pod}: {problem}",
            socket.display()
        ))),
        Err(Unanswered::Away(problem)) => {
            let (hold, why) = held_while_away(socket, &pod);
            if hold {
                Err(CniError::agent_away(format!(
                    "pod {pod} must be in the mesh ({why}), and the warren agent cannot be \
                     reached at {}: {problem}; the pod starts once the agent is back",
                    socket.display()
                )))
            } else {
                eprintln!(
                    "warren-cni: the warren agent cannot be reached at {} ({problem}); pod {pod} \
                     is not in the mesh ({why}): it starts uncaptured",
                    socket.display()
                );
                previous.output(&conf.cni_version)
            }
        }
    }
}

fn check(env: &Env, conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    let container_id = env.required("CNI_CONTAINERID")?;
    let netns = PathBuf::from(env.required("CNI_NETNS")?);
    env.required("CNI_IFNAME")?;
    let Some(pod) = env.pod()? else {
        return Ok(());
    };
    let request = Request::Check {
        pod: pod.clone(),
        container_id,
        netns,
    };
    match ask(socket, &request, conf.timeout.unwrap_or(SHORT_TIMEOUT)) {
        Ok(Response::Enrolled | Response::NotInMesh) => Ok(()),
        Ok(Response::Refused { reason }) => Err(CniError::refused(format!(
            "pod {pod} is not held by the warren agent: {reason}"
        ))),
        Ok(other) => Err(CniError::protocol(format!(
            "the warren agent answered CHECK for pod {pod} with {other:?}"
        ))),
        Err(Unanswered::Later(problem)) => Err(CniError::agent_away(format!(
            "the warren agent at {} did not answer CHECK for pod {pod}: {problem}",
            socket.display()
        ))),
        Err(Unanswered::Away(problem)) => match held_while_away(socket, &pod) {
            (true, why) => Err(CniError::agent_away(format!(
                "pod {pod} must be in the mesh ({why}), and the warren agent cannot be reached \
                 at {}: {problem}",
                socket.display()
            ))),
            (false, _) => Ok(()),
        },
    }
}

/// DEL always succeeds (the spec asks it of every plugin, and a sandbox
/// must be able to go away whatever state the agent is in); the agent
/// releases a pod it was not told about when it next sees the pod gone.
fn del(env: &Env, socket: &Path) {
    let Ok(container_id) = env.required("CNI_CONTAINERID") else {
        return;
    };
    let pod = env.pod().ok().flatten();
    let request = Request::Del { pod, container_id };
    if let Err(problem) = ask(socket, &request, SHORT_TIMEOUT) {
        eprintln!(
            "warren-cni: DEL: the warren agent cannot be reached at {} ({problem}); it releases \
             the pod when it sees it gone",
            socket.display()
        );
    }
}

/// Whether `pod` must be held while the agent is away, and why, from what
/// the agent left next to its socket.
fn held_while_away(socket: &Path, pod: &PodRef) -> (bool, String) {
    let path = socket.with_file_name(MEMBERSHIP_FILE);
    let membership = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            serde_json::from_slice::<Membership>(&bytes).map_err(|e| format!("unreadable: {e}"))
        });
    match membership {
        Ok(membership) => {
            let hold = membership.must_hold(pod);
            let why = format!(
                "as {} says, written by the agent when it last ran",
                path.display()
            );
            (hold, why)
        }
        // Nothing to go by: fail closed.
        Err(problem) => (
            true,
            format!(
                "{} cannot tell ({problem}), so every pod is held",
                path.display()
            ),
        ),
    }
}

/// Why the agent gave no answer.
enum Unanswered {
    /// Nobody listens: the agent is away, and the plugin decides alone.
    Away(String),
    /// The agent took the request and did not answer (in time): it is
    /// there, so nothing is decided without it.
    Later(String),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Away(problem) | Self::Later(problem) => f.write_str(problem),
        }
    }
}

/// Sends `request`, waits at most `timeout` for the answer.
fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, Unanswered> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            Unanswered::Away(format!("connect: {e}"))
        }
        _ => Unanswered::Later(format!("connect: {e}")),
    })?;
    let later = Unanswered::Later;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| later(format!("setting timeouts: {e}")))?;
    let mut line = serde_json::to_vec(request).map_err(|e| later(format!("encoding: {e}")))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| later(format!("sending: {e}")))?;
    let mut answer = Vec::new();
    BufReader::new(stream.take(MAX_MESSAGE as u64))
        .read_until(b'\n', &mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                later(format!("no answer within {}s", timeout.as_secs_f32()))
            }
            _ => later(format!("reading the answer: {e}")),
        })?;
    if answer.is_empty() {
        return Err(later(
            "the agent closed the connection without answering".into(),
        ));
    }
    serde_json::from_slice(&answer).map_err(|e| later(format!("unreadable answer: {e}")))
}
