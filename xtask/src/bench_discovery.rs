//! `cargo xtask bench-discovery`: what the agent's Kubernetes discovery costs at scale.
//!
//! One agent in Kubernetes mode on node-1 of a one-node lab, against the tests' real API
//! server and controller manager (Kubernetes 1.20). It starts on an empty cluster: its RSS
//! and CPU time then are the baseline. The bench then creates, as fast as the API server
//! takes them (a bounded number of requests in flight), Services with selectors (the
//! controller manager makes their EndpointSlices), Istio policies, and Pods bound to fake
//! Nodes, each then given a status as a kubelet reports it (Running, Ready, a unique
//! address). No Pod is on node-1: the agent enrolls nothing, so what is measured is
//! discovery alone: watching, keeping the facts, building and publishing the mesh.
//!
//! Measured: how long creation took; from its end, until the agent published every mesh
//! pod, Service port and policy, and until it settled once the controller manager had
//! finished the EndpointSlices; its memory and CPU time over the baseline (and per 1000
//! pods); and a forced relist (API server killed, etcd compacted, API server restarted, so
//! that every watch gets 410 Gone): how long until every kind is listed again, and what it
//! costs. Release builds; results also go to `target/bench/discovery.json`, the agent's
//! log to `target/bench/discovery-agent.log`.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    future::Future,
    io::{Read, Seek, SeekFrom},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::core::v1::{Namespace, Node as KubeNode, Pod as KubePod, Service, ServiceAccount},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use warren_tests::{
    Lab, LabSpec, Node,
    cluster::{ISTIO_CRDS, RBAC},
    controlplane::{self, ControlPlane},
    harness::{binary, kube_agent_config},
    lab,
};

use crate::procfs;

/// The agent's log level: its discovery says "published the mesh" (with counts) and
/// "listed again" at debug and info under this target.
const LOG_LEVEL: &str = "info,warren_agent::kubernetes=debug";
/// The watched kinds, as the agent names them in its log.
const KINDS: [&str; 6] = [
    "namespaces",
    "pods",
    "services",
    "EndpointSlice",
    "PeerAuthentication",
    "AuthorizationPolicy",
];
/// Pod addresses: 10.128.0.1 onwards, away from the lab's 10.10.x and 10.244.x.
const POD_ADDRESSES: Ipv4Addr = Ipv4Addr::new(10, 128, 0, 0);
const MAX_PODS: usize = 1 << 22;
/// A start on an empty cluster takes a second or two.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// For a transient refusal (429, 500 while a namespace's token is made, a connection reset).
const REQUEST_PATIENCE: Duration = Duration::from_secs(60);
/// For the agent to catch up with what was created, and for the controller manager.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(900);
/// The agent's watches retry with backoff up to 30 s; lists of every kind follow.
const RELIST_TIMEOUT: Duration = Duration::from_secs(240);
/// A watch that failed, but not with 410 Gone, and then failed no more for this long has
/// resumed: kube-rs's backoff waits at most 30 s, plus up to as much jitter.
const RESUMED_AFTER: Duration = Duration::from_secs(65);
/// Settled: no "published the mesh" for this long.
const QUIET: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Pods, spread over the fake nodes.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Services, spread over the namespaces; each selects a group of its namespace's pods.
    #[arg(long, default_value_t = 2_000)]
    services: usize,
    /// Istio policies (PeerAuthentication and AuthorizationPolicy, half each).
    #[arg(long, default_value_t = 200)]
    policies: usize,
    /// Namespaces; every other one is in the mesh (istio.io/dataplane-mode=ambient).
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Fake Nodes the pods are bound to (node-1, the agent's, gets none).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Requests in flight while creating objects.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let plan = Plan::new(args)?;
    crate::setup::run(true)?;
    println!("building warren (release)...");
    let bin_dir = crate::build(crate::Profile::Release)?;
    // SAFETY: xtask has spawned no thread yet (only child processes, waited
    // for), so no one reads the environment concurrently. harness::binary()
    // reads this variable to find the release builds.
    unsafe { std::env::set_var("WARREN_BIN_DIR", &bin_dir) };
    let ticks_per_second = procfs::clock_ticks()?;

    // Dropped in reverse: the agent, then the control plane, then the lab.
    let lab = Lab::up(LabSpec {
        nodes: 1,
        pods_per_node: 0,
    })?;
    println!("starting the control plane (Kubernetes 1.20)...");
    let mut cp = ControlPlane::start(&lab)?;
    cp.apply(RBAC).context("the agent's RBAC")?;
    cp.apply(ISTIO_CRDS).context("Istio's CRDs")?;
    let dir = lab::files_dir(lab.prefix()).join("bench-discovery");
    fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("agent.kubeconfig");
    cp.agent_kubeconfig("warren-system", "warren-agent", &kubeconfig)?;
    let results_dir = crate::workspace_root().join("target/bench");
    fs::create_dir_all(&results_dir)?;
    let node = lab.node(0);
    let mut agent = AgentProcess::start(
        node,
        &kube_agent_config(node, &kubeconfig),
        &dir,
        &results_dir.join("discovery-agent.log"),
        ticks_per_second,
    )?;
    agent.wait_for(READY_TIMEOUT, "warren agent ready", |l| {
        message(l) == "warren agent ready"
    })?;
    // Whatever it does once at start (first publish, certificates) is over.
    thread::sleep(Duration::from_secs(2));
    let baseline = agent.usage()?;
    println!(
        "agent ready on an empty cluster: RSS {:.1} MiB, CPU {:.2} s",
        mib(baseline.rss_kib),
        baseline.cpu_s
    );

    let client = cp.client();
    let skeleton_start = Instant::now();
    cp.block_on(register_nodes(&client, node, &plan))?;
    cp.block_on(create_namespaces(&client, &plan))?;
    let skeleton = skeleton_start.elapsed();
    let slices = SliceTally::watch(&cp, plan.expected_endpoints());

    println!(
        "creating {} services, {} policies, {} pods ({} requests in flight)...",
        plan.services, plan.policies, plan.pods, plan.concurrency
    );
    let creation = Creation::run(&cp, &plan)?;
    let created_at = Timestamp::now();
    let service_ports = cp.block_on(count_service_ports(&client))?;
    let expected = Expected {
        workloads: plan.mesh_pods(),
        service_ports,
        policies: plan.policies,
    };
    println!(
        "created in {:.1} s; waiting for the agent ({} workloads, {} service ports, {} policies)...",
        creation.total().as_secs_f64(),
        expected.workloads,
        expected.service_ports,
        expected.policies
    );
    let convergence = Convergence::wait(&mut agent, &slices, &expected, created_at)?;
    let loaded = agent.usage()?;
    slices.stop();
    let refused = agent.policy_errors();
    ensure!(
        refused.is_empty(),
        "the agent refused policies the bench meant as valid: {refused:?}"
    );

    println!("forcing a relist: API server killed, etcd compacted, API server restarted...");
    let relist = Relist::run(&mut cp, &mut agent, &expected)?;
    let bench = started.elapsed();

    let report = Report {
        plan: &plan,
        expected: &expected,
        skeleton,
        creation: &creation,
        convergence: &convergence,
        baseline,
        loaded,
        relist: &relist,
        bench,
    };
    report.print();
    let path = results_dir.join("discovery.json");
    fs::write(&path, serde_json::to_string_pretty(&report.to_json())?)?;
    println!("\nresults: {}", path.display());
    println!("agent log: {}", agent.log.path.display());
    drop(agent);
    drop(cp);
    drop(lab);
    Ok(())
}

