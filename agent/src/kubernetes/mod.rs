//! The mesh from the API server: what the agent learns from Kubernetes.
//!
//! One watch (kube-rs's runtime watcher) per kind — Namespaces, Pods,
//! Services, EndpointSlices, and Istio's PeerAuthentication and
//! AuthorizationPolicy — each keeping only the facts warren uses
//! ([`facts`]). A builder turns the facts into the mesh model ([`build`]) and
//! publishes it, at most every [`SETTLE`], once every kind has been listed:
//! the agent never enrolls (or releases) pods from a partial view.
//!
//! A watch that expires (410 Gone) or breaks lists again; the objects it had
//! stay in force until the new list is complete, and are then replaced
//! whole. While the API server cannot be reached, the last view stays and
//! each watch retries with backoff (kube-rs's default: from 0.8 s, doubling,
//! up to 30 s), saying so in the log.

pub(crate) mod build;
pub(crate) mod facts;
pub mod taint;
#[cfg(test)]
mod tests;
pub(crate) mod watch;

use std::{sync::Arc, time::Duration};

use kube::{
    Api, Client,
    discovery::{self, ApiResource},
};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use warren_pki::identity::TrustDomain;

use crate::{mesh::Store, metrics::Metrics};
pub use watch::Reported;
use watch::{Shared, Tables};

/// How long the builder lets changes pile up before publishing them: a
/// rollout's burst of events makes one snapshot, not hundreds.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How often a kind the API server does not serve (yet) is looked for.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

/// The label, on namespaces and pods, that enrolls pods in ambient mode.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// What the source needs to know of this agent.
#[derive(Debug, Clone)]
pub struct Context {
    /// This node's name: its pods are enrolled here.
    pub node: String,
    pub trust_domain: TrustDomain,
    /// Where mesh-wide policies live.
    pub root_namespace: String,
    /// Where to leave the CNI plugin the mesh's membership, for while the
    /// agent is away.
    pub membership_file: Option<std::path::PathBuf>,
    /// Where the runtime's sandbox reports are kept across restarts.
    pub reports_file: Option<std::path::PathBuf>,
}

/// Keeps the reports where the next agent finds them; a failure is logged
/// (that agent then finds such pods by their processes, once the API server
/// has their address).
fn save_reports(reports: &std::collections::HashMap<String, Reported>, context: &Context) {
    let Some(path) = &context.reports_file else {
        return;
    };
    if let Err(error) = crate::cni::write_json(path, reports) {
        warn!(path = %path.display(), %error, "cannot keep the runtime's sandbox reports");
    }
}

/// The reports an earlier agent kept, of sandboxes whose namespace file is
/// still there, holding the same namespace.
fn load_reports(context: &Context) -> std::collections::HashMap<String, Reported> {
    let Some(path) = &context.reports_file else {
        return Default::default();
    };
    let reports: std::collections::HashMap<String, Reported> = match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(reports) => reports,
            Err(error) => {
                warn!(path = %path.display(), %error, "ignoring unreadable sandbox reports");
                return Default::default();
            }
        },
        Err(_) => return Default::default(),
    };
    reports
        .into_iter()
        .filter(|(_, report)| {
            crate::sandbox::NsId::of_path(&report.netns).is_ok_and(|id| id == report.netns_id)
        })
        .collect()
}

/// The running source, as the CNI server asks it: which pods are in the
/// mesh, and the sandboxes the runtime reports.
#[derive(Clone)]
pub struct Source {
    shared: Arc<Shared>,
    context: Arc<Context>,
}

impl Source {
    /// Whether the pod is in the mesh, as far as the watches know yet.
    pub fn decide(&self, pod: &warren_cni::PodRef) -> crate::cni::Decision {
        build::decide(&self.shared.tables(), &self.context, pod)
    }

    /// This node's pods of the mesh, with an address yet or not: what a
    /// previous agent pinned for them stays (a pod enrolled through the CNI
    /// plugin may have no address in the API server yet).
    pub fn mesh_pods_here(&self) -> Vec<String> {
        build::mesh_pods_here(&self.shared.tables(), &self.context)
    }

    /// The runtime set up a sandbox for the pod `uid`: it is enrolled there
    /// (at the next build) without waiting for the API server's address.
    pub fn report(&self, uid: &str, sandbox: Reported) {
        let mut tables = self.shared.tables();
        tables.sandboxes.insert(uid.to_owned(), sandbox);
        save_reports(&tables.sandboxes, &self.context);
        drop(tables);
        self.shared.changed.notify_one();
    }

