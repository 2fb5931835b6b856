#![no_main]
//! Watch events of the kinds the agent watches, to the mesh it builds (see
//! `warren_agent::fuzzing::kubernetes::objects`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    warren_agent::fuzzing::kubernetes::objects(data);
});
