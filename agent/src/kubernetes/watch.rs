//! One watch per kind, keeping the facts of its objects in a table.

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex, MutexGuard},
};

use futures_util::StreamExt;
use kube::{
    Api, Resource, ResourceExt,
    api::DynamicObject,
    discovery::ApiResource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::facts::{PodFacts, PolicyFacts, ServiceFacts, SliceFacts};
use crate::{mesh::Labels, metrics::Metrics};

/// The facts of one kind's objects, by `namespace/name` (by name for
/// cluster-wide kinds: namespaces).
pub struct Table<F> {
    pub objects: HashMap<String, F>,
    /// Objects of a list under way (after a watch restarted); they replace
    /// `objects` whole when the list is complete, so that the current view
    /// stays in force meanwhile.
    relisting: Option<HashMap<String, F>>,
    /// Whether a first list has completed.
    pub synced: bool,
}

impl<F> Default for Table<F> {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

#[derive(Default)]
pub struct Tables {
    pub namespaces: Table<Labels>,
    pub pods: Table<PodFacts>,
    /// This node's sandboxes as the container runtime reported them through
    /// the CNI plugin, by pod UID: known before the API server has the
    /// pod's address.
    pub sandboxes: HashMap<String, Reported>,
    pub services: Table<ServiceFacts>,
    pub slices: Table<SliceFacts>,
    pub peer_authentications: Table<PolicyFacts>,
    pub authorization_policies: Table<PolicyFacts>,
}

impl Tables {
    pub fn synced(&self) -> bool {
        self.namespaces.synced
            && self.pods.synced
            && self.services.synced
            && self.slices.synced
            && self.peer_authentications.synced
            && self.authorization_policies.synced
    }
}

/// A sandbox the container runtime set up for a pod of this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reported {
    pub container_id: String,
    /// Its network namespace file.
    pub netns: std::path::PathBuf,
    /// The namespace the file held then: a file that holds another one now
    /// is another sandbox's.
    pub netns_id: crate::sandbox::NsId,
    pub ip: std::net::Ipv4Addr,
}

/// The tables, and the builder's wake-up.
#[derive(Default)]
pub struct Shared {
    tables: Mutex<Tables>,
    pub changed: Notify,
    /// Where watch failures are counted (none in unit tests).
    pub metrics: Option<Arc<Metrics>>,
}

impl Shared {
    /// Tables that count the watches' failures in `metrics`.
    pub fn counted(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    pub fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kind the API server does not serve: it has no objects.
    pub fn mark_synced_empty<F>(&self, table: fn(&mut Tables) -> &mut Table<F>) {
        let mut tables = self.tables();
        let table = table(&mut tables);
        table.objects.clear();
        table.synced = true;
        self.changed.notify_one();
    }
}

/// Watches a kind that k8s-openapi types.
pub async fn typed<K, F>(
    api: Api<K>,
    kind: &'static str,
    shared: Arc<Shared>,
    table: fn(&mut Tables) -> &mut Table<F>,
    facts: fn(&K) -> Option<F>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    run(api, kind, shared, table, facts).await
}

/// Watches a kind found by discovery.
pub async fn dynamic<F>(
    api: Api<DynamicObject>,
    resource: ApiResource,
    kind: &'static str,
    shared: Arc<Shared>,
    table: fn(&mut Tables) -> &mut Table<F>,
    facts: impl Fn(&ApiResource, &DynamicObject) -> Option<F> + Send + Sync + 'static,
) {
    run(api, kind, shared, table, move |object| {
        facts(&resource, object)
    })
    .await
}

async fn run<K, F>(
    api: Api<K>,
    kind: &'static str,
    shared: Arc<Shared>,
    table: fn(&mut Tables) -> &mut Table<F>,
    facts: impl Fn(&K) -> Option<F>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                // The backoff paces these: at most one every 30 s once the
                // outage has lasted.
                if warren_daemon::kubernetes::forbidden(&error) {
                    error!(
                        kind,
                        error = %error,
                        "the agent's service account may not list or watch this kind (RBAC, see \
                         deploy/kustomize/base/agent/rbac.yaml); until it can, this kind's view stays as it is \
                         (none before a first list: nothing is enrolled), retrying"
                    );
                } else {
                    warn!(
                        kind,
                        error = %error,
                        "cannot watch the API server; serving the last view of the mesh, retrying"
                    );
                }
                if let Some(metrics) = &shared.metrics {
                    metrics.discovery_error();
                }
                failing = true;
                continue;
            }
        };
        if failing {
            failing = false;
            info!(kind, "watching the API server again");
        }
        // `namespace/name`, or the name of a cluster-wide object.
        let key = |object: &K| match object.namespace() {
            Some(namespace) => format!("{namespace}/{}", object.name_any()),
            None => object.name_any(),
        };
        let mut tables = shared.tables();
        let table = table(&mut tables);
        match event {
            watcher::Event::Init => table.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if let (Some(relisting), Some(facts)) = (&mut table.relisting, facts(&object)) {
                    relisting.insert(key(&object), facts);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = table.relisting.take() {
                    table.objects = listed;
                }
                if table.synced {
                    // After a watch expired (410 Gone) or broke: the view
                    // is current again.
                    info!(kind, objects = table.objects.len(), "listed again");
                } else {
                    info!(kind, objects = table.objects.len(), "listed");
                }
                table.synced = true;
            }
            watcher::Event::Apply(object) => match facts(&object) {
                Some(facts) => {
                    table.objects.insert(key(&object), facts);
                }
                None => {
                    table.objects.remove(&key(&object));
                }
            },
            watcher::Event::Delete(object) => {
                table.objects.remove(&key(&object));
            }
        }
        drop(tables);
        shared.changed.notify_one();
    }
}
