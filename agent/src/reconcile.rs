//! Keeps the pods enrolled on this node in step with the mesh: enrolls the
//! local workloads that are new, withdraws those that left or changed, and
//! retries the ones that failed with exponential backoff (a pod whose sandbox
//! is not there yet, a netns that vanished, a busy kernel).
//!
//! The reconciler only decides; an [`Enroller`] does the work. The agent's
//! enroller attaches eBPF programs and starts proxies ([`crate::pod`]);
//! tests use one that records calls, so the decisions are checked without
//! root.

use std::{
    collections::HashMap,
    fmt::Display,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use crate::{mesh::Workload, sandbox::NsId};

/// First retry of a pod that failed to enroll; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What actually enrolls and withdraws pods.
pub trait Enroller {
    /// A pod while it is enrolled.
    type Pod;
    type Error: Display;

    /// Enrolls these workloads (asked together: they may share slow work,
    /// like asking a CA for certificates); one result per workload, in order.
    fn enroll(
        &mut self,
        workloads: &[Arc<Workload>],
    ) -> impl Future<Output = Vec<Result<Self::Pod, Self::Error>>>;

    /// Stops serving the pod and releases it.
    fn withdraw(&mut self, pod: Self::Pod) -> impl Future<Output = ()>;

    /// Brings an enrolled pod in line with `workload` (the same pod; its
    /// labels or probe ports may have changed) and with the policies in
    /// force. Cheap when nothing changed.
    fn refresh(&mut self, pod: &mut Self::Pod, workload: &Arc<Workload>);

    /// The network namespace the pod was enrolled in.
    fn namespace(pod: &Self::Pod) -> Option<NsId>;

    /// Whether the pod is still where it was enrolled (updating how it is
    /// found if that changed but the place did not). A sandbox can be
    /// recreated under the same pod, with the same address: the new one
    /// would go unenforced.
    fn still_there(&mut self, pod: &mut Self::Pod) -> impl Future<Output = bool>;
}

/// A pod that failed to enroll, waiting for its next attempt.
#[derive(Debug)]
struct Failing {
    workload: Arc<Workload>,
    attempts: u32,
    next: Instant,
    /// Why the last attempt failed.
    error: String,
}

/// Where a pod of this node stands, as the CNI plugin is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Captured and served, as this workload says (its address, its
    /// sandbox), in this network namespace.
    Enrolled {
        workload: Arc<Workload>,
        netns: Option<NsId>,
    },
    /// Not enrolled: the last attempt failed, for this reason.
    Failing {
        workload: Arc<Workload>,
        error: String,
    },
}

/// Every pod of this node the reconciler holds or tries, by `namespace/name`.
pub type States = HashMap<String, PodState>;

pub struct Reconciler<E: Enroller> {
    enroller: E,
    /// By `namespace/name`.
    enrolled: HashMap<String, (Arc<Workload>, E::Pod)>,
    failing: HashMap<String, Failing>,
    /// Whether a pod that was failing left the mesh since the last
    /// [`take_departed_failures`](Self::take_departed_failures): what a
    /// previous agent pinned for it is to be released.
    departed_failures: bool,
}

impl<E: Enroller> Reconciler<E> {
    pub fn new(enroller: E) -> Self {
        Self {
            enroller,
            enrolled: HashMap::new(),
            failing: HashMap::new(),
            departed_failures: false,
        }
    }

    /// Whether pods that never enrolled have left since last asked.
    pub fn take_departed_failures(&mut self) -> bool {
        std::mem::take(&mut self.departed_failures)
    }

    pub fn enroller(&mut self) -> &mut E {
        &mut self.enroller
    }

    /// The pods enrolled now.
    pub fn enrolled(&self) -> impl Iterator<Item = (&Arc<Workload>, &E::Pod)> {
        self.enrolled.values().map(|(w, p)| (w, p))
    }

    /// Pods waiting for another attempt.
    pub fn failing(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.failing.values().map(|f| &f.workload)
    }

    /// Where each pod stands.
    pub fn states(&self) -> States {
        let enrolled = self.enrolled.iter().map(|(name, (w, pod))| {
            let state = PodState::Enrolled {
                workload: w.clone(),
                netns: E::namespace(pod),
            };
            (name.clone(), state)
        });
        let failing = self.failing.iter().map(|(name, f)| {
            let state = PodState::Failing {
                workload: f.workload.clone(),
                error: f.error.clone(),
            };
            (name.clone(), state)
        });
        enrolled.chain(failing).collect()
    }

