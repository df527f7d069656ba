//! The seam between a call's outgoing HTTP and whoever sends it: the
//! request and response a runner hands over, the failure kinds wasi-http
//! tells apart, and the [`Egress`] trait (the host's proxy, in process or
//! over vsock).

use crate::audit::AuditLog;
use crate::grants::HttpGrant;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// An outgoing HTTP request the grant allowed, with its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRequest {
    /// Method.
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Headers (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// The answer to an [`EgressRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Why an [`Egress`] has no response, in the classes wasi-http's error
/// codes tell apart. The guest answers the component with the same code
/// `wasmtime-wasi-http` gives in process for the same cause, so a failed
/// request looks the same in both isolation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressFailureKind {
    /// The proxy's own check refused it (grant, scheme, URL).
    Denied,
    /// The host name did not resolve.
    Dns,
    /// Nothing accepted the connection.
    ConnectionRefused,
    /// The proxy's time limit passed.
    Timeout,
    /// TLS failed (handshake, certificate).
    Tls,
    /// The response body is over [`EGRESS_MAX_BODY`].
    TooLarge,
    /// Anything else (proxy unreachable, protocol error).
    Other,
}

/// An egress failure: its class and a sentence saying what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressFailure {
    /// The class.
    pub kind: EgressFailureKind,
    /// What happened.
    pub message: String,
}

impl EgressFailure {
    /// A failure of `kind`.
    pub fn new(kind: EgressFailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A failure of kind [`EgressFailureKind::Other`].
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(EgressFailureKind::Other, message)
    }

    /// The wasi-http error code the component sees: what
    /// `wasmtime-wasi-http`'s own client reports for the same cause.
    pub fn error_code(&self) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        use wasmtime_wasi_http::p2::bindings::http::types::{DnsErrorPayload, ErrorCode};
        match self.kind {
            EgressFailureKind::Denied => ErrorCode::HttpRequestDenied,
            EgressFailureKind::Dns => ErrorCode::DnsError(DnsErrorPayload {
                rcode: Some("address not available".into()),
                info_code: None,
            }),
            EgressFailureKind::ConnectionRefused => ErrorCode::ConnectionRefused,
            EgressFailureKind::Timeout => ErrorCode::ConnectionTimeout,
            EgressFailureKind::Tls => ErrorCode::TlsProtocolError,
            EgressFailureKind::TooLarge => {
                ErrorCode::HttpResponseBodySize(Some(EGRESS_MAX_BODY as u64))
            }
            EgressFailureKind::Other => ErrorCode::DestinationUnavailable,
        }
    }
}

impl std::fmt::Display for EgressFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Largest request or response body that goes through an [`Egress`].
pub const EGRESS_MAX_BODY: usize = 8 << 20;

/// The call a request belongs to: its grant and its audit trail.
#[derive(Debug, Clone)]
pub struct EgressCall {
    /// The call's HTTP grant (the runner already checked the request's
    /// name against it).
    pub grant: Arc<HttpGrant>,
    /// The call's audit trail, for the egress's own decisions.
    pub audit: AuditLog,
}

/// Where requests the grant allowed by name go: the host's egress proxy,
/// called directly in process isolation and over vsock from the microVM
/// (there it checks again with the host's own copy of the grant, ignoring
/// `call`). It resolves the name, checks each address, connects only to an
/// address it checked, and says why it refused. Blocking; called off the
/// async runtime. A runner without one sends nothing.
pub trait Egress: Send + Sync {
    /// Send one request.
    ///
    /// # Errors
    /// Why there is no response (refused by the proxy's own check,
    /// unreachable, TLS, too large).
    fn send(
        &self,
        request: EgressRequest,
        call: &EgressCall,
    ) -> Result<EgressResponse, EgressFailure>;
}
