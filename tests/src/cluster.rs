//! A Kubernetes cluster in the lab: a real control plane ([`ControlPlane`]),
//! the stand-in kubelet ([`Kubelet`]) and a warren agent per node in
//! Kubernetes mode, talking to the API server with the token of the service
//! account `deploy/kustomize/base/agent/rbac.yaml` makes. Shared by the end-to-end tests and
//! `cargo xtask demo`. Its methods panic, saying what failed: it is test
//! support.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use std::time::{Duration, Instant};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Namespace, Pod as KubePod, Service, ServiceAccount},
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::{
    Lab,
    controlplane::ControlPlane,
    harness::{
        Agent, CA_PORT, CaService, HEALTH_PORT, LogLine, PATIENCE, dev_ca_dir, kube_agent_config,
        test_lab,
    },
    kubelet::Kubelet,
    lab::{self, Node, Pod},
};

/// The agents' RBAC, as deployed.
pub const RBAC: &str = concat!(
    include_str!("../../deploy/kustomize/base/namespace.yaml"),
    "---\n",
    include_str!("../../deploy/kustomize/base/agent/rbac.yaml")
);
/// Istio's security CRDs (PeerAuthentication, AuthorizationPolicy).
pub const ISTIO_CRDS: &str =
    include_str!("../../deploy/kustomize/istio-crds/istio-security-crds.yaml");

/// A lab cluster: the control plane, the stand-in kubelet, an agent per node.
/// Fields drop in order: agents, kubelet, control plane, lab.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub kubelet: Kubelet,
    pub cp: ControlPlane,
    pub lab: Lab,
}

impl Cluster {
    pub fn up(nodes: usize) -> Self {
        Self::start(nodes, true)
    }

    /// `istio_crds`: whether Istio's security CRDs are installed.
    pub fn start(nodes: usize, istio_crds: bool) -> Self {
        Self::start_with(nodes, istio_crds, RBAC, true)
    }

    /// With the agents' RBAC `rbac`; `ready`: whether to wait for the agents
    /// to be ready.
    pub fn start_with(nodes: usize, istio_crds: bool, rbac: &str, ready: bool) -> Self {
        let mut cluster = Self::without_agents(nodes, istio_crds, rbac);
        cluster.start_agents(ready, None, kube_agent_config);
        cluster
    }

    /// The control plane (with `rbac` and, if `istio_crds`, Istio's CRDs)
    /// and the kubelet, but no agents yet: see [`start_agents`](Self::start_agents).
    pub fn without_agents(nodes: usize, istio_crds: bool, rbac: &str) -> Self {
        let lab = test_lab(nodes, 0);
        let cp = ControlPlane::start(&lab).expect("control plane");
        cp.apply(rbac).expect("agent RBAC");
        if istio_crds {
            cp.apply(ISTIO_CRDS).expect("Istio CRDs");
        }
        let kubelet = Kubelet::start(&lab, &cp).expect("kubelet");
        Self {
            agents: Vec::new(),
            kubelet,
            cp,
            lab,
        }
    }

    /// Starts an agent on every node, with the config `config(node,
    /// kubeconfig)`, where the kubeconfig holds a token of the agents'
    /// service account; `ready`: whether to wait for each to be ready;
    /// `capabilities`: the only ones the agents get (all root has if None).
    pub fn start_agents(
        &mut self,
        ready: bool,
        capabilities: Option<&[String]>,
        config: impl Fn(&Node, &Path) -> String,
    ) {
        let dir = self.agents_dir();
        let kubeconfig = dir.join("agent.kubeconfig");
        self.cp
            .agent_kubeconfig("warren-system", "warren-agent", &kubeconfig)
            .expect("agent kubeconfig");
        self.agents = self
            .lab
            .nodes()
            .iter()
            .map(|node| {
                let config = config(node, &kubeconfig);
                let mut agent =
                    Agent::spawn_limited(node, &config, &dir, capabilities).expect("agent starts");
                if ready {
                    agent.wait_ready().expect("agent ready");
                }
                agent
            })
            .collect();
    }

