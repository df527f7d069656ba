//! The vsock tx path over a guest memory and queue the fuzzer writes
//! whole (descriptor table, rings, headers, payloads).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    airlock_vmm::devices::vsock::fuzzing::tx(data);
});
