//! Guest → host protocol frames: whatever bytes a guest sends, reading a
//! frame never panics or allocates past its limits, and a frame that reads
//! writes back to the same frame.
#![no_main]

use airlock_guest::proto::{FrameLimits, read_frame, write_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small caps: the reader must refuse a declared length past them before
    // allocating it.
    let limits = FrameLimits {
        max_json: 64 << 10,
        max_blob: 64 << 10,
    };
    let mut input = data;
    while let Ok(frame) = read_frame(&mut input, limits) {
        let mut out = Vec::new();
        write_frame(&mut out, &frame.msg, &frame.blob).expect("a frame that read writes");
        let again =
            read_frame(&mut out.as_slice(), FrameLimits::default()).expect("and reads back");
        assert_eq!(again, frame);
    }
});
