//! MCP over streamable HTTP at `/mcp` (JSON-RPC 2.0).
//!
//! * `POST /mcp`: one JSON-RPC message (or a batch). Requests get an
//!   `application/json` response; notifications and client responses get
//!   `202 Accepted`. Methods: `initialize`, `ping`, `tools/list`, `tools/call`.
//! * `initialize` starts a session (`Mcp-Session-Id` response header); every
//!   later request must carry it (400 without, 404 for an unknown one).
//!   `initialize` must come alone, never in a batch. Sessions end after
//!   [`SESSION_IDLE`](super::SESSION_IDLE) unused, and a tenant holds at
//!   most [`MAX_SESSIONS_PER_TENANT`](super::MAX_SESSIONS_PER_TENANT) (the
//!   least recently used goes first).
//! * `GET /mcp` is 405: this server sends no server-initiated messages.
//! * `DELETE /mcp` ends the session.
//! * `Origin` is validated against `allowed_origins` (DNS-rebinding defence);
//!   requests without `Origin` (non-browser clients) are accepted.
//! * The bearer token decides tenant and role as for the REST API.
//!
//! Tool results: `structuredContent = {"result": value}` (MCP wants an
//! object) plus the same value as JSON text in `content`; a failed call
//! (including bad arguments, which the model can fix) is `isError: true`
//! with the structured error as text.

use super::api::{AppState, principal, read_body};
use super::{Action, Principal, ServiceError, export};
use airlock_guest::CallResult;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Protocol revisions this server speaks, newest first.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];

const SESSION: &str = "mcp-session-id";

fn rpc_error(id: &Value, code: i64, message: impl Into<String>) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message.into()}})
}

fn http_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

// An early-return response, built once per rejected request: size does not matter.
#[allow(clippy::result_large_err)]
fn check_origin(s: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => Ok(()),
        Some(o) if s.config.allowed_origins.iter().any(|a| a == o) => Ok(()),
        Some(o) => Err(http_error(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            &format!("Origin {o} is not in this server's allowed_origins."),
        )),
    }
}

#[allow(clippy::result_large_err)]
fn common(s: &AppState, headers: &HeaderMap) -> Result<Principal, Response> {
    check_origin(s, headers)?;
    let who = principal(s, headers).map_err(IntoResponse::into_response)?;
    if let Some(v) = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        && !PROTOCOL_VERSIONS.contains(&v)
    {
        return Err(http_error(
            StatusCode::BAD_REQUEST,
            "unsupported_protocol_version",
            &format!(
                "MCP-Protocol-Version {v} is not supported; this server speaks {PROTOCOL_VERSIONS:?}."
            ),
        ));
    }
    Ok(who)
}

/// `GET /mcp`: no server-to-client stream is offered.
pub async fn get(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = common(&s, &headers) {
        return r;
    }
    let mut r = http_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This server sends no server-initiated messages; use POST.",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
    r
}

/// `DELETE /mcp`: end the session.
pub async fn delete(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = common(&s, &headers) {
        return r;
    }
    match headers.get(SESSION).and_then(|v| v.to_str().ok()) {
        Some(id) if s.end_session(id) => StatusCode::NO_CONTENT.into_response(),
        Some(_) => http_error(
            StatusCode::NOT_FOUND,
            "unknown_session",
            "No such MCP session.",
        ),
        None => http_error(
            StatusCode::BAD_REQUEST,
            "missing_session",
            "Mcp-Session-Id is required.",
        ),
    }
}

