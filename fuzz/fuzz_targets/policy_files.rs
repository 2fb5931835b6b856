#![no_main]
//! Istio's PeerAuthentication and AuthorizationPolicy documents
//! (`security.istio.io/v1` and `v1beta1`) as files (see
//! `warren_agent::fuzzing::policy::files`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_agent::fuzzing::policy::files(data));
