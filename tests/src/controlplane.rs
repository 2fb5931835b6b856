//! A real Kubernetes control plane for the end-to-end tests, envtest-style: etcd,
//! kube-apiserver and kube-controller-manager, and no kubelet (the lab plays it:
//! [`crate::kubelet`]).
//!
//! The binaries are Kubernetes 1.20.2, built by `cargo xtask setup` from Debian's
//! source package (see /work/shared/notes/kubernetes-here.md), found by [`bin_dir`].
//!
//! ```text
//!   root netns: etcd 127.0.0.1:<port>, kube-apiserver https://127.0.0.1:<port>
//!                 ^ relayed by this process
//!   wire netns: 10.10.0.254:6443 on br0  <-  agents in node netns: https://10.10.0.254:6443
//! ```
//!
//! Every process runs in `<lab cgroup>/control-plane`, so the lab's teardown kills them
//! even if the test process dies; dropping the [`ControlPlane`] kills them sooner.
//!
//! The API server keeps an audit log of what service accounts do ([`AUDIT_POLICY`]), so
//! that a test can check warren's RBAC against the requests its components really made
//! ([`ControlPlane::audit_events`], [`crate::audit`]).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;

use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use nix::sched::{CloneFlags, setns};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::Deserialize as _;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::audit::{self, AuditEvent};
use crate::lab::{self, Lab};

pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
/// Where agents in node namespaces reach the API server: an address on the lab's bridge.
pub const AGENT_API_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 254);
pub const AGENT_API_PORT: u16 = 6443;
/// The API server's URL from node namespaces, as agents' kubeconfigs name it.
pub const AGENT_API_URL: &str = "https://10.10.0.254:6443";
/// The audiences the API server accepts; TokenRequests default to all of them.
pub const API_AUDIENCES: &str = "https://kubernetes.default.svc,warren-ca";
/// Validity asked for agents' tokens: longer than any test.
const AGENT_TOKEN_SECONDS: i64 = 7 * 24 * 3600;
/// The controllers a cluster without kubelets or scheduler needs: Services' endpoints,
/// service accounts and their token Secrets (Pod admission waits for them), namespace
/// deletion and owner references.
const CONTROLLERS: &str =
    "endpoint,endpointslice,serviceaccount,serviceaccount-token,namespace,garbagecollector";
/// A cold start takes 2-5 s; a loaded machine may take much longer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The API server's audit policy: request metadata (who, verb, resource, name, response
/// code, the authorizer's decision; no bodies) of service accounts only, so the admin's
/// and the controller manager's many requests cost nothing. Every stage is kept: 1.20
/// logs a watch only when it ends (ResponseStarted and ResponseComplete together), so
/// RequestReceived is what tells that a request is still open
/// ([`ControlPlane::audit_events`] waits for them).
pub const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
  - level: Metadata
    userGroups: [system:serviceaccounts]
  - level: None
";
/// How long [`ControlPlane::audit_events`] waits for open requests to end: the server
/// ends a watch within milliseconds of its client's going.
const AUDIT_PATIENCE: Duration = Duration::from_secs(10);
/// How long `apply` retries what a young cluster refuses for a moment (a CRD not yet
/// served, a namespace whose service-account token does not exist yet).
const APPLY_PATIENCE: Duration = Duration::from_secs(20);

/// `~/.cache/warren`, where `cargo xtask setup` caches what it builds.
pub fn cache_root() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/warren")
}

/// The directory holding `kube-apiserver` and `kube-controller-manager`:
/// `$WARREN_KUBE_BIN_DIR` if set, else the cached build of `cargo xtask setup`
/// (`~/.cache/warren/kubernetes-<source version>/bin`). Without a build the path
/// returned does not exist, and [`ControlPlane::start`] says how to make one.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WARREN_KUBE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let root = cache_root();
    let mut builds: Vec<PathBuf> = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("kubernetes-")
        })
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| has_binaries(bin))
        .collect();
    builds.sort();
    builds
        .pop()
        .unwrap_or_else(|| root.join("kubernetes").join("bin"))
}

