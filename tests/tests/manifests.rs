//! The Kubernetes manifests users install (`deploy/kustomize`). Every
//! kustomization renders with `kubectl kustomize`; every object it makes
//! validates offline, strictly (an unknown field is an error), against
//! Kubernetes 1.30's schemas with `kubernetes-validate` (PyPI); the tests'
//! real API server accepts them; and the facts users and the code rely on
//! hold: what the agent may do on a node and why, that its config names what
//! its pod mounts, that the agent's token is for the audience the CA checks,
//! that warren never captures itself, that everything lives in warren-system,
//! that images carry warren's version, and that uninstalling cleans where the
//! agent pins.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize as _;
use serde_json::{Value, json};
use warren_tests::controlplane::ControlPlane;
use warren_tests::harness::test_lab;

/// The Kubernetes version whose schemas every object must satisfy: what
/// managed clusters commonly run (kubernetes-validate carries 1.25 to 1.37).
const SCHEMA_VERSION: &str = "1.30.0";
const NAMESPACE: &str = "warren-system";
const AGENT: &str = "warren-agent";
const CA: &str = "warren-ca";
const TRUST_BUNDLE: &str = "warren-trust-bundle";
const AMBIENT: (&str, &str) = ("istio.io/dataplane-mode", "ambient");

/// Every kustomization under deploy/kustomize.
const KUSTOMIZATIONS: [&str; 6] = [
    "base",
    "istio-crds",
    "standalone",
    "uninstall",
    "examples/custom",
    "examples/lab",
];
/// Those that install the agents and the CA.
const INSTALLS: [&str; 4] = ["base", "standalone", "examples/custom", "examples/lab"];
/// The agent's capabilities, each explained in deploy/README.md and in a
/// comment of the DaemonSet.
const AGENT_CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];
const CLUSTER_SCOPED: [&str; 4] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A kustomization's output: its text and its objects.
struct Rendered {
    text: String,
    objects: Vec<Value>,
}

/// `kubectl kustomize <name>`, once per test binary.
fn rendered(name: &str) -> &'static Rendered {
    static ALL: OnceLock<BTreeMap<&'static str, Rendered>> = OnceLock::new();
    ALL.get_or_init(|| KUSTOMIZATIONS.iter().map(|&k| (k, render(k))).collect())
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not one of KUSTOMIZATIONS"))
}

fn render(name: &str) -> Rendered {
    let dir = deploy_dir().join("kustomize").join(name);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl (needed to render the manifests): {e}"));
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kustomize writes UTF-8");
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{name}: kustomize wrote bad YAML: {e}"));
            serde_json::to_value(value).expect("YAML as JSON")
        })
        .filter(|v| !v.is_null())
        .collect();
    assert!(!objects.is_empty(), "{name} renders nothing");
    Rendered { text, objects }
}

/// The one object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} {name}");
    found[0]
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// Containers and init containers.
fn all_containers(pod: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(|field| pod[field].as_array().into_iter().flatten())
}

fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("no {what} named {name} in {list}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("{v} is not a string")))
        .collect()
}

/// Every workload with a pod template, with its kind and name.
fn pod_templates(objects: &[Value]) -> impl Iterator<Item = (String, &Value)> {
    objects
        .iter()
        .filter(|o| o["spec"]["template"]["spec"].is_object())
        .map(|o| {
            let field = |f: &Value| f.as_str().unwrap().to_owned();
            (
                format!("{} {}", field(&o["kind"]), field(&o["metadata"]["name"])),
                o,
            )
        })
}

/// The value of `--flag=value` (or `--flag value`) in a container's args,
/// with `$(VAR)` expanded from its env as the kubelet does.
fn arg(container: &Value, flag: &str) -> String {
    let args = strings(&container["args"]);
    let value = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| {
            a.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
                .or_else(|| (*a == flag).then(|| args.get(i + 1).copied()).flatten())
        })
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    expand(container, value)
}

fn expand(container: &Value, text: &str) -> String {
    let mut out = text.to_owned();
    while let Some(start) = out.find("$(") {
        let end = start + out[start..].find(')').expect("unclosed $(");
        let var = &out[start + 2..end];
        let value = env(container, var)["value"]
            .as_str()
            .unwrap_or_else(|| panic!("${var} has no literal value"))
            .to_owned();
        out.replace_range(start..=end, &value);
    }
    out
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    named(&container["env"], name, "environment variable")
}

