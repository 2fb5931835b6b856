//! The agent's local configuration file: which node this is, the trust domain,
//! where certificates come from, and where the mesh is learnt: the workloads
//! listed in the file itself (how warren runs without Kubernetes: tests, the
//! demo, small installations) or the API server (`kubernetes:`). Either way
//! they feed the same [`crate::mesh`] model.
//!
//! Every error names the file, the field and what is wrong with it; a config
//! that does not validate is never partially applied.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use warren_pki::{
    identity::{DEFAULT_TRUST_DOMAIN, IdentityError, NodeId, SpiffeId, TrustDomain},
    transport::NODE_ROOTS,
};

use crate::mesh::{Cluster, Labels, LocalPod, Workload, policy::DEFAULT_ROOT_NAMESPACE};

pub const DEFAULT_DEV_CA_DIR: &str = "/var/lib/warren/dev-ca";
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/warren";
pub const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shorter lifetimes would renew faster than connections can be set up.
pub const MIN_CERTIFICATE_TTL: Duration = Duration::from_secs(2);
/// Where a DaemonSet passes the node's name (downward API: `spec.nodeName`)
/// when the config file does not name it.
pub const NODE_NAME_ENV: &str = "NODE_NAME";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", path.display())]
    Syntax {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config file {}: {field}: {problem}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The node this agent runs on.
    pub node: String,
    pub trust_domain: TrustDomain,
    /// Where workload certificates come from.
    pub issuer: Issuer,
    /// Roots to trust (PEM, one or more), reloaded when the file changes.
    /// With the development CA, trusted besides its own root.
    pub trust_bundle: Option<PathBuf>,
    /// How long workload certificates live; they are renewed at about half.
    pub certificate_ttl: Duration,
    /// A directory of Istio policy documents (PeerAuthentication,
    /// AuthorizationPolicy), reloaded when it changes.
    pub policy_dir: Option<PathBuf>,
    /// Where mesh-wide policies live.
    pub root_namespace: String,
    /// Where the agent pins its eBPF maps and pods' links (on bpffs), so that
    /// they outlive it.
    pub bpf_pin_dir: PathBuf,
    /// The workloads listed in the file (none with `kubernetes`).
    pub workloads: Vec<Workload>,
    /// Learn the mesh from the API server instead of `workloads`.
    pub kubernetes: Option<KubernetesSettings>,
    /// Where to serve the health endpoints for the kubelet's probes
    /// (`host:port`), if anywhere.
    pub health_listen: Option<String>,
    /// Serve the CNI plugin (`warren-cni`), so that new pods are enrolled
    /// before they run.
    pub cni: Option<CniSettings>,
    /// Where to serve Prometheus metrics (`host:port`), if anywhere.
    pub metrics_listen: Option<String>,
    /// Where to serve the admin endpoint: a loopback address.
    pub admin_listen: String,
    /// The cluster, as metrics name it.
    pub cluster: Cluster,
    /// Let pods of this node that policy allows to talk connect straight to
    /// each other, in the node's kernel, instead of through an HBONE tunnel
    /// to ourselves (README "The same-node fast path"). On unless the file
    /// says `fastPath: false`.
    pub fast_path: bool,
    /// What one pod, one peer and the node may hold in the agent (README
    /// "Limits"); what is not set is derived from the open-files limit.
    pub limits: LimitSettings,
}

/// `limits:` in the config; each `None` is left to the agent to derive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSettings {
    /// File descriptors the agent may hold for one pod's connections.
    pub connections_per_pod: Option<usize>,
    /// Streams the identities of one namespace may have open to the node's pods.
    pub streams_per_peer_namespace: Option<usize>,
    /// File descriptors the agent may hold for connections, all pods.
    pub connections_per_node: Option<usize>,
    /// File descriptors each pod keeps for itself each way, out of the
    /// node's budget, whatever the other pods hold.
    pub reserved_per_pod: Option<usize>,
    /// How long streams of a peer whose certificate expired, or whose root
    /// was removed, may go on before they are cut.
    pub drain_deadline: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    connections_per_pod: Option<usize>,
    #[serde(default)]
    streams_per_peer_namespace: Option<usize>,
    #[serde(default)]
    connections_per_node: Option<usize>,
    #[serde(default)]
    reserved_per_pod: Option<usize>,
    #[serde(default)]
    drain_deadline: Option<String>,
}

