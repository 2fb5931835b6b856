//! The CNI spec's side of the plugin: environment, configuration, the
//! previous plugin's result, error objects and VERSION.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};

use warren_cni::PodRef;

pub use warren_cni::SUPPORTED_VERSIONS;

/// The largest configuration read from stdin.
pub const MAX_CONFIG: usize = 1024 * 1024;

/// A failure, printed as the spec's error object.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub cni_version: Option<String>,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            cni_version: None,
        }
    }
    pub fn incompatible(msg: impl Into<String>) -> Self {
        Self::new(1, msg)
    }
    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(4, msg)
    }
    pub fn io(msg: impl Into<String>) -> Self {
        Self::new(5, msg)
    }
    pub fn decode(msg: impl Into<String>) -> Self {
        Self::new(6, msg)
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(7, msg)
    }
    /// The spec's "try again later": the runtime retries the sandbox.
    pub fn agent_away(msg: impl Into<String>) -> Self {
        Self::new(11, msg)
    }
    /// 1.1.0's STATUS: the plugin cannot serve ADDs.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(50, msg)
    }
    /// The agent could not enroll the pod (plugin-specific code).
    pub fn refused(msg: impl Into<String>) -> Self {
        Self::new(100, msg)
    }
    /// The agent said something this plugin does not understand.
    pub fn protocol(msg: impl Into<String>) -> Self {
        Self::new(101, msg)
    }

    pub fn to_json(&self) -> String {
        let mut object = json!({"code": self.code, "msg": self.msg});
        if let Some(version) = &self.cni_version {
            object["cniVersion"] = version.clone().into();
        }
        object.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    /// 1.1.0: whether the plugin is ready for ADDs.
    Status,
    /// 1.1.0: garbage collection of what no sandbox uses.
    Gc,
}

/// The environment the runtime runs the plugin with.
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Self {
        Self::from_vars(std::env::vars())
    }

    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            vars: vars.into_iter().collect(),
        }
    }

    pub fn command(&self) -> Result<Command, CniError> {
        match self.vars.get("CNI_COMMAND").map(String::as_str) {
            Some("ADD") => Ok(Command::Add),
            Some("DEL") => Ok(Command::Del),
            Some("CHECK") => Ok(Command::Check),
            Some("VERSION") => Ok(Command::Version),
            Some("STATUS") => Ok(Command::Status),
            Some("GC") => Ok(Command::Gc),
            Some(other) => Err(CniError::env(format!(
                "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
            ))),
            None => Err(CniError::env(
                "required env variables [CNI_COMMAND] missing: warren-cni is a CNI plugin, run by \
                 the container runtime",
            )),
        }
    }

    pub fn required(&self, name: &str) -> Result<String, CniError> {
        self.vars
            .get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| CniError::env(format!("required env variables [{name}] missing")))
    }

    /// The Kubernetes pod of `CNI_ARGS` (`K=V;K=V`), if it names one.
    pub fn pod(&self) -> Result<Option<PodRef>, CniError> {
        let args = self.vars.get("CNI_ARGS").map(String::as_str).unwrap_or("");
        let mut pairs = HashMap::new();
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| CniError::env(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
            pairs.insert(key, value);
        }
        let (Some(namespace), Some(name)) = (
            pairs.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty()),
            pairs.get("K8S_POD_NAME").filter(|v| !v.is_empty()),
        ) else {
            return Ok(None);
        };
        Ok(Some(PodRef {
            namespace: (*namespace).to_owned(),
            name: (*name).to_owned(),
            uid: pairs
                .get("K8S_POD_UID")
                .filter(|v| !v.is_empty())
                .map(|v| (*v).to_owned()),
        }))
    }
}

/// The plugin's configuration, as the runtime derived it from the list.
#[derive(Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub socket: Option<PathBuf>,
    pub timeout: Option<Duration>,
    prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        if stdin.len() > MAX_CONFIG {
            return Err(CniError::decode(format!(
                "the configuration is over {MAX_CONFIG} bytes"
            )));
        }
        let object: Map<String, Value> = serde_json::from_slice(stdin)
            .map_err(|e| CniError::decode(format!("error unmarshalling network config: {e}")))?;
        let cni_version = match object.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            _ => {
                return Err(CniError::invalid(
                    "cniVersion missing from the configuration",
                ));
            }
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::incompatible(format!(
                "cniVersion {cni_version} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let socket = match object.get("socket") {
            None => None,
            Some(Value::String(s)) if Path::new(s).is_absolute() => Some(PathBuf::from(s)),
            Some(other) => {
                return Err(CniError::invalid(format!(
                    "socket must be an absolute path, not {other}"
                )));
            }
        };
        let timeout = match object.get("timeoutSeconds") {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some_and(|s| (1..=600).contains(&s)) => {
                n.as_u64().map(Duration::from_secs)
            }
            Some(other) => {
                return Err(CniError::invalid(format!(
                    "timeoutSeconds must be a whole number of seconds from 1 to 600, not {other}"
                )));
            }
        };
        Ok(Self {
            cni_version,
            socket,
            timeout,
            prev_result: object.get("prevResult").cloned(),
        })
    }

    /// The previous plugin's result, which a chained plugin must have.
    pub fn previous_result(&self) -> Result<PreviousResult, CniError> {
        match &self.prev_result {
            Some(Value::Object(result)) => Ok(PreviousResult(result.clone())),
            Some(_) => Err(CniError::decode("prevResult is not an object")),
            None => Err(CniError::invalid(
                "no prevResult: warren-cni must come after the plugin that gives pods their \
                 addresses, in a plugin list",
            )),
        }
    }
}

