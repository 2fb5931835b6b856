//! A Kubernetes cluster in the lab: a real control plane ([`ControlPlane`]),
//! the stand-in kubelet ([`Kubelet`]) and a warren agent per node in
//! Kubernetes mode, talking to the API server with the token of the service
//! account `deploy/kustomize/base/agent/rbac.yaml` makes. Shared by the end-to-end tests and
//! `cargo xtask demo`. Its methods panic, saying what failed: it is test
//! support.

use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::{
    Lab,
    controlplane::ControlPlane,
    harness::{Agent, LogLine, PATIENCE, kube_agent_config, test_lab},
    kubelet::Kubelet,
    lab::{self, Pod},
};

/// The agents' RBAC, as deployed.
pub const RBAC: &str = concat!(
    include_str!("../../deploy/kustomize/base/namespace.yaml"),
    "---
",
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
        let lab = test_lab(nodes, 0);
        let cp = ControlPlane::start(&lab).expect("control plane");
        cp.apply(rbac).expect("agent RBAC");
        if istio_crds {
            cp.apply(ISTIO_CRDS).expect("Istio CRDs");
        }
        let kubelet = Kubelet::start(&lab, &cp).expect("kubelet");
        let dir = lab::files_dir(lab.prefix()).join("agents");
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("agent.kubeconfig");
        cp.agent_kubeconfig("warren-system", "warren-agent", &kubeconfig)
            .expect("agent kubeconfig");
        let agents = lab
            .nodes()
            .iter()
            .map(|node| {
                let config = kube_agent_config(node, &kubeconfig);
                if ready {
                    Agent::start(node, &config, &dir).expect("agent starts")
                } else {
                    Agent::spawn(node, &config, &dir).expect("agent starts")
                }
            })
            .collect();
        Self {
            agents,
            kubelet,
            cp,
            lab,
        }
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