/// What the bench creates, derived from the arguments, object by object.
///
/// Namespace `i` is `bench-NNN`, in the mesh when `i` is even. Service `s` is `svc-J` in
/// namespace `s % N` (`J = s / N`), selecting `app: app-J`. Pod `p` is in namespace
/// `p % N`, labelled with one of its namespace's Service apps (round robin), bound to fake
/// node `p % nodes`, with address 10.128.0.0 + p + 1. Policy `q` is in namespace
/// `(q / 2) % N`: a PeerAuthentication when `q` is even, else an AuthorizationPolicy.
#[derive(Debug)]
struct Plan {
    pods: usize,
    services: usize,
    policies: usize,
    namespaces: usize,
    nodes: usize,
    concurrency: usize,
}

impl Plan {
    fn new(args: &Args) -> Result<Self> {
        ensure!(args.namespaces > 0, "--namespaces must be at least 1");
        ensure!(args.nodes > 0, "--nodes must be at least 1");
        ensure!(args.concurrency > 0, "--concurrency must be at least 1");
        ensure!(
            args.pods <= MAX_PODS,
            "--pods: at most {MAX_PODS} (addresses)"
        );
        Ok(Self {
            pods: args.pods,
            services: args.services,
            policies: args.policies,
            namespaces: args.namespaces,
            nodes: args.nodes,
            concurrency: args.concurrency,
        })
    }

    fn namespace(&self, i: usize) -> String {
        format!("bench-{i:03}")
    }

    fn namespace_in_mesh(i: usize) -> bool {
        i.is_multiple_of(2)
    }

    /// How many Services namespace `i` has.
    fn services_in(&self, i: usize) -> usize {
        self.services / self.namespaces + usize::from(i < self.services % self.namespaces)
    }

    fn fake_node(&self, i: usize) -> String {
        format!("fake-node-{:02}", i + 1)
    }

