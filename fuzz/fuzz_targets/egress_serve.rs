//! The host's egress port as a guest reaches it: one connection, any
//! bytes. Serving never panics; when the handler ran, the answer is one
//! well-formed frame.
#![no_main]

use airlock_guest::egress::serve_one;
use airlock_guest::proto::{FrameLimits, Message, read_frame};
use airlock_guest::{EgressFailure, EgressFailureKind};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};

/// A connection: reads come from the fuzzer, writes are kept.
struct Conn<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut conn = Conn {
        input: data,
        output: Vec::new(),
    };
    let mut seen = None;
    let served = serve_one(&mut conn, |req| {
        seen = Some(req.url.clone());
        Err(EgressFailure::new(EgressFailureKind::Denied, "fuzz"))
    });
    if served.is_ok() {
        let answer = read_frame(&mut conn.output.as_slice(), FrameLimits::default())
            .expect("the answer is a frame");
        match (&seen, answer.msg) {
            (Some(_), Message::HttpResponse { status, .. }) => assert!(status.is_err()),
            (None, Message::Error { .. }) => {}
            (s, m) => panic!("handler ran: {s:?}, answered {m:?}"),
        }
    }
});