    /// Makes every failing pod due now (a runtime is waiting for one of
    /// them: its sandbox may be there at last).
    pub fn hurry(&mut self, now: Instant) {
        for failing in self.failing.values_mut() {
            failing.next = failing.next.min(now);
        }
    }

    /// When the next failed pod is due for another attempt.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|f| f.next).min()
    }

    /// Brings enrollment in line with `desired` (this node's workloads):
    /// withdraws pods that left or changed place, refreshes those whose
    /// labels or probe ports changed, enrolls the new ones and those whose
    /// retry is due at `now`.
    pub async fn reconcile(
        &mut self,
        desired: impl IntoIterator<Item = Arc<Workload>>,
        now: Instant,
    ) {
        let desired: HashMap<String, Arc<Workload>> = desired
            .into_iter()
            .map(|w| (w.qualified_name(), w))
            .collect();

        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(name, (w, _))| desired.get(*name).is_none_or(|d| !d.same_pod(w)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, pod)) = self.enrolled.remove(&name) {
                self.enroller.withdraw(pod).await;
            }
        }
        for (name, (workload, pod)) in &mut self.enrolled {
            // Present: the stale ones are gone.
            let wanted = &desired[name];
            if wanted != workload {
                *workload = wanted.clone();
            }
            self.enroller.refresh(pod, workload);
        }
        // A failing pod that changed gets a fresh start; one that left is
        // forgotten.
        let failing = self.failing.len();
        self.failing.retain(|name, failing| {
            desired
                .get(name)
                .is_some_and(|d| d.same_pod(&failing.workload))
        });
        self.departed_failures |= self.failing.len() < failing;

        let due: Vec<Arc<Workload>> = desired
            .into_iter()
            .filter(|(name, _)| !self.enrolled.contains_key(name))
            .filter(|(name, _)| self.failing.get(name).is_none_or(|f| f.next <= now))
            .map(|(_, w)| w)
            .collect();
        if due.is_empty() {
            return;
        }
        let results = self.enroller.enroll(&due).await;
        for (workload, result) in due.into_iter().zip(results) {
            let name = workload.qualified_name();
            match result {
                Ok(pod) => {
                    if let Some(failing) = self.failing.remove(&name) {
                        info!(workload = %name, attempts = failing.attempts + 1, "enrolled after retrying");
                    }
                    self.enrolled.insert(name, (workload, pod));
                }
                Err(error) => {
                    let attempts = self.failing.get(&name).map_or(0, |f| f.attempts) + 1;
                    let backoff = backoff(attempts);
                    // The first failure is news; repeats are a pod still not
                    // there, logged less loudly.
                    if attempts == 1 {
                        error!(
                            workload = %name, %error, retry_in_ms = backoff.as_millis() as u64,
                            "cannot enroll pod; its traffic is not captured yet, retrying"
                        );
                    } else {
                        warn!(
                            workload = %name, %error, attempts,
                            retry_in_ms = backoff.as_millis() as u64,
                            "cannot enroll pod yet"
                        );
                    }
                    self.failing.insert(
                        name,
                        Failing {
                            workload,
                            attempts,
                            next: now + backoff,
                            error: error.to_string(),
                        },
                    );
                }
            }
        }
    }

    /// Withdraws the enrolled pods that are no longer where they were
    /// enrolled; the next [`reconcile`](Self::reconcile) enrolls them again
    /// where they are now. Returns how many were.
    pub async fn recheck(&mut self) -> usize {
        let mut moved = Vec::new();
        for (name, (_, pod)) in &mut self.enrolled {
            if !self.enroller.still_there(pod).await {
                moved.push(name.clone());
            }
        }
        for name in &moved {
            if let Some((_, pod)) = self.enrolled.remove(name) {
                warn!(workload = %name, "the pod's sandbox was recreated; enrolling it again");
                self.enroller.withdraw(pod).await;
            }
        }
        moved.len()
    }

    /// Refreshes every enrolled pod (the policies changed).
    pub fn refresh_all(&mut self) {
        for (workload, pod) in self.enrolled.values_mut() {
            self.enroller.refresh(pod, workload);
        }
    }

    /// Gives the enrolled pods back, for a shutdown that leaves them pinned.
    pub fn into_pods(self) -> impl Iterator<Item = E::Pod> {
        self.enrolled.into_values().map(|(_, pod)| pod)
    }
}

/// The wait before attempt `attempts + 1`.
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests;