    /// Where the agents' configs, kubeconfig and logs go.
    pub fn agents_dir(&self) -> PathBuf {
        let dir = lab::files_dir(self.lab.prefix()).join("agents");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn apply(&self, yaml: &str) {
        self.cp.apply(yaml).expect("apply");
    }

    /// A namespace with service accounts `accounts`, labelled ambient or not.
    pub fn namespace(&self, name: &str, ambient: bool, accounts: &[&str]) {
        let labels = if ambient {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
        ));
        for account in accounts {
            self.apply(&format!(
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {account}, namespace: {name}}}\n"
            ));
        }
    }

    /// Creates a Pod on node `node` (0-based) and waits until the kubelet
    /// has it running. `extra` goes into the container (ports, probes).
    pub fn pod(&self, spec: &PodSpec) -> Pod {
        let labels: Vec<String> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\n\
             spec:\n  nodeName: {}\n  serviceAccountName: {}\n  containers:\n  - name: app\n    \
             image: labpod\n{}",
            spec.name,
            spec.namespace,
            labels.join(", "),
            self.lab.node(spec.node).name,
            spec.account,
            spec.container
        ));
        self.kubelet
            .wait_pod(spec.namespace, spec.name, PATIENCE)
            .expect("pod running")
    }

    pub fn patch_labels<K>(&self, namespace: Option<&str>, name: &str, labels: serde_json::Value)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.cp.client(), namespace.unwrap_or_default());
        self.cp
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": labels}})),
            ))
            .expect("patch labels");
    }

    pub fn label_namespace(&self, name: &str, value: Option<&str>) {
        let api: Api<Namespace> = Api::all(self.cp.client());
        self.cp
            .block_on(api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": value}}})),
            ))
            .expect("label namespace");
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.cp
            .delete("v1", "Pod", Some(namespace), name)
            .expect("delete pod");
    }
}

pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// 0-based.
    pub node: usize,
    pub account: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    /// YAML lines of the container, indented by four spaces.
    pub container: String,
}

impl<'a> PodSpec<'a> {
    pub fn new(namespace: &'a str, name: &'a str, node: usize, account: &'a str) -> Self {
        Self {
            namespace,
            name,
            node,
            account,
            labels: Vec::new(),
            container: String::new(),
        }
    }

    pub fn label(mut self, key: &'a str, value: &'a str) -> Self {
        self.labels.push((key, value));
        self
    }

    pub fn container(mut self, yaml: &str) -> Self {
        self.container = yaml.to_owned();
        self
    }
}

pub fn enrolled(workload: &str) -> impl Fn(&LogLine) -> bool + '_ {
    move |l| {
        l.message() == "enrolled pod: capturing its outbound TCP connections, serving HBONE"
            && l.field("workload") == workload
    }
}

pub fn withdrawn(workload: &str) -> impl Fn(&LogLine) -> bool + '_ {
    move |l| {
        l.message() == "withdrew from pod: its traffic is no longer captured"
            && l.field("workload") == workload
    }
}

/// How many lines of `agent` match `pred` now.
pub fn count(agent: &Agent, pred: impl Fn(&LogLine) -> bool) -> usize {
    agent.lines().iter().filter(|l| pred(l)).count()
}

pub fn addr(pod: &Pod, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(pod.ip, port)
}

/// The ClusterIP of the Service `namespace/name`.
pub fn cluster_ip(cluster: &Cluster, namespace: &str, name: &str) -> Ipv4Addr {
    let api: Api<Service> = Api::namespaced(cluster.cp.client(), namespace);
    let service = cluster.cp.block_on(api.get(name)).expect("service");
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("cluster IP")
        .parse()
        .unwrap()
}

/// The CA's service account and roles, and the trust-bundle ConfigMap, as
/// deployed.
pub const CA_RBAC: &str = concat!(
    include_str!("../../deploy/kustomize/base/namespace.yaml"),
    "---\n",
    include_str!("../../deploy/kustomize/base/ca/rbac.yaml"),
    "---\n",
    include_str!("../../deploy/kustomize/base/trust-bundle.yaml"),
);
/// The audience of the agents' tokens, as deployed.
pub const CA_AUDIENCE: &str = "warren-ca";

/// The capabilities the agent's DaemonSet adds (after dropping ALL).
pub fn agent_capabilities() -> Vec<String> {
    let daemonset: serde_json::Value = serde_yaml::from_str(include_str!(
        "../../deploy/kustomize/base/agent/daemonset.yaml"
    ))
    .expect("the agent's DaemonSet is YAML");
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let agent = containers
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("a container named agent");
    let capabilities = &agent["securityContext"]["capabilities"];
    assert_eq!(capabilities["drop"], json!(["ALL"]), "the agent drops ALL");
    capabilities["add"]
        .as_array()
        .expect("capabilities added")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_owned())
        .collect()
}

/// `warren-ca serve --kubernetes` on node-1 (index 0) of a [`Cluster`], as
/// deployed: its own service account, the agents authenticated by tokens
/// bound to their Pods (one host-network agent Pod per node, as the
/// DaemonSet makes), the roots published in the trust-bundle ConfigMap.
pub struct KubeCa {
    pub service: CaService,
    /// The roots as the agents get them: from the ConfigMap.
    pub trust: PathBuf,
    /// The agents' token files, by node index.
    pub tokens: Vec<PathBuf>,
}

