//! The HTTP API (axum on hyper). Routes are listed in [`router`] and
//! described in `docs/openapi.json`, served at `/v1/openapi.json`.
//!
//! Every error is JSON: `{"error": {"code", "message", "field"?}}` with a 4xx
//! status for the caller's mistakes and 5xx only for the server's own. Bodies
//! are read with explicit limits, so an oversized body is a 413 JSON error,
//! never a truncated read.

use super::store::StoreError;
use super::{Action, Principal, Service, ServiceError, export, mcp};
use crate::policy::report::static_report;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

/// Shared state of the handlers.
pub type AppState = Arc<Service>;

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

impl ServiceError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyCalls { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Conflict(_) => StatusCode::CONFLICT,
            // The shared database is down or unreachable: nothing was
            // written; the same request may succeed later.
            Self::Store(StoreError::Postgres(_) | StoreError::ObjectStore { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Store(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden { .. } => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::BadRequest { code, .. } => code,
            Self::TooLarge { .. } => "too_large",
            Self::TooManyCalls { .. } => "too_many_calls",
            Self::Conflict(_) => "conflict",
            Self::Store(StoreError::Postgres(_) | StoreError::ObjectStore { .. }) => {
                "storage_unavailable"
            }
            Self::Store(_) => "storage_error",
            Self::Internal(_) => "internal_error",
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> Value {
        let mut e = json!({"code": self.code(), "message": self.to_string()});
        match self {
            Self::BadRequest { field: Some(f), .. } => e["field"] = f.clone().into(),
            Self::TooLarge { field, limit } => {
                e["field"] = (*field).into();
                e["limit"] = (*limit).into();
            }
            _ => {}
        }
        json!({ "error": e })
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut r = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, Self::Unauthorized) {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().unwrap_or_else(|_| unreachable!()),
            );
        }
        r
    }
}

type ApiResult<T> = Result<T, ServiceError>;

/// The caller, from `Authorization: Bearer <token>`.
pub(crate) fn principal(s: &Service, headers: &HeaderMap) -> ApiResult<Principal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    s.authenticate(token)
}

/// The caller, who must be allowed `action`.
fn authorize(s: &Service, headers: &HeaderMap, action: Action) -> ApiResult<Principal> {
    let who = principal(s, headers)?;
    who.require(action)?;
    Ok(who)
}

/// Read a whole body, refusing more than `limit` bytes with a 413.
pub(crate) async fn read_body(
    body: Body,
    limit: u64,
    field: &'static str,
) -> ApiResult<bytes::Bytes> {
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|_| ServiceError::TooLarge { field, limit })
}

/// The router with every route.
pub fn router(state: AppState) -> Router {
    let c = "/v1/components/{name}";
    // Every answer names the node that gave it (the config checked the
    // name's characters).
    let node = header::HeaderValue::from_str(&state.config.node)
        .unwrap_or_else(|_| header::HeaderValue::from_static("airlock"));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route(
            "/v1/components",
            get(list_components)
                .post(upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(c, get(get_component).delete(delete_component))
        .route(&format!("{c}/policy"), get(get_policy).put(put_policy))
        .route(&format!("{c}/policy/versions"), get(policy_versions))
        .route(&format!("{c}/policy/diff"), get(policy_diff))
        .route(&format!("{c}/report"), get(report))
        .route("/v1/tools", get(list_tools))
        .route("/v1/tools/{call}", post(invoke))
        .route("/v1/audit", get(audit_query))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .merge(super::console::routes())
        .fallback(|| async {
            ServiceError::NotFound("No such route; see /v1/openapi.json.".into())
        })
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let node = node.clone();
            async move {
                r.headers_mut().insert("airlock-node", node);
                r
            }
        }))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> ApiResult<axum::Json<Value>> {
    // Ready means the database answers.
    s.store().list("")?;
    Ok(axum::Json(
        json!({"ready": true, "isolation": s.isolation()}),
    ))
}