/// The admin endpoint's address unless the config says otherwise
/// (ztunnel's).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";

/// The CNI plugin's side of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    /// The Unix socket the plugin asks on. Its directory is made, or made
    /// private (root only), by the agent; the membership file goes beside it.
    pub socket: PathBuf,
    /// Install the plugin into the node's CNI configuration and keep it
    /// there, if set.
    pub install: Option<CniInstall>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInstall {
    /// The node's CNI configuration directory, as the agent sees it (e.g.
    /// the host's `/etc/cni/net.d` mounted at `/host/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The node's CNI plugin directory, as the agent sees it.
    pub bin_dir: PathBuf,
    /// The plugin binary to copy there.
    pub binary: PathBuf,
    /// The socket's path as the host (the runtime) sees it, written into
    /// the plugin's configuration; by default the same as `socket`.
    pub host_socket: PathBuf,
}

pub const DEFAULT_CNI_SOCKET: &str = "/var/run/warren/cni.sock";

/// How the agent reaches the API server and finds pods on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// A kubeconfig file; none: in-cluster (the pod's service-account token
    /// and CA, `KUBERNETES_SERVICE_HOST`).
    pub kubeconfig: Option<PathBuf>,
    /// The host's `/proc` as the agent sees it (a DaemonSet mounts it).
    pub host_proc: PathBuf,
    /// The host's cgroup v2 mount as the agent sees it.
    pub host_cgroup: PathBuf,
}

/// Who signs this node's workload certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issuer {
    /// A self-signed root kept in `dir`, created on first use. Every agent of
    /// a mesh must share it, or they will not trust each other. Labs only.
    DevCa { dir: PathBuf },
    /// A CA service speaking Istio's certificate API (`warren-ca serve`),
    /// reached as this node.
    Ca(CaSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    /// `host:port` of the CA service.
    pub address: String,
    /// How the agent proves which node it is.
    pub credential: CaCredential,
}

/// How the agent authenticates to the CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCredential {
    /// Hosts without Kubernetes: the directory of the node's credential
    /// (`node.pem`, `node-key.pem`, and `ca-roots.pem`), as `warren-ca
    /// node-credential` writes it. Read at each connection to the CA, so a
    /// renewed credential needs no restart.
    Node(PathBuf),
    /// On Kubernetes: the agent Pod's projected service-account token (for
    /// the CA's audience), read at each request, as the kubelet rotates it.
    Token(PathBuf),
}

impl Config {
    /// This agent's node identity, as its node credential must name it.
    pub fn node_id(&self) -> Result<NodeId, IdentityError> {
        NodeId::new(self.trust_domain.clone(), &self.node)
    }

    /// The file holding the roots to trust, if any: `trustBundle`, or with a
    /// CA service and no `trustBundle`, the roots of the node credential
    /// (with a token, `trustBundle` is required).
    pub fn trust_bundle_path(&self) -> Option<PathBuf> {
        match (&self.trust_bundle, &self.issuer) {
            (Some(path), _) => Some(path.clone()),
            (None, Issuer::Ca(ca)) => match &ca.credential {
                CaCredential::Node(dir) => Some(dir.join(NODE_ROOTS)),
                CaCredential::Token(_) => None,
            },
            (None, Issuer::DevCa { .. }) => None,
        }
    }
}