/// Where `volume` is mounted in `container`.
fn mount<'a>(container: &'a Value, volume: &str) -> &'a Value {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume)
        .unwrap_or_else(|| panic!("volume {volume} is not mounted in {}", container["name"]))
}

/// The volume mounting `host_path` from the node, and where `container` has it.
fn host_mount<'a>(pod: &'a Value, container: &'a Value, host_path: &str) -> &'a Value {
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["hostPath"]["path"] == host_path)
        .unwrap_or_else(|| panic!("no hostPath volume of {host_path}"));
    mount(container, volume["name"].as_str().unwrap())
}

/// The port number a probe (or anything with `port`) names, resolving names.
fn port_number(container: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => named(&container["ports"], name, "port")["containerPort"]
            .as_u64()
            .unwrap(),
        other => panic!("{other} is not a port"),
    }
}

/// The workload and its main container.
fn workload<'a>(
    objects: &'a [Value],
    kind: &str,
    name: &str,
    container: &str,
) -> (&'a Value, &'a Value) {
    let pod = pod_spec(object(objects, kind, name));
    let main = named(&pod["containers"], container, "container");
    (pod, main)
}

fn agent(objects: &[Value]) -> (&Value, &Value) {
    workload(objects, "DaemonSet", AGENT, "agent")
}

fn ca(objects: &[Value]) -> (&Value, &Value) {
    workload(objects, "Deployment", CA, "ca")
}

/// Where the file `key` of ConfigMap `config_map` appears in the pod: the
/// projected or ConfigMap volume carrying it, mounted in `container`.
/// Returns the path and the ConfigMap's name as the pod references it.
fn config_map_file(
    pod: &Value,
    container: &Value,
    config_map: &str,
    key: &str,
) -> (String, String) {
    for volume in pod["volumes"].as_array().into_iter().flatten() {
        let sources: Vec<&Value> = match (&volume["configMap"], &volume["projected"]) {
            (cm, _) if cm.is_object() => vec![cm],
            (_, projected) if projected.is_object() => config_map_sources(projected),
            _ => continue,
        };
        for source in sources {
            let name = source["name"].as_str().unwrap();
            // Generated ConfigMaps carry a hash suffix.
            if name != config_map && !name.starts_with(&format!("{config_map}-")) {
                continue;
            }
            let path = match source["items"].as_array() {
                Some(items) => items
                    .iter()
                    .find(|i| i["key"] == key)
                    .map(|i| i["path"].as_str().unwrap().to_owned()),
                None => Some(key.to_owned()),
            };
            if let Some(path) = path {
                let at = mount(container, volume["name"].as_str().unwrap())["mountPath"]
                    .as_str()
                    .unwrap();
                return (format!("{at}/{path}"), name.to_owned());
            }
        }
    }
    panic!(
        "{config_map}'s {key} is mounted nowhere in {}",
        container["name"]
    )
}

fn config_map_sources(projected: &Value) -> Vec<&Value> {
    projected["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| &s["configMap"])
        .filter(|cm| cm.is_object())
        .collect()
}

/// The YAML config a workload's container reads with `--config`, from the
/// ConfigMap the pod mounts, as JSON.
fn mounted_config(objects: &[Value], pod: &Value, container: &Value, config_map: &str) -> Value {
    let path = arg(container, "--config");
    let key = Path::new(&path).file_name().unwrap().to_str().unwrap();
    let (mounted_at, name) = config_map_file(pod, container, config_map, key);
    assert_eq!(
        path, mounted_at,
        "--config names a file the pod does not mount there"
    );
    let text = object(objects, "ConfigMap", &name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} has no {key}"));
    serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(text).unwrap()).unwrap()
}

fn agent_config(objects: &[Value]) -> Value {
    let (pod, container) = agent(objects);
    mounted_config(objects, pod, container, "warren-agent-config")
}

#[test]
fn every_kustomization_renders_and_validates_against_the_schemas_offline() {
    let dir = tempfile::tempdir().unwrap();
    for name in KUSTOMIZATIONS {
        let rendered = rendered(name);
        let file = dir.path().join(format!("{}.yaml", name.replace('/', "-")));
        std::fs::write(&file, &rendered.text).unwrap();
        let output = Command::new("kubernetes-validate")
            .args([
                "--kubernetes-version",
                SCHEMA_VERSION,
                "--strict",
                "--quiet",
            ])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run kubernetes-validate (pip install kubernetes-validate): {e}")
            });
        // --quiet prints only failures and warnings; a kind without a schema
        // is a warning with a zero exit, and would go unchecked.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success() && said.trim().is_empty(),
            "{name} does not validate against Kubernetes {SCHEMA_VERSION}:\n{said}"
        );
    }
}

