//! The lab plays the kubelet for a [`ControlPlane`]: there is no kubelet, no container
//! runtime and no scheduler, so this registers a Node per lab node and realizes the Pods
//! bound to them (`spec.nodeName` set by the test) as lab pods, reporting their status as
//! a kubelet would.
//!
//! For each Pod on a lab node that is not `hostNetwork` it makes a sandbox with
//! [`Lab::add_pod`] (netns, address, kubelet-shaped cgroup, pause process) and patches the
//! Pod's status: Running, podIP(s), hostIP, Ready, ContainersReady, startTime. A
//! `hostNetwork` Pod gets the node's address and no sandbox. A Pod being deleted loses its
//! sandbox and is then deleted at once (grace period 0), as a kubelet confirms a deletion.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod as KubePod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::controlplane::{ControlPlane, random_hex};
use crate::lab::{Lab, Node, Pod, PodSandboxes};

/// Pods annotated `lab.warren.io/runtime: cni` are left alone: the test makes
/// their sandboxes with real CNI plugins ([`crate::cni::Runtime`]).
pub const CNI_RUNTIME_ANNOTATION: &str = "lab.warren.io/runtime";

/// How long [`Kubelet::start`] waits for its first list of Pods.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `(namespace, name)` of a Pod.
type PodKey = (String, String);

/// The stand-in kubelet of every node of a lab; stops on drop. Drop it before the lab.
pub struct Kubelet {
    realized: Arc<Mutex<HashMap<PodKey, Pod>>>,
    task: JoinHandle<()>,
}

