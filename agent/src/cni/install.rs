//! Chaining `warren-cni` after the node's primary CNI plugin, and removing
//! it again.
//!
//! The runtime uses one config file: the first by name that parses and has a
//! plugin (docs/cni-facts.md §4). As istio-cni's installer does, warren edits
//! that file in place: it appends its entry to the primary's plugin list.
//! The primary may rewrite its file at any time (and drop our entry), so
//! [`keep_installed`] watches the directory and puts the entry back.
//!
//! The file is parsed into `serde_json::Value`, whose objects keep keys
//! sorted (the workspace does not enable `preserve_order`): a rewritten file
//! holds the same JSON, but its keys may come in a different order.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use warren_daemon::logging::Chain;

/// The `type` of warren's plugin in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "warren-cni";

const CONFIG_MODE: u32 = 0o644;
const BINARY_MODE: u32 = 0o755;
/// How often to look when the directory cannot be watched.
const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// A primary writes several files in a row; let it finish before reading.
const SETTLE: Duration = Duration::from_millis(200);
/// How often the wait for a primary CNI config is said again.
const WAITING_REMINDER: Duration = Duration::from_secs(300);
/// A watch can miss events (a full inotify queue drops them); checking now
/// and then costs one read when nothing changed.
const RESYNC: Duration = Duration::from_secs(60);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Tries at writing a file that another writer keeps changing under us.
const WRITE_ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot list the CNI config directory {}", path.display())]
    ListDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not valid JSON", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {problem}", path.display())]
    BadConfig {
        path: PathBuf,
        #[source]
        problem: ConfigProblem,
    },
    /// From the pure functions, which know no file.
    #[error(transparent)]
    Config(#[from] ConfigProblem),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} kept changing while warren-cni was being written into it ({attempts} tries)", path.display())]
    KeptChanging { path: PathBuf, attempts: usize },
}

/// What is wrong with a config or with our entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    #[error("the config is {found}, not a JSON object")]
    NotAnObject { found: &'static str },
    #[error("\"plugins\" is {found}, not an array")]
    PluginsNotAList { found: &'static str },
    #[error("the config has neither a \"plugins\" list nor a plugin \"type\"")]
    NoPlugin,
    #[error("the entry's \"type\" is {found}, not \"{PLUGIN_TYPE}\"")]
    EntryNotOurs { found: String },
    #[error(
        "it is a symbolic link: the agent edits a primary's file in place, and would replace the \
         link with a copy"
    )]
    SymbolicLink,
    #[error(
        "its cniVersion {found} is not one warren-cni speaks ({}): added, it would fail every \
         pod's ADD",
        warren_cni::SUPPORTED_VERSIONS.join(", ")
    )]
    UnsupportedVersion { found: String },
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Installed {
    /// Wrote our entry into this file.
    Written(PathBuf),
    /// The primary, this file, already held our entry as it should be.
    Unchanged(PathBuf),
    /// No valid config in the directory: the primary CNI is not there yet.
    NoPrimary,
}

/// The config file the runtime uses: the first by name (byte order) among
/// `*.conf`, `*.conflist` and `*.json` that parses and has a plugin. Like
/// the runtime, skips files that do not parse; ignores hidden files (ours,
/// and other writers', temporary files).
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(find_primary(conf_dir)?.map(|found| found.path))
}

/// `config` (a conflist, or a single-plugin object, which becomes a list)
/// with every `warren-cni` plugin removed and `entry` appended last.
/// Everything else is kept: unknown keys, the other plugins and their order.
pub fn with_plugin(config: &Value, entry: &Map<String, Value>) -> Result<Value, InstallError> {
    match entry.get("type") {
        Some(Value::String(found)) if found == PLUGIN_TYPE => {}
        other => {
            return Err(ConfigProblem::EntryNotOurs {
                found: other.map_or_else(|| "missing".to_owned(), Value::to_string),
            }
            .into());
        }
    }
    let mut list = as_list(config)?;
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        plugins.retain(|plugin| !is_ours(plugin));
        plugins.push(Value::Object(entry.clone()));
    }
    Ok(Value::Object(list))
}

