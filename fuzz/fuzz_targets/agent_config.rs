#![no_main]
//! The agent's config file, and the CA's reading of it as a workloads file
//! (see `warren_agent::fuzzing::config::parse`, `warren_fuzz::config`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| warren_fuzz::config::agent_and_ca(data));
