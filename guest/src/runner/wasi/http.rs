//! `wasi:http`: every request checked against the HTTP grant and
//! audited here, then sent through the [`Egress`](crate::runner::Egress)
//! (fails closed without one).

use crate::audit::{AuditLog, Decision};
use crate::grants::{HttpGrant, HttpVerdict};
use crate::runner::egress::{EGRESS_MAX_BODY, Egress, EgressCall, EgressRequest};
use std::sync::Arc;
use wasmtime_wasi_http::WasiHttpHooks;

/// Outgoing HTTP: every request is checked against the grant and recorded.
pub(crate) struct EgressHooks {
    pub(crate) grant: Arc<HttpGrant>,
    pub(crate) audit: AuditLog,
    pub(crate) egress: Option<Arc<dyn Egress>>,
}

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: ::http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> EgressFuture {
        drop(fut);
        let uri = request.uri().clone();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri.host().unwrap_or("").to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let target = format!(
            "{} {scheme}://{host}:{port}{}",
            request.method(),
            uri.path()
        );
        match self.grant.check(&scheme, &host, port) {
            HttpVerdict::Denied(reason) => {
                self.audit
                    .record("http.request", target, Decision::Deny, reason);
                let pause = self.audit.denial_pause();
                Box::new(async move {
                    tokio::time::sleep(pause).await;
                    Err(wasmtime_wasi_http::Error::HttpRequestDenied)
                })
            }
            HttpVerdict::Allowed(reason) => {
                self.audit
                    .record("http.request", target, Decision::Allow, reason);
                match &self.egress {
                    Some(e) => send_via(
                        e.clone(),
                        request,
                        EgressCall {
                            grant: self.grant.clone(),
                            audit: self.audit.clone(),
                        },
                    ),
                    None => no_egress(),
                }
            }
        }
    }
}

pub(crate) type EgressFuture = Box<
    dyn Future<
            Output = Result<
                (
                    ::http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

/// Send a request the grant allowed through an [`Egress`].
pub(crate) fn send_via(
    egress: Arc<dyn Egress>,
    request: ::http::Request<wasmtime_wasi_http::WasiBody>,
    call: EgressCall,
) -> EgressFuture {
    use http_body_util::{BodyExt, Full, Limited};
    use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
    Box::new(async move {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, EGRESS_MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                wasmtime_wasi_http::Error::from(ErrorCode::HttpRequestBodySize(Some(
                    EGRESS_MAX_BODY as u64,
                )))
            })?
            .to_bytes();
        let req = EgressRequest {
            method: parts.method.to_string(),
            url: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        let resp = tokio::task::spawn_blocking(move || egress.send(req, &call))
            .await
            .map_err(|e| {
                wasmtime_wasi_http::Error::from(ErrorCode::InternalError(Some(e.to_string())))
            })?
            .map_err(|f| {
                tracing::warn!(error = %f.message, kind = ?f.kind, "egress proxy refused or failed");
                wasmtime_wasi_http::Error::from(f.error_code())
            })?;
        let mut builder = ::http::Response::builder().status(resp.status);
        for (k, v) in &resp.headers {
            builder = builder.header(k, v);
        }
        let res = builder
            .body(
                Full::new(bytes::Bytes::from(resp.body))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| {
                tracing::warn!(error = %e, "the egress proxy's response is not valid HTTP");
                wasmtime_wasi_http::Error::from(ErrorCode::HttpProtocolError)
            })?;
        Ok((
            res,
            Box::new(async { Ok(()) })
                as Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
        ))
    })
}

/// A runner built without an [`Egress`] sends nothing: allowed requests
/// fail closed.
pub(crate) fn no_egress() -> EgressFuture {
    tracing::warn!(
        "outgoing HTTP allowed by the grant, but this runner has no egress; failing closed"
    );
    Box::new(async { Err(wasmtime_wasi_http::Error::DestinationUnavailable) })
}
