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

/// What a [`Message::Refresh`] asks of the guest, checked by the agent.
#[derive(Debug, Clone, Copy)]
pub struct Fresh<'a> {
    /// Entropy to mix into the kernel's RNG before reseeding it
    /// ([`proto::REFRESH_SEED`] bytes).
    pub seed: &'a [u8],
    /// The host's wall clock, ns since the Unix epoch.
    pub unix_ns: u64,
    /// Shares to mount (each [`proto::Mount::check`]ed; at most once a
    /// session, before any component is loaded).
    pub mounts: &'a [proto::Mount],
}

/// How the agent applies a [`Message::Refresh`]: mix the seed into the
/// kernel's RNG and reseed it, set the wall clock, mount the shares. The
/// init passes the real one; an agent without one refuses refreshes.
pub type RefreshFn<'a> = &'a dyn Fn(&Fresh<'_>) -> Result<(), String>;

/// Why the agent refuses a refresh before its hook sees it.
fn refusal(seed: &[u8], mounts: &[proto::Mount], mounted: bool, loaded: bool) -> Option<String> {
    if seed.len() != proto::REFRESH_SEED {
        return Some(format!(
            "A refresh carries {} bytes of seed, not {}.",
            seed.len(),
            proto::REFRESH_SEED
        ));
    }
    if mounts.is_empty() {
        return None;
    }
    if mounted || loaded {
        return Some("Shares are mounted once, before any component is loaded.".to_string());
    }
    if mounts.len() > airlock_abi::MAX_SHARES {
        return Some(format!(
            "{} shares; a VM has at most {}.",
            mounts.len(),
            airlock_abi::MAX_SHARES
        ));
    }
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = m.check() {
            return Some(format!("Share {i}: {e}."));
        }
        if mounts[..i]
            .iter()
            .any(|o| o.tag == m.tag || o.path == m.path)
        {
            return Some(format!("Share {i}: its tag or path is given twice."));
        }
    }
    None
}

/// Serve one host connection until shutdown or close, refusing refreshes
/// (see [`serve_with`]).
///
/// # Errors
/// As [`serve_with`].
pub fn serve<S: Read + Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
) -> Result<SessionEnd, ProtoError> {
    serve_with(conn, runner, boot, &|_: &Fresh<'_>| {
        Err("this agent cannot refresh its guest".to_string())
    })
}

/// Serve one host connection until shutdown or close, applying the host's
/// [`Message::Refresh`] with `refresh`.
///
/// # Errors
/// Protocol violations by the host (bad frames) end the session with an error;
/// a bad request (unknown component, invalid artifact, a refresh without
/// exactly [`proto::REFRESH_SEED`] bytes of seed) only answers `Error`.
pub fn serve_with<S: Read + Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
    refresh: RefreshFn<'_>,
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
    let mut mounted = false;
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
            Message::Refresh { unix_ns, mounts } => {
                let reply = match refusal(&frame.blob, &mounts, mounted, !loaded.is_empty()) {
                    Some(why) => Err(why),
                    None => {
                        // Tried once, whatever came of it: a half-made
                        // mount is never made again over itself.
                        mounted |= !mounts.is_empty();
                        refresh(&Fresh {
                            seed: &frame.blob,
                            unix_ns,
                            mounts: &mounts,
                        })
                    }
                };
                let reply = match reply {
                    Ok(()) => Message::Refreshed,
                    Err(message) => Message::Error { id: None, message },
                };
                proto::write_frame(conn, &reply, b"")?;
            }
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
        Message::Refresh { .. } => "refresh",
        Message::Refreshed => "refreshed",
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
