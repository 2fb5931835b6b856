//! The renewal loop against a CA that can be switched off, with real
//! certificates of four seconds (so these tests take a few seconds each).
//! Certificates count whole seconds, so "four seconds" is three to four.

use std::{
    future::{self, Future},
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use super::*;
use crate::tls::{
    DevCa,
    testing::{TempCa, trust_domain},
};

const LIFETIME: Duration = Duration::from_secs(4);

/// A development CA that answers only while `up`.
struct Ca {
    ca: DevCa,
    _dir: TempCa,
    up: AtomicBool,
    requests: AtomicUsize,
}

impl Ca {
    fn new(up: bool) -> Arc<Self> {
        let dir = TempCa::new();
        let ca = DevCa::load_or_create(dir.dir(), &trust_domain())
            .unwrap()
            .with_validity(LIFETIME);
        Arc::new(Self {
            ca,
            _dir: dir,
            up: AtomicBool::new(up),
            requests: AtomicUsize::new(0),
        })
    }
}

impl CertificateSource for Ca {
    fn certificate(
        &self,
        id: &SpiffeId,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCertificate, TlsError>> + Send + '_>> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let result = if self.up.load(Ordering::SeqCst) {
            self.ca.issue(id)
        } else {
            Err(TlsError::CertificateAuthority("the CA is down".into()))
        };
        Box::pin(future::ready(result))
    }
}

#[derive(Default)]
struct Pod {
    certificate: Mutex<Option<Arc<WorkloadCertificate>>>,
    installed: AtomicUsize,
    expired: AtomicUsize,
}

impl Holder for Pod {
    fn name(&self) -> String {
        "default/sleep".into()
    }

    fn identity(&self) -> &SpiffeId {
        static ID: std::sync::LazyLock<SpiffeId> = std::sync::LazyLock::new(|| {
            "spiffe://cluster.local/ns/default/sa/sleep"
                .parse()
                .unwrap()
        });
        &ID
    }

    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.certificate.lock().unwrap().clone()
    }

    fn install(
        &self,
        certificate: WorkloadCertificate,
    ) -> impl Future<Output = Result<(), TlsError>> + Send {
        *self.certificate.lock().unwrap() = Some(Arc::new(certificate));
        self.installed.fetch_add(1, Ordering::SeqCst);
        future::ready(Ok(()))
    }

    fn expired(&self) -> impl Future<Output = ()> + Send {
        self.expired.fetch_add(1, Ordering::SeqCst);
        future::ready(())
    }
}

impl Pod {
    fn valid(&self) -> bool {
        self.current()
            .is_some_and(|c| c.is_valid_at(SystemTime::now()))
    }
}

/// A pod holding a fresh certificate from `ca`, looked after by renewal.
fn start(ca: &Arc<Ca>, with_certificate: bool) -> (Arc<Pod>, tokio::task::JoinHandle<()>) {
    let pod = Arc::new(Pod::default());
    if with_certificate {
        *pod.certificate.lock().unwrap() = Some(Arc::new(ca.ca.issue(pod.identity()).unwrap()));
    }
    let task = tokio::spawn(keep_fresh(pod.clone(), ca.clone()));
    (pod, task)
}

#[tokio::test]
async fn renews_at_half_life_while_the_ca_answers() {
    let ca = Ca::new(true);
    let (pod, task) = start(&ca, true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Due about every two seconds.
    let installed = pod.installed.load(Ordering::SeqCst);
    assert!((1..=3).contains(&installed), "{installed} renewals in 5 s");
    assert!(pod.valid());
    assert_eq!(pod.expired.load(Ordering::SeqCst), 0);
    task.abort();
}

#[tokio::test]
async fn an_outage_is_ridden_out_then_expiry_is_reported_once_and_renewal_resumes() {
    let ca = Ca::new(true);
    let (pod, task) = start(&ca, true);
    ca.up.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Renewal was due and failed: the certificate is kept meanwhile.
    assert!(ca.requests.load(Ordering::SeqCst) >= 1);
    assert!(pod.valid());
    assert_eq!(pod.expired.load(Ordering::SeqCst), 0);

    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!pod.valid());
    assert_eq!(pod.expired.load(Ordering::SeqCst), 1);
    let asked = ca.requests.load(Ordering::SeqCst);
    assert!(asked >= 3, "only {asked} requests: no retries?");
    assert_eq!(pod.installed.load(Ordering::SeqCst), 0);

    // Back: at most a retry period (a quarter of the lifetime, but at least
    // a second) later, the pod has a certificate again.
    ca.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pod.valid());
    assert_eq!(
        pod.expired.load(Ordering::SeqCst),
        1,
        "expiry reported again"
    );
    task.abort();
}

#[tokio::test]
async fn a_pod_without_a_certificate_gets_one_once_the_ca_answers() {
    let ca = Ca::new(false);
    let (pod, task) = start(&ca, false);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(pod.current().is_none());
    // Backing off: not hammering the CA.
    let asked = ca.requests.load(Ordering::SeqCst);
    assert!((1..=2).contains(&asked), "{asked} requests in 2.5 s");
    ca.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(pod.valid());
    assert_eq!(pod.expired.load(Ordering::SeqCst), 0);
    task.abort();
}