async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    let who = principal(&s, &headers)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics_text_for(&who.tenant),
    )
        .into_response())
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Append a chunk of component bytes, refusing uploads over `limit` (413).
fn write_component_chunk(
    w: &mut super::store::BlobWriter,
    chunk: &[u8],
    limit: u64,
) -> ApiResult<()> {
    w.write(chunk)?;
    if w.size() > limit {
        return Err(ServiceError::TooLarge {
            field: "component",
            limit,
        });
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    name: Option<String>,
}

/// `POST /v1/components?name=…` with the raw component as the body, or a
/// multipart form with parts `name`, `component` and optionally `policy`.
/// The header carrying a policy's detached signature on `PUT …/policy`
/// (`ed25519:<128 hex>`, see `airlock sign`).
pub const SIGNATURE_HEADER: &str = "airlock-signature";

async fn upload(
    State(s): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> ApiResult<Response> {
    let who = authorize(&s, &headers, Action::Manage)?;
    let Query(q) =
        query.map_err(|e| super::bad("invalid_query", Some("query".into()), e.body_text()))?;
    let limit = s.config.limits.max_upload_bytes;
    let text_limit = s.config.limits.max_request_bytes;
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let mut name = q.name;
    let mut policy: Option<String> = None;
    let mut policy_signature: Option<String> = None;
    let mut staged = None;
    if is_multipart {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| super::bad("invalid_multipart", None, e.body_text()))?;
        while let Some(mut field) = mp
            .next_field()
            .await
            .map_err(|e| super::bad("invalid_multipart", None, e.body_text()))?
        {
            let part = field.name().unwrap_or("").to_string();
            match part.as_str() {
                "component" => {
                    let mut w = s.store().begin_upload()?;
                    while let Some(chunk) = field.chunk().await.map_err(|e| {
                        super::bad("invalid_multipart", Some("component".into()), e.body_text())
                    })? {
                        write_component_chunk(&mut w, &chunk, limit)?;
                    }
                    staged = Some(w.finish()?);
                }
                f @ ("name" | "policy" | "policy_signature") => {
                    let mut text = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(|e| {
                        super::bad("invalid_multipart", Some(f.to_string()), e.body_text())
                    })? {
                        text.extend_from_slice(&chunk);
                        if text.len() as u64 > text_limit {
                            return Err(ServiceError::TooLarge {
                                field: match f {
                                    "name" => "name",
                                    "policy" => "policy",
                                    _ => "policy_signature",
                                },
                                limit: text_limit,
                            });
                        }
                    }
                    let text = String::from_utf8(text).map_err(|_| {
                        super::bad(
                            "invalid_multipart",
                            Some(f.to_string()),
                            "must be UTF-8 text",
                        )
                    })?;
                    match f {
                        "name" => name = Some(text.trim().to_string()),
                        "policy" => policy = Some(text),
                        _ => policy_signature = Some(text.trim().to_string()),
                    }
                }
                other => {
                    return Err(super::bad(
                        "invalid_multipart",
                        Some(other.to_string()),
                        "unknown part; expected name, component, policy and policy_signature",
                    ));
                }
            }
        }
    } else {
        let mut w = s.store().begin_upload()?;
        let mut stream = req.into_body().into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| super::bad("invalid_body", Some("component".into()), e.to_string()))?;
            write_component_chunk(&mut w, &chunk, limit)?;
        }
        staged = Some(w.finish()?);
    }
    let staged = staged.filter(|b| b.size > 0).ok_or_else(|| {
        super::bad(
            "invalid_component",
            Some("component".into()),
            "the upload has no component bytes",
        )
    })?;
    let name = name.ok_or_else(|| {
        super::bad(
            "invalid_name",
            Some("name".into()),
            "give the component a name (?name= or a `name` part)",
        )
    })?;
    let digest = staged.digest.clone();
    let size = staged.size;
    // Compiling takes CPU time: keep it off the async workers.
    let s2 = s.clone();
    let n2 = name.clone();
    let reg = tokio::task::spawn_blocking(move || {
        s2.register_upload(
            &who,
            &n2,
            staged,
            policy.as_deref(),
            policy_signature.as_deref(),
        )
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))??;
    let status = if reg.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        axum::Json(json!({
            "name": name, "digest": digest, "size": size, "created": reg.created,
            "tools": reg.tools, "audit_record": reg.audit_record,
            "signature": crate::signing::state(reg.signed_by.as_deref()),
            "signed_by": reg.signed_by,
        })),
    )
        .into_response())
}

async fn list_components(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::Read)?;
    Ok(axum::Json(
        json!({"components": s.store().list(&who.tenant)?}),
    ))
}

