//! The lab plays the container runtime's network setup, with real CNI
//! plugins: Debian's `containernetworking-plugins` (bridge + host-local, in
//! `/usr/lib/cni`) as the node's primary network, and whatever the node's
//! configuration chains after it (warren-cni, once the agent installed it).
//!
//! As containerd does for a Pod the kubelet asks a sandbox for: the kubelet
//! has made the pod's cgroup; the runtime makes a network namespace with no
//! process in it, runs each plugin of the first configuration list in
//! `conf_dir` (by name, as the runtime picks it) with the CNI environment
//! and the previous plugin's result, and only then starts the sandbox's
//! process. A failed ADD is undone with DEL, in reverse order.
//!
//! Node `i`'s CNI pods get 10.244.{i}.194-254 on bridge `wcni0`
//! (10.244.{i}.193/26) in the node's namespace, inside the node's pod range,
//! so the lab's routes between nodes reach them.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod as KubePod;
use serde_json::{Value, json};

use crate::{
    cluster::{Cluster, RBAC},
    harness::{Agent, LogLine, PATIENCE, binary, kube_agent_config},
    kubelet::CNI_RUNTIME_ANNOTATION,
    lab::{self, CgroupDriver, Node, Pod, QosClass, kubelet_cgroup},
};

/// Where Debian's package puts the plugins.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// A node's CNI configuration and plugins, as its runtime sees them.
pub struct Runtime {
    node: Node,
    /// The node's configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Where the agent copies warren-cni (`/opt/cni/bin`); searched after
    /// Debian's directory.
    pub bin_dir: PathBuf,
    ipam_dir: PathBuf,
    netns_prefix: String,
}

/// A sandbox the runtime made.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// As the lab runs commands in it: `cgroup` is the (first) container's.
    pub pod: Pod,
    pub container_id: String,
    pub pod_cgroup: PathBuf,
    cni_args: String,
    /// The final ADD result.
    pub result: Value,
    list: Value,
}

/// A plugin that failed: its error object and what it said on stderr.
#[derive(Debug, Clone)]
pub struct Failure {
    pub plugin: String,
    pub code: Option<u64>,
    pub msg: String,
    pub stderr: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed (code {:?}): {} [stderr: {}]",
            self.plugin,
            self.code,
            self.msg,
            self.stderr.trim()
        )
    }
}

impl std::error::Error for Failure {}

/// The pod a sandbox is for, as the kubelet passes it.
pub struct PodRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

impl Runtime {
    /// The node's runtime, with its primary network (bridge + host-local)
    /// written as `10-lab-bridge.conflist` in `dir/conf`.
    pub fn new(node: &Node, dir: &Path) -> Result<Self> {
        let conf_dir = dir.join("net.d");
        let bin_dir = dir.join("bin");
        let ipam_dir = dir.join("ipam");
        for d in [&conf_dir, &bin_dir, &ipam_dir] {
            fs::create_dir_all(d)?;
        }
        let runtime = Self {
            node: node.clone(),
            conf_dir,
            bin_dir,
            ipam_dir,
            netns_prefix: format!("{}c", node.netns),
        };
        fs::write(
            runtime.conf_dir.join("10-lab-bridge.conflist"),
            serde_json::to_string_pretty(&runtime.primary())?,
        )?;
        Ok(runtime)
    }

