//! The CA's view of Pods: which service accounts run on which node, and the
//! agents' own Pods. Kept from one watch of all Pods, as facts only.

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tracing::{error, info, warn};

use super::ObjectRef;

/// On a mirror Pod: the kubelet made it for a static pod of its own node.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the CA keeps of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`: none until scheduled.
    pub node: Option<String>,
    /// Being deleted: an agent's token is no longer honoured (its pod may
    /// stay Terminating for as long as its node does not confirm, which is
    /// when an unreachable or compromised node would be revoked).
    pub terminating: bool,
}

impl PodFacts {
    /// Facts of a Pod that vouches for an identity on its node. None for:
    /// - one that has finished (Succeeded or Failed): it runs nothing that
    ///   needs a certificate;
    /// - a mirror Pod: a node's kubelet may create one on its own node in
    ///   any namespace, so it proves nothing about that node;
    /// - one without `spec.serviceAccountName`: the API server sets it on
    ///   every Pod it admits except mirror Pods; taking it for `default`
    ///   would hand out each namespace's default identity.
    pub fn of(pod: &Pod) -> Option<(ObjectRef, Self)> {
        let spec = pod.spec.as_ref()?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed"))
            || pod.annotations().contains_key(MIRROR_ANNOTATION)
        {
            return None;
        }
        let key = ObjectRef {
            namespace: pod.namespace()?,
            name: pod.name_any(),
        };
        let facts = Self {
            uid: pod.uid()?,
            service_account: spec
                .service_account_name
                .clone()
                .filter(|sa| !sa.is_empty())?,
            node: spec.node_name.clone().filter(|n| !n.is_empty()),
            terminating: pod.metadata.deletion_timestamp.is_some(),
        };
        Some((key, facts))
    }
}

/// (node, namespace, service account)
type Placement = (String, String, String);

#[derive(Default)]
struct Table {
    pods: HashMap<ObjectRef, PodFacts>,
    /// How many Pods of each placement there are: what authorization asks.
    placements: HashMap<Placement, usize>,
    /// A relist under way: it replaces `pods` whole when complete, so that
    /// the current view stays in force meanwhile.
    relisting: Option<HashMap<ObjectRef, PodFacts>>,
}

impl Table {
    fn placement(key: &ObjectRef, facts: &PodFacts) -> Option<Placement> {
        let node = facts.node.clone()?;
        Some((node, key.namespace.clone(), facts.service_account.clone()))
    }

    fn insert(&mut self, key: ObjectRef, facts: PodFacts) {
        self.remove(&key);
        if let Some(placement) = Self::placement(&key, &facts) {
            *self.placements.entry(placement).or_default() += 1;
        }
        self.pods.insert(key, facts);
    }

    fn remove(&mut self, key: &ObjectRef) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if let Some(placement) = Self::placement(key, &old)
            && let Some(count) = self.placements.get_mut(&placement)
        {
            *count -= 1;
            if *count == 0 {
                self.placements.remove(&placement);
            }
        }
    }

    fn replace(&mut self, listed: HashMap<ObjectRef, PodFacts>) {
        self.pods.clear();
        self.placements.clear();
        for (key, facts) in listed {
            self.insert(key, facts);
        }
    }
}

/// The Pods of the cluster, as the CA last heard of them.
#[derive(Default)]
pub struct Pods {
    table: Mutex<Table>,
    synced: AtomicBool,
}

impl Pods {
    /// Whether a first list has completed: before it, nothing is authorized.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Whether a Pod of `namespace` running as `service_account` is on `node`.
    pub fn runs_on(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let key = (
            node.to_owned(),
            namespace.to_owned(),
            service_account.to_owned(),
        );
        self.table().placements.contains_key(&key)
    }

    /// An agent's Pod, if it runs and is not being deleted.
    pub fn agent_pod(&self, pod: &ObjectRef) -> Option<PodFacts> {
        self.table()
            .pods
            .get(pod)
            .filter(|facts| !facts.terminating)
            .cloned()
    }

    /// Applies one event of the Pod watch.
    pub fn apply(&self, event: watcher::Event<Pod>) {
        let mut table = self.table();
        match event {
            watcher::Event::Init => table.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(relisting), Some((key, facts))) =
                    (&mut table.relisting, PodFacts::of(&pod))
                {
                    relisting.insert(key, facts);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = table.relisting.take() {
                    table.replace(listed);
                }
                let pods = table.pods.len();
                if self.synced.swap(true, Ordering::AcqRel) {
                    info!(pods, "pods listed again");
                } else {
                    info!(pods, "pods listed");
                }
            }
            watcher::Event::Apply(pod) => match PodFacts::of(&pod) {
                Some((key, facts)) => table.insert(key, facts),
                None => {
                    if let Some(namespace) = pod.namespace() {
                        table.remove(&ObjectRef {
                            namespace,
                            name: pod.name_any(),
                        });
                    }
                }
            },
            watcher::Event::Delete(pod) => {
                if let Some(namespace) = pod.namespace() {
                    table.remove(&ObjectRef {
                        namespace,
                        name: pod.name_any(),
                    });
                }
            }
        }
    }

    /// Watches all Pods until the stream ends (never, in practice): lists,
    /// then follows changes; relists after a 410 or a broken watch, retrying
    /// with kube-rs's backoff while the API server is away (the last view
    /// stays in force meanwhile).
    pub async fn watch(&self, client: Client) {
        let api: Api<Pod> = Api::all(client);
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        failing = false;
                        info!("watching pods again");
                    }
                    self.apply(event);
                }
                Err(error) => {
                    if warren_daemon::kubernetes::forbidden(&error) {
                        error!(
                            %error,
                            "the CA's service account may not list or watch pods (RBAC, see \
                             deploy/); until it can, it signs nothing it has not seen, retrying"
                        );
                    } else {
                        warn!(
                            %error,
                            "cannot watch pods; authorizing from the last view, retrying"
                        );
                    }
                    failing = true;
                }
            }
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}
