//! The crypto provider of warren's HBONE connections. (The CA's transport
//! uses ring's defaults: it is not bound by ztunnel's choice of suites.)

use std::sync::{Arc, LazyLock};

use rustls::crypto::{CryptoProvider, ring};

/// ring with only the suites ztunnel offers. Explicit rather than the
/// process-wide default, which another crate could install differently.
static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    let mut provider = ring::default_provider();
    provider.cipher_suites = vec![
        ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
});

/// The provider of every HBONE configuration (and of the checks of
/// workload certificates).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::clone(&PROVIDER)
}
