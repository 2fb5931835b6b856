#![no_main]
//! The HBONE server's HTTP/2 connection: what a client sends after the
//! preface (see `warren_agent::fuzzing::hbone::server`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: warren_fuzz::write_seeds(warren_agent::fuzzing::hbone::server_seeds),
    |data: &[u8]| {
        warren_agent::fuzzing::hbone::server(data);
    }
);