impl Cluster {
    /// Starts the CA on Kubernetes, waits until it has listed the Pods and
    /// published its roots, checks the ConfigMap holds them, and makes each
    /// node's agent Pod and token.
    pub fn start_ca(&self) -> KubeCa {
        self.apply(CA_RBAC);
        let dir = self.agents_dir();
        let kubeconfig = dir.join("ca.kubeconfig");
        self.cp
            .agent_kubeconfig("warren-system", "warren-ca", &kubeconfig)
            .expect("CA kubeconfig");
        let signing = dir.join("ca-signing");
        let mut service = CaService::start_kubernetes(
            self.lab.node(0),
            &kubeconfig,
            &signing,
            &[],
            dir.join("ca.log"),
        )
        .expect("CA starts");
        service
            .wait_for(PATIENCE, |l| l.message() == "pods listed")
            .expect("CA lists pods");
        service
            .wait_for(PATIENCE, |l| l.message() == "published the trust bundle")
            .expect("CA publishes its roots");

        // What the kubelet projects into the agents: the ConfigMap's roots,
        // which must be the CA's.
        let configmaps: Api<ConfigMap> = Api::namespaced(self.cp.client(), "warren-system");
        let published = self
            .cp
            .block_on(configmaps.get("warren-trust-bundle"))
            .expect("trust-bundle ConfigMap");
        let roots = published.data.unwrap_or_default()["roots.pem"].clone();
        assert_eq!(
            roots,
            std::fs::read_to_string(signing.join("root.pem")).unwrap(),
            "the ConfigMap holds the CA's roots"
        );
        let trust = dir.join("trust-roots.pem");
        std::fs::write(&trust, roots).unwrap();

        let tokens = self
            .lab
            .nodes()
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let pod = agent_pod(self, &node.name, &format!("warren-agent-{}", node.name));
                let path = dir.join(format!("token-{i}"));
                std::fs::write(&path, bound_token(&self.cp, &pod, CA_AUDIENCE)).unwrap();
                path
            })
            .collect();
        KubeCa {
            service,
            trust,
            tokens,
        }
    }

    /// Starts the agents in Kubernetes mode with certificates from `ca`, as
    /// deployed: each presents its Pod's token, trusts the ConfigMap's roots,
    /// serves its health endpoints on [`HEALTH_PORT`], and has exactly the
    /// capabilities the DaemonSet grants ([`agent_capabilities`]).
    pub fn start_agents_with_ca(&mut self, ca: &KubeCa) {
        let address = SocketAddrV4::new(self.lab.node(0).ip, CA_PORT);
        let nodes: Vec<String> = self.lab.nodes().iter().map(|n| n.name.clone()).collect();
        let capabilities = agent_capabilities();
        self.start_agents(true, Some(&capabilities), |node, kubeconfig| {
            let i = nodes.iter().position(|n| *n == node.name).unwrap();
            kube_agent_config(node, kubeconfig).replace(
                &format!("devCaDir: {}\n", dev_ca_dir(node).display()),
                &format!(
                    "ca:\n  address: {address}\n  token: {}\ntrustBundle: {}\n\
                     healthListen: {}:{HEALTH_PORT}\n",
                    ca.tokens[i].display(),
                    ca.trust.display(),
                    node.ip
                ),
            )
        });
    }
}

/// A host-network Pod of the agents' service account on `node`, as the
/// DaemonSet makes; waits until it runs.
pub fn agent_pod(cluster: &Cluster, node: &str, name: &str) -> KubePod {
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: warren-system}}\n\
         spec:\n  nodeName: {node}\n  hostNetwork: true\n  serviceAccountName: warren-agent\n  \
         containers:\n  - name: agent\n    image: warren-agent\n"
    ));
    let pods: Api<KubePod> = Api::namespaced(cluster.cp.client(), "warren-system");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let pod = cluster.cp.block_on(pods.get(name)).unwrap();
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") {
            return pod;
        }
        assert!(Instant::now() < deadline, "{name} never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A service-account token for `pod`'s service account, bound to `pod`, for
/// `audience`, an hour long: what the kubelet projects into the agent.
pub fn bound_token(cp: &ControlPlane, pod: &KubePod, audience: &str) -> String {
    let namespace = pod.metadata.namespace.clone().unwrap();
    let account = pod
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .unwrap();
    let api: Api<ServiceAccount> = Api::namespaced(cp.client(), &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let issued: TokenRequest = cp
        .block_on(api.create_subresource("token", &account, &PostParams::default(), &request))
        .unwrap();
    issued.status.unwrap().token
}