    fn fake_node_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 20, (i / 250) as u8, (i % 250 + 1) as u8)
    }

    fn pod_ip(p: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(POD_ADDRESSES) + p as u32 + 1)
    }

    /// The app label of pod `p`: one of its namespace's Services selects it.
    fn pod_app(&self, p: usize) -> String {
        let namespace = p % self.namespaces;
        match self.services_in(namespace) {
            0 => "loner".into(),
            apps => format!("app-{}", (p / self.namespaces) % apps),
        }
    }

    fn mesh_pods(&self) -> usize {
        (0..self.pods)
            .filter(|p| Self::namespace_in_mesh(p % self.namespaces))
            .count()
    }

    /// Ready endpoints over all EndpointSlices once the controller manager is done: each
    /// pod whose namespace has Services is selected by exactly one.
    fn expected_endpoints(&self) -> usize {
        (0..self.pods)
            .filter(|p| self.services_in(p % self.namespaces) > 0)
            .count()
    }

    fn pod(&self, p: usize) -> (String, String, Value) {
        let namespace = self.namespace(p % self.namespaces);
        let app = self.pod_app(p);
        let name = format!("{app}-7d9f8c6b5-{p:05}");
        let object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app": app, "version": "v1", "pod-template-hash": "7d9f8c6b5"},
                "annotations": {"kubectl.kubernetes.io/default-container": "app"},
            },
            "spec": {
                "nodeName": self.fake_node(p % self.nodes),
                "serviceAccountName": "default",
                "containers": [{
                    "name": "app",
                    "image": format!("registry.example/bench/{app}:1.0"),
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "grpc", "containerPort": 9090},
                    ],
                    "env": [{
                        "name": "POD_NAME",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                    }],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "livenessProbe": {"tcpSocket": {"port": 8080}},
                    "resources": {
                        "requests": {"cpu": "10m", "memory": "32Mi"},
                        "limits": {"memory": "64Mi"},
                    },
                }],
            },
        });
        (namespace, name, object)
    }

    fn service(&self, s: usize) -> (String, Value) {
        let namespace = self.namespace(s % self.namespaces);
        let j = s / self.namespaces;
        let mut ports = vec![json!({"name": "http", "port": 80, "targetPort": "http"})];
        // Some Services have a second port, as many do.
        if j.is_multiple_of(4) {
            ports.push(json!({"name": "grpc", "port": 9090, "targetPort": "grpc"}));
        }
        let object = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": format!("svc-{j}"), "namespace": namespace, "labels": {"app": format!("app-{j}")}},
            "spec": {"selector": {"app": format!("app-{j}")}, "ports": ports},
        });
        (namespace, object)
    }

    /// Policy `q`: valid, of every shape warren reads at L4.
    fn policy(&self, q: usize) -> Value {
        let slot = q / 2;
        let i = slot % self.namespaces;
        let round = slot / self.namespaces;
        let namespace = self.namespace(i);
        let apps = self.services_in(i).max(1);
        let app = format!("app-{}", round % apps);
        let neighbour = self.namespace((i + 1) % self.namespaces);
        let (kind, spec) = if q.is_multiple_of(2) {
            let spec = if round == 0 {
                // One namespace-wide mode per namespace, as Istio expects.
                json!({"mtls": {"mode": if i % 4 < 2 { "STRICT" } else { "PERMISSIVE" }}})
            } else {
                json!({
                    "selector": {"matchLabels": {"app": app}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
                })
            };
            ("PeerAuthentication", spec)
        } else {
            let spec = match (i + round) % 3 {
                0 => json!({
                    "selector": {"matchLabels": {"app": app}},
                    "action": "ALLOW",
                    "rules": [{
                        "from": [
                            {"source": {"principals": [format!("cluster.local/ns/{neighbour}/sa/default")]}},
                            {"source": {"namespaces": [namespace]}},
                        ],
                        "to": [{"operation": {"ports": ["8080"]}}],
                    }],
                }),
                1 => json!({
                    "action": "DENY",
                    "rules": [{
                        "from": [{"source": {"ipBlocks": ["192.168.0.0/16"], "notNamespaces": [namespace]}}],
                        "when": [{"key": "destination.port", "values": ["9090"]}],
                    }],
                }),
                _ => json!({
                    "selector": {"matchLabels": {"app": app}},
                    "action": "AUDIT",
                    "rules": [{"to": [{"operation": {"notPorts": ["9090"]}}]}],
                }),
            };
            ("AuthorizationPolicy", spec)
        };
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": kind,
            "metadata": {"name": format!("{}-{round}", kind.to_lowercase()), "namespace": namespace},
            "spec": spec,
        })
    }
}

/// What the agent publishes once it has everything.
struct Expected {
    workloads: usize,
    service_ports: usize,
    policies: usize,
}

impl Expected {
    fn matches(&self, line: &Value) -> bool {
        let count = |field: &str| line[field].as_u64().map(|n| n as usize);
        count("workloads") == Some(self.workloads)
            && count("service_ports") == Some(self.service_ports)
            && count("policies") == Some(self.policies)
    }
}

/// node-1 (the lab's, the agent's) and the fake nodes, registered and Ready as a kubelet
/// would make them: the EndpointSlice controller skips pods whose Node it does not know.
async fn register_nodes(client: &kube::Client, node_1: &Node, plan: &Plan) -> Result<()> {
    let mut nodes = vec![(node_1.name.clone(), node_1.ip)];
    nodes.extend((0..plan.nodes).map(|i| (plan.fake_node(i), Plan::fake_node_ip(i))));
    let api: Api<KubeNode> = Api::all(client.clone());
    let now = now();
    let api = &api;
    let now = &now;
    let nodes = &nodes;
    run_all(nodes.len(), plan.concurrency, move |i| async move {
        let (name, ip) = &nodes[i];
        let node: KubeNode = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            },
        }))?;
        create(|| format!("Node {name}"), api, &node).await?;
        let status = json!({"status": {
            "addresses": [
                {"type": "InternalIP", "address": ip.to_string()},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "a fake node of cargo xtask bench-discovery",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }});
        let status = &status;
        retry(
            || format!("reporting the status of Node {name}"),
            move || async move {
                api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                    .await
            },
        )
        .await
        .map(drop)
    })
    .await
}