/// The result a chained plugin receives and passes on.
pub struct PreviousResult(Map<String, Value>);

impl PreviousResult {
    /// The IPv4 addresses given to the interface inside `netns` (or to no
    /// interface in particular).
    pub fn ipv4_in(&self, netns: &Path) -> Vec<Ipv4Addr> {
        let interfaces = self.0.get("interfaces").and_then(Value::as_array);
        let in_sandbox = |index: &Value| {
            let Some(index) = index.as_u64() else {
                return false;
            };
            interfaces
                .and_then(|list| list.get(index as usize))
                .and_then(|i| i.get("sandbox"))
                .and_then(Value::as_str)
                .is_some_and(|sandbox| Path::new(sandbox) == netns)
        };
        let mut ips: Vec<Ipv4Addr> = self
            .0
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|ip| ip.get("interface").is_none_or(in_sandbox))
            .filter_map(|ip| ip.get("address")?.as_str())
            .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
            .collect();
        ips.dedup();
        ips
    }

    /// The result to print: unchanged, at the configuration's version.
    pub fn output(&self, cni_version: &str) -> Result<String, CniError> {
        let mut result = self.0.clone();
        result.insert("cniVersion".into(), cni_version.into());
        serde_json::to_string(&result).map_err(|e| CniError::io(format!("encoding result: {e}")))
    }
}

/// VERSION's answer.
pub fn version(stdin: &[u8]) -> Result<String, CniError> {
    // The runtime may send {"cniVersion": ...}; the answer names the
    // version asked for when it is one of ours.
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()));
    let current = asked.unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].into());
    Ok(json!({"cniVersion": current, "supportedVersions": SUPPORTED_VERSIONS}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_vars(pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())))
    }

    #[test]
    fn reads_the_pod_from_cni_args_whatever_else_they_hold() {
        let e = env(&[(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=11111111-2222-3333-4444-555555555555",
        )]);
        let pod = e.pod().unwrap().unwrap();
        assert_eq!(pod.to_string(), "shop/web-1");
        assert_eq!(
            pod.uid.as_deref(),
            Some("11111111-2222-3333-4444-555555555555")
        );
        // dockershim sent no UID.
        let e = env(&[("CNI_ARGS", "K8S_POD_NAMESPACE=a;K8S_POD_NAME=b")]);
        assert_eq!(e.pod().unwrap().unwrap().uid, None);
        // Not a Kubernetes pod.
        assert_eq!(env(&[("CNI_ARGS", "IgnoreUnknown=1")]).pod().unwrap(), None);
        assert_eq!(env(&[]).pod().unwrap(), None);
        assert_eq!(env(&[("CNI_ARGS", "junk")]).pod().unwrap_err().code, 4);
    }

    #[test]
    fn takes_the_addresses_of_the_sandbox_interface_only() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"warren-cni","prevResult":{
                "cniVersion":"1.0.0",
                "interfaces":[{"name":"br0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
                "ips":[{"interface":2,"address":"10.99.0.2/24","gateway":"10.99.0.1"},
                       {"interface":0,"address":"10.99.0.1/24"},
                       {"interface":2,"address":"fd00::2/64"}],
                "dns":{}}}"#,
        )
        .unwrap();
        let previous = conf.previous_result().unwrap();
        assert_eq!(
            previous.ipv4_in(Path::new("/var/run/netns/p")),
            vec![Ipv4Addr::new(10, 99, 0, 2)]
        );
        let output: Value = serde_json::from_str(&previous.output("1.0.0").unwrap()).unwrap();
        assert_eq!(output["ips"][0]["address"], "10.99.0.2/24");
        assert_eq!(output["cniVersion"], "1.0.0");
    }

    #[test]
    fn refuses_bad_configuration_naming_the_problem() {
        let error = NetConf::parse(b"{").unwrap_err();
        assert_eq!(error.code, 6);
        let error = NetConf::parse(br#"{"cniVersion":"0.2.0"}"#).unwrap_err();
        assert_eq!(error.code, 1);
        assert!(error.msg.contains("0.2.0"), "{}", error.msg);
        let error = NetConf::parse(br#"{"cniVersion":"1.0.0","socket":"rel"}"#).unwrap_err();
        assert_eq!(error.code, 7);
        let error = NetConf::parse(br#"{"cniVersion":"1.0.0","timeoutSeconds":0}"#).unwrap_err();
        assert!(error.msg.contains("timeoutSeconds"), "{}", error.msg);
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0"}"#).unwrap();
        assert!(
            conf.previous_result()
                .err()
                .unwrap()
                .msg
                .contains("prevResult")
        );
    }

    #[test]
    fn version_answers_as_the_spec_says() {
        let answer: Value =
            serde_json::from_str(&version(br#"{"cniVersion":"0.4.0"}"#).unwrap()).unwrap();
        assert_eq!(answer["cniVersion"], "0.4.0");
        assert_eq!(
            answer["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let answer: Value = serde_json::from_str(&version(b"").unwrap()).unwrap();
        assert_eq!(answer["cniVersion"], "1.1.0");
    }
}
