//! The vsock rx path: packets delivered into receive buffers the fuzzer
//! describes, until the guest has none left.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    airlock_vmm::devices::vsock::fuzzing::rx(rest, usize::from(len) * 300);
});
