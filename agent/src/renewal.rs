//! Keeps each enrolled pod's certificate valid: renews it at about half its
//! lifetime, retries with backoff while the CA cannot answer, and when a
//! certificate expires anyway, retires every connection made with it, so the
//! pod gets no tunnels until the CA issues a new one (fail closed).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::{error, info, warn};

use crate::{
    logging::Chain,
    proxy::inbound::PodInbound,
    tls::{CertificateSource, WorkloadCertificate},
};

/// First retry after a failure; doubled after each further one.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between attempts: a minute, or a quarter of the
/// certificate's lifetime if that is shorter, so that a short-lived
/// certificate gets several attempts before it expires.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Runs until aborted (the pod is withdrawn). `inbound.pod` may start without
/// a certificate: its first request failed already, so this waits a moment
/// before asking again.
pub async fn keep_fresh(inbound: Arc<PodInbound>, source: Arc<dyn CertificateSource>) {
    let pod = &inbound.pod;
    let name = pod.workload.qualified_name();
    let mut backoff = RETRY_MIN;
    if pod.certificate().is_none() {
        tokio::time::sleep(backoff).await;
    }
    // The expired certificate whose connections were retired already.
    let mut retired: Option<Arc<WorkloadCertificate>> = None;
    loop {
        let current = pod.certificate();
        if let Some(current) = &current {
            tokio::time::sleep(until_renewal(current)).await;
        }
        let renewed = match source.certificate(&pod.workload.identity).await {
            Ok(certificate) => inbound.renew(certificate).await,
            Err(error) => Err(error),
        };
        let error = match renewed {
            Ok(()) => {
                backoff = RETRY_MIN;
                if let Some(certificate) = pod.certificate() {
                    info!(
                        workload = %name,
                        identity = %certificate.identity(),
                        valid_for_s = remaining(&certificate).as_secs(),
                        "{}",
                        if current.is_some() { "certificate renewed" } else { "certificate issued" }
                    );
                }
                continue;
            }
            Err(error) => error,
        };
        let retry_max = current
            .as_ref()
            .map_or(RETRY_MAX, |c| RETRY_MAX.min(c.lifetime() / 4))
            .max(RETRY_MIN);
        let mut retry_in = backoff;
        backoff = (backoff * 2).min(retry_max);
        let Some(certificate) = current else {
            error!(
                workload = %name,
                error = %Chain(&error),
                ?retry_in,
                "no certificate: the workload gets no tunnels until the CA issues one"
            );
            tokio::time::sleep(retry_in).await;
            continue;
        };
        let expires_in = remaining(&certificate);
        if expires_in.is_zero() {
            error!(
                workload = %name,
                error = %Chain(&error),
                ?retry_in,
                "no valid certificate: the workload gets no tunnels until the CA issues one"
            );
        } else {
            warn!(
                workload = %name,
                error = %Chain(&error),
                ?retry_in,
                expires_in_s = expires_in.as_secs(),
                "certificate renewal failed; keeping the current certificate until it expires"
            );
            if expires_in <= retry_in {
                tokio::time::sleep(expires_in).await;
                retry_in -= expires_in;
            }
        }
        if remaining(&certificate).is_zero()
            && !retired
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &certificate))
        {
            expired(&inbound, &certificate).await;
            retired = Some(certificate);
        }
        tokio::time::sleep(retry_in).await;
    }
}

/// Says that the pod's certificate expired, and retires the pooled outbound
/// connections made with it (inbound ones wind down by themselves at expiry).
async fn expired(inbound: &PodInbound, certificate: &WorkloadCertificate) {
    error!(
        workload = %inbound.pod.workload.qualified_name(),
        identity = %certificate.identity(),
        "certificate expired without renewal: the workload gets no tunnels until the CA \
         issues a new one"
    );
    inbound.pod.retire_connections().await;
}

/// How long until `certificate` should be renewed: its refresh time, less a
/// little jitter so that pods enrolled together do not renew together.
fn until_renewal(certificate: &WorkloadCertificate) -> Duration {
    let jitter = certificate.lifetime().mul_f64(rand::random::<f64>() * 0.05);
    certificate
        .refresh_at()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(jitter)
}

fn remaining(certificate: &WorkloadCertificate) -> Duration {
    certificate
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}