/// The namespaces, labelled, and then waits until the controller manager has made each
/// one's `default` service account and its token, which Pod admission needs.
async fn create_namespaces(client: &kube::Client, plan: &Plan) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let api = &api;
    run_all(plan.namespaces, plan.concurrency, move |i| async move {
        let mut labels = json!({"team": format!("team-{}", i % 7)});
        if Plan::namespace_in_mesh(i) {
            labels["istio.io/dataplane-mode"] = "ambient".into();
        }
        let name = plan.namespace(i);
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
        create(|| format!("Namespace {name}"), api, &namespace).await
    })
    .await?;
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    let deadline = Instant::now() + REQUEST_PATIENCE;
    loop {
        let listed = accounts
            .list(&ListParams::default().fields("metadata.name=default"))
            .await?;
        let ready = listed
            .iter()
            .filter(|sa| {
                sa.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with("bench-"))
                    && sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
            })
            .count();
        if ready == plan.namespaces {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the controller manager made {ready} of {} namespaces' service-account tokens in \
             {REQUEST_PATIENCE:?}",
            plan.namespaces
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long each kind took to create.
struct Creation {
    services: Duration,
    policies: Duration,
    pods: Duration,
    /// Requests refused for a moment and sent again.
    retries: usize,
}

static RETRIES: AtomicUsize = AtomicUsize::new(0);

impl Creation {
    /// Services first, then policies, then Pods (the bulk): as in a cluster coming up, the
    /// EndpointSlice controller follows Pods becoming ready.
    fn run(cp: &ControlPlane, plan: &Plan) -> Result<Self> {
        let client = cp.client();
        let client = &client;
        let start = Instant::now();
        cp.block_on(run_all(
            plan.services,
            plan.concurrency,
            move |s| async move {
                let (namespace, object) = plan.service(s);
                let service: Service = serde_json::from_value(object)?;
                let api = Api::namespaced(client.clone(), &namespace);
                create(|| format!("Service {s}"), &api, &service).await
            },
        ))?;
        let services = start.elapsed();
        println!("  services: {:.1} s", services.as_secs_f64());

        let start = Instant::now();
        let resources = ["PeerAuthentication", "AuthorizationPolicy"].map(|kind| {
            ApiResource::from_gvk(&GroupVersionKind::gvk("security.istio.io", "v1", kind))
        });
        let resources = &resources;
        cp.block_on(run_all(
            plan.policies,
            plan.concurrency,
            move |q| async move {
                let policy: DynamicObject = serde_json::from_value(plan.policy(q))?;
                let namespace = policy.metadata.namespace.clone().unwrap_or_default();
                let api = Api::namespaced_with(client.clone(), &namespace, &resources[q % 2]);
                create(|| format!("policy {q}"), &api, &policy).await
            },
        ))?;
        let policies = start.elapsed();
        println!("  policies: {:.1} s", policies.as_secs_f64());

        let start = Instant::now();
        let done = AtomicUsize::new(0);
        let done = &done;
        let step = (plan.pods / 10).max(1);
        cp.block_on(run_all(plan.pods, plan.concurrency, move |p| async move {
            let (namespace, name, object) = plan.pod(p);
            let pod: KubePod = serde_json::from_value(object)?;
            let api: Api<KubePod> = Api::namespaced(client.clone(), &namespace);
            let api = &api;
            create(|| format!("Pod {namespace}/{name}"), api, &pod).await?;
            let status = warren_tests::kubelet::running_status(
                &pod,
                Plan::fake_node_ip(p % plan.nodes),
                Plan::pod_ip(p),
                None,
            );
            let (name, status) = (&name, &status);
            retry(
                || format!("reporting the status of Pod {namespace}/{name}"),
                move || async move {
                    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
                        .await
                },
            )
            .await?;
            let done = done.fetch_add(1, Ordering::Relaxed) + 1;
            if done.is_multiple_of(step) {
                let elapsed = start.elapsed().as_secs_f64();
                println!(
                    "  pods: {done}/{} in {elapsed:.1} s ({:.0}/s)",
                    plan.pods,
                    done as f64 / elapsed
                );
            }
            Ok(())
        }))?;
        let pods = start.elapsed();
        Ok(Self {
            services,
            policies,
            pods,
            retries: RETRIES.load(Ordering::Relaxed),
        })
    }

    fn total(&self) -> Duration {
        self.services + self.policies + self.pods
    }
}

/// Runs `make(0..count)` with at most `concurrency` in flight; stops at the first error.
async fn run_all<F, Fut>(count: usize, concurrency: usize, make: F) -> Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    futures::stream::iter(0..count)
        .map(make)
        .buffer_unordered(concurrency)
        .try_for_each(|()| async { Ok(()) })
        .await
}

/// Creates `object`; one that exists already (a retried create that had gone through) is
/// fine.
async fn create<K>(what: impl Fn() -> String, api: &Api<K>, object: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    retry(
        || format!("creating {}", what()),
        move || async move {
            match api.create(&PostParams::default(), object).await {
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
                result => result.map(drop),
            }
        },
    )
    .await
}

/// Sends a request again, for [`REQUEST_PATIENCE`], while the API server refuses it for a
/// moment (overload, a namespace's token not made yet, a connection reset); counted in
/// [`RETRIES`].
async fn retry<T, F, Fut>(what: impl Fn() -> String, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let overloaded = |err: &kube::Error| match err {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    };
    let counted = || {
        RETRIES.fetch_add(1, Ordering::Relaxed);
    };
    controlplane::retry_while(REQUEST_PATIENCE, overloaded, counted, what, attempt).await
}

/// Service ports as the agent counts them: each TCP port of each Service with a cluster
/// IP (the `kubernetes` Service's too).
async fn count_service_ports(client: &kube::Client) -> Result<usize> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(services
        .iter()
        .filter_map(|s| s.spec.as_ref())
        .filter(|spec| spec.type_.as_deref() != Some("ExternalName"))
        .filter(|spec| {
            spec.cluster_ip
                .as_deref()
                .is_some_and(|ip| ip.parse::<Ipv4Addr>().is_ok())
        })
        .map(|spec| {
            spec.ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .count()
        })
        .sum())
}