/// `config` with every `warren-cni` plugin removed; anything that is not a
/// list of plugins is returned as it is.
pub fn without_plugin(config: &Value) -> Value {
    let mut config = config.clone();
    if let Some(Value::Array(plugins)) = config.get_mut("plugins") {
        plugins.retain(|plugin| !is_ours(plugin));
    }
    config
}

/// Puts `entry` last in the primary's plugin list, writing only when that
/// changes the file, so that our own writes, seen by the watch, settle.
///
/// A single-plugin primary (`.conf`, or a `.json` object) becomes
/// `<stem>.conflist`: the list form is only loaded from `.conflist` files,
/// and the same stem keeps the file's place in the name order. The new file
/// is written before the old one is removed, so the runtime never finds the
/// directory without a valid config.
pub fn install(conf_dir: &Path, entry: &Map<String, Value>) -> Result<Installed, InstallError> {
    for _ in 0..WRITE_ATTEMPTS {
        let Some(primary) = find_primary(conf_dir)? else {
            return Ok(Installed::NoPrimary);
        };
        // Renaming over a link would replace it with a copy, and the
        // primary's later writes to the link's target would no longer be
        // what the runtime reads.
        let link = fs::symlink_metadata(&primary.path).map_err(|source| InstallError::Read {
            path: primary.path.clone(),
            source,
        })?;
        if link.file_type().is_symlink() {
            return Err(InstallError::BadConfig {
                path: primary.path.clone(),
                problem: ConfigProblem::SymbolicLink,
            });
        }
        let version = primary.config["cniVersion"].as_str().unwrap_or_default();
        if !warren_cni::SUPPORTED_VERSIONS.contains(&version) {
            return Err(InstallError::BadConfig {
                path: primary.path.clone(),
                problem: ConfigProblem::UnsupportedVersion {
                    found: primary.config["cniVersion"].to_string(),
                },
            });
        }
        let wanted = with_plugin(&primary.config, entry).map_err(|e| in_file(e, &primary.path))?;
        let target = if is_single_plugin(&primary.config) {
            primary.path.with_extension("conflist")
        } else {
            primary.path.clone()
        };
        if target == primary.path && wanted == primary.config {
            return Ok(Installed::Unchanged(target));
        }
        let guard = Guard {
            path: &primary.path,
            expected: &primary.bytes,
        };
        if !write_atomic(&target, &to_file_bytes(&wanted), CONFIG_MODE, Some(guard))? {
            continue;
        }
        if target != primary.path {
            remove_if_present(&primary.path)?;
        }
        return Ok(Installed::Written(target));
    }
    Err(InstallError::KeptChanging {
        path: conf_dir.to_owned(),
        attempts: WRITE_ATTEMPTS,
    })
}

/// Removes the `warren-cni` entry from every config file in `conf_dir` that
/// has one (not just the primary: an older primary may still hold one), and
/// returns the files it changed. Goes on past a file it cannot fix, and then
/// reports the first such error.
///
/// A `.conflist` that [`install`] made from a `.conf` stays a `.conflist`:
/// the runtime loads both forms alike, and the primary, if it rewrites its
/// `.conf`, will sort first again.
pub fn uninstall(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let mut first_error = None;
    for path in config_files(conf_dir)? {
        match remove_entry(&path) {
            Ok(true) => changed.push(path),
            Ok(false) => {}
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(changed),
    }
}

/// Copies the plugin binary to `bin_dir/warren-cni`, unless it is there
/// already with this content. The runtime may be executing the old binary
/// meanwhile: the new one is written beside it and renamed over it, and a
/// process that runs the old file keeps its inode, so no exec ever sees a
/// half-written file (writing in place would also fail with ETXTBSY).
pub fn copy_binary(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let content = fs::read(source).map_err(|source_error| InstallError::Read {
        path: source.to_owned(),
        source: source_error,
    })?;
    match fs::read(&target) {
        Ok(existing) if existing == content => {
            let mode = fs::metadata(&target)
                .map_err(|source| read_error(&target, source))?
                .permissions()
                .mode();
            if mode & 0o7777 != BINARY_MODE {
                fs::set_permissions(&target, fs::Permissions::from_mode(BINARY_MODE))
                    .map_err(|source| write_error(&target, source))?;
            }
            return Ok(target);
        }
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(read_error(&target, source)),
    }
    write_atomic(&target, &content, BINARY_MODE, None)?;
    Ok(target)
}

/// Removes `bin_dir/warren-cni`; false if it was not there. A runtime still
/// executing it keeps running the unlinked file.
pub fn remove_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    remove_if_present(&bin_dir.join(PLUGIN_TYPE))
}