    /// The runtime tore down the sandbox `container_id`: whether one was
    /// reported.
    pub fn forget(&self, container_id: &str) -> bool {
        let mut tables = self.shared.tables();
        let before = tables.sandboxes.len();
        tables
            .sandboxes
            .retain(|_, sandbox| sandbox.container_id != container_id);
        let forgot = tables.sandboxes.len() < before;
        if forgot {
            save_reports(&tables.sandboxes, &self.context);
        }
        drop(tables);
        if forgot {
            self.shared.changed.notify_one();
        }
        forgot
    }
}

/// Starts watching the API server and publishing what it says into
/// `store`. Aborting the handle stops every watch.
pub fn spawn(
    client: Client,
    context: Context,
    store: Store,
    metrics: Arc<Metrics>,
) -> (tokio::task::JoinHandle<()>, Source) {
    let shared = Arc::new(Shared::counted(metrics));
    let reports = load_reports(&context);
    if !reports.is_empty() {
        info!(
            sandboxes = reports.len(),
            "kept the runtime's sandbox reports of an earlier agent"
        );
    }
    shared.tables().sandboxes = reports;
    let context = Arc::new(context);
    let source = Source {
        shared: shared.clone(),
        context: context.clone(),
    };
    let task = tokio::spawn(async move {
        let mut watches = JoinSet::new();
        watches.spawn(watch::typed(
            Api::all(client.clone()),
            "namespaces",
            shared.clone(),
            |t: &mut Tables| &mut t.namespaces,
            facts::namespace,
        ));
        watches.spawn(watch::typed(
            Api::all(client.clone()),
            "pods",
            shared.clone(),
            |t: &mut Tables| &mut t.pods,
            facts::pod,
        ));
        watches.spawn(watch::typed(
            Api::all(client.clone()),
            "services",
            shared.clone(),
            |t: &mut Tables| &mut t.services,
            facts::service,
        ));
        watches.spawn(discovered(
            client.clone(),
            "discovery.k8s.io",
            "EndpointSlice",
            shared.clone(),
            |t: &mut Tables| &mut t.slices,
            facts::endpoint_slice,
        ));
        let root_namespace = context.root_namespace.clone();
        watches.spawn(discovered(
            client.clone(),
            "security.istio.io",
            "PeerAuthentication",
            shared.clone(),
            |t: &mut Tables| &mut t.peer_authentications,
            move |ar, object| facts::policy(ar, object, &root_namespace),
        ));
        let root_namespace = context.root_namespace.clone();
        watches.spawn(discovered(
            client.clone(),
            "security.istio.io",
            "AuthorizationPolicy",
            shared.clone(),
            |t: &mut Tables| &mut t.authorization_policies,
            move |ar, object| facts::policy(ar, object, &root_namespace),
        ));
        tokio::select! {
            () = build::publish_loop(&shared, &context, &store) => {}
            // Watches run forever; one that stops (a bug) would freeze its
            // kind's view without a word.
            Some(stopped) = watches.join_next() => {
                error!(
                    result = ?stopped.map_err(|e| e.to_string()),
                    "a watch of the API server stopped; the view of the mesh no longer follows \
                     the cluster"
                );
            }
        }
    });
    (task, source)
}

/// Watches `kind` of `group` at the version the API server prefers (so
/// EndpointSlices are `v1` where served and `v1beta1` on older servers, and
/// Istio's policies `v1` or `v1beta1`). A group the server does not serve
/// (Istio's CRDs not installed) holds no objects: that is said in the log,
/// and looked for again every few seconds.
async fn discovered<F: Send + 'static>(
    client: Client,
    group: &'static str,
    kind: &'static str,
    shared: Arc<Shared>,
    table: fn(&mut Tables) -> &mut watch::Table<F>,
    facts: impl Fn(&ApiResource, &kube::api::DynamicObject) -> Option<F> + Send + Sync + 'static,
) {
    let mut absent_said = false;
    let resource = loop {
        let absent = match discovery::group(&client, group).await {
            Ok(api_group) => match api_group.recommended_kind(kind) {
                Some((resource, _)) => break resource,
                None => true,
            },
            // Truthful: the API server lists its groups, and this is not
            // one (deleting a CRD deletes its objects too).
            Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => true,
            Err(error) => {
                warn!(group, kind, error = %error, "API discovery failed; retrying");
                false
            }
        };
        if absent && !absent_said {
            absent_said = true;
            warn!(
                group,
                kind,
                "the API server does not serve this kind (CRDs not installed?); none is in force \
                 until it does"
            );
            // Nothing to wait for: no objects is the truth for now.
            shared.mark_synced_empty(table);
        }
        // Policies installed after the agent started apply within this.
        tokio::time::sleep(DISCOVERY_RETRY).await;
    };
    info!(group, kind, version = %resource.version, "watching");
    let api = Api::all_with(client, &resource);
    watch::dynamic(api, resource, kind, shared, table, facts).await;
}