/// Ready endpoints over the bench's EndpointSlices, from a watch of the bench's own: when
/// the controller manager has finished is part of when the agent can have.
struct SliceTally {
    state: Arc<Mutex<SliceState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct SliceState {
    by_slice: HashMap<String, usize>,
    ready: usize,
    expected: usize,
    /// When `ready` first reached `expected`.
    complete: Option<Timestamp>,
}

impl SliceTally {
    fn watch(cp: &ControlPlane, expected: usize) -> Self {
        let state = Arc::new(Mutex::new(SliceState {
            expected,
            ..Default::default()
        }));
        // 1.20 serves discovery.k8s.io/v1beta1 only.
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "discovery.k8s.io",
            "v1beta1",
            "EndpointSlice",
        ));
        let api: Api<DynamicObject> = Api::all_with(cp.client(), &resource);
        let shared = state.clone();
        let task = cp.handle().spawn(async move {
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let (slice, ready) = match event {
                    Ok(watcher::Event::Apply(slice) | watcher::Event::InitApply(slice)) => {
                        let ready = ready_endpoints(&slice);
                        (slice, ready)
                    }
                    Ok(watcher::Event::Delete(slice)) => (slice, 0),
                    _ => continue,
                };
                let Some(namespace) = slice
                    .metadata
                    .namespace
                    .as_deref()
                    .filter(|n| n.starts_with("bench-"))
                else {
                    continue;
                };
                let key = format!("{namespace}/{}", slice.metadata.name.unwrap_or_default());
                let mut state = lock(&shared);
                let before = state.by_slice.insert(key, ready).unwrap_or(0);
                state.ready = state.ready + ready - before;
                if state.ready == state.expected && state.complete.is_none() {
                    state.complete = Some(Timestamp::now());
                }
            }
        });
        Self { state, task }
    }

    /// (ready endpoints now, when they first were all there).
    fn progress(&self) -> (usize, Option<Timestamp>) {
        let state = lock(&self.state);
        (state.ready, state.complete)
    }

    fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SliceTally {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Endpoints of a slice that are ready (no condition counts as ready, as the API says).
fn ready_endpoints(slice: &DynamicObject) -> usize {
    slice.data["endpoints"].as_array().map_or(0, |endpoints| {
        endpoints
            .iter()
            .filter(|e| e["conditions"]["ready"] != false)
            .count()
    })
}

/// From the end of creation until the agent had it all.
struct Convergence {
    /// The first "published the mesh" with every mesh pod, Service port and policy.
    all_published: f64,
    /// The controller manager's last EndpointSlice write the bench saw.
    slices_complete: f64,
    /// The agent's last "published the mesh" before [`QUIET`].
    settled: f64,
    /// "published the mesh" lines from the end of creation to settling.
    publishes: usize,
}

impl Convergence {
    fn wait(
        agent: &mut AgentProcess,
        slices: &SliceTally,
        expected: &Expected,
        created_at: Timestamp,
    ) -> Result<Self> {
        let full = agent.wait_for(CONVERGE_TIMEOUT, "the whole mesh published", |l| {
            message(l) == "published the mesh" && expected.matches(l)
        })?;
        let all_published = seconds(created_at, timestamp(&full)?);
        println!("  agent published the whole mesh after {all_published:.1} s");
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        let slices_done = loop {
            let (ready, complete) = slices.progress();
            if let Some(complete) = complete {
                break complete;
            }
            ensure!(
                Instant::now() < deadline,
                "the EndpointSlices list {ready} ready endpoints of {} after {CONVERGE_TIMEOUT:?}",
                lock(&slices.state).expected
            );
            thread::sleep(POLL);
        };
        let slices_complete = seconds(created_at, slices_done);
        println!("  EndpointSlices complete after {slices_complete:.1} s");
        let last = agent.settle(slices_done)?;
        ensure!(
            expected.matches(&last),
            "the agent's last publish does not have the whole mesh: {last}"
        );
        let publishes = agent
            .lines_since(created_at)
            .filter(|l| message(l) == "published the mesh")
            .count();
        Ok(Self {
            all_published,
            slices_complete,
            settled: seconds(created_at, timestamp(&last)?),
            publishes,
        })
    }
}

/// The watches forced to list again, and what it cost.
struct Relist {
    /// Kill to ready (with etcd compacted in between).
    restart: f64,
    compacted_revision: i64,
    /// Per kind: the relist as the agent logged it.
    kinds: BTreeMap<&'static str, KindRelist>,
    /// From the API server ready to the last kind listed again; None if some never did.
    all_listed: Option<f64>,
    /// The "published the mesh" after the relist, if the mesh changed (else the builder
    /// publishes nothing: the view did not change).
    published: Option<Value>,
    /// Seconds from the API server ready of each "published the mesh" after it.
    publish_times: Vec<f64>,
    cpu_s: f64,
    peak_rss_kib: u64,
    rss_kib: u64,
}

#[derive(Default)]
struct KindRelist {
    /// "cannot watch the API server" while it was down and after.
    failures: usize,
    /// Of which 403 Forbidden: the restarted API server's authorizer not caught up yet.
    forbidden: usize,
    /// Whether one was 410 Gone (etcd compacted past the watch's resourceVersion).
    gone: bool,
    /// Seconds from the API server ready (negative: before) of the last failure.
    last_failure: Option<f64>,
    last_error: Option<String>,
    /// Seconds from the API server ready: the watch worked again (the relist began).
    watching_again: Option<f64>,
    /// Seconds from the API server ready: "listed again".
    listed_again: Option<f64>,
    objects: Option<u64>,
}

impl KindRelist {
    /// Each kind's failures and relist, from the agent's log since the kill; times in
    /// seconds from `ready_at`.
    fn from_log(
        agent: &AgentProcess,
        killed_at: Timestamp,
        ready_at: Timestamp,
    ) -> BTreeMap<&'static str, KindRelist> {
        let mut kinds: BTreeMap<&'static str, KindRelist> =
            KINDS.iter().map(|&k| (k, KindRelist::default())).collect();
        for line in agent.lines_since(killed_at) {
            let Some(kind) = kinds.get_mut(line["kind"].as_str().unwrap_or_default()) else {
                continue;
            };
            let at = || timestamp(line).map(|t| seconds(ready_at, t)).ok();
            match message(line) {
                "cannot watch the API server; serving the last view of the mesh, retrying" => {
                    let error = line["error"].as_str().unwrap_or_default();
                    kind.failures += 1;
                    kind.forbidden += usize::from(error.contains("Forbidden"));
                    kind.gone |= error.contains("too old resource version")
                        || error.contains("Expired")
                        || error.contains("410");
                    kind.last_failure = at();
                    kind.last_error = Some(error.to_owned());
                }
                "watching the API server again" => kind.watching_again = at(),
                "listed again" => {
                    kind.listed_again = at();
                    kind.objects = line["objects"].as_u64();
                }
                _ => {}
            }
        }
        kinds
    }
}