#[test]
fn the_agent_has_exactly_its_named_capabilities_and_nothing_runs_privileged() {
    let readme = std::fs::read_to_string(deploy_dir().join("README.md")).unwrap();
    let daemonset =
        std::fs::read_to_string(deploy_dir().join("kustomize/base/agent/daemonset.yaml")).unwrap();
    for name in KUSTOMIZATIONS {
        for (what, workload) in pod_templates(&rendered(name).objects) {
            let pod = pod_spec(workload);
            let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
            for container in all_containers(pod) {
                let sc = &container["securityContext"];
                assert_ne!(sc["privileged"], true, "{name}: {what} runs privileged");
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}: {what}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}: {what}");
                // Clusters before 1.30 read the annotation, later ones the
                // field, and refuse the two disagreeing.
                let annotation = &annotations[format!(
                    "container.apparmor.security.beta.kubernetes.io/{}",
                    container["name"].as_str().unwrap()
                )];
                match sc["appArmorProfile"]["type"].as_str() {
                    Some("Unconfined") => assert_eq!(annotation, "unconfined", "{name}: {what}"),
                    None => assert!(annotation.is_null(), "{name}: {what}"),
                    Some(other) => panic!("{name}: {what}: AppArmor {other}"),
                }
            }
            // Only the uninstall job goes without the runtime's seccomp
            // filter (its DaemonSet says why).
            let seccomp = if what.ends_with("warren-uninstall") {
                "Unconfined"
            } else {
                "RuntimeDefault"
            };
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"], seccomp,
                "{name}: {what}"
            );
        }
    }
    for name in INSTALLS {
        let (pod, agent) = agent(&rendered(name).objects);
        let sc = &agent["securityContext"];
        let mut added = strings(&sc["capabilities"]["add"]);
        added.sort_unstable();
        assert_eq!(
            added, AGENT_CAPABILITIES,
            "{name}: the agent's capabilities"
        );
        // Added capabilities are effective for root only (no ambient ones).
        assert_eq!(sc["runAsUser"], 0, "{name}");
        // Kubernetes defines allowPrivilegeEscalation as true with
        // SYS_ADMIN; saying false would only mislead.
        assert!(sc["allowPrivilegeEscalation"].is_null(), "{name}");
        assert!(
            all_containers(pod).count() == 1,
            "{name}: one container in the agent's pod"
        );
    }
    for cap in AGENT_CAPABILITIES {
        assert!(
            readme.contains(&format!("`CAP_{cap}`")),
            "deploy/README.md does not explain CAP_{cap}"
        );
        assert!(
            daemonset.contains(&format!("# {cap}: ")),
            "the DaemonSet has no comment saying why it adds {cap}"
        );
    }
    let (pod, _) = workload(
        &rendered("uninstall").objects,
        "DaemonSet",
        "warren-uninstall",
        "done",
    );
    for container in all_containers(pod) {
        // On the kernels warren needs, the pins' owner may open them.
        assert!(
            container["securityContext"]["capabilities"]["add"].is_null(),
            "the uninstall job needs no capability"
        );
    }
}