fn has_binaries(dir: &Path) -> bool {
    [APISERVER, CONTROLLER_MANAGER]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

/// etcd, kube-apiserver and kube-controller-manager for one lab; killed on drop.
pub struct ControlPlane {
    dir: PathBuf,
    cgroup: PathBuf,
    etcd: Process,
    etcd_endpoint: String,
    apiserver: Option<Process>,
    apiserver_args: Vec<OsString>,
    apiserver_port: u16,
    audit_log: PathBuf,
    /// The log's length at each kill of the API server: requests open then never end.
    audit_cutoffs: Vec<usize>,
    controller_manager: Process,
    admin_kubeconfig: PathBuf,
    ca_pem: String,
    client: kube::Client,
    forwarders: Vec<JoinHandle<()>>,
    /// `Option` only so that `Drop` can shut it down without waiting for its tasks.
    runtime: Option<Runtime>,
}

/// A control-plane process and the file its output goes to.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane for `lab`, ready when this returns: the API server answers
    /// /readyz, on 127.0.0.1 and (for node namespaces) on [`AGENT_API_URL`], and the
    /// controller manager has made the `default` service account's token.
    pub fn start(lab: &Lab) -> Result<ControlPlane> {
        let bin = bin_dir();
        ensure!(
            has_binaries(&bin),
            "no {APISERVER} and {CONTROLLER_MANAGER} in {}: run `cargo xtask setup` to build \
             them, or point WARREN_KUBE_BIN_DIR at a directory holding them",
            bin.display()
        );
        let dir = lab::files_dir(lab.prefix()).join("control-plane");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cgroup = lab.cgroup().join("control-plane");
        fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        Self::start_in(lab, &bin, dir, cgroup.clone()).inspect_err(|_| {
            // Whatever was started before the failure.
            let _ = fs::write(cgroup.join("cgroup.kill"), "1");
        })
    }

    fn start_in(lab: &Lab, bin: &Path, dir: PathBuf, cgroup: PathBuf) -> Result<ControlPlane> {
        let credentials = Credentials::generate()?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.pem", &credentials.ca_pem)?;
        let serving_cert = write("serving.pem", &credentials.serving_cert_pem)?;
        let serving_key = write("serving-key.pem", &credentials.serving_key_pem)?;
        let sa_key = write("sa.key", &credentials.sa_key_pem)?;
        let sa_pub = write("sa.pub", &credentials.sa_pub_pem)?;
        let tokens = write(
            "tokens.csv",
            &format!("{},admin,1,system:masters\n", credentials.admin_token),
        )?;
        let audit_policy = write("audit-policy.yaml", AUDIT_POLICY)?;
        let audit_log = dir.join("audit.log");

        let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let etcd_endpoint = format!("http://127.0.0.1:{etcd_port}");
        let etcd_args = args([
            "--name=warren-lab".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_endpoint}"),
            format!("--advertise-client-urls={etcd_endpoint}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-cluster=warren-lab=http://127.0.0.1:{etcd_peer_port}"),
        ]);
        let etcd = Process::spawn("etcd", Path::new("etcd"), &etcd_args, &cgroup, &dir)?;

        let apiserver_args = args([
            format!("--etcd-servers={etcd_endpoint}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={apiserver_port}"),
            format!("--advertise-address={AGENT_API_ADDRESS}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", serving_cert.display()),
            format!("--tls-private-key-file={}", serving_key.display()),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--api-audiences={API_AUDIENCES}"),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            // The agent runs privileged, as a DaemonSet would.
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            format!("--audit-policy-file={}", audit_policy.display()),
            format!("--audit-log-path={}", audit_log.display()),
            "--audit-log-format=json".into(),
            // Each event is written before its response is finished (the default, made
            // explicit): what a client has seen answered is in the log when a test reads it.
            "--audit-log-mode=blocking".into(),
        ]);
        let apiserver_bin = bin.join(APISERVER);
        let apiserver = Process::spawn(APISERVER, &apiserver_bin, &apiserver_args, &cgroup, &dir)?;

        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(
            &admin_kubeconfig,
            &format!("https://127.0.0.1:{apiserver_port}"),
            &credentials.ca_pem,
            "admin",
            &credentials.admin_token,
            "default",
        )?;
        // Started now, in parallel with the API server's start: it waits for it.
        let controller_manager_args = args([
            format!("--kubeconfig={}", admin_kubeconfig.display()),
            format!("--controllers={CONTROLLERS}"),
            format!("--service-account-private-key-file={}", sa_key.display()),
            format!("--root-ca-file={}", ca.display()),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
        ]);
        let controller_manager = Process::spawn(
            CONTROLLER_MANAGER,
            &bin.join(CONTROLLER_MANAGER),
            &controller_manager_args,
            &cgroup,
            &dir,
        )?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("control-plane")
            .enable_all()
            .build()
            .context("starting the control plane's tokio runtime")?;
        let client = runtime.block_on(kubeconfig_client(&admin_kubeconfig))?;
        let mut cp = ControlPlane {
            dir,
            cgroup,
            etcd,
            etcd_endpoint,
            apiserver: Some(apiserver),
            apiserver_args,
            apiserver_port,
            audit_log,
            audit_cutoffs: Vec::new(),
            controller_manager,
            admin_kubeconfig,
            ca_pem: credentials.ca_pem,
            client,
            forwarders: Vec::new(),
            runtime: Some(runtime),
        };
        cp.wait_ready()?;
        cp.forward_from_wire(lab)?;
        cp.wait_controller_manager()?;
        Ok(cp)
    }

    /// An admin client (group system:masters) talking to https://127.0.0.1:<port>.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Runs a future on the control plane's runtime (the one [`Self::client`] lives on),
    /// for synchronous tests. Do not call from inside that runtime.
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime().block_on(future)
    }

    /// The runtime's handle, to spawn background tasks (the kubelet's) on it.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime().handle().clone()
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// The API server's URL in the root network namespace.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The CA certificate (PEM) that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig for the admin, on [`Self::url`] (for kubectl while debugging).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The directory with the control plane's files and logs (`etcd.log`,
    /// `kube-apiserver.log`, `kube-controller-manager.log`, `audit.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The API server's audit log (JSON lines, see [`AUDIT_POLICY`]).
    pub fn audit_log(&self) -> &Path {
        &self.audit_log
    }

    /// Every request of a service account so far, one event per request in the order
    /// they came, across API server restarts; for [`audit::unused_grants`] and
    /// [`audit::denied`].
    ///
    /// Stop the clients first (agents, CA): it waits up to 10 s for every request to be
    /// answered, since 1.20 logs a watch only once it ends, and fails naming those still
    /// open. Everything a client has seen answered is in it.
    pub fn audit_events(&self) -> Result<Vec<AuditEvent>> {
        self.audit_events_within(AUDIT_PATIENCE)
    }

    /// [`Self::audit_events`], waiting at most `patience` for open requests to end.
    pub fn audit_events_within(&self, patience: Duration) -> Result<Vec<AuditEvent>> {
        let deadline = Instant::now() + patience;
        loop {
            let bytes = match fs::read(&self.audit_log) {
                Ok(bytes) => bytes,
                // The API server makes it at its first event.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(err) => {
                    return Err(err)
                        .with_context(|| format!("reading {}", self.audit_log.display()));
                }
            };
            let mut events = Vec::new();
            let mut open = Vec::new();
            let mut start = 0;
            // Requests of a killed API server's time that were open then never end: only
            // those of the running one are waited for.
            let ends = self.audit_cutoffs.iter().copied().chain([bytes.len()]);
            for (segment, end) in ends.enumerate() {
                let text = String::from_utf8_lossy(&bytes[start.min(end)..end]);
                let parsed = audit::parse_log(&text)
                    .with_context(|| format!("parsing {}", self.audit_log.display()))?;
                if segment == self.audit_cutoffs.len() {
                    open = parsed.iter().filter(|e| !e.answered()).cloned().collect();
                }
                events.extend(parsed);
                start = end;
            }
            if open.is_empty() {
                return Ok(events);
            }
            if Instant::now() > deadline {
                let open: Vec<String> = open
                    .iter()
                    .map(|event| format!("{} by {}", event.describe(), event.user))
                    .collect();
                bail!(
                    "{} requests still open after {patience:?} (stop their clients first: \
                     {APISERVER} 1.20 logs a watch only when it ends): {}",
                    open.len(),
                    open.join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates or replaces every object of a multi-document YAML text (any kind, CRDs and
    /// their instances too), in order; a namespaced object without a namespace goes to
    /// `default`. Returns the objects as stored.
    pub fn apply(&self, yaml: &str) -> Result<Vec<DynamicObject>> {
        self.block_on(apply_yaml(&self.client, yaml))
    }

    /// Deletes an object; false if there was none. Pods get a deletion timestamp and are
    /// finished by the kubelet ([`crate::kubelet::Kubelet`]), as in a cluster.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<bool> {
        self.block_on(delete_object(
            &self.client,
            api_version,
            kind,
            namespace,
            name,
        ))
    }

    /// A token for a service account from the TokenRequest API, for every audience of
    /// [`API_AUDIENCES`], valid for a week.
    pub fn service_account_token(&self, namespace: &str, service_account: &str) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: API_AUDIENCES.split(',').map(str::to_owned).collect(),
                expiration_seconds: Some(AGENT_TOKEN_SECONDS),
                ..Default::default()
            },
            ..Default::default()
        };
        let issued: TokenRequest = self
            .block_on(api.create_subresource(
                "token",
                service_account,
                &PostParams::default(),
                &request,
            ))
            .with_context(|| format!("requesting a token for {namespace}/{service_account}"))?;
        let status = issued
            .status
            .context("TokenRequest answered without status")?;
        Ok(status.token)
    }

    /// Writes a kubeconfig for an agent in a node namespace: [`AGENT_API_URL`], this
    /// control plane's CA, and a token of `namespace/service_account`.
    pub fn agent_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
        path: &Path,
    ) -> Result<()> {
        let token = self.service_account_token(namespace, service_account)?;
        write_kubeconfig(
            path,
            AGENT_API_URL,
            &self.ca_pem,
            &format!("{namespace}/{service_account}"),
            &token,
            namespace,
        )
    }

    /// SIGKILLs the API server; etcd and the controller manager stay up.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        let mut apiserver = self
            .apiserver
            .take()
            .context("the API server is not running")?;
        apiserver.kill()?;
        let logged = fs::metadata(&self.audit_log).map_or(0, |m| m.len());
        self.audit_cutoffs
            .push(usize::try_from(logged).context("audit log size")?);
        Ok(())
    }

    /// Starts the API server again, same port, same etcd, and waits until it is ready.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        ensure!(self.apiserver.is_none(), "the API server is running");
        let bin = bin_dir().join(APISERVER);
        let process = Process::spawn(
            APISERVER,
            &bin,
            &self.apiserver_args,
            &self.cgroup,
            &self.dir,
        )?;
        self.apiserver = Some(process);
        self.wait_ready()
    }

    /// Compacts etcd's history up to its current revision, so that watches from any
    /// older resourceVersion get 410 Gone. Returns that revision.
    pub fn compact_etcd(&self) -> Result<i64> {
        let status = etcdctl(
            &self.etcd_endpoint,
            &["endpoint", "status", "--write-out=json"],
        )?;
        let status: serde_json::Value =
            serde_json::from_str(&status).context("parsing `etcdctl endpoint status`")?;
        let revision = status[0]["Status"]["header"]["revision"]
            .as_i64()
            .with_context(|| format!("no revision in {status}"))?;
        etcdctl(&self.etcd_endpoint, &["compact", &revision.to_string()])?;
        Ok(revision)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let client = self.client.clone();
        loop {
            let apiserver = self
                .apiserver
                .as_mut()
                .context("the API server is not running")?;
            apiserver.ensure_running()?;
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a static request");
            let answer = self.block_on(async {
                tokio::time::timeout(Duration::from_secs(2), client.request_text(request)).await
            });
            match answer {
                Ok(Ok(text)) if text.trim() == "ok" => return Ok(()),
                answer if Instant::now() > deadline => {
                    let apiserver = self.apiserver.as_ref().expect("checked above");
                    bail!(
                        "{APISERVER} not ready after {STARTUP_TIMEOUT:?} (last answer: \
                         {answer:?}); its log ends with:\n{}",
                        apiserver.log_tail()
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until the controller manager has made the `default` service account's token
    /// Secret, which Pod admission needs, as proof that it works.
    fn wait_controller_manager(&mut self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "default");
        loop {
            self.controller_manager.ensure_running()?;
            let account = self.block_on(accounts.get_opt("default"))?;
            if account.is_some_and(|sa| sa.secrets.is_some_and(|s| !s.is_empty())) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{CONTROLLER_MANAGER} made no service-account token in {STARTUP_TIMEOUT:?}; \
                 its log ends with:\n{}",
                self.controller_manager.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Puts [`AGENT_API_ADDRESS`] on the lab's bridge and relays its port 6443 (and the API
    /// server's own port, which the `kubernetes` Service's endpoints name) to the API server.
    fn forward_from_wire(&mut self, lab: &Lab) -> Result<()> {
        let wire = lab.wire_netns();
        lab::ip(wire, &format!("addr add {AGENT_API_ADDRESS}/24 dev br0"))?;
        let netns =
            File::open(lab::netns_path(wire)).with_context(|| format!("opening netns {wire}"))?;
        let ports = [AGENT_API_PORT, self.apiserver_port];
        // A socket stays in the netns of the thread that made it: make the listeners in a
        // thread that joined the wire's namespace, then serve them from the runtime.
        let listeners = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<StdTcpListener>> {
                    setns(&netns, CloneFlags::CLONE_NEWNET).context("entering the wire netns")?;
                    ports
                        .iter()
                        .map(|&port| {
                            let listener = StdTcpListener::bind((AGENT_API_ADDRESS, port))
                                .with_context(|| {
                                    format!("listening on {AGENT_API_ADDRESS}:{port}")
                                })?;
                            listener.set_nonblocking(true)?;
                            Ok(listener)
                        })
                        .collect()
                })
                .join()
                .expect("the listener thread does not panic")
        })?;
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, self.apiserver_port));
        let _runtime = self.runtime().enter();
        for listener in listeners {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            self.forwarders.push(tokio::spawn(relay(listener, target)));
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for forwarder in &self.forwarders {
            forwarder.abort();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        // One write kills all three, and anything else started in the cgroup.
        if let Err(err) = fs::write(self.cgroup.join("cgroup.kill"), "1") {
            eprintln!("control plane: killing {}: {err}", self.cgroup.display());
        }
        for process in [Some(&mut self.etcd), self.apiserver.as_mut()]
            .into_iter()
            .flatten()
            .chain([&mut self.controller_manager])
        {
            let _ = process.child.wait();
        }
    }
}

impl Process {
    /// Starts `program` in `cgroup`, its output appended to `<dir>/<name>.log`.
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        cgroup: &Path,
        dir: &Path,
    ) -> Result<Process> {
        let log = dir.join(format!("{name}.log"));
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = crate::lab::placed_command(program, None, cgroup)?;
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process { name, child, log })
    }

    fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log ends with:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn kill(&mut self) -> Result<()> {
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        self.child.wait()?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// The control plane's keys and certificates, and the admin's token.
struct Credentials {
    ca_pem: String,
    serving_cert_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
    admin_token: String,
}

impl Credentials {
    fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "warren-lab kubernetes CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, &ca_key);

        // Loopback for the tests, the bridge address for agents, the `kubernetes` Service
        // for whoever resolves it, and the names in-cluster clients use.
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            AGENT_API_ADDRESS.to_string(),
            "10.96.0.1".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "localhost".to_owned(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        Ok(Credentials {
            ca_pem: ca_cert.pem(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
            admin_token: random_hex(16)?,
        })
    }
}

/// `2 * bytes` random hex digits.
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn args<const N: usize>(args: [String; N]) -> Vec<OsString> {
    args.into_iter().map(OsString::from).collect()
}

/// Distinct free ports on 127.0.0.1, as the kernel hands them out now.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    // All held at once, so that they differ.
    let listeners: Vec<StdTcpListener> = (0..N)
        .map(|_| StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<_>>()
        .context("finding free ports")?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

async fn relay(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let mut inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors, say: do not spin.
                eprintln!("control plane: forwarder accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            // A refused connection (API server killed) closes the client's too.
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

fn etcdctl(endpoint: &str, args: &[&str]) -> Result<String> {
    let output = Command::new("etcdctl")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .context("running etcdctl (Debian package etcd-client)")?;
    ensure!(
        output.status.success(),
        "etcdctl {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes a kubeconfig with one cluster, one user (a bearer token) and one context.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    user: &str,
    token: &str,
    namespace: &str,
) -> Result<()> {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "warren-lab",
            "cluster": {"server": server, "certificate-authority-data": ca_data},
        }],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{
            "name": "warren-lab",
            "context": {"cluster": "warren-lab", "user": user, "namespace": namespace},
        }],
        "current-context": "warren-lab",
    });
    let text = serde_yaml::to_string(&config)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A client from a kubeconfig file. Its connections are made from whichever thread drives
/// them, so a client built and used on a thread inside a node's netns talks from there.
pub async fn kubeconfig_client(path: &Path) -> Result<kube::Client> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let kubeconfig = Kubeconfig::from_yaml(&text)
        .with_context(|| format!("parsing kubeconfig {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Ok(kube::Client::try_from(config)?)
}

/// Async [`ControlPlane::apply`], for code already on a runtime.
pub async fn apply_yaml(client: &kube::Client, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document).context("parsing YAML")?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(serde_json::to_value(value)?)
            .context("a YAML document is not a Kubernetes object")?;
        applied.push(apply_object(client, &object).await?);
    }
    Ok(applied)
}

async fn apply_object(client: &kube::Client, object: &DynamicObject) -> Result<DynamicObject> {
    let types = object
        .types
        .as_ref()
        .context("an object without apiVersion or kind")?;
    let name = object
        .metadata
        .name
        .as_deref()
        .with_context(|| format!("a {} without metadata.name", types.kind))?;
    let what = format!("applying {} {name}", types.kind);
    let gvk = GroupVersionKind::try_from(types).with_context(|| format!("{what}: apiVersion"))?;
    retry(&what, || async {
        let api = dynamic_api(client, &gvk, object.metadata.namespace.as_deref()).await?;
        match api.create(&PostParams::default(), object).await {
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let current = api.get(name).await?;
                let mut desired = object.clone();
                desired.metadata.resource_version = current.metadata.resource_version;
                api.replace(name, &PostParams::default(), &desired).await
            }
            result => result,
        }
    })
    .await
}

async fn delete_object(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<bool> {
    let (group, version) = match api_version.split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let what = format!("deleting {kind} {name}");
    retry(&what, || async {
        let api = dynamic_api(client, &gvk, namespace).await?;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(false),
            Err(err) => Err(err),
        }
    })
    .await
}

/// The API of a kind as the server serves it (discovery), in `namespace` or `default` for
/// namespaced kinds.
async fn dynamic_api(
    client: &kube::Client,
    gvk: &GroupVersionKind,
    namespace: Option<&str>,
) -> kube::Result<Api<DynamicObject>> {
    let (resource, capabilities) = discovery::pinned_kind(client, gvk).await?;
    Ok(match capabilities.scope {
        Scope::Namespaced => {
            Api::namespaced_with(client.clone(), namespace.unwrap_or("default"), &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    })
}

/// Retries `attempt` for [`APPLY_PATIENCE`] while it fails in ways a young cluster
/// recovers from: a kind not yet discovered (a CRD just created), 404 from a resource not
/// yet served, a conflict, a refused Pod while its namespace's service-account token is
/// being made (500 ServerTimeout), an unavailable server.
async fn retry<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let young_cluster = |err: &kube::Error| match err {
        kube::Error::Api(status) => matches!(status.code, 404 | 409 | 429 | 500 | 503 | 504),
        kube::Error::Discovery(_) | kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    };
    retry_while(
        APPLY_PATIENCE,
        young_cluster,
        || {},
        || what.to_owned(),
        attempt,
    )
    .await
}

/// Sends `attempt` again, every 200 ms for `patience`, while it fails with an error that
/// `transient` says the API server recovers from; `on_retry` hears of each retry. The
/// error that ends it is given the context `what`.
pub async fn retry_while<T, F, Fut>(
    patience: Duration,
    transient: impl Fn(&kube::Error) -> bool,
    mut on_retry: impl FnMut(),
    what: impl Fn() -> String,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        if !transient(&err) || Instant::now() > deadline {
            return Err(err).with_context(what);
        }
        on_retry();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs a future on a fresh single-threaded runtime, on a thread that has joined the
/// network namespace at `netns` (a node's, say): every socket it makes lives there, so a
/// client built inside `make` talks as an agent on that node would.
pub fn block_on_in_netns<T, F>(netns: &Path, make: impl FnOnce() -> F + Send) -> Result<T>
where
    T: Send,
    F: Future<Output = T>,
{
    let file = File::open(netns).with_context(|| format!("opening netns {}", netns.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering netns {}", netns.display()))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(make()))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