impl Config {
    /// Reads the file; a missing `node` is taken from `$NODE_NAME`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_env(path, &text, std::env::var(NODE_NAME_ENV).ok())
    }

    /// Parses `text` as if read from `path` (which only appears in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(path, text, None)
    }

    /// Parses `text`, with `env_node` as the node if the file names none.
    pub fn parse_with_env(
        path: &Path,
        text: &str,
        env_node: Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|source| ConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        raw.validate(env_node)
            .map_err(|(field, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                problem,
            })
    }

    /// The workloads the file places on this node.
    pub fn local_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.iter().filter(|w| w.local.is_some())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: Option<String>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    dev_ca_dir: Option<PathBuf>,
    #[serde(default)]
    trust_bundle: Option<PathBuf>,
    #[serde(default)]
    certificate_ttl: Option<String>,
    #[serde(default)]
    ca: Option<RawCa>,
    #[serde(default)]
    policy_dir: Option<PathBuf>,
    #[serde(default)]
    root_namespace: Option<String>,
    #[serde(default)]
    bpf_pin_dir: Option<PathBuf>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
    #[serde(default)]
    health_listen: Option<String>,
    #[serde(default)]
    cni: Option<RawCni>,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    cluster_id: Option<String>,
    #[serde(default)]
    cluster_domain: Option<String>,
    #[serde(default)]
    fast_path: Option<bool>,
    #[serde(default)]
    limits: RawLimits,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCni {
    #[serde(default)]
    socket: Option<PathBuf>,
    #[serde(default)]
    install: Option<RawCniInstall>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCniInstall {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    #[serde(default)]
    binary: Option<PathBuf>,
    #[serde(default)]
    host_socket: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    host_proc: Option<PathBuf>,
    #[serde(default)]
    host_cgroup: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCa {
    address: String,
    #[serde(default)]
    node_credential: Option<PathBuf>,
    #[serde(default)]
    token: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkload {
    name: String,
    namespace: String,
    /// Istio's workload name (a Deployment's, say); the pod's by default.
    #[serde(default)]
    workload_name: Option<String>,
    service_account: String,
    ip: Ipv4Addr,
    node: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    probe_ports: BTreeSet<u16>,
}

type Invalid = (String, String);

impl RawConfig {
    fn validate(self, env_node: Option<String>) -> Result<Config, Invalid> {
        let node = match (self.node, env_node) {
            (Some(node), _) => node,
            (None, Some(node)) => node,
            (None, None) => {
                return Err((
                    "node".into(),
                    format!(
                        "missing: name this agent's node here or in ${NODE_NAME_ENV} (a \
                         DaemonSet sets it from spec.nodeName)"
                    ),
                ));
            }
        };
        if node.trim().is_empty() {
            return Err(("node".into(), "must name this agent's node".into()));
        }
        let trust_domain =
            TrustDomain::new(self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))
                .map_err(|e| ("trustDomain".into(), e.to_string()))?;

        let certificate_ttl = match &self.certificate_ttl {
            None => DEFAULT_CERTIFICATE_TTL,
            Some(text) => {
                let ttl = humantime::parse_duration(text).map_err(|e| {
                    (
                        "certificateTtl".to_owned(),
                        format!("{text:?} is not a duration like 24h or 90s: {e}"),
                    )
                })?;
                if ttl < MIN_CERTIFICATE_TTL {
                    return Err((
                        "certificateTtl".into(),
                        format!("{text} is shorter than the minimum, {MIN_CERTIFICATE_TTL:?}"),
                    ));
                }
                ttl
            }
        };
        let root_namespace = self
            .root_namespace
            .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_owned());
        if root_namespace.trim().is_empty() {
            return Err(("rootNamespace".into(), "must not be empty".into()));
        }
        let health_listen = listen_address("healthListen", self.health_listen, "0.0.0.0:15021")?;
        let metrics_listen = listen_address("metricsListen", self.metrics_listen, "0.0.0.0:15020")?;
        // Unauthenticated, and it changes the log level: only processes of
        // the node itself may reach it.
        let admin_listen = self
            .admin_listen
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_owned());
        let loopback = admin_listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback());
        if !loopback {
            return Err((
                "adminListen".into(),
                format!(
                    "{admin_listen:?} is not a loopback address and port (e.g. {DEFAULT_ADMIN_LISTEN}): \
                     the admin endpoint has no authentication"
                ),
            ));
        }
        let default_cluster = Cluster::default();
        let cluster = Cluster {
            id: self.cluster_id.unwrap_or(default_cluster.id),
            domain: self.cluster_domain.unwrap_or(default_cluster.domain),
        };
        for (field, value) in [
            ("clusterId", &cluster.id),
            ("clusterDomain", &cluster.domain),
        ] {
            if value.trim().is_empty() {
                return Err((field.into(), "must not be empty".into()));
            }
        }
        let issuer = match (self.ca, self.dev_ca_dir) {
            (Some(_), Some(_)) => {
                return Err((
                    "devCaDir".into(),
                    "cannot be used with `ca`: certificates come from one or the other".into(),
                ));
            }
            (Some(ca), None) => {
                let ca = ca.validate()?;
                if matches!(ca.credential, CaCredential::Token(_)) && self.trust_bundle.is_none() {
                    return Err((
                        "trustBundle".into(),
                        "is required with ca.token: the roots the CA's own certificate chains to \
                         (on Kubernetes, the warren-trust-bundle ConfigMap, mounted)"
                            .into(),
                    ));
                }
                Issuer::Ca(ca)
            }
            (None, dir) => Issuer::DevCa {
                dir: dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_CA_DIR)),
            },
        };
        let mut by_name = HashMap::new();
        let mut by_ip = HashMap::new();
        let mut workloads = Vec::with_capacity(self.workloads.len());
        for (i, raw) in self.workloads.into_iter().enumerate() {
            let at = |field: &str| format!("workloads[{i}].{field}");
            let workload = raw.validate(&node, &trust_domain, at)?;
            if let Some(first) = by_name.insert(workload.qualified_name(), i) {
                return Err((
                    at("name"),
                    format!(
                        "{} is also workloads[{first}]; pod names must be unique in a namespace",
                        workload.qualified_name()
                    ),
                ));
            }
            if let Some(first) = by_ip.insert(workload.ip, i) {
                return Err((
                    at("ip"),
                    format!("{} is also the address of workloads[{first}]", workload.ip),
                ));
            }
            workloads.push(workload);
        }
        let raw = self.limits;
        for (field, value) in [
            ("connectionsPerPod", raw.connections_per_pod),
            ("streamsPerPeerNamespace", raw.streams_per_peer_namespace),
            ("connectionsPerNode", raw.connections_per_node),
        ] {
            if value == Some(0) {
                return Err((format!("limits.{field}"), "must be at least 1".into()));
            }
        }
        let drain_deadline = match &raw.drain_deadline {
            None => None,
            Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
                (
                    "limits.drainDeadline".to_owned(),
                    format!("{text:?} is not a duration like 10s: {e}"),
                )
            })?),
        };
        let limits = LimitSettings {
            connections_per_pod: raw.connections_per_pod,
            streams_per_peer_namespace: raw.streams_per_peer_namespace,
            connections_per_node: raw.connections_per_node,
            reserved_per_pod: raw.reserved_per_pod,
            drain_deadline,
        };
        let kubernetes = match self.kubernetes {
            None => None,
            Some(_) if !workloads.is_empty() => {
                return Err((
                    "workloads".into(),
                    "cannot be used with `kubernetes`: the workloads come from the API server"
                        .into(),
                ));
            }
            Some(_) if self.policy_dir.is_some() => {
                return Err((
                    "policyDir".into(),
                    "cannot be used with `kubernetes`: policies come from the API server".into(),
                ));
            }
            Some(raw) => Some(KubernetesSettings {
                kubeconfig: raw.kubeconfig,
                host_proc: raw.host_proc.unwrap_or_else(|| "/proc".into()),
                host_cgroup: raw.host_cgroup.unwrap_or_else(|| "/sys/fs/cgroup".into()),
            }),
        };
        let cni = match self.cni {
            None => None,
            Some(raw) => Some(raw.validate()?),
        };
        Ok(Config {
            node,
            trust_domain,
            issuer,
            policy_dir: self.policy_dir,
            root_namespace,
            bpf_pin_dir: self
                .bpf_pin_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_PIN_DIR)),
            trust_bundle: self.trust_bundle,
            certificate_ttl,
            workloads,
            kubernetes,
            health_listen,
            cni,
            metrics_listen,
            admin_listen,
            cluster,
            fast_path: self.fast_path.unwrap_or(true),
            limits,
        })
    }
}