#[test]
fn the_agent_runs_on_every_node_one_node_at_a_time() {
    for name in INSTALLS {
        let objects = &rendered(name).objects;
        let daemonset = object(objects, "DaemonSet", AGENT);
        let (pod, agent) = agent(objects);
        assert_eq!(
            pod["tolerations"],
            json!([{"operator": "Exists"}]),
            "{name}: the agent must tolerate every taint"
        );
        assert_eq!(pod["priorityClassName"], "system-node-critical", "{name}");
        assert_eq!(
            daemonset["spec"]["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}),
            "{name}"
        );
        assert_eq!(pod["hostNetwork"], true, "{name}");
        assert_eq!(
            pod["hostPID"], true,
            "{name}: cgroup.procs needs the host's PIDs"
        );
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{name}");
        assert_eq!(
            env(agent, "NODE_NAME")["valueFrom"],
            json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
            "{name}"
        );
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!((10..=60).contains(&grace), "{name}: grace period {grace}s");

        let ready = &agent["readinessProbe"]["httpGet"];
        assert_eq!(ready["path"], "/healthz/ready", "{name}");
        let live_probe = &agent["livenessProbe"];
        assert_eq!(live_probe["httpGet"]["path"], "/healthz/live", "{name}");
        // A slow API server must not get the agent killed: at least a minute
        // of failed checks before a restart.
        let patience = live_probe["periodSeconds"].as_u64().unwrap()
            * live_probe["failureThreshold"].as_u64().unwrap();
        assert!(
            patience >= 60,
            "{name}: liveness gives up after {patience}s"
        );
        let config = agent_config(objects);
        let health = config["healthListen"].as_str().unwrap();
        // Host-network: on loopback only, where the kubelet (on the node)
        // still reaches it, and no pod does.
        assert_eq!(
            health.rsplit_once(':').unwrap().0,
            "127.0.0.1",
            "{name}: the agent's health endpoints are open beyond the node"
        );
        for probe in [ready, &live_probe["httpGet"]] {
            assert_eq!(
                probe["host"], "127.0.0.1",
                "{name}: the probes ask where the agent does not listen"
            );
            assert_eq!(
                health.rsplit_once(':').unwrap().1,
                port_number(agent, &probe["port"]).to_string(),
                "{name}: the probes ask where the agent does not listen"
            );
        }
    }
}

#[test]
fn the_agent_config_names_what_its_pod_mounts() {
    for name in INSTALLS {
        let objects = &rendered(name).objects;
        let (pod, agent) = agent(objects);
        let config = agent_config(objects);
        let kubernetes = &config["kubernetes"];

        let proc = host_mount(pod, agent, "/proc");
        assert_eq!(kubernetes["hostProc"], proc["mountPath"], "{name}");
        assert_eq!(proc["readOnly"], true, "{name}");
        let cgroup = host_mount(pod, agent, "/sys/fs/cgroup");
        assert_eq!(kubernetes["hostCgroup"], cgroup["mountPath"], "{name}");
        assert_eq!(cgroup["readOnly"], true, "{name}");
        assert!(
            kubernetes["kubeconfig"].is_null(),
            "{name}: in-cluster credentials"
        );

        let bpffs = host_mount(pod, agent, "/sys/fs/bpf");
        assert_eq!(bpffs["mountPropagation"], "HostToContainer", "{name}");
        assert_ne!(bpffs["readOnly"], true, "{name}: the agent pins on bpffs");
        let pins = config["bpfPinDir"].as_str().unwrap();
        let at = bpffs["mountPath"].as_str().unwrap();
        assert!(
            pins.starts_with(&format!("{at}/")),
            "{name}: {pins} is not on the host's bpffs"
        );

        let (bundle, _) = config_map_file(pod, agent, TRUST_BUNDLE, "roots.pem");
        assert_eq!(config["trustBundle"], bundle.as_str(), "{name}");

        let token = named(&pod["volumes"], "ca-token", "volume")["projected"]["sources"][0]
            ["serviceAccountToken"]["path"]
            .as_str()
            .unwrap();
        let token_at = mount(agent, "ca-token")["mountPath"].as_str().unwrap();
        assert_eq!(
            config["ca"]["token"],
            format!("{token_at}/{token}"),
            "{name}"
        );

        // The CNI plugin: its socket where the host's runtime finds it, the
        // node's CNI directories, and the runtime's namespace files at the
        // host's paths, new ones seen as they are made.
        let cni = &config["cni"];
        let socket = host_mount(pod, agent, "/var/run/warren");
        assert_eq!(socket["mountPath"], "/var/run/warren", "{name}");
        assert!(
            cni["socket"]
                .as_str()
                .unwrap()
                .starts_with("/var/run/warren/"),
            "{name}"
        );
        let conf = host_mount(pod, agent, "/etc/cni/net.d");
        assert_eq!(cni["install"]["confDir"], conf["mountPath"], "{name}");
        let bin = host_mount(pod, agent, "/opt/cni/bin");
        assert_eq!(cni["install"]["binDir"], bin["mountPath"], "{name}");
        let netns = host_mount(pod, agent, "/var/run/netns");
        assert_eq!(netns["mountPath"], "/var/run/netns", "{name}");
        assert_eq!(netns["mountPropagation"], "HostToContainer", "{name}");

        // The CA's address is its Service's name and port.
        let service = object(objects, "Service", CA);
        let port = &service["spec"]["ports"][0];
        assert_eq!(
            config["ca"]["address"],
            format!("{CA}.{NAMESPACE}.svc:{}", port["port"]),
            "{name}"
        );
        let (ca_pod_spec, ca) = ca(objects);
        let ca_labels =
            &object(objects, "Deployment", CA)["spec"]["template"]["metadata"]["labels"];
        for (key, value) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(
                &ca_labels[key], value,
                "{name}: the Service selects no CA pod"
            );
        }
        assert_eq!(
            port_number(ca, &port["targetPort"]),
            arg(ca, "--listen")
                .rsplit_once(':')
                .unwrap()
                .1
                .parse::<u64>()
                .unwrap(),
            "{name}: the Service sends agents where the CA does not listen"
        );
        assert!(ca_pod_spec["hostNetwork"].is_null(), "{name}");
    }
}