impl Relist {
    fn run(cp: &mut ControlPlane, agent: &mut AgentProcess, expected: &Expected) -> Result<Self> {
        let before = agent.usage()?;
        agent.reset_peak()?;
        let killed_at = Timestamp::now();
        let restart = Instant::now();
        cp.kill_apiserver()?;
        let compacted_revision = cp.compact_etcd()?;
        cp.restart_apiserver()?;
        let ready_at = Timestamp::now();
        let restart = restart.elapsed().as_secs_f64();
        println!("  API server ready again after {restart:.1} s");

        // Each kind either gets 410 Gone and lists again, or resumes its watch, which
        // the agent does not log: a kind that failed for other reasons only, and then
        // no more for longer than the longest backoff, has resumed.
        let deadline = Instant::now() + RELIST_TIMEOUT;
        let kinds = loop {
            agent.poll()?;
            let kinds = KindRelist::from_log(agent, killed_at, ready_at);
            let now = seconds(ready_at, Timestamp::now());
            let done = kinds.values().all(|k| {
                k.listed_again.is_some()
                    || (!k.gone
                        && now - k.last_failure.unwrap_or(0.0) > RESUMED_AFTER.as_secs_f64())
            });
            if done || Instant::now() > deadline {
                break kinds;
            }
            thread::sleep(POLL);
        };
        let all_listed = kinds
            .values()
            .filter_map(|k| k.listed_again)
            .reduce(f64::max);
        let last = agent.settle(Timestamp::now())?;
        let publish_times: Vec<f64> = agent
            .lines_since(ready_at)
            .filter(|l| message(l) == "published the mesh")
            .filter_map(|l| timestamp(l).ok())
            .map(|t| seconds(ready_at, t))
            .collect();
        let published = (!publish_times.is_empty()).then_some(last);
        if let Some(published) = &published {
            ensure!(
                expected.matches(published),
                "after the relist the agent published another mesh: {published}"
            );
        }
        let after = agent.usage()?;
        Ok(Self {
            restart,
            compacted_revision,
            kinds,
            all_listed,
            published,
            publish_times,
            cpu_s: after.cpu_s - before.cpu_s,
            peak_rss_kib: after.hwm_kib,
            rss_kib: after.rss_kib,
        })
    }
}

/// The agent, run as `Daemon::start` does but at the log level the bench reads; killed on
/// drop.
struct AgentProcess {
    child: Child,
    log: AgentLog,
    ticks_per_second: f64,
}

impl AgentProcess {
    fn start(
        node: &Node,
        config: &str,
        dir: &Path,
        log: &Path,
        ticks_per_second: f64,
    ) -> Result<Self> {
        let config_path = dir.join("agent.yaml");
        fs::write(&config_path, config)?;
        let log_file =
            fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = node
            .try_command(binary("warren")?)?
            .args(["agent", "--config"])
            .arg(&config_path)
            .args(["--log-format", "json", "--log-level", LOG_LEVEL])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the agent")?;
        Ok(Self {
            child,
            log: AgentLog::new(log),
            ticks_per_second,
        })
    }

