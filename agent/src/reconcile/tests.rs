use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
};

use super::*;
use warren_pki::identity::{SpiffeId, TrustDomain};

use crate::mesh::LocalPod;

/// Records what it is asked to do; pods named in `broken` fail to enroll.
#[derive(Default)]
struct Recorder {
    calls: Vec<String>,
    broken: HashSet<String>,
    /// Pods whose sandbox is gone.
    moved: HashSet<String>,
}

impl Enroller for Recorder {
    type Pod = String;
    type Error = String;

    async fn enroll(&mut self, workloads: &[Arc<Workload>]) -> Vec<Result<String, String>> {
        workloads
            .iter()
            .map(|w| {
                let name = w.qualified_name();
                self.calls.push(format!("enroll {name}"));
                if self.broken.contains(&name) {
                    Err("sandbox not there yet".into())
                } else {
                    Ok(name)
                }
            })
            .collect()
    }

    async fn withdraw(&mut self, pod: String) {
        self.calls.push(format!("withdraw {pod}"));
    }

    fn namespace(_: &String) -> Option<crate::sandbox::NsId> {
        None
    }

    async fn still_there(&mut self, pod: &mut String) -> bool {
        !self.moved.contains(pod)
    }

    fn refresh(&mut self, pod: &mut String, workload: &Arc<Workload>) {
        let labels: Vec<_> = workload.labels.values().cloned().collect();
        self.calls
            .push(format!("refresh {pod} [{}]", labels.join(",")));
    }
}

fn pod(name: &str, ip: u8) -> Workload {
    Workload {
        name: name.into(),
        namespace: "ns".into(),
        workload_name: name.into(),
        service_account: "sa".into(),
        identity: SpiffeId::new(TrustDomain::new("cluster.local").unwrap(), "ns", "sa").unwrap(),
        ip: Ipv4Addr::new(10, 244, 1, ip),
        node: "node-1".into(),
        labels: Default::default(),
        local: Some(LocalPod::Kubelet {
            uid: format!("uid-{name}"),
            netns: None,
        }),
        probe_ports: BTreeSet::new(),
    }
}

fn calls(reconciler: &mut Reconciler<Recorder>) -> Vec<String> {
    let mut calls = std::mem::take(&mut reconciler.enroller().calls);
    calls.sort();
    calls
}

#[tokio::test]
async fn enrolls_new_pods_withdraws_gone_ones_and_refreshes_relabelled_ones() {
    let mut reconciler = Reconciler::new(Recorder::default());
    let now = Instant::now();
    let (a, b) = (Arc::new(pod("a", 2)), Arc::new(pod("b", 3)));
    reconciler.reconcile([a.clone(), b.clone()], now).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a", "enroll ns/b"]);

    // Nothing changed: refreshed (cheap), nothing enrolled twice.
    reconciler.reconcile([a.clone(), b.clone()], now).await;
    assert_eq!(
        calls(&mut reconciler),
        ["refresh ns/a []", "refresh ns/b []"]
    );

    // a relabelled: refreshed with its new labels, not re-enrolled. b gone.
    let mut relabelled = pod("a", 2);
    relabelled.labels.insert("app".into(), "web".into());
    reconciler.reconcile([Arc::new(relabelled)], now).await;
    assert_eq!(
        calls(&mut reconciler),
        ["refresh ns/a [web]", "withdraw ns/b"]
    );

    // a moved to another address (a new sandbox): withdrawn, then enrolled.
    reconciler.reconcile([Arc::new(pod("a", 9))], now).await;
    assert_eq!(
        reconciler.enroller().calls,
        ["withdraw ns/a", "enroll ns/a"]
    );
}