#[test]
fn the_agents_token_is_for_the_ca_and_the_ca_knows_the_agents() {
    for name in INSTALLS {
        let objects = &rendered(name).objects;
        let (pod, _) = agent(objects);
        let (_, ca) = ca(objects);
        let token = &named(&pod["volumes"], "ca-token", "volume")["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], arg(ca, "--token-audience"), "{name}");
        assert_eq!(token["expirationSeconds"], 3600, "{name}");
        assert_eq!(
            arg(ca, "--agent-service-account"),
            format!(
                "{NAMESPACE}/{}",
                pod["serviceAccountName"].as_str().unwrap()
            ),
            "{name}"
        );
        assert!(
            strings(&ca["args"]).contains(&"--kubernetes"),
            "{name}: the CA must check agents' tokens"
        );
        assert_eq!(
            arg(ca, "--trust-bundle-configmap"),
            format!("{NAMESPACE}/{TRUST_BUNDLE}"),
            "{name}"
        );
        // The trust domain: the agents' and the CA's are one.
        let config = agent_config(objects);
        assert_eq!(
            config["trustDomain"].as_str().unwrap_or("cluster.local"),
            arg(ca, "--trust-domain"),
            "{name}: agents and CA disagree on the trust domain"
        );
    }
    // The example overlay really changes it, in both places.
    let (_, ca) = ca(&rendered("examples/custom").objects);
    assert_eq!(arg(ca, "--trust-domain"), "mesh.example.com");
}

#[test]
fn the_trust_bundle_ships_empty_and_the_agents_read_it_live() {
    for name in INSTALLS {
        let objects = &rendered(name).objects;
        let bundle = object(objects, "ConfigMap", TRUST_BUNDLE);
        // Re-applying the manifests must never empty what the CA wrote.
        assert!(
            bundle["data"].is_null() && bundle["binaryData"].is_null(),
            "{name}"
        );
        let (pod, agent) = agent(objects);
        let (_, referenced) = config_map_file(pod, agent, TRUST_BUNDLE, "roots.pem");
        assert_eq!(referenced, TRUST_BUNDLE, "{name}");
        // subPath mounts never see updates: a rotated root would not arrive.
        for container in all_containers(pod) {
            for m in container["volumeMounts"].as_array().into_iter().flatten() {
                assert!(m["subPath"].is_null(), "{name}: {m}");
            }
        }
    }
}

#[test]
fn no_volume_is_mounted_inside_another() {
    for name in KUSTOMIZATIONS {
        for (what, workload) in pod_templates(&rendered(name).objects) {
            for container in all_containers(pod_spec(workload)) {
                let paths: Vec<&str> = container["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|m| m["mountPath"].as_str().unwrap())
                    .collect();
                for outer in &paths {
                    for inner in &paths {
                        assert!(
                            !inner.starts_with(&format!("{}/", outer.trim_end_matches('/'))),
                            "{name}: {what} mounts {inner} inside {outer}, which a read-only \
                             ConfigMap or Secret volume cannot hold"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn warren_never_captures_itself() {
    for name in KUSTOMIZATIONS {
        let objects = &rendered(name).objects;
        for namespace in objects.iter().filter(|o| o["kind"] == "Namespace") {
            assert_ne!(
                namespace["metadata"]["labels"][AMBIENT.0], AMBIENT.1,
                "{name}: warren's namespace is in the mesh"
            );
        }
        for (what, workload) in pod_templates(objects) {
            let labels = &workload["spec"]["template"]["metadata"]["labels"];
            assert_eq!(
                labels[AMBIENT.0], "none",
                "{name}: {what} does not opt out of the mesh"
            );
        }
    }
    for name in INSTALLS {
        let (pod, _) = agent(&rendered(name).objects);
        assert_eq!(
            pod["hostNetwork"], true,
            "{name}: host-network pods are never enrolled"
        );
    }
}

#[test]
fn every_object_is_in_warren_system_or_cluster_scoped() {
    for name in KUSTOMIZATIONS {
        for o in &rendered(name).objects {
            let kind = o["kind"].as_str().unwrap();
            let what = format!("{name}: {kind} {}", o["metadata"]["name"]);
            if CLUSTER_SCOPED.contains(&kind) {
                assert!(
                    o["metadata"]["namespace"].is_null(),
                    "{what} is cluster-scoped"
                );
            } else {
                assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{what}");
            }
            for subject in o["subjects"].as_array().into_iter().flatten() {
                assert_eq!(subject["namespace"], NAMESPACE, "{what}");
            }
            if kind == "Namespace" {
                assert_eq!(o["metadata"]["name"], NAMESPACE, "{what}");
            }
        }
    }
}

#[test]
fn images_carry_warrens_version() {
    let version = env!("CARGO_PKG_VERSION");
    let mut seen = BTreeSet::new();
    for name in KUSTOMIZATIONS {
        for (what, workload) in pod_templates(&rendered(name).objects) {
            for container in all_containers(pod_spec(workload)) {
                let image = container["image"].as_str().unwrap();
                assert!(
                    image.ends_with(&format!(":{version}")),
                    "{name}: {what} runs {image}, not warren {version}"
                );
                seen.insert((name, image.to_owned()));
            }
        }
    }
    for name in ["base", "uninstall"] {
        let images: BTreeSet<&str> = seen
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, i)| i.rsplit_once(':').unwrap().0)
            .collect();
        let expected: BTreeSet<&str> = match name {
            "base" => [
                "ghcr.io/warren-mesh/warren-agent",
                "ghcr.io/warren-mesh/warren-ca",
            ]
            .into(),
            _ => ["ghcr.io/warren-mesh/warren-agent"].into(),
        };
        assert_eq!(images, expected, "{name}");
    }
}

#[test]
fn the_ca_runs_unprivileged_on_its_cacerts_secret() {
    for name in ["base", "standalone", "examples/custom"] {
        let objects = &rendered(name).objects;
        let (pod, ca) = ca(objects);
        let sc = &ca["securityContext"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{name}");
        assert!(
            sc["capabilities"]["add"].is_null(),
            "{name}: the CA needs no capability"
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod[host].is_null(), "{name}: {host}");
        }
        let cacerts = named(&pod["volumes"], "cacerts", "volume");
        assert_eq!(cacerts["secret"]["secretName"], "cacerts", "{name}");
        assert_eq!(cacerts["secret"]["defaultMode"], 0o440, "{name}");
        assert_eq!(
            mount(ca, "cacerts")["mountPath"],
            arg(ca, "--cacerts"),
            "{name}"
        );
        for (probe, path) in [
            ("readinessProbe", "/healthz/ready"),
            ("livenessProbe", "/healthz/live"),
        ] {
            let get = &ca[probe]["httpGet"];
            assert_eq!(get["path"], path, "{name}");
            assert_eq!(
                port_number(ca, &get["port"]).to_string(),
                arg(ca, "--health-listen").rsplit_once(':').unwrap().1,
                "{name}: {probe}"
            );
        }
    }
    // The lab's CA makes its own root and needs no Secret.
    let (pod, ca) = ca(&rendered("examples/lab").objects);
    assert!(
        strings(&ca["args"])
            .iter()
            .all(|a| !a.starts_with("--cacerts"))
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["secret"].is_null())
    );
    assert_eq!(mount(ca, "lab-ca")["mountPath"], arg(ca, "--self-signed"));
}

/// A role's rules as (apiGroup, resource, resourceNames, verbs) rows.
fn rules(role: &Value) -> BTreeSet<(String, String, String, String)> {
    let mut rows = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                rows.insert((
                    group.to_owned(),
                    resource.to_owned(),
                    strings(&rule["resourceNames"]).join(","),
                    strings(&rule["verbs"]).join(","),
                ));
            }
        }
    }
    rows
}

fn rows(expected: &[(&str, &str, &str, &str)]) -> BTreeSet<(String, String, String, String)> {
    expected
        .iter()
        .map(|(g, r, n, v)| (g.to_string(), r.to_string(), n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn rbac_grants_only_what_the_code_uses() {
    let objects = &rendered("base").objects;
    assert_eq!(
        rules(object(objects, "ClusterRole", AGENT)),
        rows(&[
            ("", "pods", "", "list,watch"),
            ("", "namespaces", "", "list,watch"),
            ("", "services", "", "list,watch"),
            ("discovery.k8s.io", "endpointslices", "", "list,watch"),
            ("security.istio.io", "peerauthentications", "", "list,watch"),
            (
                "security.istio.io",
                "authorizationpolicies",
                "",
                "list,watch"
            ),
            ("", "nodes", "", "get,patch"),
        ]),
        "the agent reads, and writes only its own Node's taint"
    );
    assert_eq!(
        rules(object(objects, "ClusterRole", CA)),
        rows(&[
            ("authentication.k8s.io", "tokenreviews", "", "create"),
            ("", "pods", "", "list,watch"),
        ])
    );
    assert_eq!(
        rules(object(objects, "Role", CA)),
        rows(&[("", "configmaps", TRUST_BUNDLE, "patch")]),
        "the CA touches its own ConfigMap only"
    );
    let roles: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 3, "an unexpected role");
    for (kind, name, role_kind) in [
        ("ClusterRoleBinding", AGENT, "ClusterRole"),
        ("ClusterRoleBinding", CA, "ClusterRole"),
        ("RoleBinding", CA, "Role"),
    ] {
        let binding = object(objects, kind, name);
        assert_eq!(binding["roleRef"]["kind"], role_kind);
        assert_eq!(binding["roleRef"]["name"], name);
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}])
        );
    }
    // Each workload runs as the account its role is bound to.
    assert_eq!(agent(objects).0["serviceAccountName"], AGENT);
    assert_eq!(ca(objects).0["serviceAccountName"], CA);
}

#[test]
fn uninstall_cleans_where_the_agent_pins_on_every_node() {
    let objects = &rendered("uninstall").objects;
    let daemonset = object(objects, "DaemonSet", "warren-uninstall");
    let pod = pod_spec(daemonset);
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(
        pod["automountServiceAccountToken"], false,
        "it needs no API access"
    );
    let init = named(&pod["initContainers"], "uninstall", "init container");
    let done = named(&pod["containers"], "done", "container");
    assert_eq!(strings(&init["args"])[..2], ["uninstall", "--config"]);
    assert_eq!(strings(&done["args"])[..2], ["uninstall", "--config"]);
    assert!(
        !strings(&init["args"]).contains(&"--wait"),
        "the init container must finish"
    );
    assert!(strings(&done["args"]).contains(&"--wait"));
    let agent = agent_config(&rendered("base").objects);
    for container in [init, done] {
        let config = mounted_config(objects, pod, container, "warren-uninstall-config");
        assert_eq!(
            config["bpfPinDir"], agent["bpfPinDir"],
            "uninstall looks elsewhere than the agent pins"
        );
        // The CNI plugin comes out of the node's configuration, from where
        // the agent put it.
        assert_eq!(
            config["cni"]["install"], agent["cni"]["install"],
            "uninstall looks elsewhere than the agent installs the CNI plugin"
        );
        for host in ["/etc/cni/net.d", "/opt/cni/bin"] {
            let at = host_mount(pod, container, host)["mountPath"].clone();
            assert!(
                [
                    &config["cni"]["install"]["confDir"],
                    &config["cni"]["install"]["binDir"]
                ]
                .contains(&&at),
                "{host} mounted at {at}, which the config does not name"
            );
        }
        let bpffs = host_mount(pod, container, "/sys/fs/bpf");
        assert_eq!(bpffs["mountPath"], "/sys/fs/bpf");
        assert_eq!(
            env(container, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
    }
}

/// The tests' API server (Kubernetes 1.20) validates what an offline schema
/// cannot: cross-field rules (e.g. a memory request above its limit),
/// quantities, names, and references to priority classes. Fields newer than
/// 1.20 (appArmorProfile) are dropped by it, not refused.
#[test]
fn a_real_api_server_accepts_every_manifest() {
    let lab = test_lab(1, 0);
    let cp = ControlPlane::start(&lab).expect("control plane");
    let mut stored = BTreeMap::new();
    for name in [
        "standalone",
        "uninstall",
        "examples/custom",
        "examples/lab",
        "base",
        "istio-crds",
    ] {
        for object in &rendered(name).objects {
            let id = format!(
                "{} {}",
                object["kind"].as_str().unwrap(),
                object["metadata"]["name"].as_str().unwrap()
            );
            // The tests' apply replaces an existing object whole, which a
            // Service refuses (its cluster IP cannot be unset); no overlay
            // changes the Service.
            if object["kind"] == "Service" && stored.contains_key(&id) {
                continue;
            }
            let applied = cp
                .apply(&serde_yaml::to_string(object).unwrap())
                .unwrap_or_else(|e| panic!("the API server refuses {name}'s {id}: {e:#}"));
            assert_eq!(applied.len(), 1);
            stored.insert(id, serde_json::to_value(&applied[0]).unwrap());
        }
    }
    // What it stored is what was shipped (the base, applied last).
    let stored = stored[&format!("DaemonSet {AGENT}")].clone();
    let (pod, agent) = agent(std::slice::from_ref(&stored));
    let mut caps = strings(&agent["securityContext"]["capabilities"]["add"]);
    caps.sort_unstable();
    assert_eq!(
        caps, AGENT_CAPABILITIES,
        "the API server changed the capabilities"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
}

/// The agent's config as shipped is one the agent accepts: the fields it
/// names exist and agree with each other (`ca.token` with a `trustBundle`).
#[test]
fn the_agent_accepts_the_shipped_config() {
    for name in INSTALLS {
        let config = serde_yaml::to_string(&agent_config(&rendered(name).objects)).unwrap();
        warren_agent::config::Config::parse_with_env(
            Path::new("config.yaml"),
            &config,
            Some("node-1".into()),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The CA's arguments as shipped are ones `warren-ca serve` accepts: run
/// with them (variables expanded as the kubelet does; a lab's self-signed
/// root made in a temporary directory), it gets past parsing and stops at
/// the first thing this machine lacks: the `cacerts` Secret, or for the lab
/// the Pod's in-cluster credentials.
#[test]
fn the_ca_accepts_the_shipped_arguments() {
    let binary = warren_tests::harness::binary("warren-ca").unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for name in INSTALLS {
        let (_, container) = ca(&rendered(name).objects);
        let args: Vec<String> = strings(&container["args"])
            .iter()
            .map(|a| match a.strip_prefix("--self-signed=") {
                Some(_) => format!("--self-signed={}", scratch.path().display()),
                None => expand(container, a),
            })
            .collect();
        let output = Command::new(&binary).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(!stderr.contains("Usage:"), "{name}: {stderr}");
        let expected = if args.iter().any(|a| a.starts_with("--self-signed=")) {
            "in-cluster credentials"
        } else {
            "/etc/cacerts/"
        };
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
}

#[test]
fn prometheus_finds_the_metrics_where_they_are_served() {
    for name in INSTALLS {
        let objects = &rendered(name).objects;
        // The agent: its config says where; the pod's annotations and its
        // declared port say the same.
        let (_, agent) = agent(objects);
        let listen = agent_config(objects)["metricsListen"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let port = listen.rsplit_once(':').map(|(_, p)| p.to_owned());
        let annotations =
            &object(objects, "DaemonSet", AGENT)["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(
            annotations["prometheus.io/port"].as_str(),
            port.as_deref(),
            "{name}: the agent's metricsListen ({listen}) and its annotation"
        );
        assert_eq!(
            port_number(agent, &json!("http-monitoring")).to_string(),
            port.unwrap(),
            "{name}"
        );
        // The admin endpoint is never opened beyond the node.
        let admin = agent_config(objects)["adminListen"]
            .as_str()
            .unwrap_or("127.0.0.1:15000")
            .to_owned();
        assert!(
            admin.starts_with("127.0.0.1:"),
            "{name}: adminListen {admin}"
        );

        // The CA: --metrics-listen, its annotation and its port.
        let (_, ca) = ca(objects);
        let ca_port = arg(ca, "--metrics-listen")
            .rsplit_once(':')
            .unwrap()
            .1
            .to_owned();
        let annotations =
            &object(objects, "Deployment", CA)["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(
            annotations["prometheus.io/port"],
            ca_port.as_str(),
            "{name}"
        );
        assert_eq!(
            port_number(ca, &json!("http-monitoring")).to_string(),
            ca_port,
            "{name}"
        );
    }
}