/// Installs `entry` and keeps it installed: re-installs whenever the
/// directory changes (a primary that rewrites its file drops our entry).
/// Waits for a primary if there is none yet. Retries failures with growing
/// pauses. Polls every 5 s if the directory cannot be watched. Never
/// returns: run it as a task, and abort the task to stop.
pub async fn keep_installed(
    conf_dir: PathBuf,
    entry: Map<String, Value>,
    installed: tokio::sync::watch::Sender<bool>,
) {
    let dir = conf_dir.display().to_string();
    // The runtime may not have made the directory yet, and a watch needs it;
    // an empty directory means to the runtime what a missing one does.
    if let Err(error) = fs::create_dir_all(&conf_dir) {
        warn!(%dir, error = %error, "cannot create the CNI config directory");
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watcher = match warren_daemon::watch::watch_files(std::slice::from_ref(&conf_dir), tx) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            warn!(
                %dir,
                error = %Chain(&error),
                "cannot watch the CNI config directory; checking it every 5 s instead",
            );
            None
        }
    };
    let mut watching = watcher.is_some();
    let mut waiting_since: Option<std::time::Instant> = None;
    let mut last_said: Option<std::time::Instant> = None;
    let mut retry = RETRY_FIRST;
    loop {
        let (conf_dir, entry) = (conf_dir.clone(), entry.clone());
        // fsync can take a while on a busy disk: keep it off the runtime.
        let outcome = tokio::task::spawn_blocking(move || install(&conf_dir, &entry)).await;
        let failed = match outcome {
            Ok(Ok(Installed::Written(file))) => {
                info!(file = %file.display(), "added warren-cni to the CNI config");
                (waiting_since, last_said) = (None, None);
                installed.send_if_modified(|i| !std::mem::replace(i, true));
                false
            }
            Ok(Ok(Installed::Unchanged(_))) => {
                (waiting_since, last_said) = (None, None);
                installed.send_if_modified(|i| !std::mem::replace(i, true));
                false
            }
            Ok(Ok(Installed::NoPrimary)) => {
                installed.send_if_modified(|i| std::mem::replace(i, false));
                // Said at once, then every few minutes: the node keeps its
                // not-ready taint meanwhile, and a conf dir the runtime does
                // not read (k3s, RKE2, OpenShift keep theirs elsewhere) would
                // otherwise go unnoticed.
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if last_said.is_none_or(|t| t.elapsed() >= WAITING_REMINDER) {
                    last_said = Some(std::time::Instant::now());
                    warn!(
                        %dir,
                        waiting_s = since.elapsed().as_secs(),
                        "no CNI config in the directory yet; waiting for the primary CNI plugin \
                         to write one (the node keeps its warren.io/agent-not-ready taint until \
                         warren-cni is in it)"
                    );
                }
                false
            }
            Ok(Err(error)) => {
                installed.send_if_modified(|i| std::mem::replace(i, false));
                error!(%dir, error = %Chain(&error), retry_in = ?retry, "cannot add warren-cni to the CNI config");
                true
            }
            Err(error) => {
                error!(%dir, error = %error, retry_in = ?retry, "adding warren-cni to the CNI config failed");
                true
            }
        };
        if failed {
            // Not woken early by events: a failed write makes some itself.
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
            while rx.try_recv().is_ok() {}
            continue;
        }
        retry = RETRY_FIRST;
        if !watching {
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        }
        match tokio::time::timeout(RESYNC, rx.recv()).await {
            Ok(Some(_)) => {
                tokio::time::sleep(SETTLE).await;
                while rx.try_recv().is_ok() {}
            }
            Ok(None) => {
                warn!(%dir, "stopped watching the CNI config directory; checking it every 5 s instead");
                watching = false;
            }
            Err(_) => {}
        }
    }
}