impl RawCni {
    fn validate(self) -> Result<CniSettings, (String, String)> {
        let absolute = |field: &str, path: &Path| {
            if path.is_absolute() {
                Ok(())
            } else {
                Err((
                    field.to_owned(),
                    format!("{} must be an absolute path", path.display()),
                ))
            }
        };
        let socket = self
            .socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CNI_SOCKET));
        absolute("cni.socket", &socket)?;
        if socket.parent().is_none_or(|p| p == Path::new("/")) {
            return Err((
                "cni.socket".into(),
                "must be in a directory of its own (the agent makes it root-only)".into(),
            ));
        }
        let install = match self.install {
            None => None,
            Some(raw) => {
                absolute("cni.install.confDir", &raw.conf_dir)?;
                absolute("cni.install.binDir", &raw.bin_dir)?;
                let binary = match raw.binary {
                    Some(binary) => binary,
                    // Shipped beside the agent.
                    None => std::env::current_exe()
                        .ok()
                        .and_then(|exe| Some(exe.parent()?.join("warren-cni")))
                        .ok_or_else(|| {
                            (
                                "cni.install.binary".to_owned(),
                                "not given, and the agent's own directory is unknown".to_owned(),
                            )
                        })?,
                };
                absolute("cni.install.binary", &binary)?;
                let host_socket = raw.host_socket.unwrap_or_else(|| socket.clone());
                absolute("cni.install.hostSocket", &host_socket)?;
                Some(CniInstall {
                    conf_dir: raw.conf_dir,
                    bin_dir: raw.bin_dir,
                    binary,
                    host_socket,
                })
            }
        };
        Ok(CniSettings { socket, install })
    }
}