    /// The primary network, as a CNI that owns the node writes it.
    pub fn primary(&self) -> Value {
        let i = self.node.index;
        json!({
            "cniVersion": "1.0.0",
            "name": "lab-pods",
            "plugins": [{
                "type": "bridge",
                "bridge": "wcni0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.ipam_dir,
                    "ranges": [[{
                        "subnet": format!("10.244.{i}.192/26"),
                        "gateway": format!("10.244.{i}.193"),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            }],
        })
    }

    /// The configuration list the runtime uses: the first valid file by
    /// name.
    pub fn list(&self) -> Result<(PathBuf, Value)> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.conf_dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        files.sort();
        for file in files {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".conflist") {
                continue;
            }
            if let Ok(list) = serde_json::from_slice::<Value>(&fs::read(&file)?)
                && list["plugins"].as_array().is_some_and(|p| !p.is_empty())
            {
                return Ok((file, list));
            }
        }
        bail!("no configuration list in {}", self.conf_dir.display())
    }

    /// The kubelet makes the pod's cgroup, then the runtime the sandbox's
    /// network: ADD through the whole list. On failure the sandbox is torn
    /// down (DEL through the list) and the failing plugin's error returned.
    pub fn add(&self, pod: &PodRef, qos: QosClass) -> Result<Result<Sandbox, Failure>> {
        let container_id = lab::random_hex_64()?;
        let (pod_rel, container_rel) = kubelet_cgroup(self.driver(), qos, pod.uid, &container_id);
        let root = self.node.kubelet_cgroup_root();
        let pod_cgroup = root.join(pod_rel);
        fs::create_dir_all(&pod_cgroup)?;
        let netns = format!("{}{}", self.netns_prefix, &container_id[..6]);
        lab::run(Command::new("ip").args(["netns", "add", &netns]))?;
        let (_, list) = self.list()?;
        let cni_args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};\
             K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.uid
        );
        let mut sandbox = Sandbox {
            pod: Pod {
                name: pod.name.to_owned(),
                node: self.node.name.clone(),
                netns,
                ip: Ipv4Addr::UNSPECIFIED,
                cgroup: root.join(container_rel),
            },
            container_id,
            pod_cgroup,
            cni_args,
            result: Value::Null,
            list,
        };
        // containerd's go-cni brings the loopback interface up first, with
        // a network of its own (`WithLoNetwork`).
        let loopback = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        if let Err(failure) = self.invoke("ADD", &sandbox, &loopback, None, "lo")? {
            bail!("loopback: {failure}");
        }
        let mut previous = None;
        for plugin in plugins(&sandbox.list) {
            match self.invoke("ADD", &sandbox, &plugin, previous.as_ref(), "eth0")? {
                Ok(result) => previous = Some(result),
                Err(failure) => {
                    if let Some(result) = previous {
                        sandbox.result = result;
                    }
                    self.del(&sandbox)?;
                    return Ok(Err(failure));
                }
            }
        }
        sandbox.result = previous.context("an empty list")?;
        let address = sandbox.result["ips"][0]["address"]
            .as_str()
            .context("no address in the result")?;
        sandbox.pod.ip = address.split('/').next().unwrap_or_default().parse()?;
        // The sandbox's process starts only now; the app container's
        // cgroup with it.
        fs::create_dir_all(&sandbox.pod.cgroup)?;
        Ok(Ok(sandbox))
    }

    /// CHECK through the list.
    pub fn check(&self, sandbox: &Sandbox) -> Result<Result<(), Failure>> {
        for plugin in plugins(&sandbox.list) {
            if let Err(failure) =
                self.invoke("CHECK", sandbox, &plugin, Some(&sandbox.result), "eth0")?
            {
                return Ok(Err(failure));
            }
        }
        Ok(Ok(()))
    }

    /// DEL through the list, last plugin first, then the namespace goes.
    /// Every plugin's DEL must succeed.
    pub fn del(&self, sandbox: &Sandbox) -> Result<()> {
        let result = (!sandbox.result.is_null()).then_some(&sandbox.result);
        for plugin in plugins(&sandbox.list).iter().rev() {
            if let Err(failure) = self.invoke("DEL", sandbox, plugin, result, "eth0")? {
                bail!("DEL must succeed: {failure}");
            }
        }
        lab::run(Command::new("ip").args(["netns", "del", &sandbox.pod.netns]))?;
        Ok(())
    }

    /// Runs one plugin as the runtime does, in the node's namespace: the
    /// plugin's object with the list's version and name (and the previous
    /// result) on stdin, the CNI variables in the environment.
    fn invoke(
        &self,
        command: &str,
        sandbox: &Sandbox,
        plugin: &Value,
        previous: Option<&Value>,
        ifname: &str,
    ) -> Result<Result<Value, Failure>> {
        let kind = plugin["type"].as_str().context("a plugin without a type")?;
        let binary = [Path::new(DEBIAN_PLUGINS), &self.bin_dir]
            .iter()
            .map(|dir| dir.join(kind))
            .find(|path| path.exists())
            .with_context(|| format!("no plugin {kind}"))?;
        let mut config = plugin.clone();
        config["cniVersion"] = sandbox.list["cniVersion"].clone();
        config["name"] = sandbox.list["name"].clone();
        if let Some(previous) = previous {
            config["prevResult"] = previous.clone();
        }
        let path = format!("{DEBIAN_PLUGINS}:{}", self.bin_dir.display());
        let mut child = self
            .node
            .try_command(&binary)?
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", lab::netns_path(&sandbox.pod.netns))
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", &sandbox.cni_args)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(config.to_string().as_bytes())?;
        let output = child.wait_with_output()?;
        let stdout: Value = if output.stdout.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!(
                    "{kind} {command} printed {:?}",
                    String::from_utf8_lossy(&output.stdout)
                )
            })?
        };
        if output.status.success() {
            // CHECK and DEL print nothing; ADD passes the result on.
            return Ok(Ok(if stdout.is_null() {
                previous.cloned().unwrap_or_default()
            } else {
                stdout
            }));
        }
        Ok(Err(Failure {
            plugin: kind.to_owned(),
            code: stdout["code"].as_u64(),
            msg: stdout["msg"].as_str().unwrap_or_default().to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }))
    }

    fn driver(&self) -> CgroupDriver {
        self.node.cgroup_driver()
    }
}

