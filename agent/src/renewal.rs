//! Keeps each enrolled pod's certificate valid: renews it at about half its
//! lifetime, retries with backoff while the CA cannot answer, and when a
//! certificate expires anyway, says so and retires the connections made with
//! it, so the pod gets no tunnels until the CA issues a new one (fail closed).

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use warren_daemon::logging::Chain;
use warren_pki::{
    identity::SpiffeId,
    tls::{TlsError, WorkloadCertificate},
};

use crate::{proxy::inbound::PodInbound, tls::CertificateSource};

/// First retry after a failure; doubled after each further one.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between attempts: a minute, or a quarter of the
/// certificate's lifetime if that is shorter, so that a short-lived
/// certificate gets several attempts before it expires.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Waits for a wall-clock time are cut into pieces this long, so that a
/// clock stepped forward (NTP at boot) is noticed soon after.
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// What renewal looks after: one pod's certificate.
pub trait Holder: Send + Sync + 'static {
    /// `namespace/name`, for logs.
    fn name(&self) -> String;
    fn identity(&self) -> &SpiffeId;
    /// The latest certificate, valid or not.
    fn current(&self) -> Option<Arc<WorkloadCertificate>>;
    /// Puts a new certificate in place, or refuses it (the old one stays).
    fn install(
        &self,
        certificate: WorkloadCertificate,
    ) -> impl Future<Output = Result<(), TlsError>> + Send;
    /// The current certificate expired: retire what was made with it.
    fn expired(&self) -> impl Future<Output = ()> + Send;
}

impl Holder for PodInbound {
    fn name(&self) -> String {
        self.pod.workload.qualified_name()
    }

    fn identity(&self) -> &SpiffeId {
        &self.pod.workload.identity
    }

    fn current(&self) -> Option<Arc<WorkloadCertificate>> {
        self.pod.certificate()
    }

    fn install(
        &self,
        certificate: WorkloadCertificate,
    ) -> impl Future<Output = Result<(), TlsError>> + Send {
        self.renew(certificate)
    }

    fn expired(&self) -> impl Future<Output = ()> + Send {
        // Inbound connections wind down by themselves at expiry.
        self.pod.retire_connections()
    }
}

/// Runs until aborted (the pod is withdrawn). The holder may start without a
/// certificate: its first request failed already, so this waits a moment
/// before asking again.
pub async fn keep_fresh<H: Holder>(holder: Arc<H>, source: Arc<dyn CertificateSource>) {
    let name = holder.name();
    let mut backoff = RETRY_MIN;
    // A wait before the next request, after a failure.
    let mut pause = holder.current().is_none().then_some(RETRY_MIN);
    // The expired certificate already reported (and its connections retired).
    let mut reported: Option<Arc<WorkloadCertificate>> = None;
    loop {
        let current = holder.current();
        let unreported = current
            .clone()
            .filter(|c| !reported.as_ref().is_some_and(|r| Arc::ptr_eq(r, c)));
        let expiry = async {
            match &unreported {
                Some(certificate) => sleep_until(certificate.not_after()).await,
                None => std::future::pending().await,
            }
        };
        let wait = pause.take();
        let attempt = async {
            match (wait, &current) {
                (Some(wait), _) => tokio::time::sleep(wait).await,
                (None, Some(current)) => sleep_until(renewal_due(current)).await,
                (None, None) => {}
            }
            match source.certificate(holder.identity()).await {
                Ok(certificate) => holder.install(certificate).await,
                Err(error) => Err(error),
            }
        };
        // An expiry interrupts whatever is under way (a wait, a request to a
        // stalled CA): it is reported at once, then a request is made again.
        let outcome = tokio::select! {
            () = expiry => None,
            outcome = attempt => Some(outcome),
        };
        let Some(outcome) = outcome else {
            let certificate = unreported.expect("only a certificate can expire");
            error!(
                workload = %name,
                identity = %certificate.identity(),
                "certificate expired without renewal: the workload gets no tunnels until the CA \
                 issues a new one"
            );
            holder.expired().await;
            reported = Some(certificate);
            continue;
        };
        match outcome {
            Ok(()) => {
                backoff = RETRY_MIN;
                if let Some(certificate) = holder.current() {
                    info!(
                        workload = %name,
                        identity = %certificate.identity(),
                        valid_for_s = remaining(&certificate).as_secs(),
                        "{}",
                        if current.is_some() { "certificate renewed" } else { "certificate issued" }
                    );
                }
            }
            Err(error) => {
                let retry_max = current
                    .as_ref()
                    .map_or(RETRY_MAX, |c| RETRY_MAX.min(c.lifetime() / 4))
                    .max(RETRY_MIN);
                let retry_in = backoff;
                backoff = (backoff * 2).min(retry_max);
                pause = Some(retry_in);
                let error = Chain(&error);
                match current.as_ref().map(|c| remaining(c)) {
                    Some(left) if !left.is_zero() => warn!(
                        workload = %name, %error, ?retry_in, expires_in_s = left.as_secs(),
                        "certificate renewal failed; keeping the current certificate until it expires"
                    ),
                    Some(_) => error!(
                        workload = %name, %error, ?retry_in,
                        "no valid certificate: the workload gets no tunnels until the CA issues one"
                    ),
                    None => error!(
                        workload = %name, %error, ?retry_in,
                        "no certificate: the workload gets no tunnels until the CA issues one"
                    ),
                }
            }
        }
    }
}

/// When `certificate` should be renewed: its refresh time, less a little
/// jitter so that pods enrolled together do not renew together.
fn renewal_due(certificate: &WorkloadCertificate) -> SystemTime {
    let jitter = certificate.lifetime().mul_f64(rand::random::<f64>() * 0.05);
    certificate.refresh_at() - jitter
}

/// Sleeps until the wall clock reads `time`. Certificates live on the wall
/// clock; tokio sleeps on the monotonic one, so the wall clock is read again
/// every [`CLOCK_CHECK`].
async fn sleep_until(time: SystemTime) {
    while let Ok(left) = time.duration_since(SystemTime::now()) {
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(CLOCK_CHECK)).await;
    }
}

fn remaining(certificate: &WorkloadCertificate) -> Duration {
    certificate
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