/// `POST /mcp`.
pub async fn post(State(s): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let who = match common(&s, &headers) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let bytes = match read_body(body, s.config.limits.max_request_bytes, "body").await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(rpc_error(&Value::Null, -32700, format!("Parse error: {e}"))),
            )
                .into_response();
        }
    };
    let messages = match &msg {
        Value::Array(a) => a.clone(),
        _ => vec![msg.clone()],
    };
    let initializing = messages.iter().any(|m| m["method"] == "initialize");
    // `initialize` stands alone (MCP forbids it in a batch): a batch that
    // hides one must not skip the session check for the rest.
    if initializing && messages.len() > 1 {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(rpc_error(
                &Value::Null,
                -32600,
                "Invalid Request: initialize must be sent alone, not in a batch",
            )),
        )
            .into_response();
    }
    let session = headers
        .get(SESSION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if !initializing {
        match &session {
            None => {
                return http_error(
                    StatusCode::BAD_REQUEST,
                    "missing_session",
                    "Mcp-Session-Id is required after initialize.",
                );
            }
            Some(id) if !s.session_valid(id, &who) => {
                return http_error(
                    StatusCode::NOT_FOUND,
                    "unknown_session",
                    "No such MCP session; initialize again.",
                );
            }
            Some(_) => {}
        }
    }
    let mut new_session = None;
    let mut replies = Vec::new();
    for m in &messages {
        if m.get("method").is_none() || m.get("id").is_none() {
            // A notification or a response to us: nothing to answer.
            continue;
        }
        let id = m["id"].clone();
        if m["jsonrpc"] != "2.0" {
            replies.push(rpc_error(
                &id,
                -32600,
                "Invalid Request: jsonrpc must be \"2.0\"",
            ));
            continue;
        }
        let method = m["method"].as_str().unwrap_or("");
        let params = m.get("params").cloned().unwrap_or(json!({}));
        let reply = match method {
            "initialize" => {
                let asked = params["protocolVersion"].as_str().unwrap_or("");
                let version = if PROTOCOL_VERSIONS.contains(&asked) {
                    asked
                } else {
                    PROTOCOL_VERSIONS[0]
                };
                new_session = Some(s.new_session(&who));
                Ok(json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "airlock", "version": env!("CARGO_PKG_VERSION")},
                    "instructions": "Tools run in Airlock's Wasm sandbox with only the capabilities their policy grants.",
                }))
            }
            "ping" => Ok(json!({})),
            "tools/list" => tools_list(&s, &who).await,
            "tools/call" => tools_call(&s, &who, &params).await,
            other => Err((-32601, format!("Method not found: {other}"))),
        };
        replies.push(match reply {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => rpc_error(&id, code, message),
        });
    }
    if replies.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    let body = if msg.is_array() {
        Value::Array(replies)
    } else {
        replies.remove(0)
    };
    let mut r = axum::Json(body).into_response();
    if let Some(id) = new_session
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        r.headers_mut().insert(SESSION, v);
    }
    r
}

type RpcResult = Result<Value, (i64, String)>;

fn service_error(e: ServiceError) -> (i64, String) {
    match e {
        ServiceError::NotFound(m) => (-32602, m),
        ServiceError::Forbidden { .. } | ServiceError::Unauthorized => (-32001, e.to_string()),
        ServiceError::TooManyCalls { .. } | ServiceError::TooLarge { .. } => {
            (-32002, e.to_string())
        }
        other => (-32603, other.to_string()),
    }
}

async fn tools_list(s: &AppState, who: &Principal) -> RpcResult {
    who.require(Action::Read).map_err(service_error)?;
    let s2 = s.clone();
    let tenant = who.tenant.clone();
    let tools = tokio::task::spawn_blocking(move || s2.offered_tools(&tenant))
        .await
        .map_err(|e| (-32603, e.to_string()))?
        .map_err(service_error)?;
    Ok(export::tools(&tools, export::Format::Mcp))
}

async fn tools_call(s: &AppState, who: &Principal, params: &Value) -> RpcResult {
    let name = params["name"].as_str().ok_or((
        -32602,
        "Invalid params: `name` (string) is required".to_string(),
    ))?;
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    match s.invoke(who, name, args).await {
        Ok(inv) => {
            let meta =
                json!({"airlock": {"audit_record": inv.audit.record, "metering": inv.metering}});
            Ok(match inv.result {
                CallResult::Ok(v) => json!({
                    "content": [{"type": "text", "text": v.to_string()}],
                    "structuredContent": export::mcp_structured(&v),
                    "isError": false,
                    "_meta": meta,
                }),
                CallResult::Error(e) => json!({
                    "content": [{"type": "text", "text": format!("{e} {}", serde_json::to_string(&e).unwrap_or_default())}],
                    "isError": true,
                    "_meta": meta,
                }),
            })
        }
        // Argument mistakes go back to the model as a tool error it can fix.
        Err(e @ ServiceError::BadRequest { .. }) => Ok(json!({
            "content": [{"type": "text", "text": e.body().to_string()}],
            "isError": true,
        })),
        Err(e) => Err(service_error(e)),
    }
}