fn plugins(list: &Value) -> Vec<Value> {
    list["plugins"].as_array().cloned().unwrap_or_default()
}

/// A cluster whose agents serve and install warren-cni, with each node's
/// runtime.
pub struct CniCluster {
    pub cluster: Cluster,
    pub runtimes: Vec<Runtime>,
}

pub fn cni_dir(cluster: &Cluster, node: &Node) -> PathBuf {
    cluster.agents_dir().join(format!("cni-{}", node.name))
}

pub fn socket_of(cluster: &Cluster, node: &Node) -> PathBuf {
    cni_dir(cluster, node).join("run/cni.sock")
}

/// The agent's config with the CNI plugin served and installed.
pub fn cni_config(node: &Node, kubeconfig: &Path, dir: &Path) -> String {
    format!(
        "{}cni:\n  socket: {}\n  install:\n    confDir: {}\n    binDir: {}\n    binary: {}\n",
        kube_agent_config(node, kubeconfig),
        dir.join("run/cni.sock").display(),
        dir.join("net.d").display(),
        dir.join("bin").display(),
        binary("warren-cni").unwrap().display(),
    )
}

impl CniCluster {
    pub fn up(nodes: usize) -> Self {
        let mut cluster = Cluster::without_agents(nodes, true, RBAC);
        let runtimes: Vec<Runtime> = cluster
            .lab
            .nodes()
            .iter()
            .map(|node| Runtime::new(node, &cni_dir(&cluster, node)).unwrap())
            .collect();
        let dirs: Vec<PathBuf> = cluster
            .lab
            .nodes()
            .iter()
            .map(|n| cni_dir(&cluster, n))
            .collect();
        cluster.start_agents(true, None, |node, kubeconfig| {
            cni_config(node, kubeconfig, &dirs[node.index - 1])
        });
        let cni = Self { cluster, runtimes };
        for runtime in &cni.runtimes {
            wait_installed(runtime);
        }
        // Ready and installed: each agent took its node's not-ready taint off
        // (the lab's kubelet registers nodes with it).
        for node in cni.cluster.lab.nodes() {
            let deadline = Instant::now() + PATIENCE;
            while cni
                .taints(&node.name)
                .contains(&"warren.io/agent-not-ready".to_owned())
            {
                assert!(Instant::now() < deadline, "{} still tainted", node.name);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cni
    }

    pub fn taints(&self, node: &str) -> Vec<String> {
        let api: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(self.cluster.cp.client());
        let node = self.cluster.cp.block_on(api.get(node)).expect("get node");
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.key)
            .collect()
    }

    /// Stops node `node`'s agent and starts another, as a restart does.
    pub fn restart_agent(&mut self, node: usize) {
        let _ = self.cluster.agents[node].stop();
        let node = self.cluster.lab.node(node).clone();
        let dir = self.cluster.agents_dir();
        let kubeconfig = dir.join("agent.kubeconfig");
        let config = cni_config(&node, &kubeconfig, &cni_dir(&self.cluster, &node));
        self.cluster.agents[node.index - 1] = Agent::start(&node, &config, &dir).unwrap();
    }

    /// Creates a Pod on `node` whose sandbox the test makes (the kubelet
    /// stand-in leaves it alone); returns its UID.
    pub fn pod(&self, namespace: &str, name: &str, node: usize, account: &str) -> String {
        self.cluster.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
             annotations: {{{CNI_RUNTIME_ANNOTATION}: cni}}\nspec:\n  nodeName: {}\n  \
             serviceAccountName: {account}\n  containers:\n  - name: app\n    image: labpod\n",
            self.cluster.lab.node(node).name,
        ));
        let api: kube::Api<KubePod> = kube::Api::namespaced(self.cluster.cp.client(), namespace);
        let pod = self.cluster.cp.block_on(api.get(name)).expect("get pod");
        pod.metadata.uid.expect("uid")
    }

    /// The runtime of `node` makes the sandbox of `namespace/name`.
    pub fn add(
        &self,
        node: usize,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<Sandbox, String> {
        self.runtimes[node]
            .add(
                &PodRef {
                    namespace,
                    name,
                    uid,
                },
                QosClass::BestEffort,
            )
            .expect("runtime")
            .map_err(|failure| failure.to_string())
    }
}

/// Waits until the node's configuration chains warren-cni last.
pub fn wait_installed(runtime: &Runtime) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, list) = runtime.list().unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default())
            .collect();
        if types == ["bridge", "warren-cni"] {
            return list;
        }
        assert!(Instant::now() < deadline, "not installed: {types:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's log line for a pod the plugin held until it was enrolled.
pub fn cni_added(pod: &str) -> impl Fn(&LogLine) -> bool + '_ {
    move |l| l.message() == "CNI ADD: pod enrolled before it runs" && l.field("pod") == pod
}
