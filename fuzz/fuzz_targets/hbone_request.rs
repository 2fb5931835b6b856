#![no_main]
//! A CONNECT's method, authority and headers, checked as the inbound proxy
//! checks them (see `warren_agent::fuzzing::hbone::request`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_agent::fuzzing::hbone::request(data));