    /// Reads what the agent logged since the last call; fails if it exited.
    fn poll(&mut self) -> Result<()> {
        self.log.read()?;
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the agent exited ({status}); its log: {}",
                self.log.path.display()
            );
        }
        Ok(())
    }

    /// Waits for a line (logged at any time) matching `pred`.
    fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if let Some(line) = self.log.lines.iter().find(|l| pred(l)) {
                return Ok(line.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not log {what} within {timeout:?}; its log: {}",
                    self.log.path.display()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until the agent published nothing for [`QUIET`] after `since`; returns its
    /// last "published the mesh".
    fn settle(&mut self, since: Timestamp) -> Result<Value> {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            self.poll()?;
            let last = self
                .log
                .lines
                .iter()
                .rev()
                .find(|l| message(l) == "published the mesh")
                .context("the agent never published the mesh")?
                .clone();
            let last_at = timestamp(&last)?.max(since);
            if seconds(last_at, Timestamp::now()) >= QUIET.as_secs_f64() {
                return Ok(last);
            }
            ensure!(
                Instant::now() < deadline,
                "the agent kept publishing for {CONVERGE_TIMEOUT:?}"
            );
            thread::sleep(POLL);
        }
    }

    /// The lines logged at or after `since` (lines come in time order).
    fn lines_since(&self, since: Timestamp) -> impl Iterator<Item = &Value> {
        let lines = &self.log.lines;
        let start = lines.partition_point(|l| timestamp(l).is_ok_and(|t| t < since));
        lines[start..].iter()
    }

    /// What the agent logged about policies it refused.
    fn policy_errors(&self) -> Vec<String> {
        self.log
            .lines
            .iter()
            .filter(|l| message(l).starts_with("policy refused"))
            .map(Value::to_string)
            .collect()
    }

    fn usage(&self) -> Result<Usage> {
        let pid = self.child.id();
        Ok(Usage {
            rss_kib: procfs::status_kib(pid, "VmRSS")?,
            hwm_kib: procfs::status_kib(pid, "VmHWM")?,
            cpu_s: procfs::cpu_ticks(pid)? as f64 / self.ticks_per_second,
        })
    }

    /// Starts VmHWM again from the current RSS, to see the peak of what follows.
    fn reset_peak(&self) -> Result<()> {
        let path = format!("/proc/{}/clear_refs", self.child.id());
        fs::write(&path, "5").with_context(|| format!("writing 5 to {path}"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's JSON log, read as it grows.
struct AgentLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    lines: Vec<Value>,
}

impl AgentLog {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        }
    }

    fn read(&mut self) -> Result<()> {
        let mut file = fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        // A line is complete once its newline is there.
        if let Some(end) = self.partial.rfind('\n') {
            let rest = self.partial.split_off(end + 1);
            let complete = std::mem::replace(&mut self.partial, rest);
            self.lines.extend(
                complete
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok()),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    rss_kib: u64,
    hwm_kib: u64,
    cpu_s: f64,
}

fn message(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

fn timestamp(line: &Value) -> Result<Timestamp> {
    let text = line["timestamp"]
        .as_str()
        .with_context(|| format!("a log line without timestamp: {line}"))?;
    text.parse()
        .with_context(|| format!("log timestamp {text:?}"))
}

/// Seconds from `from` to `to` (negative if `to` is earlier).
fn seconds(from: Timestamp, to: Timestamp) -> f64 {
    (to.as_nanosecond() - from.as_nanosecond()) as f64 / 1e9
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a timestamp serializes")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

struct Report<'a> {
    plan: &'a Plan,
    expected: &'a Expected,
    skeleton: Duration,
    creation: &'a Creation,
    convergence: &'a Convergence,
    baseline: Usage,
    loaded: Usage,
    relist: &'a Relist,
    bench: Duration,
}

impl Report<'_> {
    fn per_thousand_pods(&self, delta: f64) -> f64 {
        delta / (self.plan.pods.max(1) as f64 / 1000.0)
    }

    fn print(&self) {
        let plan = self.plan;
        let c = self.creation;
        let v = self.convergence;
        let r = self.relist;
        println!(
            "\ndiscovery at scale: {} pods ({} in the mesh) on {} fake nodes, {} namespaces, \
             {} services ({} service ports, {} endpoints), {} policies",
            plan.pods,
            self.expected.workloads,
            plan.nodes,
            plan.namespaces,
            plan.services,
            self.expected.service_ports,
            plan.expected_endpoints(),
            plan.policies
        );
        println!(
            "\ncreation ({} requests in flight, {} retried)",
            plan.concurrency, c.retries
        );
        let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
        let row = |label: &str, seconds: f64, note: String| {
            println!("  {label:<44}{seconds:>9.2} s  {note}");
        };
        row(
            "namespaces and nodes (before the clock)",
            self.skeleton.as_secs_f64(),
            String::new(),
        );
        row(
            "services",
            c.services.as_secs_f64(),
            format!("{:.0}/s", rate(plan.services, c.services)),
        );
        row(
            "policies",
            c.policies.as_secs_f64(),
            format!("{:.0}/s", rate(plan.policies, c.policies)),
        );
        row(
            "pods (create + status)",
            c.pods.as_secs_f64(),
            format!("{:.0} pods/s", rate(plan.pods, c.pods)),
        );
        row("total", c.total().as_secs_f64(), String::new());
        println!("\nagent convergence, from the end of creation");
        row(
            "whole mesh published (pods, ports, policies)",
            v.all_published,
            String::new(),
        );
        row(
            "EndpointSlices complete in the API",
            v.slices_complete,
            String::new(),
        );
        row(
            "settled (last publish)",
            v.settled,
            format!("{} publishes", v.publishes),
        );
        let (b, l) = (self.baseline, self.loaded);
        println!(
            "\n{:<30}{:>12}{:>12}{:>12}{:>16}",
            "agent", "empty", "loaded", "delta", "per 1000 pods"
        );
        let cost = |label: &str, base: f64, loaded: f64| {
            let delta = loaded - base;
            println!(
                "  {label:<28}{base:>12.2}{loaded:>12.2}{delta:>12.2}{:>16.2}",
                self.per_thousand_pods(delta)
            );
        };
        cost("RSS (MiB)", mib(b.rss_kib), mib(l.rss_kib));
        cost("peak RSS, VmHWM (MiB)", mib(b.hwm_kib), mib(l.hwm_kib));
        cost("CPU time (s)", b.cpu_s, l.cpu_s);

        println!(
            "\nrelist: API server killed, etcd compacted (revision {}), restarted",
            r.compacted_revision
        );
        row("API server kill to ready", r.restart, String::new());
        if let Some(all) = r.all_listed {
            row(
                "ready to the last relisting kind listed again",
                all,
                "(includes the watches' backoff)".into(),
            );
        }
        println!(
            "  {:<20}{:>8}{:>14}{:>6}{:>13}{:>14}{:>9}",
            "kind", "objects", "failures", "410", "watch again", "listed again", "list"
        );
        let secs = |s: Option<f64>| s.map_or_else(|| "-".to_owned(), |s| format!("{s:.2} s"));
        for (kind, k) in &r.kinds {
            let list = k.watching_again.zip(k.listed_again).map(|(a, b)| b - a);
            let listed = match k.listed_again {
                Some(_) => secs(k.listed_again),
                None if !k.gone => "resumed".to_owned(),
                None => "never".to_owned(),
            };
            println!(
                "  {kind:<20}{:>8}{:>14}{:>6}{:>13}{:>14}{:>9}",
                k.objects.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                if k.forbidden > 0 {
                    format!("{} ({} 403)", k.failures, k.forbidden)
                } else {
                    k.failures.to_string()
                },
                if k.gone { "yes" } else { "no" },
                secs(k.watching_again),
                listed,
                secs(list)
            );
        }
        println!(
            "  (times from the API server ready; \"resumed\": its watch went on from where it \
             was, no 410 and no list)"
        );
        match &r.published {
            Some(line) => println!(
                "  published again {} time(s), first {:.2} s, last {:.2} s after ready: \
                 workloads {}, service ports {} (as before)",
                r.publish_times.len(),
                r.publish_times[0],
                r.publish_times[r.publish_times.len() - 1],
                line["workloads"],
                line["service_ports"]
            ),
            None => println!("  published again: no (the mesh had not changed)"),
        }
        row("CPU time of the relist", r.cpu_s, String::new());
        println!(
            "  {:<44}{:>9.1} MiB (RSS after: {:.1} MiB)",
            "peak RSS during the relist",
            mib(r.peak_rss_kib),
            mib(r.rss_kib)
        );
        println!(
            "\nbench took {:.0} s, from the start (setup and release build included) to here",
            self.bench.as_secs_f64()
        );
    }

    fn to_json(&self) -> Value {
        let plan = self.plan;
        let c = self.creation;
        let v = self.convergence;
        let r = self.relist;
        let usage = |u: Usage| json!({"rss_mib": mib(u.rss_kib), "hwm_mib": mib(u.hwm_kib), "cpu_s": u.cpu_s});
        let delta = json!({
            "rss_mib": mib(self.loaded.rss_kib) - mib(self.baseline.rss_kib),
            "hwm_mib": mib(self.loaded.hwm_kib) - mib(self.baseline.hwm_kib),
            "cpu_s": self.loaded.cpu_s - self.baseline.cpu_s,
        });
        let per_1000 = json!({
            "rss_mib": self.per_thousand_pods(delta["rss_mib"].as_f64().unwrap_or_default()),
            "hwm_mib": self.per_thousand_pods(delta["hwm_mib"].as_f64().unwrap_or_default()),
            "cpu_s": self.per_thousand_pods(delta["cpu_s"].as_f64().unwrap_or_default()),
        });
        let kinds: serde_json::Map<String, Value> = r
            .kinds
            .iter()
            .map(|(kind, k)| {
                let value = json!({
                    "objects": k.objects,
                    "watch_failures": k.failures,
                    "forbidden_failures": k.forbidden,
                    "gone_410": k.gone,
                    "last_failure_s": k.last_failure,
                    "last_error": k.last_error,
                    "watching_again_s": k.watching_again,
                    "listed_again_s": k.listed_again,
                });
                ((*kind).to_owned(), value)
            })
            .collect();
        json!({
            "cluster": {
                "pods": plan.pods,
                "mesh_pods": self.expected.workloads,
                "fake_nodes": plan.nodes,
                "namespaces": plan.namespaces,
                "services": plan.services,
                "service_ports": self.expected.service_ports,
                "endpoints": plan.expected_endpoints(),
                "policies": plan.policies,
                "kubernetes": "1.20.2",
            },
            "creation": {
                "concurrency": plan.concurrency,
                "retried_requests": c.retries,
                "namespaces_and_nodes_s": self.skeleton.as_secs_f64(),
                "services_s": c.services.as_secs_f64(),
                "policies_s": c.policies.as_secs_f64(),
                "pods_s": c.pods.as_secs_f64(),
                "total_s": c.total().as_secs_f64(),
            },
            "convergence_from_end_of_creation": {
                "whole_mesh_published_s": v.all_published,
                "endpoint_slices_complete_s": v.slices_complete,
                "settled_s": v.settled,
                "publishes": v.publishes,
            },
            "agent": {
                "empty_cluster": usage(self.baseline),
                "loaded": usage(self.loaded),
                "delta": delta,
                "per_1000_pods": per_1000,
            },
            "relist": {
                "apiserver_kill_to_ready_s": r.restart,
                "compacted_revision": r.compacted_revision,
                "last_relisting_kind_listed_again_s_after_ready": r.all_listed,
                "kinds": kinds,
                "published_again": r.published,
                "published_again_s_after_ready": r.publish_times,
                "cpu_s": r.cpu_s,
                "peak_rss_mib": mib(r.peak_rss_kib),
                "rss_after_mib": mib(r.rss_kib),
            },
            "bench_s": self.bench.as_secs_f64(),
        })
    }
}