/// A parsed config file.
struct Found {
    path: PathBuf,
    bytes: Vec<u8>,
    config: Value,
}

fn find_primary(conf_dir: &Path) -> Result<Option<Found>, InstallError> {
    for path in config_files(conf_dir)? {
        let Some((bytes, config)) = read_config(&path)? else {
            continue;
        };
        if has_plugin(&path, &config) {
            return Ok(Some(Found {
                path,
                bytes,
                config,
            }));
        }
    }
    Ok(None)
}

/// The directory's config files by name, in byte order, as the runtime
/// sorts them.
fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let list_error = |source| InstallError::ListDir {
        path: conf_dir.to_owned(),
        source,
    };
    let mut names = Vec::new();
    for dirent in fs::read_dir(conf_dir).map_err(list_error)? {
        let name = dirent.map_err(list_error)?.file_name();
        let path = Path::new(&name);
        let config_like = path
            .extension()
            .is_some_and(|ext| ext == "conf" || ext == "conflist" || ext == "json");
        if config_like && !name.as_encoded_bytes().starts_with(b".") {
            names.push(name);
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|name| conf_dir.join(name))
        .filter(|path| path.is_file())
        .collect())
}

/// The file's bytes and JSON; `None` if it does not parse, or vanished since
/// the directory was listed.
fn read_config(path: &Path) -> Result<Option<(Vec<u8>, Value)>, InstallError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(read_error(path, source)),
    };
    Ok(serde_json::from_slice(&bytes)
        .ok()
        .map(|config| (bytes, config)))
}

/// Whether the runtime would find a plugin in this file.
fn has_plugin(path: &Path, config: &Value) -> bool {
    let list = config
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|plugins| !plugins.is_empty());
    let single = config.get("type").and_then(Value::as_str).is_some();
    match path.extension().and_then(|ext| ext.to_str()) {
        Some("conflist") => list,
        Some("conf") => single,
        Some("json") => list || single,
        _ => false,
    }
}

fn is_single_plugin(config: &Value) -> bool {
    config.get("plugins").is_none()
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// `config` as a conflist: itself, or a single-plugin config wrapped as a
/// runtime does, the list taking its `cniVersion` and `name`.
fn as_list(config: &Value) -> Result<Map<String, Value>, ConfigProblem> {
    let Value::Object(object) = config else {
        return Err(ConfigProblem::NotAnObject {
            found: kind(config),
        });
    };
    match object.get("plugins") {
        Some(Value::Array(_)) => Ok(object.clone()),
        Some(other) => Err(ConfigProblem::PluginsNotAList { found: kind(other) }),
        None if object.contains_key("type") => {
            let mut plugin = object.clone();
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(value) = plugin.remove(key) {
                    list.insert(key.to_owned(), value);
                }
            }
            list.insert(
                "plugins".to_owned(),
                Value::Array(vec![Value::Object(plugin)]),
            );
            Ok(list)
        }
        None => Err(ConfigProblem::NoPlugin),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn in_file(error: InstallError, path: &Path) -> InstallError {
    match error {
        InstallError::Config(problem) => InstallError::BadConfig {
            path: path.to_owned(),
            problem,
        },
        other => other,
    }
}

/// Takes our entry out of one file; false if it had none (or is not a
/// config the runtime could read).
fn remove_entry(path: &Path) -> Result<bool, InstallError> {
    for _ in 0..WRITE_ATTEMPTS {
        let Some((bytes, config)) = read_config(path)? else {
            return Ok(false);
        };
        let stripped = without_plugin(&config);
        if stripped == config {
            return Ok(false);
        }
        let guard = Guard {
            path,
            expected: &bytes,
        };
        if write_atomic(path, &to_file_bytes(&stripped), CONFIG_MODE, Some(guard))? {
            return Ok(true);
        }
    }
    Err(InstallError::KeptChanging {
        path: path.to_owned(),
        attempts: WRITE_ATTEMPTS,
    })
}

fn to_file_bytes(config: &Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail: its keys are strings.
    let mut bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// A file that must still hold what a write was computed from.
#[derive(Clone, Copy)]
pub(super) struct Guard<'a> {
    path: &'a Path,
    expected: &'a [u8],
}

/// Writes `bytes` to `path` atomically: a hidden temporary file in the same
/// directory (the runtime ignores it, and rename needs one filesystem),
/// fsynced, then renamed over `path`. With a guard, gives up (false,
/// nothing written) if the guarded file changed since it was read: the
/// primary rewrote it meanwhile, and the caller must start again from its
/// new content rather than overwrite it.
pub(super) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    guard: Option<Guard<'_>>,
) -> Result<bool, InstallError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    // A name already taken is not ours to remove: fail before touching it.
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(|source| write_error(path, source))?;
    let result = write_then_rename(file, &temp, path, bytes, mode, guard);
    if !matches!(result, Ok(true)) {
        let _ = fs::remove_file(&temp);
    } else if let Ok(dir) = fs::File::open(dir) {
        // Makes the rename itself durable across a crash; the rename is
        // atomic either way, so a failure here changes nothing we rely on.
        let _ = dir.sync_all();
    }
    result
}

