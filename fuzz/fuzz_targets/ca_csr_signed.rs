#![no_main]
//! What a CSR asks for, validly signed (see `warren_fuzz::csr::sign_info`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warren_fuzz::write_seeds(warren_fuzz::csr::info_seeds),
    |data: &[u8]| warren_fuzz::csr::sign_info(data)
);
