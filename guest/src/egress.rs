//! The egress protocol: how an outgoing HTTP request that the grant allowed
//! leaves the microVM. The guest has no network stack at all; its runner
//! hands the request to [`VsockEgress`], which opens a vsock connection to
//! the host ([`EGRESS_PORT`]), sends one `HttpRequest` frame (body in the
//! blob) and reads one `HttpResponse` frame back. The host side
//! ([`serve_one`]) checks the request against the call's grant again — the
//! guest is not trusted to have done so — before sending it anywhere.
//!
//! **Invariants:** one request per connection; bodies larger than
//! [`EGRESS_MAX_BODY`] are refused on both sides; an answer that is not a
//! matching `HttpResponse` is an error, never a response.

use crate::proto::{self, FrameLimits, Message, ProtoError};
use crate::runner::{
    EGRESS_MAX_BODY, EgressFailure, EgressFailureKind, EgressRequest, EgressResponse,
};
use std::io::{Read, Write};

/// The host's vsock port for egress (guest → host CID 2).
pub const EGRESS_PORT: u32 = 1025;

fn limits() -> FrameLimits {
    FrameLimits {
        max_json: 1 << 20,
        max_blob: EGRESS_MAX_BODY as u32,
    }
}

/// Client side: send `req` on `conn`, read the answer.
///
/// # Errors
/// The connection failed, or the host refused or could not send the request.
pub fn exchange<S: Read + Write>(
    conn: &mut S,
    id: u64,
    req: EgressRequest,
) -> Result<EgressResponse, EgressFailure> {
    let msg = Message::HttpRequest {
        id,
        method: req.method,
        url: req.url,
        headers: req.headers,
    };
    proto::write_frame(conn, &msg, &req.body).map_err(|e| EgressFailure::other(e.to_string()))?;
    let frame =
        proto::read_frame(conn, limits()).map_err(|e| EgressFailure::other(e.to_string()))?;
    match frame.msg {
        Message::HttpResponse {
            id: got,
            status,
            failure,
            headers,
        } if got == id => {
            let status = status
                .map_err(|m| EgressFailure::new(failure.unwrap_or(EgressFailureKind::Other), m))?;
            Ok(EgressResponse {
                status,
                headers,
                body: frame.blob,
            })
        }
        Message::Error { message, .. } => Err(EgressFailure::other(message)),
        msg => Err(EgressFailure::other(format!(
            "the egress proxy answered {msg:?}"
        ))),
    }
}

/// Server side: read one request from `conn`, let `handle` decide and send
/// it, write the answer.
///
/// # Errors
/// Only when the connection itself fails; a refused or failed request is
/// an answer (`status: Err`), not an error.
pub fn serve_one<S: Read + Write>(
    conn: &mut S,
    handle: impl FnOnce(EgressRequest) -> Result<EgressResponse, EgressFailure>,
) -> Result<(), ProtoError> {
    let frame = proto::read_frame(conn, limits())?;
    let Message::HttpRequest {
        id,
        method,
        url,
        headers,
    } = frame.msg
    else {
        let message = "The egress port only takes HTTP requests.".to_string();
        return proto::write_frame(conn, &Message::Error { id: None, message }, b"");
    };
    let req = EgressRequest {
        method,
        url,
        headers,
        body: frame.blob,
    };
    let (msg, body) = match handle(req) {
        Ok(r) => (
            Message::HttpResponse {
                id,
                status: Ok(r.status),
                failure: None,
                headers: r.headers,
            },
            r.body,
        ),
        Err(e) => (
            Message::HttpResponse {
                id,
                status: Err(e.message),
                failure: Some(e.kind),
                headers: Vec::new(),
            },
            Vec::new(),
        ),
    };
    proto::write_frame(conn, &msg, &body)
}

/// The in-VM egress: a vsock connection to the host per request.
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
pub struct VsockEgress {
    next: std::sync::atomic::AtomicU64,
}

#[cfg(target_os = "linux")]
impl crate::runner::Egress for VsockEgress {
    /// The host checks with its own copy of the grant and keeps its own
    /// audit events: `call` stays here.
    fn send(
        &self,
        req: EgressRequest,
        _call: &crate::runner::EgressCall,
    ) -> Result<EgressResponse, EgressFailure> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| EgressFailure::other(format!("vsock socket: {e}")))?;
        connect(
            fd.as_raw_fd(),
            &VsockAddr::new(nix::libc::VMADDR_CID_HOST, EGRESS_PORT),
        )
        .map_err(|e| {
            EgressFailure::other(format!("the host's egress proxy is not reachable: {e}"))
        })?;
        let mut conn = std::fs::File::from(fd);
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        exchange(&mut conn, id, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn req() -> EgressRequest {
        EgressRequest {
            method: "POST".into(),
            url: "http://127.0.0.1:8080/x".into(),
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"hello".to_vec(),
        }
    }

    #[test]
    fn a_request_and_its_answer_cross_intact() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve_one(&mut b, |r| {
                assert_eq!(r, req());
                Ok(EgressResponse {
                    status: 201,
                    headers: vec![("x-a".into(), "1".into())],
                    body: b"made".to_vec(),
                })
            })
            .unwrap();
        });
        let r = exchange(&mut a, 7, req()).unwrap();
        server.join().unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"made");
        assert_eq!(r.headers, vec![("x-a".to_string(), "1".to_string())]);
    }

    #[test]
    fn a_failure_crosses_with_the_hosts_reason_and_class() {
        use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve_one(&mut b, |_| {
                Err(EgressFailure::new(
                    EgressFailureKind::Tls,
                    "bad certificate",
                ))
            })
            .unwrap();
        });
        let e = exchange(&mut a, 1, req()).unwrap_err();
        server.join().unwrap();
        assert_eq!(
            e,
            EgressFailure::new(EgressFailureKind::Tls, "bad certificate")
        );
        // The code wasmtime-wasi-http gives in process for a TLS failure.
        assert!(matches!(e.error_code(), ErrorCode::TlsProtocolError));
        let denied = EgressFailure::new(EgressFailureKind::Denied, "no");
        assert!(matches!(denied.error_code(), ErrorCode::HttpRequestDenied));
    }

    #[test]
    fn other_messages_on_the_egress_port_are_refused() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve_one(&mut b, |_| panic!("not a request")));
        proto::write_frame(&mut a, &Message::Shutdown, b"").unwrap();
        let f = proto::read_frame(&mut a, FrameLimits::default()).unwrap();
        assert!(matches!(f.msg, Message::Error { .. }), "{:?}", f.msg);
        server.join().unwrap().unwrap();
    }
}
