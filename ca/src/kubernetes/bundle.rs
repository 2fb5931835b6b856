//! The trust bundle for agents: the CA writes its roots into a ConfigMap
//! that every agent mounts (and reloads when the kubelet updates it). The
//! manifests create the ConfigMap, so the CA needs only to patch that one
//! object; it patches again now and then, which undoes a stray edit.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tracing::{error, info, warn};

use super::ObjectRef;

/// The ConfigMap key holding the roots, PEM.
pub const ROOTS_KEY: &str = "roots.pem";
/// How often the roots are written again once they are in place.
const REFRESH: Duration = Duration::from_secs(10 * 60);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Writes `roots_pem` into `configmap` until the task is dropped: at once
/// (retrying with backoff until it works), then every [`REFRESH`]. Sets
/// `published` after the first success.
pub async fn publish_roots(
    client: Client,
    configmap: ObjectRef,
    roots_pem: String,
    published: Arc<AtomicBool>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &configmap.namespace);
    let patch = serde_json::json!({ "data": { ROOTS_KEY: roots_pem } });
    let mut retry = FIRST_RETRY;
    loop {
        match api
            .patch(
                &configmap.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                if !published.swap(true, Ordering::AcqRel) {
                    info!(%configmap, key = ROOTS_KEY, "published the trust bundle");
                }
                retry = FIRST_RETRY;
                tokio::time::sleep(REFRESH).await;
                continue;
            }
            Err(kube::Error::Api(status)) if status.code == 404 => error!(
                %configmap,
                "cannot publish the trust bundle: the ConfigMap does not exist (the manifests \
                 in deploy/ create it), retrying"
            ),
            Err(kube::Error::Api(status)) if status.is_forbidden() => error!(
                %configmap,
                error = %status.message,
                "cannot publish the trust bundle: the CA's service account may not patch this \
                 ConfigMap (RBAC, see deploy/), retrying"
            ),
            Err(error) => warn!(
                %configmap,
                %error,
                "cannot publish the trust bundle yet, retrying"
            ),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}