/// An optional `host:port` to serve on; `example` shows the form in the error.
fn listen_address(
    field: &str,
    address: Option<String>,
    example: &str,
) -> Result<Option<String>, Invalid> {
    match address {
        Some(address) if !is_host_port(&address) => Err((
            field.into(),
            format!("{address:?} is not host:port (e.g. {example})"),
        )),
        other => Ok(other),
    }
}

/// `host:port` with a host and a port other than 0.
fn is_host_port(address: &str) -> bool {
    let port = address
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()));
    matches!(port, Some((host, Ok(port))) if !host.is_empty() && port != 0)
}

impl RawCa {
    fn validate(self) -> Result<CaSettings, Invalid> {
        if !is_host_port(&self.address) {
            return Err((
                "ca.address".into(),
                format!("{:?} is not host:port (e.g. 10.0.0.1:15012)", self.address),
            ));
        }
        let credential = match (self.node_credential, self.token) {
            (Some(_), Some(_)) => {
                return Err((
                    "ca.token".into(),
                    "cannot be used with ca.nodeCredential: the agent authenticates with one or \
                     the other"
                        .into(),
                ));
            }
            (None, None) => {
                return Err((
                    "ca".into(),
                    "needs nodeCredential (the directory of this node's credential) or token \
                     (the file of the agent pod's projected service-account token)"
                        .into(),
                ));
            }
            (Some(dir), None) if dir.as_os_str().is_empty() => {
                return Err((
                    "ca.nodeCredential".into(),
                    "must name the directory of this node's credential".into(),
                ));
            }
            (None, Some(file)) if file.as_os_str().is_empty() => {
                return Err((
                    "ca.token".into(),
                    "must name the file of the agent pod's service-account token".into(),
                ));
            }
            (Some(dir), None) => CaCredential::Node(dir),
            (None, Some(file)) => CaCredential::Token(file),
        };
        Ok(CaSettings {
            address: self.address,
            credential,
        })
    }
}

