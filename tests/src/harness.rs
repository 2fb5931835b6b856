//! Running warren in a lab: agent processes on nodes, `labpod` servers and
//! clients in pods, and the config files that tie them together.
//!
//! Shared by the end-to-end tests and `cargo xtask demo`, so the demo shows
//! exactly what the tests check.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::lab::{Lab, Node, Pod};

/// How long to wait for something a process should do promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Where cargo put a binary of this workspace: `$WARREN_TARGET_DIR/<profile>`
/// if set (xtask sets it), else next to the running executable (an
/// integration test runs from `target/<profile>/deps/`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("WARREN_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().context("executable has no directory")?;
            if dir.ends_with("deps") {
                dir.parent().context("deps has no parent")?.to_owned()
            } else {
                dir.to_owned()
            }
        }
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (`cargo build -p warren-agent -p warren-ca -p \
             warren-tests`; `cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// A fresh lab for an end-to-end test; panics (saying how to run the tests)
/// without root, and if the lab cannot be built.
pub fn test_lab(nodes: usize, pods_per_node: usize) -> Lab {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests need root (eBPF, namespaces, cgroups): run `cargo xtask test`"
    );
    Lab::up(crate::lab::LabSpec {
        nodes,
        pods_per_node,
    })
    .expect("lab up")
}

/// A workload as the agent's config lists it.
#[derive(Debug, Clone)]
pub struct MeshWorkload {
    pub pod: Pod,
    pub namespace: String,
    pub service_account: String,
    /// `key: value` pairs, as policy selectors see them.
    pub labels: Vec<(String, String)>,
    /// Ports plaintext from the node may reach in any mode (the kubelet's
    /// probes).
    pub probe_ports: Vec<u16>,
    /// Istio's workload name (a Deployment's), if not the pod's.
    pub workload_name: Option<String>,
}

impl MeshWorkload {
    pub fn new(pod: &Pod, namespace: &str, service_account: &str) -> Self {
        Self {
            pod: pod.clone(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            labels: Vec::new(),
            probe_ports: Vec::new(),
            workload_name: None,
        }
    }

    /// As a pod of the workload `name` (a Deployment, say).
    pub fn workload_name(mut self, name: &str) -> Self {
        self.workload_name = Some(name.into());
        self
    }

    /// With `port` probed by the kubelet.
    pub fn probe_port(mut self, port: u16) -> Self {
        self.probe_ports.push(port);
        self
    }

    /// With the label `key: value`.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.pod.name)
    }

    /// Its SPIFFE ID, in the lab's trust domain.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// The development CA's directory for a lab: shared by its agents, so they
/// trust each other; removed with the lab.
pub fn dev_ca_dir(node: &Node) -> PathBuf {
    crate::lab::files_dir(&node.lab).join("dev-ca")
}

/// The agent config for `node`, listing `workloads` (on any node), with
/// certificates from the lab's development CA.
pub fn agent_config(node: &Node, workloads: &[MeshWorkload]) -> String {
    let issuer = format!("devCaDir: {}\n", dev_ca_dir(node).display());
    config_yaml(&node.name, &issuer, Some(node), workloads)
}

/// Starts an agent on every node of `lab`, each with `workloads`, the policy
/// directory `policies` and certificates from the lab's development CA;
/// configs and logs go to `dir`.
pub fn start_agents_with_policies(
    lab: &Lab,
    workloads: &[MeshWorkload],
    policies: &Path,
    dir: &Path,
) -> Vec<Agent> {
    start_agents_with(lab, workloads, policies, dir, "")
}

/// Like [`start_agents_with_policies`], with `extra` (YAML) added to each
/// agent's config.
pub fn start_agents_with(
    lab: &Lab,
    workloads: &[MeshWorkload],
    policies: &Path,
    dir: &Path,
    extra: &str,
) -> Vec<Agent> {
    lab.nodes()
        .iter()
        .map(|node| {
            let config = agent_config(node, workloads)
                + &format!("policyDir: {}\n{extra}", policies.display());
            Agent::start(node, &config, dir).expect("agent starts")
        })
        .collect()
}

/// Replaces the policies in the directory `policies` with `yaml`
/// (atomically, as config management does) and waits until every one of
/// `agents` has loaded them.
pub fn replace_policies(agents: &mut [Agent], policies: &Path, yaml: &str) {
    let loaded = |l: &LogLine| l.message() == "policies loaded";
    let before: Vec<usize> = agents
        .iter()
        .map(|a| a.lines().iter().filter(|l| loaded(l)).count())
        .collect();
    let tmp = policies.join(".policies.yaml.new");
    fs::write(&tmp, yaml).expect("write policies");
    fs::rename(&tmp, policies.join("policies.yaml")).expect("replace policies");
    // Any load from now on read the new file: the agent waits for the
    // writes to settle before reading.
    for (agent, before) in agents.iter_mut().zip(before) {
        agent
            .wait_for_count(PATIENCE, before + 1, loaded)
            .expect("policies loaded");
    }
}

/// The agent config for `node` in Kubernetes mode: the mesh from the API
/// server through `kubeconfig` (the agent's own service account), pods found
/// under the node's kubelet cgroup root, certificates from the lab's
/// development CA.
pub fn kube_agent_config(node: &Node, kubeconfig: &Path) -> String {
    format!(
        "node: {}\ntrustDomain: cluster.local\ndevCaDir: {}\nbpfPinDir: {}\nkubernetes:\n  \
         kubeconfig: {}\n  hostProc: /proc\n  hostCgroup: {}\n",
        node.name,
        dev_ca_dir(node).display(),
        crate::lab::pin_dir(&node.lab).join(&node.name).display(),
        kubeconfig.display(),
        node.kubelet_cgroup_root().display()
    )
}

/// The agent config for `node`, with certificates from the CA service at
/// `ca` and the node credential in `credential`.
pub fn ca_agent_config(
    node: &Node,
    workloads: &[MeshWorkload],
    ca: SocketAddrV4,
    credential: &Path,
) -> String {
    let issuer = format!(
        "ca:\n  address: {ca}\n  nodeCredential: {}\n",
        credential.display()
    );
    config_yaml(&node.name, &issuer, Some(node), workloads)
}

/// What the CA service is told about the mesh (`--workloads`): which node
/// runs which workload.
pub fn ca_workloads(workloads: &[MeshWorkload]) -> String {
    config_yaml("warren-ca", "", None, workloads)
}

fn config_yaml(
    node_name: &str,
    issuer: &str,
    node: Option<&Node>,
    workloads: &[MeshWorkload],
) -> String {
    // Each agent pins in a directory of its own lab and node.
    let pins = node.map_or_else(String::new, |node| {
        format!(
            "bpfPinDir: {}\n",
            crate::lab::pin_dir(&node.lab).join(&node.name).display()
        )
    });
    let mut yaml = format!(
        "node: {node_name}\ntrustDomain: cluster.local\n{issuer}{pins}workloads:{}\n",
        if workloads.is_empty() { " []" } else { "" }
    );
    for w in workloads {
        let _ = write!(
            yaml,
            "  - name: {}\n    namespace: {}\n    serviceAccount: {}\n    ip: {}\n    node: {}\n",
            w.pod.name, w.namespace, w.service_account, w.pod.ip, w.pod.node
        );
        if !w.labels.is_empty() {
            let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(yaml, "    labels: {{{}}}", labels.join(", "));
        }
        if !w.probe_ports.is_empty() {
            let _ = writeln!(yaml, "    probePorts: {:?}", w.probe_ports);
        }
        if let Some(name) = &w.workload_name {
            let _ = writeln!(yaml, "    workloadName: {name}");
        }
        if node.is_some_and(|node| w.pod.node == node.name) {
            let _ = write!(
                yaml,
                "    netns: {}\n    cgroup: {}\n",
                w.pod.netns_path().display(),
                w.pod.cgroup.display()
            );
        }
    }
    yaml
}

/// The log filter of the daemons the tests run: beyond production's `info`,
/// the kernel programs' records and each connection's decisions as they are
/// made (what a test waits for); `WARREN_LOG_LEVEL` replaces it (the bench
/// runs production's).
pub fn log_level() -> String {
    std::env::var("WARREN_LOG_LEVEL").unwrap_or_else(|_| {
        "info,warren_ebpf=debug,warren_agent::proxy=debug,warren_agent::fastpath=debug".into()
    })
}

/// A `warren` agent or `warren-ca` process on a lab node, logging JSON to a
/// file.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    /// Who this is, in failure messages: "agent on node-1", "CA".
    pub name: String,
}

impl Daemon {
    /// Starts `<program> <args>` (the path of `warren` or `warren-ca`) in
    /// `node`'s namespace, logging to `log`.
    fn start(
        node: &Node,
        program: PathBuf,
        name: String,
        args: &[&OsStr],
        log: PathBuf,
    ) -> Result<Self> {
        Self::start_limited(node, program, name, args, log, None)
    }

    /// Like [`start`](Self::start); with `capabilities` (names as a pod's
    /// securityContext has them: `NET_ADMIN`), the process gets those and no
    /// others, as a container that drops ALL and adds them does (setpriv
    /// empties the bounding set but for them before exec).
    fn start_limited(
        node: &Node,
        program: PathBuf,
        name: String,
        args: &[&OsStr],
        log: PathBuf,
        capabilities: Option<&[String]>,
    ) -> Result<Self> {
        let log_file = fs::File::create(&log)?;
        let mut command = match capabilities {
            None => node.try_command(&program)?,
            Some(capabilities) => {
                let kept: Vec<String> = capabilities
                    .iter()
                    .map(|c| format!(",+{}", c.to_lowercase()))
                    .collect();
                let mut command = node.try_command("setpriv")?;
                command
                    .arg(format!("--bounding-set=-all{}", kept.concat()))
                    .arg("--inh-caps=-all")
                    .arg("--")
                    .arg(&program);
                command
            }
        };
        let child = command
            .args(args)
            .args(["--log-format", "json", "--log-level", &log_level()])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            child: Some(child),
            log,
            name,
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process's ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every JSON line logged so far.
    pub fn lines(&self) -> Vec<LogLine> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok().map(LogLine))
            .collect()
    }

    /// Waits for a log line matching `pred`; fails (quoting the log) if the
    /// process exits or `timeout` passes first.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Result<LogLine> {
        let mut found = self.wait_for_count(timeout, 1, pred)?;
        Ok(found.swap_remove(0))
    }

    /// Waits until `n` log lines match `pred`, and returns them.
    pub fn wait_for_count(
        &mut self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Result<Vec<LogLine>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<LogLine> = self.lines().into_iter().filter(&pred).collect();
            if found.len() >= n {
                return Ok(found);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("{} exited ({status}); log:\n{}", self.name, self.log_text());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: expected log line(s) did not come; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The lines logged at WARN or ERROR.
    pub fn complaints(&self) -> Vec<LogLine> {
        self.lines()
            .into_iter()
            .filter(|l| l.0["level"] == "WARN" || l.0["level"] == "ERROR")
            .collect()
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} already stopped", self.name))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{} ignored SIGTERM", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A warren agent running on a lab node.
pub struct Agent {
    daemon: Daemon,
    config: PathBuf,
    pub node: String,
}

impl Agent {
    /// Writes `config` next to the log in `dir`, starts the agent in the
    /// node's namespace and waits until it is ready.
    pub fn start(node: &Node, config: &str, dir: &Path) -> Result<Self> {
        let mut agent = Self::spawn(node, config, dir)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Waits until the agent says it is ready (the mesh known, its pods
    /// tried).
    pub fn wait_ready(&mut self) -> Result<()> {
        self.wait_for(PATIENCE, |l| l.message() == "warren agent ready")
            .map(drop)
    }

    /// Like [`start`](Self::start), without waiting for it to be ready.
    pub fn spawn(node: &Node, config: &str, dir: &Path) -> Result<Self> {
        Self::spawn_limited(node, config, dir, None)
    }

    /// Like [`spawn`](Self::spawn); with `capabilities`, the agent has those
    /// and no others (see [`Daemon`]).
    pub fn spawn_limited(
        node: &Node,
        config: &str,
        dir: &Path,
        capabilities: Option<&[String]>,
    ) -> Result<Self> {
        Self::spawn_binary(binary("warren")?, node, config, dir, capabilities)
    }

    /// Like [`start`](Self::start), running the agent binary at `program`
    /// (another build of warren, say, to compare with).
    pub fn start_binary(program: PathBuf, node: &Node, config: &str, dir: &Path) -> Result<Self> {
        let mut agent = Self::spawn_binary(program, node, config, dir, None)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    fn spawn_binary(
        program: PathBuf,
        node: &Node,
        config: &str,
        dir: &Path,
        capabilities: Option<&[String]>,
    ) -> Result<Self> {
        // The log apart from the config: the agent watches its config's
        // directory, and each line it wrote there would wake it (a cost no
        // production agent pays: its log is a pipe).
        let logs = dir.join("logs");
        fs::create_dir_all(&logs)?;
        let config_path = dir.join(format!("{}.yaml", node.name));
        fs::write(&config_path, config)?;
        let args = [
            OsStr::new("agent"),
            OsStr::new("--config"),
            config_path.as_os_str(),
        ];
        let daemon = Daemon::start_limited(
            node,
            program,
            format!("agent on {}", node.name),
            &args,
            logs.join(format!("{}.log", node.name)),
            capabilities,
        )?;
        Ok(Self {
            daemon,
            config: config_path,
            node: node.name.clone(),
        })
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Runs `warren uninstall` with this agent's config (stop the agent
    /// first): its pods are released and talk directly again. Returns what
    /// the command printed.
    pub fn uninstall(&self) -> Result<String> {
        let output = Command::new(binary("warren")?)
            .args(["uninstall", "--config"])
            .arg(&self.config)
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            bail!(
                "warren uninstall failed: {stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(stdout)
    }

    /// Replaces the config file the way config management does (write, then
    /// rename); the agent notices by itself.
    pub fn rewrite_config(&self, config: &str) -> Result<()> {
        let tmp = self.config.with_extension("yaml.new");
        fs::write(&tmp, config)?;
        fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// The connections this agent reports having captured.
    pub fn captures(&self) -> Vec<Capture> {
        self.lines()
            .iter()
            .filter(|l| l.message() == "captured outbound connection")
            .filter_map(|l| serde_json::from_value(l.0.clone()).ok())
            .collect()
    }
}

impl std::ops::Deref for Agent {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

/// A lab CA's signing files, as `warren-ca init` makes them: a root and an
/// intermediate that signs.
#[derive(Debug, Clone)]
pub struct LabCa {
    pub dir: PathBuf,
}

impl LabCa {
    /// Runs `warren-ca init --dir dir`.
    pub fn init(dir: &Path) -> Result<Self> {
        let output = Command::new(binary("warren-ca")?)
            .args(["init", "--dir"])
            .arg(dir)
            .output()?;
        if !output.status.success() {
            bail!(
                "warren-ca init failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.join("root.pem")
    }

    /// `--ca-cert`, `--ca-key` and `--roots` for this CA, publishing `roots`.
    fn signing_args(&self, roots: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--ca-cert".into(),
            self.dir.join("ca-cert.pem").into(),
            "--ca-key".into(),
            self.dir.join("ca-key.pem").into(),
            "--roots".into(),
            roots.into(),
        ]
    }

    /// Runs `warren-ca node-credential` for `node` into `out`; `replace` to
    /// renew one there.
    pub fn node_credential(
        &self,
        node: &Node,
        roots: &Path,
        out: &Path,
        replace: bool,
    ) -> Result<()> {
        let output = Command::new(binary("warren-ca")?)
            .args(["node-credential", "--node", &node.name, "--out"])
            .arg(out)
            .args(self.signing_args(roots))
            .args(replace.then_some("--replace"))
            .output()?;
        if !output.status.success() {
            bail!(
                "warren-ca node-credential failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

/// `warren-ca serve` on a lab node, listening on the node's address.
pub struct CaService {
    daemon: Daemon,
    pub addr: SocketAddrV4,
}

/// The CA service's port.
pub const CA_PORT: u16 = 15012;
/// Where the agents serve their health endpoints (as deployed).
pub const HEALTH_PORT: u16 = 15021;
/// Where the CA serves its health endpoints in the lab: deployed, it has a
/// network namespace of its own and uses 15021 too; here it shares one
/// node's with that node's agent.
pub const CA_HEALTH_PORT: u16 = 15031;

impl CaService {
    /// Serves `ca`'s signing certificate, publishing `roots`, for the mesh
    /// in the `workloads` file; waits until it listens.
    pub fn start(
        node: &Node,
        ca: &LabCa,
        roots: &Path,
        workloads: &Path,
        log: PathBuf,
    ) -> Result<Self> {
        let addr = SocketAddrV4::new(node.ip, CA_PORT);
        let mut args: Vec<std::ffi::OsString> =
            vec!["serve".into(), "--listen".into(), addr.to_string().into()];
        args.extend(ca.signing_args(roots));
        args.extend(["--workloads".into(), workloads.into()]);
        Self::serve(node, args, log)
    }

    /// Serves for agents on Kubernetes, as the manifests run it: agents'
    /// service-account tokens reviewed through the API server at
    /// `kubeconfig` (the CA's own service account), the roots published in
    /// the ConfigMap warren-system/warren-trust-bundle, health endpoints on
    /// [`CA_HEALTH_PORT`]; signing with a self-signed root kept in `signing`.
    pub fn start_kubernetes(
        node: &Node,
        kubeconfig: &Path,
        signing: &Path,
        extra: &[&str],
        log: PathBuf,
    ) -> Result<Self> {
        let addr = SocketAddrV4::new(node.ip, CA_PORT);
        let health = SocketAddrV4::new(node.ip, CA_HEALTH_PORT);
        let mut args: Vec<std::ffi::OsString> = vec![
            "serve".into(),
            "--listen".into(),
            addr.to_string().into(),
            "--health-listen".into(),
            health.to_string().into(),
            "--self-signed".into(),
            signing.into(),
            "--kubernetes".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
            "--trust-bundle-configmap".into(),
            "warren-system/warren-trust-bundle".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        Self::serve(node, args, log)
    }

    /// Starts `warren-ca` with `args` and waits until it listens.
    fn serve(node: &Node, args: Vec<std::ffi::OsString>, log: PathBuf) -> Result<Self> {
        let addr = SocketAddrV4::new(node.ip, CA_PORT);
        let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let mut daemon = Daemon::start(node, binary("warren-ca")?, "CA".into(), &args, log)?;
        daemon.wait_for(PATIENCE, |l| {
            l.message() == "warren CA serving istio.v1.auth.IstioCertificateService"
        })?;
        Ok(Self { daemon, addr })
    }
}

impl std::ops::Deref for CaService {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl std::ops::DerefMut for CaService {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

/// One JSON log line of a daemon.
#[derive(Debug, Clone)]
pub struct LogLine(pub Value);

impl LogLine {
    pub fn message(&self) -> &str {
        self.0["message"].as_str().unwrap_or_default()
    }

    pub fn field(&self, name: &str) -> &str {
        self.0[name].as_str().unwrap_or_default()
    }
}

/// "captured outbound connection", as the agent logs it.
#[derive(Debug, Clone, Deserialize)]
pub struct Capture {
    pub workload: String,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub dst_workload: String,
    pub path: String,
}

/// A `labpod serve` process in a pod.
pub struct Server {
    child: Child,
    events: mpsc::Receiver<Value>,
    pub name: String,
    pub addr: SocketAddrV4,
}

impl Server {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let mut child = pod
            .try_command(binary("labpod")?)?
            .args(["serve", "--port", &port.to_string(), "--name", &pod.name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting labpod serve")?;
        let events = json_lines(child.stdout.take().context("no stdout")?);
        let mut server = Self {
            child,
            events,
            name: pod.name.clone(),
            addr: SocketAddrV4::new(pod.ip, port),
        };
        server
            .next_event(PATIENCE)
            .context("server did not start listening")?;
        Ok(server)
    }

    /// The next connection the server finished serving.
    pub fn next_served(&mut self) -> Result<Served> {
        self.next_served_within(PATIENCE)
    }

    /// Like [`Server::next_served`], for when the answer may be "none".
    /// Whether the application served no connection in the next 300 ms
    /// (after a call that should not have reached it).
    pub fn saw_nothing(&mut self) -> bool {
        self.next_served_within(Duration::from_millis(300)).is_err()
    }

    pub fn next_served_within(&mut self, timeout: Duration) -> Result<Served> {
        let deadline = Instant::now() + timeout;
        loop {
            let event = self.next_event(deadline.saturating_duration_since(Instant::now()))?;
            if event["event"] == "served" {
                return Ok(serde_json::from_value(event)?);
            }
        }
    }

    fn next_event(&mut self, timeout: Duration) -> Result<Value> {
        self.events
            .recv_timeout(timeout)
            .with_context(|| format!("no word from the server in {}", self.name))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection as the server saw it.
#[derive(Debug, Clone, Deserialize)]
pub struct Served {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub bytes: u64,
}

/// What `labpod call` reports.
#[derive(Debug, Clone, Deserialize)]
pub struct Called {
    pub server: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub sent: u64,
    pub received: u64,
    pub ok: bool,
}

/// Options of one `labpod call`.
#[derive(Debug, Clone, Default)]
pub struct Call {
    pub bytes: Option<usize>,
    pub bind_port: Option<u16>,
    /// Bind this source address first (a pod forging another's).
    pub bind_ip: Option<std::net::Ipv4Addr>,
    pub hold_ms: Option<u64>,
    pub spread_ms: Option<u64>,
    /// Default 5 s.
    pub connect_timeout_ms: Option<u64>,
}

impl Call {
    /// A call that gives up connecting after 1.5 s: for attempts that are
    /// expected to be dropped (a dropped SYN is not refused, it times out).
    pub fn quick() -> Self {
        Self {
            connect_timeout_ms: Some(1500),
            ..Self::default()
        }
    }

    /// Starts the call from `pod` to `dst` without waiting for it.
    pub fn spawn(&self, pod: &Pod, dst: impl Into<SocketAddr>) -> Result<Child> {
        self.start(pod.try_command(binary("labpod")?)?, dst.into())
    }

    /// Calls `dst` from the node's own namespace, as the kubelet's probes
    /// do, and returns what the client saw.
    pub fn run_from_node(&self, node: &Node, dst: impl Into<SocketAddr>) -> Result<Called> {
        finish(self.spawn_from_node(node, dst)?)
    }

    /// Starts the call from the node's own namespace without waiting for it.
    pub fn spawn_from_node(&self, node: &Node, dst: impl Into<SocketAddr>) -> Result<Child> {
        self.start(node.try_command(binary("labpod")?)?, dst.into())
    }

    /// Runs `labpod call` as `cmd` (placed in a pod or on a node).
    fn start(&self, mut cmd: Command, dst: SocketAddr) -> Result<Child> {
        cmd.args(["call", &dst.to_string()]);
        if let Some(bytes) = self.bytes {
            cmd.args(["--bytes", &bytes.to_string()]);
        }
        if let Some(port) = self.bind_port {
            cmd.args(["--bind-port", &port.to_string()]);
        }
        if let Some(ip) = self.bind_ip {
            cmd.args(["--bind-ip", &ip.to_string()]);
        }
        if let Some(ms) = self.hold_ms {
            cmd.args(["--hold-ms", &ms.to_string()]);
        }
        if let Some(ms) = self.spread_ms {
            cmd.args(["--spread-ms", &ms.to_string()]);
        }
        if let Some(ms) = self.connect_timeout_ms {
            cmd.args(["--connect-timeout-ms", &ms.to_string()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting labpod call")
    }

    /// Calls `dst` from `pod` and returns what the client saw; fails if the
    /// call did not complete with every byte echoed back.
    pub fn run(&self, pod: &Pod, dst: impl Into<SocketAddr>) -> Result<Called> {
        finish(self.spawn(pod, dst)?)
    }
}

/// Waits for a spawned call and parses its report.
pub fn finish(child: Child) -> Result<Called> {
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout
        .lines()
        .find_map(|l| serde_json::from_str::<Called>(l).ok());
    match report {
        Some(called) if output.status.success() && called.ok => Ok(called),
        _ => bail!(
            "call failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// The JSON events a lab tool prints on `stdout`, one a line, as they come.
pub fn json_lines(stdout: ChildStdout) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line)
                && tx.send(value).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// tcpdump on the wire, at node-1's port of the bridge (everything between
/// node-1 and the other nodes), to check what an eavesdropper there would see.
pub struct WireCapture {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl WireCapture {
    pub fn start(lab: &Lab) -> Result<Self> {
        let file = tempfile::NamedTempFile::new()?;
        // Immediate mode: without it packets wait in the kernel's buffer for
        // up to a second, and a capture stopped sooner loses them.
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.wire_netns(),
                "tcpdump",
                "--immediate-mode",
            ])
            .args(["-i", "n1", "-U", "-s", "0", "-w"])
            .arg(file.path())
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (`cargo xtask setup` installs it)")?;
        // tcpdump says "listening on n1" once it captures.
        let mut stderr = BufReader::new(child.stderr.take().context("no stderr")?);
        let mut said = String::new();
        while !said.contains("listening on") {
            if stderr.read_line(&mut said)? == 0 {
                bail!("tcpdump did not start: {said}");
            }
        }
        thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Ok(Self { child, file })
    }

    /// Stops the capture and returns the pcap file's bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        // Let the last packets in (tcpdump writes each as it reads it: wait
        // until the file stops growing), then stop cleanly.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut last = (0, Instant::now());
        while Instant::now() < deadline && last.1.elapsed() < Duration::from_millis(300) {
            thread::sleep(Duration::from_millis(50));
            let size = fs::metadata(self.file.path())?.len();
            if size != last.0 {
                last = (size, Instant::now());
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        self.child.wait()?;
        Ok(fs::read(self.file.path())?)
    }
}

/// Whether `needle` occurs in `haystack` (e.g. a payload in a capture).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A lab tool (`labpod`) running in a pod, with its JSON events.
pub struct Tool {
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Tool {
    /// Starts `labpod ARGS` in `pod`.
    pub fn start(pod: &Pod, args: &[&str]) -> Self {
        let mut child = pod
            .command(binary("labpod").unwrap())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("labpod starts");
        let events = json_lines(child.stdout.take().unwrap());
        Self { child, events }
    }

    /// The next event named `name`, skipping others.
    pub fn next(&self, name: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {name:?} event within {within:?}"));
            if event["event"] == name {
                return event;
            }
        }
    }

    /// Events that have come so far, without waiting.
    pub fn so_far(&self) -> Vec<Value> {
        self.events.try_iter().collect()
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `labpod spray` from `pod`: COUNT connections at once, each sending a
/// byte; how they ended.
pub fn spray(pod: &Pod, addr: SocketAddr, count: usize, wait_ms: u64, hold_ms: u64) -> Tool {
    spray_with(pod, addr, count, wait_ms, hold_ms, &[])
}

pub fn spray_with(
    pod: &Pod,
    addr: SocketAddr,
    count: usize,
    wait_ms: u64,
    hold_ms: u64,
    extra: &[&str],
) -> Tool {
    let (addr, count) = (addr.to_string(), count.to_string());
    let (wait_ms, hold_ms) = (wait_ms.to_string(), hold_ms.to_string());
    let mut args = vec![
        "spray",
        "--addr",
        &addr,
        "--count",
        &count,
        "--wait-ms",
        &wait_ms,
        "--hold-ms",
        &hold_ms,
    ];
    args.extend_from_slice(extra);
    Tool::start(pod, &args)
}

/// How many of a spray's connections ended as `how`.
pub fn ended(report: &Value, how: &str) -> u64 {
    report[how].as_u64().unwrap_or_else(|| panic!("{report}"))
}

/// How many the other end closed: with a close, or with a reset when the
/// byte the client sent was still unread.
pub fn closed(report: &Value) -> u64 {
    ended(report, "closed") + ended(report, "reset")
}

/// Calls made one after the other from a pod, on a thread, until stopped:
/// traffic that runs across whatever a test does meanwhile.
pub struct CallLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<Vec<CallEnd>>,
}

/// How one call of a [`CallLoop`] ended: when, and why it failed if it did.
#[derive(Debug, Clone)]
pub struct CallEnd {
    pub at: Instant,
    pub error: Option<String>,
}

impl CallLoop {
    /// Starts calling `dst` from `pod` with `call`, `pause` between calls.
    pub fn start(pod: &Pod, dst: impl Into<SocketAddr>, call: Call, pause: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pod, dst, flag) = (pod.clone(), dst.into(), stop.clone());
        let thread = thread::spawn(move || {
            let mut ends = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let error = call.run(&pod, dst).err().map(|e| format!("{e:#}"));
                ends.push(CallEnd {
                    at: Instant::now(),
                    error,
                });
                thread::sleep(pause);
            }
            ends
        });
        Self { stop, thread }
    }

    /// Stops it and returns how each call ended, in order.
    pub fn finish(self) -> Vec<CallEnd> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .expect("the calling thread does not panic")
    }
}