#[tokio::test]
async fn a_pod_that_fails_is_retried_with_growing_backoff_until_it_enrolls() {
    let mut recorder = Recorder::default();
    recorder.broken.insert("ns/a".into());
    let mut reconciler = Reconciler::new(recorder);
    let start = Instant::now();
    let (a, b) = (Arc::new(pod("a", 2)), Arc::new(pod("b", 3)));
    reconciler.reconcile([a.clone(), b.clone()], start).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a", "enroll ns/b"]);
    assert_eq!(reconciler.next_retry(), Some(start + FIRST_BACKOFF));
    assert_eq!(reconciler.failing().count(), 1);

    // Not due yet: not tried again, however often the mesh changes.
    reconciler.reconcile([a.clone(), b.clone()], start).await;
    assert_eq!(calls(&mut reconciler), ["refresh ns/b []"]);

    // Due: tried again, fails again, waits twice as long.
    let due = start + FIRST_BACKOFF;
    reconciler.reconcile([a.clone(), b.clone()], due).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a", "refresh ns/b []"]);
    assert_eq!(reconciler.next_retry(), Some(due + FIRST_BACKOFF * 2));

    // The sandbox shows up: enrolled at the next attempt, no more retries.
    reconciler.enroller().broken.clear();
    let due = due + FIRST_BACKOFF * 2;
    reconciler.reconcile([a.clone(), b.clone()], due).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a", "refresh ns/b []"]);
    assert_eq!(reconciler.next_retry(), None);
    assert_eq!(reconciler.enrolled().count(), 2);
}

#[tokio::test]
async fn a_runtime_waiting_for_a_failing_pod_makes_it_due_now_and_its_state_says_why() {
    let mut recorder = Recorder::default();
    recorder.broken.insert("ns/a".into());
    let mut reconciler = Reconciler::new(recorder);
    let start = Instant::now();
    let a = Arc::new(pod("a", 2));
    for attempt in 0..6 {
        let due = reconciler.next_retry().unwrap_or(start);
        reconciler.reconcile([a.clone()], due).await;
        assert_eq!(calls(&mut reconciler), ["enroll ns/a"], "attempt {attempt}");
    }
    let later = reconciler.next_retry().unwrap();
    let asked = later - Duration::from_secs(5);
    assert!(asked > start, "backed off by now");
    match &reconciler.states()["ns/a"] {
        PodState::Failing { error, .. } => assert_eq!(error, "sandbox not there yet"),
        other => panic!("{other:?}"),
    }
    // Not due yet...
    reconciler.reconcile([a.clone()], asked).await;
    assert!(calls(&mut reconciler).is_empty());
    // ...until a runtime asks for it: its sandbox may be there now.
    reconciler.enroller().broken.clear();
    reconciler.hurry(asked);
    assert_eq!(reconciler.next_retry(), Some(asked));
    reconciler.reconcile([a.clone()], asked).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a"]);
    assert!(matches!(
        reconciler.states()["ns/a"],
        PodState::Enrolled { .. }
    ));
}

#[tokio::test]
async fn a_failing_pod_that_changes_is_tried_at_once_and_one_that_leaves_is_forgotten() {
    let mut recorder = Recorder::default();
    recorder.broken.insert("ns/a".into());
    let mut reconciler = Reconciler::new(recorder);
    let now = Instant::now();
    reconciler.reconcile([Arc::new(pod("a", 2))], now).await;
    calls(&mut reconciler);
    // A new address (its sandbox was recreated): a new pod, tried now.
    reconciler.reconcile([Arc::new(pod("a", 4))], now).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a"]);
    assert!(reconciler.take_departed_failures(), "the first a left");
    // Gone: no retry is scheduled for it, and its departure is told once.
    reconciler.reconcile([], now).await;
    assert_eq!(reconciler.next_retry(), None);
    assert!(calls(&mut reconciler).is_empty());
    assert!(reconciler.take_departed_failures());
    assert!(!reconciler.take_departed_failures());
}

#[tokio::test]
async fn a_pod_whose_sandbox_was_recreated_is_withdrawn_and_enrolled_again() {
    let mut reconciler = Reconciler::new(Recorder::default());
    let now = Instant::now();
    let (a, b) = (Arc::new(pod("a", 2)), Arc::new(pod("b", 3)));
    reconciler.reconcile([a.clone(), b.clone()], now).await;
    calls(&mut reconciler);
    assert_eq!(reconciler.recheck().await, 0);
    reconciler.enroller().moved.insert("ns/a".into());
    assert_eq!(reconciler.recheck().await, 1);
    assert_eq!(calls(&mut reconciler), ["withdraw ns/a"]);
    reconciler.enroller().moved.clear();
    reconciler.reconcile([a, b], now).await;
    assert_eq!(calls(&mut reconciler), ["enroll ns/a", "refresh ns/b []"]);
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    assert_eq!(backoff(1), FIRST_BACKOFF);
    assert_eq!(backoff(2), FIRST_BACKOFF * 2);
    assert_eq!(backoff(3), FIRST_BACKOFF * 4);
    assert_eq!(backoff(40), MAX_BACKOFF);
}
