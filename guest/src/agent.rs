//! The guest agent: serves the host↔guest protocol over one connection,
//! loading components and running calls with the [`Runner`].
//!
//! **Invariant:** the agent only runs what the host sends, with the grant set
//! the host sends; it never reads policy itself.

use crate::proto::{self, BootStage, FrameLimits, Message, ProtoError};
use crate::runner::{Loaded, Runner};
use airlock_wasm_tools::docs::Docs;
use std::collections::HashMap;
use std::io::{Read, Write};

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The host asked for shutdown.
    Shutdown,
    /// The host closed the connection.
    Closed,
}

/// Serve one host connection until shutdown or close.
///
/// # Errors
/// Protocol violations by the host (bad frames) end the session with an error;
/// a bad request (unknown component, invalid artifact) only answers `Error`.
pub fn serve<S: Read + Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
) -> Result<SessionEnd, ProtoError> {
    proto::write_frame(
        conn,
        &Message::Hello {
            protocol: proto::PROTOCOL_VERSION,
            engine: runner.fingerprint(),
            boot,
        },
        b"",
    )?;
    let mut loaded: HashMap<String, Loaded> = HashMap::new();
    loop {
        let frame = match proto::read_frame(conn, FrameLimits::default()) {
            Ok(f) => f,
            Err(ProtoError::Closed) => return Ok(SessionEnd::Closed),
            Err(e) => {
                // Tell the host why before hanging up; a bad frame is never trusted.
                let _ = proto::write_frame(
                    conn,
                    &Message::Error {
                        id: None,
                        message: e.to_string(),
                    },
                    b"",
                );
                return Err(e);
            }
        };
        match frame.msg {
            Message::Load { digest, docs } => {
                tracing::info!(%digest, bytes = frame.blob.len(), "load");
                let docs = Docs { functions: docs };
                let reply = match runner.load_precompiled(&frame.blob, &docs) {
                    Ok(l) if l.digest == digest => {
                        let tools = l.tools.tools.iter().map(|t| t.name.clone()).collect();
                        loaded.insert(digest.clone(), l);
                        Message::Loaded { digest, tools }
                    }
                    Ok(l) => Message::Error {
                        id: None,
                        message: format!(
                            "The artifact's digest is {}, not the announced {digest}.",
                            l.digest
                        ),
                    },
                    Err(e) => Message::Error {
                        id: None,
                        message: e.to_string(),
                    },
                };
                tracing::info!(ok = matches!(reply, Message::Loaded { .. }), "load done");
                proto::write_frame(conn, &reply, b"")?;
            }
            Message::Invoke {
                id,
                digest,
                tool,
                args,
                grants,
            } => {
                let reply = match loaded.get(&digest) {
                    Some(l) => {
                        tracing::info!(id, tool = %tool, "invoke");
                        Message::Result {
                            id,
                            outcome: Box::new(runner.invoke(l, &tool, &args, &grants)),
                        }
                    }
                    None => Message::Error {
                        id: Some(id),
                        message: format!("No component with digest {digest} is loaded."),
                    },
                };
                proto::write_frame(conn, &reply, b"")?;
            }
            Message::Shutdown => return Ok(SessionEnd::Shutdown),
            other => {
                let message = format!("The guest does not accept {} messages.", kind(&other));
                proto::write_frame(conn, &Message::Error { id: None, message }, b"")?;
            }
        }
    }
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "hello",
        Message::Load { .. } => "load",
        Message::Loaded { .. } => "loaded",
        Message::Invoke { .. } => "invoke",
        Message::Result { .. } => "result",
        Message::HttpRequest { .. } => "http_request",
        Message::HttpResponse { .. } => "http_response",
        Message::Shutdown => "shutdown",
        Message::Error { .. } => "error",
    }
}