async fn get_component(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::Read)?;
    let s2 = s.clone();
    let (row, loaded) = tokio::task::spawn_blocking(move || s2.component_tools(&who.tenant, &name))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    let mut v = serde_json::to_value(&row).unwrap_or_default();
    if let (Value::Object(out), Value::Object(inspect)) = (&mut v, loaded.tools.inspect_json()) {
        out.extend(inspect);
    }
    Ok(axum::Json(v))
}

async fn delete_component(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::Manage)?;
    let seq = s.store().delete(&who.tenant, &who.name, &name)?;
    Ok(axum::Json(json!({"deleted": name, "audit_record": seq})))
}

async fn put_policy(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let who = authorize(&s, &headers, Action::Manage)?;
    let bytes = read_body(body, s.config.limits.max_request_bytes, "policy").await?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
        super::bad(
            "invalid_policy",
            Some("policy".into()),
            "the policy must be UTF-8 TOML text",
        )
    })?;
    s.validate_policy(&who.tenant, &text, super::PolicyCheck::Store)?;
    let signature = match headers.get(SIGNATURE_HEADER) {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            super::bad(
                "signature_invalid",
                Some("policy_signature".into()),
                format!("the {SIGNATURE_HEADER} header is not text"),
            )
        })?),
    };
    let signed_by = s.policy_signer(&who.tenant, &name, &text, signature)?;
    let (version, seq) =
        s.store()
            .put_policy(&who.tenant, &who.name, &name, &text, signed_by.as_deref())?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "component": name, "version": version, "audit_record": seq,
            "signature": crate::signing::state(signed_by.as_deref()),
            "signed_by": signed_by,
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionQuery {
    version: Option<i64>,
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    q.map(|Query(v)| v)
        .map_err(|e| super::bad("invalid_query", Some("query".into()), e.body_text()))
}

async fn get_policy(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::ReadPolicy)?;
    let q = query(q)?;
    let row = s.store().policy(&who.tenant, &name, q.version)?;
    // A version the current config no longer allows is still shown (its
    // text), with no parsed form.
    let parsed = s.checked_stored(&who.tenant, &row).ok().map(|c| c.policy);
    let mut v = serde_json::to_value(&row).unwrap_or_default();
    // Secret env values never leave: the text shows their sha256 only.
    v["text"] = crate::policy::redact_text(&row.text).into();
    v["policy"] = serde_json::to_value(parsed).unwrap_or_default();
    Ok(axum::Json(v))
}

