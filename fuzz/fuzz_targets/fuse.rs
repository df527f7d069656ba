//! FUSE requests as a hostile guest kernel writes them, through
//! `fuse-backend-rs`'s parser and server into a `Share` (read-write, over
//! a small tree in the temp directory).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    airlock_vmm::devices::fs::raw::fuzz_one(data);
});