impl Kubelet {
    /// Registers the lab's nodes (Node `node-<i>`, InternalIP 10.10.0.i, Ready) and starts
    /// realizing Pods, on the control plane's runtime. Returns once the Pods that already
    /// exist have been handled.
    pub fn start(lab: &Lab, cp: &ControlPlane) -> Result<Kubelet> {
        let client = cp.client();
        let nodes = lab.nodes().to_vec();
        cp.block_on(register_nodes(&client, &nodes))?;
        let realized = Arc::new(Mutex::new(HashMap::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let worker = Worker {
            pods: Api::all(client),
            nodes,
            sandboxes: lab.sandboxes(),
            realized: Arc::clone(&realized),
            made: HashMap::new(),
        };
        let task = cp.handle().spawn(worker.run(ready_tx));
        let kubelet = Kubelet { realized, task };
        match cp.block_on(async { tokio::time::timeout(START_TIMEOUT, ready_rx).await }) {
            Ok(Ok(())) => Ok(kubelet),
            Ok(Err(_)) => bail!("the kubelet stopped before listing Pods"),
            Err(_) => bail!("the kubelet could not list Pods in {START_TIMEOUT:?}"),
        }
    }

    /// The lab pod realizing Pod `namespace/name`, once it has a sandbox and its status
    /// (Running, Ready, podIP) is stored in the API server.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let key = (namespace.to_owned(), name.to_owned());
        lock(&self.realized).get(&key).cloned()
    }

    /// Waits until [`Kubelet::pod`] has Pod `namespace/name` (hostNetwork Pods never get a
    /// sandbox: wait for their status through the API instead).
    pub fn wait_pod(&self, namespace: &str, name: &str, timeout: Duration) -> Result<Pod> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pod) = self.pod(namespace, name) {
                return Ok(pod);
            }
            if self.task.is_finished() {
                bail!("the kubelet stopped; Pod {namespace}/{name} was never realized");
            }
            if Instant::now() > deadline {
                bail!(
                    "Pod {namespace}/{name} was not realized in {timeout:?}: does it exist, \
                     with spec.nodeName a lab node?"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Sandboxes it made stay until the lab's teardown, which removes them.
        self.task.abort();
    }
}

/// A Node object as a kubelet registers it; its status (Ready) is then reported through the
/// status subresource.
async fn register_nodes(client: &kube::Client, nodes: &[Node]) -> Result<()> {
    let api: Api<KubeNode> = Api::all(client.clone());
    for node in nodes {
        let object = KubeNode {
            metadata: ObjectMeta {
                name: Some(node.name.clone()),
                labels: Some(
                    [
                        ("kubernetes.io/hostname".to_owned(), node.name.clone()),
                        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            // As deploy/README.md says to register nodes: the agent removes
            // it once ready.
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                    key: "warren.io/agent-not-ready".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            result => {
                result.with_context(|| format!("registering Node {}", node.name))?;
            }
        }
        let now = now();
        let status = json!({
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": node.ip.to_string()},
                    {"type": "Hostname", "address": node.name},
                ],
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "the warren lab plays this node's kubelet",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
                "podCIDR": format!("10.244.{}.0/24", node.index),
            }
        });
        api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .with_context(|| format!("reporting the status of Node {}", node.name))?;
    }
    Ok(())
}

/// A sandbox this kubelet made, by Pod uid.
struct Made {
    key: PodKey,
    pod: Pod,
}

struct Worker {
    pods: Api<KubePod>,
    nodes: Vec<Node>,
    sandboxes: PodSandboxes,
    realized: Arc<Mutex<HashMap<PodKey, Pod>>>,
    made: HashMap<String, Made>,
}

impl Worker {
    async fn run(mut self, ready: tokio::sync::oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut stream = watcher(self.pods.clone());
        // The uids of a (re)list: sandboxes of Pods missing from it were deleted while the
        // watch was down.
        let mut listed: HashSet<String> = HashSet::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Init) => listed.clear(),
                Ok(Event::InitApply(pod)) => {
                    listed.extend(pod.metadata.uid.clone());
                    self.sync(pod).await;
                }
                Ok(Event::InitDone) => {
                    let gone: Vec<String> = self
                        .made
                        .keys()
                        .filter(|uid| !listed.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.tear_down(&uid).await;
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                Ok(Event::Apply(pod)) => self.sync(pod).await,
                Ok(Event::Delete(pod)) => {
                    if let Some(uid) = &pod.metadata.uid {
                        self.tear_down(uid).await;
                    }
                }
                // The API server is down or restarting (tests do that): the watcher
                // retries with backoff.
                Err(err) => eprintln!("kubelet: watching Pods: {err}"),
            }
        }
    }

    /// Brings the lab in line with one Pod.
    async fn sync(&mut self, pod: KubePod) {
        let (Some(namespace), Some(name), Some(uid)) = (
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
            pod.metadata.uid.clone(),
        ) else {
            return;
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let Some(node) = spec
            .node_name
            .as_deref()
            .and_then(|n| self.nodes.iter().position(|node| node.name == n))
        else {
            return;
        };
        if pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.get(CNI_RUNTIME_ANNOTATION).is_some_and(|v| v == "cni"))
        {
            // The test plays the runtime for this one (crate::cni).
            return;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            self.tear_down(&uid).await;
            self.confirm_deletion(&namespace, &name, &uid).await;
            return;
        }
        let node_ip = self.nodes[node].ip;
        let sandbox = if spec.host_network == Some(true) {
            None
        } else {
            match self.sandbox(node, &namespace, &name, &uid, &pod).await {
                Ok(sandbox) => Some(sandbox),
                Err(err) => {
                    eprintln!("kubelet: Pod {namespace}/{name}: {err:#}");
                    return;
                }
            }
        };
        let pod_ip = sandbox.as_ref().map_or(node_ip, |sandbox| sandbox.ip);
        if !reports(&pod, pod_ip) {
            let container_id = sandbox.as_ref().map(container_id_of);
            let status = running_status(&pod, node_ip, pod_ip, container_id.as_deref());
            let api: Api<KubePod> = Api::namespaced(self.pods.clone().into_client(), &namespace);
            if let Err(err) = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
            {
                eprintln!("kubelet: reporting the status of Pod {namespace}/{name}: {err}");
                return;
            }
        }
        // Tests get the pod once the API says it runs, as clients (the agent) see it.
        if let Some(sandbox) = sandbox {
            lock(&self.realized).insert((namespace, name), sandbox);
        }
    }

    /// The Pod's sandbox, made now if it has none.
    async fn sandbox(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        uid: &str,
        pod: &KubePod,
    ) -> Result<Pod> {
        if let Some(made) = self.made.get(uid) {
            return Ok(made.pod.clone());
        }
        // The API server sets it on creation.
        let qos = pod
            .status
            .as_ref()
            .and_then(|s| s.qos_class.clone())
            .unwrap_or_else(|| "BestEffort".to_owned());
        let sandboxes = self.sandboxes.clone();
        let (ns, n, u) = (namespace.to_owned(), name.to_owned(), uid.to_owned());
        let sandbox =
            tokio::task::spawn_blocking(move || sandboxes.add(node, &ns, &n, &u, &qos)).await??;
        let key = (namespace.to_owned(), name.to_owned());
        self.made.insert(
            uid.to_owned(),
            Made {
                key,
                pod: sandbox.clone(),
            },
        );
        Ok(sandbox)
    }

    async fn tear_down(&mut self, uid: &str) {
        let Some(made) = self.made.remove(uid) else {
            return;
        };
        {
            let mut realized = lock(&self.realized);
            // A newer Pod of the same name may already have its own sandbox.
            if realized
                .get(&made.key)
                .is_some_and(|p| p.netns == made.pod.netns)
            {
                realized.remove(&made.key);
            }
        }
        let sandboxes = self.sandboxes.clone();
        let pod = made.pod;
        match tokio::task::spawn_blocking(move || sandboxes.remove(&pod)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("kubelet: {err:#}"),
            Err(err) => eprintln!("kubelet: removing a sandbox: {err}"),
        }
    }

    /// Deletes the Pod for good, as a kubelet does once its containers are gone.
    async fn confirm_deletion(&self, namespace: &str, name: &str, uid: &str) {
        let api: Api<KubePod> = Api::namespaced(self.pods.clone().into_client(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {}
            // Gone already, or a new Pod of the same name (the uid precondition).
            Err(kube::Error::Api(status)) if status.is_not_found() || status.code == 409 => {}
            Err(err) => eprintln!("kubelet: deleting Pod {namespace}/{name}: {err}"),
        }
    }
}

fn watcher(pods: Api<KubePod>) -> impl futures::Stream<Item = watcher::Result<Event<KubePod>>> {
    watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed()
}

/// Whether the Pod's status already says what this kubelet would report.
fn reports(pod: &KubePod, pod_ip: Ipv4Addr) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    let ready = status.conditions.as_ref().is_some_and(|conditions| {
        conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    });
    status.phase.as_deref() == Some("Running")
        && status.pod_ip.as_deref() == Some(&pod_ip.to_string())
        && ready
}

/// A Running, Ready status, with one running container status per container; the first
/// container carries the sandbox's container id (the lab has one cgroup per pod), the
/// others (and all, without one) random ids. What a kubelet reports once the pod runs.
pub fn running_status(
    pod: &KubePod,
    node_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    container_id: Option<&str>,
) -> serde_json::Value {
    let now = now();
    let condition =
        |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now});
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or(&[]);
    let container_statuses: Vec<serde_json::Value> = containers
        .iter()
        .enumerate()
        .map(|(i, container)| {
            let id = match (i, container_id) {
                (0, Some(id)) => id.to_owned(),
                _ => random_hex(32).unwrap_or_default(),
            };
            json!({
                "name": container.name,
                "image": container.image.clone().unwrap_or_default(),
                "imageID": "",
                "containerID": format!("containerd://{id}"),
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    json!({
        "status": {
            "phase": "Running",
            "hostIP": node_ip.to_string(),
            "podIP": pod_ip.to_string(),
            "podIPs": [{"ip": pod_ip.to_string()}],
            "startTime": now,
            "conditions": [
                condition("Initialized"),
                condition("Ready"),
                condition("ContainersReady"),
                condition("PodScheduled"),
            ],
            "containerStatuses": container_statuses,
        }
    })
}

/// The container id in a sandbox's cgroup name: `cri-containerd-<id>.scope` or `<id>`.
fn container_id_of(pod: &Pod) -> String {
    let leaf = pod.cgroup.file_name().unwrap_or_default().to_string_lossy();
    leaf.trim_start_matches("cri-containerd-")
        .trim_end_matches(".scope")
        .to_owned()
}

fn now() -> serde_json::Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a timestamp serializes")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