async fn policy_versions(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::ReadPolicy)?;
    Ok(axum::Json(
        json!({"versions": s.store().policy_versions(&who.tenant, &name)?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    from: i64,
    to: i64,
}

/// Field-by-field differences between two JSON values.
pub(crate) fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<Value>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                json_diff(
                    &p,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a == b => {}
        _ => out.push(json!({"field": path, "from": a, "to": b})),
    }
}

async fn policy_diff(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::ReadPolicy)?;
    let q = query(q)?;
    let parse = |v: i64| -> ApiResult<Value> {
        let (checked, _) = s.policy_at(&who.tenant, &name, Some(v))?;
        Ok(serde_json::to_value(checked.policy).unwrap_or_default())
    };
    let (a, b) = (parse(q.from)?, parse(q.to)?);
    let mut changes = Vec::new();
    json_diff("", &a, &b, &mut changes);
    Ok(axum::Json(
        json!({"component": name, "from": q.from, "to": q.to, "changes": changes}),
    ))
}

async fn report(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::ReadPolicy)?;
    let q = query(q)?;
    let (_row, loaded) = s.component_tools(&who.tenant, &name)?;
    let (checked, version) = s.policy_at(&who.tenant, &name, q.version)?;
    Ok(axum::Json(json!({
        "component": name,
        "policy_version": version,
        "report": static_report(&loaded.tools, &checked.policy),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolsQuery {
    format: export::Format,
}

async fn list_tools(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ToolsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::Read)?;
    let q = q.map(|Query(v)| v).map_err(|_| {
        super::bad(
            "invalid_query",
            Some("format".into()),
            "format must be openai, anthropic or mcp",
        )
    })?;
    let s2 = s.clone();
    let tools = tokio::task::spawn_blocking(move || s2.offered_tools(&who.tenant))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    Ok(axum::Json(export::tools(&tools, q.format)))
}

/// `POST /v1/tools/{component__tool}:invoke` with `{"arguments": {...}}`.
async fn invoke(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(call): Path<String>,
    body: Body,
) -> ApiResult<axum::Json<super::Invocation>> {
    let who = principal(&s, &headers)?;
    let tool = call.strip_suffix(":invoke").ok_or_else(|| {
        ServiceError::NotFound("Tool calls are POST /v1/tools/<tool>:invoke.".into())
    })?;
    let bytes = read_body(body, s.config.limits.max_request_bytes, "body").await?;
    let args = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            super::bad(
                "invalid_json",
                Some("body".into()),
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        match v {
            Value::Object(mut m) => {
                if let Some(k) = m.keys().find(|k| *k != "arguments") {
                    return Err(super::bad(
                        "invalid_json",
                        Some(format!("body.{k}")),
                        "unknown field; the body is {\"arguments\": {...}}",
                    ));
                }
                m.remove("arguments").unwrap_or_else(|| json!({}))
            }
            _ => {
                return Err(super::bad(
                    "invalid_json",
                    Some("body".into()),
                    "the body must be a JSON object {\"arguments\": {...}}",
                ));
            }
        }
    };
    Ok(axum::Json(s.invoke(&who, tool, args).await?))
}

async fn audit_query(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<super::audit::Filter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let who = authorize(&s, &headers, Action::Audit)?;
    let f = query(q)?;
    if let Some(d) = &f.decision
        && !matches!(d.as_str(), "allow" | "deny" | "error")
    {
        return Err(super::bad(
            "invalid_query",
            Some("decision".into()),
            "decision must be allow, deny or error",
        ));
    }
    Ok(axum::Json(
        json!({"records": s.store().audit_query(&who.tenant, &f)?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    head_seq: Option<i64>,
    head_hash: Option<String>,
}

async fn audit_verify(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<VerifyQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<axum::Json<super::audit::Verification>> {
    // The chain is one for the whole server: verifying it reveals only its length and head.
    authorize(&s, &headers, Action::Audit)?;
    let q = query(q)?;
    let anchor = match (q.head_seq, q.head_hash.as_deref()) {
        (Some(n), Some(h)) => Some((n, h)),
        (None, None) => None,
        _ => {
            return Err(super::bad(
                "invalid_query",
                Some("head_hash".into()),
                "give both head_seq and head_hash, or neither",
            ));
        }
    };
    Ok(axum::Json(s.store().audit_verify(anchor)?))
}

/// Serve until `shutdown` resolves; in-flight requests are finished first.
///
/// HTTP/1 connections may be half-closed: a client that shuts down its
/// sending side after the request (as `nc` and some proxies do) still
/// gets its answer, and its call is not cancelled half-way.
///
/// # Errors
/// The listener fails.
///
/// At most `max_connections` connections are open at once: the next is
/// accepted when one closes (until then it waits in the listen queue), so
/// clients cannot take the descriptors calls need. A connection that does
/// not send a request's headers within the config's `header_timeout_secs`
/// (or idles that long between requests) is closed.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let header_timeout = std::time::Duration::from_secs(state.config.limits.header_timeout_secs);
    let service = TowerToHyperService::new(router(state));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Some(header_timeout));
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of descriptors or a connection reset before accept:
                // keep serving the others.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_diff_names_changed_fields() {
        let a = json!({"limits": {"fuel": 1, "memory": 2}, "env": {"A": "x"}});
        let b = json!({"limits": {"fuel": 5, "memory": 2}, "env": {}});
        let mut out = vec![];
        json_diff("", &a, &b, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["field"], "env.A");
        assert_eq!(out[1]["field"], "limits.fuel");
        assert_eq!(out[1]["to"], 5);
    }

    #[test]
    fn openapi_document_lists_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/openapi.json",
            "/v1/components",
            "/v1/components/{name}",
            "/v1/components/{name}/policy",
            "/v1/components/{name}/policy/versions",
            "/v1/components/{name}/policy/diff",
            "/v1/components/{name}/report",
            "/v1/tools",
            "/v1/tools/{tool}:invoke",
            "/v1/audit",
            "/v1/audit/verify",
            "/mcp",
        ] {
            assert!(paths.contains_key(p), "openapi.json lacks {p}");
        }
    }
}
