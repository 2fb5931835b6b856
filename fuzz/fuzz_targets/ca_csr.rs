#![no_main]
//! A workload's CSR as a node sends it to the CA (see
//! `warren_fuzz::csr::sign_pem`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warren_fuzz::write_seeds(warren_fuzz::csr::pem_seeds),
    |data: &[u8]| warren_fuzz::csr::sign_pem(data)
);
