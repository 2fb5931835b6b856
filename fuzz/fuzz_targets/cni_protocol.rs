#![no_main]
//! The CNI plugin's inputs and the protocol between it and the agent (see
//! `warren_fuzz::cni::protocol`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_fuzz::cni::protocol(data));