impl RawWorkload {
    fn validate(
        self,
        this_node: &str,
        trust_domain: &TrustDomain,
        at: impl Fn(&str) -> String,
    ) -> Result<Workload, Invalid> {
        if self.name.trim().is_empty() {
            return Err((at("name"), "must not be empty".into()));
        }
        let identity = SpiffeId::new(trust_domain.clone(), &self.namespace, &self.service_account)
            .map_err(|e| {
                let field = match e {
                    IdentityError::Namespace(..) => "namespace",
                    _ => "serviceAccount",
                };
                (at(field), e.to_string())
            })?;
        if self.ip.is_unspecified()
            || self.ip.is_loopback()
            || self.ip.is_multicast()
            || self.ip.is_broadcast()
        {
            return Err((at("ip"), format!("{} cannot be a pod address", self.ip)));
        }
        if self.node.trim().is_empty() {
            return Err((at("node"), "must name the node the pod runs on".into()));
        }
        let local = if self.node == this_node {
            let netns = self.netns.ok_or_else(|| {
                (
                    at("netns"),
                    format!("required for a pod on this node ({this_node}): the path of its network namespace"),
                )
            })?;
            let cgroup = self.cgroup.ok_or_else(|| {
                (
                    at("cgroup"),
                    format!(
                        "required for a pod on this node ({this_node}): its cgroup v2 directory"
                    ),
                )
            })?;
            Some(LocalPod::Paths { netns, cgroup })
        } else {
            for (field, value) in [("netns", &self.netns), ("cgroup", &self.cgroup)] {
                if value.is_some() {
                    return Err((
                        at(field),
                        format!(
                            "only allowed for pods on this node ({this_node}); this pod runs on {}",
                            self.node
                        ),
                    ));
                }
            }
            None
        };
        Ok(Workload {
            workload_name: self.workload_name.unwrap_or_else(|| self.name.clone()),
            name: self.name,
            namespace: self.namespace,
            service_account: self.service_account,
            identity,
            ip: self.ip,
            node: self.node,
            labels: self.labels,
            local,
            probe_ports: self.probe_ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node: node-1
trustDomain: example.org
devCaDir: /tmp/dev-ca
trustBundle: /etc/warren/roots.pem
certificateTtl: 1h 30m
workloads:
  - name: client
    namespace: default
    serviceAccount: sleep
    ip: 10.244.1.2
    node: node-1
    netns: /run/netns/client
    cgroup: /sys/fs/cgroup/pods/client
  - name: server
    namespace: backend
    serviceAccount: httpbin
    ip: 10.244.2.2
    node: node-2
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/warren/agent.yaml"), text)
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// `text` is refused, naming `field`, for a reason that says `why`.
    fn assert_invalid(text: &str, field: &str, why: &str) {
        match parse(text) {
            Err(ConfigError::Invalid {
                field: named,
                problem,
                ..
            }) => {
                assert_eq!(named, field, "{problem}");
                assert!(problem.contains(why), "{field}: {problem}");
            }
            other => panic!("expected {field} to be refused, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_full_config() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.node, "node-1");
        assert_eq!(config.trust_domain.as_str(), "example.org");
        assert_eq!(
            config.issuer,
            Issuer::DevCa {
                dir: "/tmp/dev-ca".into()
            }
        );
        assert_eq!(
            config.trust_bundle.as_deref(),
            Some(Path::new("/etc/warren/roots.pem"))
        );
        assert_eq!(config.workloads.len(), 2);
        let local: Vec<_> = config.local_workloads().map(|w| w.name.as_str()).collect();
        assert_eq!(local, ["client"]);
        assert_eq!(
            config.workloads[1].identity.to_string(),
            "spiffe://example.org/ns/backend/sa/httpbin"
        );
        assert!(config.workloads[1].local.is_none());
    }

    #[test]
    fn trust_domain_defaults_to_cluster_local() {
        let config = parse("node: n\n").unwrap();
        assert_eq!(config.trust_domain.as_str(), "cluster.local");
        assert_eq!(
            config.issuer,
            Issuer::DevCa {
                dir: DEFAULT_DEV_CA_DIR.into()
            }
        );
        assert!(config.trust_bundle_path().is_none());
        assert!(config.workloads.is_empty());
    }

    #[test]
    fn on_kubernetes_the_agent_presents_its_token_and_trusts_the_bundle() {
        let text = GOOD.replace(
            "devCaDir: /tmp/dev-ca\n",
            "ca:\n  address: warren-ca.warren-system.svc:15012\n  token: /var/run/secrets/warren/token\n\
             healthListen: 0.0.0.0:15021\n",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.issuer,
            Issuer::Ca(CaSettings {
                address: "warren-ca.warren-system.svc:15012".into(),
                credential: CaCredential::Token("/var/run/secrets/warren/token".into()),
            })
        );
        assert_eq!(config.health_listen.as_deref(), Some("0.0.0.0:15021"));
        assert_eq!(
            config.trust_bundle_path().unwrap(),
            Path::new("/etc/warren/roots.pem")
        );

        let unrooted = text.replace("trustBundle: /etc/warren/roots.pem\n", "");
        assert_invalid(&unrooted, "trustBundle", "required with ca.token");
        let both = text.replace("  token:", "  nodeCredential: /etc/warren/node\n  token:");
        assert_invalid(&both, "ca.token", "cannot be used with ca.nodeCredential");
        let neither = text.replace("  token: /var/run/secrets/warren/token\n", "");
        assert_invalid(&neither, "ca", "needs nodeCredential");
        let bad_health = text.replace("0.0.0.0:15021", "15021");
        assert_invalid(&bad_health, "healthListen", "not host:port");
    }

    #[test]
    fn telemetry_endpoints_and_the_clusters_names() {
        let defaults = parse(GOOD).unwrap();
        assert_eq!(defaults.metrics_listen, None);
        assert_eq!(defaults.admin_listen, DEFAULT_ADMIN_LISTEN);
        assert_eq!(defaults.cluster, Cluster::default());
        assert!(defaults.fast_path, "the fast path is on by default");
        let off = parse(&format!("{GOOD}fastPath: false\n")).unwrap();
        assert!(!off.fast_path);
        let error = parse(&format!("{GOOD}fastPath: sometimes\n")).unwrap_err();
        assert!(error.to_string().contains("fastPath"), "{error}");

        assert_eq!(
            defaults.limits,
            LimitSettings::default(),
            "derived by the agent"
        );
        let limits = parse(&format!(
            "{GOOD}limits:\n  connectionsPerPod: 100\n  connectionsPerNode: 5000\n"
        ))
        .unwrap()
        .limits;
        assert_eq!(
            limits,
            LimitSettings {
                connections_per_pod: Some(100),
                streams_per_peer_namespace: None,
                connections_per_node: Some(5000),
                reserved_per_pod: None,
                drain_deadline: None,
            }
        );
        let reserve = parse(&format!("{GOOD}limits:\n  reservedPerPod: 0\n")).unwrap();
        assert_eq!(
            reserve.limits.reserved_per_pod,
            Some(0),
            "no reserve at all is a choice"
        );
        let drain = parse(&format!("{GOOD}limits:\n  drainDeadline: 2s\n")).unwrap();
        assert_eq!(drain.limits.drain_deadline, Some(Duration::from_secs(2)));
        let error = parse(&format!("{GOOD}limits:\n  drainDeadline: soon\n")).unwrap_err();
        assert!(
            error.to_string().contains("limits.drainDeadline"),
            "{error}"
        );
        let error = parse(&format!("{GOOD}limits:\n  streamsPerPeerNamespace: 0\n")).unwrap_err();
        assert!(
            error.to_string().contains("limits.streamsPerPeerNamespace"),
            "{error}"
        );
        let error = parse(&format!("{GOOD}limits:\n  perPod: 5\n")).unwrap_err();
        assert!(error.to_string().contains("perPod"), "{error}");

        let text = format!(
            "{GOOD}metricsListen: 0.0.0.0:15020\nadminListen: 127.0.0.1:25000\n\
             clusterId: east\nclusterDomain: corp.example\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.metrics_listen.as_deref(), Some("0.0.0.0:15020"));
        assert_eq!(config.admin_listen, "127.0.0.1:25000");
        assert_eq!(
            config.cluster,
            Cluster {
                id: "east".into(),
                domain: "corp.example".into()
            }
        );

        let bad_metrics = text.replace("0.0.0.0:15020", "15020");
        assert_invalid(&bad_metrics, "metricsListen", "not host:port");
        // Unauthenticated, and it changes log levels: loopback only.
        for address in ["0.0.0.0:15000", "10.0.0.1:15000", "localhost:15000"] {
            let exposed = text.replace("127.0.0.1:25000", address);
            assert_invalid(&exposed, "adminListen", "not a loopback address");
        }
        assert!(parse(&text.replace("127.0.0.1:25000", "\"[::1]:15000\"")).is_ok());
        let unnamed = text.replace("clusterId: east", "clusterId: \" \"");
        assert_invalid(&unnamed, "clusterId", "must not be empty");
    }

    #[test]
    fn a_ca_service_replaces_the_development_ca() {
        let text = GOOD.replace(
            "devCaDir: /tmp/dev-ca\ntrustBundle: /etc/warren/roots.pem\n",
            "ca:\n  address: ca.example:15012\n  nodeCredential: /etc/warren/node\n",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.issuer,
            Issuer::Ca(CaSettings {
                address: "ca.example:15012".into(),
                credential: CaCredential::Node("/etc/warren/node".into()),
            })
        );
        // The node credential's roots, unless a trust bundle is named.
        assert_eq!(
            config.trust_bundle_path().unwrap(),
            Path::new("/etc/warren/node/ca-roots.pem")
        );
        let named = parse(&format!("{text}trustBundle: /etc/roots.pem\n")).unwrap();
        assert_eq!(
            named.trust_bundle_path().unwrap(),
            Path::new("/etc/roots.pem")
        );
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let cases = [
            (
                GOOD.replace("10.244.2.2", "10.244.2.300"),
                "workloads[1].ip",
            ),
            (
                GOOD.replace("    netns: /run/netns/client\n", ""),
                "workloads[0].netns: required",
            ),
            (
                GOOD.replace("    cgroup: /sys/fs/cgroup/pods/client\n", ""),
                "workloads[0].cgroup: required",
            ),
            (
                GOOD.replace("namespace: backend", "namespace: Back_End"),
                "workloads[1].namespace",
            ),
            (
                GOOD.replace("serviceAccount: httpbin", "serviceAccount: \"\""),
                "workloads[1].serviceAccount",
            ),
            (
                GOOD.replace("10.244.2.2", "10.244.1.2"),
                "workloads[1].ip: 10.244.1.2 is also the address of workloads[0]",
            ),
            (
                GOOD.replace("10.244.2.2", "127.0.0.1"),
                "workloads[1].ip: 127.0.0.1 cannot be a pod address",
            ),
            (
                GOOD.replace(
                    "name: server\n    namespace: backend",
                    "name: client\n    namespace: default",
                ),
                "workloads[1].name: default/client is also workloads[0]",
            ),
            (
                GOOD.replace("trustDomain: example.org", "trustDomain: Example.org"),
                "trustDomain: trust domain",
            ),
            (
                GOOD.replace("node: node-2", "node: node-2\n    netns: /run/netns/x"),
                "workloads[1].netns: only allowed for pods on this node",
            ),
            (
                GOOD.replace(
                    "serviceAccount: sleep",
                    "serviceAccount: sleep\n    colour: red",
                ),
                "unknown field `colour`",
            ),
            (
                GOOD.replace("node: node-1\ntrustDomain", "trustDomain"),
                "node: missing: name this agent's node here or in $NODE_NAME",
            ),
            ("node: [\n".to_string(), "agent.yaml"),
            (
                format!("{GOOD}ca: {{address: ca:15012, nodeCredential: /n}}\n"),
                "devCaDir: cannot be used with `ca`",
            ),
            (
                "node: n\nca: {address: ca.example, nodeCredential: /n}\n".to_string(),
                "ca.address: \"ca.example\" is not host:port",
            ),
            (
                "node: n\nca: {address: ca:15012}\n".to_string(),
                "ca: needs nodeCredential (the directory of this node's credential) or token",
            ),
            (
                format!("{GOOD}kubernetes: {{}}\n"),
                "workloads: cannot be used with `kubernetes`",
            ),
            (
                "node: n\npolicyDir: /p\nkubernetes: {}\n".to_string(),
                "policyDir: cannot be used with `kubernetes`",
            ),
            (
                "node: n\nkubernetes: {kubeConfig: /k}\n".to_string(),
                "unknown field `kubeConfig`",
            ),
        ];
        for (text, expected) in cases {
            let message = error(&text);
            assert!(
                message.starts_with("config file /etc/warren/agent.yaml: "),
                "no file name in {message:?}"
            );
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
    }

    #[test]
    fn kubernetes_mode_takes_the_node_from_the_downward_api() {
        let text = "kubernetes:\n  kubeconfig: /etc/warren/kubeconfig\n";
        let path = Path::new("/etc/warren/agent.yaml");
        let config = Config::parse_with_env(path, text, Some("node-7".into())).unwrap();
        assert_eq!(config.node, "node-7");
        assert_eq!(
            config.kubernetes,
            Some(KubernetesSettings {
                kubeconfig: Some("/etc/warren/kubeconfig".into()),
                host_proc: "/proc".into(),
                host_cgroup: "/sys/fs/cgroup".into(),
            })
        );
        // The file's own `node` wins over the environment.
        let named = Config::parse_with_env(path, &format!("node: n1\n{text}"), Some("x".into()));
        assert_eq!(named.unwrap().node, "n1");
        let roots = "node: n\nkubernetes: {hostProc: /host/proc, hostCgroup: /host/cgroup}\n";
        let settings = parse(roots).unwrap().kubernetes.unwrap();
        assert_eq!(settings.kubeconfig, None);
        assert_eq!(settings.host_proc, Path::new("/host/proc"));
        assert_eq!(settings.host_cgroup, Path::new("/host/cgroup"));
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let message = error(&GOOD.replace("ip: 10.244.2.2", "ip: [oops"));
        assert!(message.contains("line"), "{message}");
    }

    #[test]
    fn unreadable_file_is_reported_with_its_path() {
        let err = Config::load(Path::new("/nonexistent/warren.yaml")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/warren.yaml"),
            "{err}"
        );
    }
}