fn write_then_rename(
    mut file: fs::File,
    temp: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
    guard: Option<Guard<'_>>,
) -> Result<bool, InstallError> {
    let write_error = |source| write_error(path, source);
    // The umask may have cleared bits of `mode`; the runtime needs them all.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_error)?;
    file.write_all(bytes).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    if let Some(guard) = guard {
        match fs::read(guard.path) {
            Ok(now) if now == guard.expected => {}
            Ok(_) => return Ok(false),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(read_error(guard.path, source)),
        }
    }
    fs::rename(temp, path).map_err(|source| InstallError::Rename {
        from: temp.to_owned(),
        to: path.to_owned(),
        source,
    })?;
    Ok(true)
}

fn remove_if_present(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(InstallError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_error(path: &Path, source: io::Error) -> InstallError {
    InstallError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_error(path: &Path, source: io::Error) -> InstallError {
    InstallError::Write {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use serde_json::json;

    use super::*;

    fn entry() -> Map<String, Value> {
        object(json!({
            "type": "warren-cni",
            "socket": "/run/warren/cni.sock",
            "logLevel": "info",
        }))
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn calico() -> Value {
        json!({
            "name": "k8s-pod-network",
            "cniVersion": "0.3.1",
            "plugins": [
                {
                    "type": "calico",
                    "log_level": "info",
                    "datastore_type": "kubernetes",
                    "nodename": "node-1",
                    "mtu": 1440,
                    "ipam": {"type": "calico-ipam"},
                    "policy": {"type": "k8s"},
                    "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
                },
                {"type": "bandwidth", "capabilities": {"bandwidth": true}},
                {"type": "portmap", "snat": true, "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn flannel() -> Value {
        json!({
            "name": "cbr0",
            "cniVersion": "0.3.1",
            "plugins": [
                {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn kindnet() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "name": "kindnet",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": "/run/cni-ipam-state",
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "ranges": [[{"subnet": "10.244.0.0/24"}]]
                    },
                    "mtu": 1500
                },
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    fn bridge() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "name": "mynet",
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": true,
            "ipam": {"type": "host-local", "subnet": "10.22.0.0/16", "routes": [{"dst": "0.0.0.0/0"}]}
        })
    }

    /// `config` with `entry` appended to its plugins.
    fn appended(config: &Value, entry: &Map<String, Value>) -> Value {
        let mut config = config.clone();
        config["plugins"]
            .as_array_mut()
            .unwrap()
            .push(Value::Object(entry.clone()));
        config
    }

    fn write_json(dir: &Path, name: &str, config: &Value) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        path
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    fn types(config: &Value) -> Vec<&str> {
        config["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|plugin| plugin["type"].as_str().unwrap())
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|dirent| dirent.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn appends_the_entry_last_to_common_primaries() {
        for (name, config, before) in [
            (
                "10-calico.conflist",
                calico(),
                vec!["calico", "bandwidth", "portmap"],
            ),
            ("10-flannel.conflist", flannel(), vec!["flannel", "portmap"]),
            ("10-kindnet.conflist", kindnet(), vec!["ptp", "portmap"]),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = write_json(dir.path(), name, &config);
            assert_eq!(types(&config), before);

            let installed = install(dir.path(), &entry()).unwrap();

            assert_eq!(installed, Installed::Written(path.clone()), "{name}");
            let after = read_json(&path);
            assert_eq!(after, appended(&config, &entry()), "{name}");
            let bytes = fs::read(&path).unwrap();
            assert!(bytes.ends_with(b"}\n"), "{name}: no trailing newline");
            assert_eq!(mode(&path), 0o644, "{name}");
            // No temporary file left behind.
            assert_eq!(names(dir.path()), vec![name.to_owned()]);
        }
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_of_the_same_stem() {
        let dir = tempfile::tempdir().unwrap();
        let conf = write_json(dir.path(), "10-bridge.conf", &bridge());
        let conflist = dir.path().join("10-bridge.conflist");

        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Written(conflist.clone())
        );

        assert!(!conf.exists(), "the .conf is still there");
        let mut plugin = object(bridge());
        plugin.remove("cniVersion");
        plugin.remove("name");
        let expected = json!({
            "cniVersion": "0.4.0",
            "name": "mynet",
            "plugins": [plugin, entry()],
        });
        assert_eq!(read_json(&conflist), expected);
        assert_eq!(mode(&conflist), 0o644);
        assert_eq!(primary(dir.path()).unwrap(), Some(conflist.clone()));
        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Unchanged(conflist)
        );
        assert_eq!(names(dir.path()), vec!["10-bridge.conflist".to_owned()]);
    }

    #[test]
    fn installing_twice_changes_nothing_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_json(dir.path(), "10-calico.conflist", &calico());
        install(dir.path(), &entry()).unwrap();
        let bytes = fs::read(&path).unwrap();
        let inode = fs::metadata(&path).unwrap().ino();

        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Unchanged(path.clone())
        );

        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "file was replaced"
        );
    }

    #[test]
    fn the_entry_returns_after_the_primary_rewrites_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_json(dir.path(), "10-flannel.conflist", &flannel());
        install(dir.path(), &entry()).unwrap();

        // The primary writes its own config again, without us.
        write_json(dir.path(), "10-flannel.conflist", &flannel());
        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Written(path.clone())
        );

        assert_eq!(
            types(&read_json(&path)),
            ["flannel", "portmap", "warren-cni"]
        );
    }

    #[test]
    fn a_changed_entry_replaces_the_old_one_and_goes_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_json(dir.path(), "10-calico.conflist", &calico());
        install(dir.path(), &entry()).unwrap();

        let mut debug = entry();
        debug.insert("logLevel".to_owned(), json!("debug"));
        assert_eq!(
            install(dir.path(), &debug).unwrap(),
            Installed::Written(path.clone())
        );
        assert_eq!(read_json(&path), appended(&calico(), &debug));

        // A stale entry in the middle (moved there by someone) goes too.
        let mut stale = calico();
        stale["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(1, Value::Object(entry()));
        write_json(dir.path(), "10-calico.conflist", &stale);
        install(dir.path(), &debug).unwrap();
        assert_eq!(read_json(&path), appended(&calico(), &debug));
    }

    #[test]
    fn uninstall_restores_the_original_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let calico_path = write_json(dir.path(), "10-calico.conflist", &calico());
        // A file a previous install left our entry in, when it was primary.
        let old = write_json(
            dir.path(),
            "20-kindnet.conflist",
            &appended(&kindnet(), &entry()),
        );
        // Not ours to touch.
        let other = write_json(dir.path(), "30-flannel.conflist", &flannel());
        let other_bytes = fs::read(&other).unwrap();
        install(dir.path(), &entry()).unwrap();

        let mut changed = uninstall(dir.path()).unwrap();
        changed.sort();

        assert_eq!(changed, vec![calico_path.clone(), old.clone()]);
        assert_eq!(read_json(&calico_path), calico());
        assert_eq!(read_json(&old), kindnet());
        assert_eq!(fs::read(&other).unwrap(), other_bytes);
        let bytes = fs::read(&calico_path).unwrap();
        assert_eq!(uninstall(dir.path()).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(fs::read(&calico_path).unwrap(), bytes);
    }

    #[test]
    fn uninstall_leaves_an_upgraded_conf_as_a_conflist() {
        let dir = tempfile::tempdir().unwrap();
        write_json(dir.path(), "10-bridge.conf", &bridge());
        let Installed::Written(conflist) = install(dir.path(), &entry()).unwrap() else {
            panic!("not written");
        };

        assert_eq!(uninstall(dir.path()).unwrap(), vec![conflist.clone()]);

        let restored = read_json(&conflist);
        assert_eq!(types(&restored), ["bridge"]);
        assert_eq!(
            with_plugin(&bridge(), &entry()).unwrap(),
            appended(&restored, &entry())
        );
    }

    #[test]
    fn the_primary_is_the_first_valid_file_in_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(primary(dir.path()).unwrap(), None);
        assert_eq!(install(dir.path(), &entry()).unwrap(), Installed::NoPrimary);

        fs::write(dir.path().join("00-broken.conflist"), "{\"plugins\": [").unwrap();
        write_json(
            dir.path(),
            "01-empty.conflist",
            &json!({"name": "x", "plugins": []}),
        );
        write_json(dir.path(), "02-no-type.conf", &json!({"name": "y"}));
        write_json(dir.path(), "03-list.conf", &calico());
        write_json(dir.path(), ".05-hidden.conflist", &flannel());
        write_json(dir.path(), "07-readme.md", &flannel());
        assert_eq!(primary(dir.path()).unwrap(), None);

        // "9-…" sorts after "10-…": names compare by bytes, not numbers.
        write_json(dir.path(), "9-kindnet.conflist", &kindnet());
        let calico_path = write_json(dir.path(), "10-calico.conflist", &calico());
        assert_eq!(primary(dir.path()).unwrap(), Some(calico_path.clone()));

        install(dir.path(), &entry()).unwrap();
        assert_eq!(types(&read_json(&calico_path)).last(), Some(&"warren-cni"));
        assert_eq!(read_json(&dir.path().join("9-kindnet.conflist")), kindnet());
        assert_eq!(
            fs::read(dir.path().join("00-broken.conflist")).unwrap(),
            b"{\"plugins\": ["
        );
    }

    #[test]
    fn a_json_file_may_hold_a_list_or_a_single_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let list = write_json(dir.path(), "10-list.json", &flannel());
        assert_eq!(primary(dir.path()).unwrap(), Some(list.clone()));
        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Written(list)
        );

        let dir = tempfile::tempdir().unwrap();
        write_json(dir.path(), "10-single.json", &bridge());
        assert_eq!(
            install(dir.path(), &entry()).unwrap(),
            Installed::Written(dir.path().join("10-single.conflist"))
        );
        assert_eq!(names(dir.path()), vec!["10-single.conflist".to_owned()]);
    }

    #[test]
    fn unknown_keys_and_settings_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = calico();
        config["disableCheck"] = json!(true);
        config["x-vendor"] = json!({"generation": 7, "notes": ["a", "b"]});
        config["plugins"][0]["futureField"] = json!({"nested": [1, 2.5, null]});
        let path = write_json(dir.path(), "10-calico.conflist", &config);

        install(dir.path(), &entry()).unwrap();

        assert_eq!(read_json(&path), appended(&config, &entry()));
    }

    #[test]
    fn bad_configs_and_entries_are_refused_by_name() {
        let mut config = calico();
        config["plugins"] = json!("calico");
        let error = with_plugin(&config, &entry()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("\"plugins\" is a string, not an array"),
            "{error}"
        );

        let wrong = object(json!({"type": "istio-cni"}));
        let error = with_plugin(&calico(), &wrong).unwrap_err();
        assert!(error.to_string().contains("\"istio-cni\""), "{error}");
        let error = with_plugin(&calico(), &Map::new()).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");

        let error = with_plugin(&json!({"name": "x"}), &entry()).unwrap_err();
        assert!(error.to_string().contains("neither"), "{error}");
        let error = with_plugin(&json!([1]), &entry()).unwrap_err();
        assert!(
            error.to_string().contains("an array, not a JSON object"),
            "{error}"
        );
    }

    #[test]
    fn a_linked_primary_or_one_of_a_version_the_plugin_does_not_speak_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let target = write_json(elsewhere.path(), "calico.conflist", &calico());
        std::os::unix::fs::symlink(&target, dir.path().join("10-calico.conflist")).unwrap();
        let error = install(dir.path(), &entry()).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert_eq!(
            read_json(&target),
            calico(),
            "the link's target was changed"
        );

        let dir = tempfile::tempdir().unwrap();
        let mut future = calico();
        future["cniVersion"] = "2.0.0".into();
        let path = write_json(dir.path(), "10-calico.conflist", &future);
        let error = install(dir.path(), &entry()).unwrap_err().to_string();
        assert!(
            error.contains("\"2.0.0\" is not one warren-cni speaks"),
            "{error}"
        );
        assert_eq!(read_json(&path), future);
    }

    #[test]
    fn a_temporary_name_already_taken_is_left_alone() {
        // The temporary names are predictable (pid, counter): whatever
        // holds the one this write draws is not the writer's to remove.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("membership.json");
        for k in 0..5000 {
            let decoy = dir
                .path()
                .join(format!(".membership.json.{}-{k}.tmp", std::process::id()));
            fs::write(decoy, "not the writer's").unwrap();
        }
        let error = write_atomic(&target, b"{}", 0o600, None).unwrap_err();
        assert!(error.to_string().contains("membership.json"), "{error}");
        assert!(!target.exists());
        assert_eq!(names(dir.path()).len(), 5000, "a decoy was removed");
    }

    #[test]
    fn without_plugin_takes_out_every_entry_and_nothing_else() {
        let mut config = appended(&kindnet(), &entry());
        config["plugins"]
            .as_array_mut()
            .unwrap()
            .insert(0, Value::Object(entry()));
        assert_eq!(without_plugin(&config), kindnet());
        assert_eq!(without_plugin(&kindnet()), kindnet());
        assert_eq!(without_plugin(&bridge()), bridge());
    }

    #[test]
    fn copying_the_binary_twice_copies_once() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("warren-cni-build");
        fs::write(&source, b"\x7fELF version one").unwrap();
        let bin_dir = dir.path().join("bin");
        fs::create_dir(&bin_dir).unwrap();

        let target = copy_binary(&source, &bin_dir).unwrap();

        assert_eq!(target, bin_dir.join("warren-cni"));
        assert_eq!(fs::read(&target).unwrap(), b"\x7fELF version one");
        assert_eq!(mode(&target), 0o755);
        let inode = fs::metadata(&target).unwrap().ino();
        copy_binary(&source, &bin_dir).unwrap();
        assert_eq!(fs::metadata(&target).unwrap().ino(), inode, "copied again");

        fs::write(&source, b"\x7fELF version two").unwrap();
        copy_binary(&source, &bin_dir).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"\x7fELF version two");
        assert_eq!(mode(&target), 0o755);
        assert_eq!(names(&bin_dir), vec!["warren-cni".to_owned()]);

        assert!(remove_binary(&bin_dir).unwrap());
        assert!(!remove_binary(&bin_dir).unwrap());
        assert!(!target.exists());
    }

    #[tokio::test]
    async fn keep_installed_waits_for_a_primary_and_puts_the_entry_back() {
        async fn entry_appears(path: &Path) -> bool {
            for _ in 0..100 {
                if let Ok(bytes) = fs::read(path)
                    && let Ok(config) = serde_json::from_slice::<Value>(&bytes)
                    && config == appended(&calico(), &entry())
                {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }

        let dir = tempfile::tempdir().unwrap();
        let (installed, _) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(keep_installed(dir.path().to_owned(), entry(), installed));
        // Let it find no primary, and start waiting.
        tokio::time::sleep(Duration::from_millis(200)).await;

        let path = write_json(dir.path(), "10-calico.conflist", &calico());
        assert!(
            entry_appears(&path).await,
            "not installed once a primary appeared"
        );

        // The primary rewrites its file without us.
        write_json(dir.path(), "10-calico.conflist", &calico());
        assert!(
            entry_appears(&path).await,
            "not put back after the primary's rewrite"
        );
        task.abort();
    }
}
