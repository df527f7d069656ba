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
    /// Shares to mount (each [`proto::Mount::check`]ed; a session's
    /// refresh is its first frame, so they are mounted before anything is
    /// loaded, once).
    pub mounts: &'a [proto::Mount],
}

/// How the agent applies a [`Message::Refresh`]: mix the seed into the
/// kernel's RNG and reseed it, set the wall clock, mount the shares. The
/// init passes the real one; an agent without one refuses refreshes.
pub type RefreshFn<'a> = &'a dyn Fn(&Fresh<'_>) -> Result<(), String>;

/// Why the agent refuses a refresh before its hook sees it.
fn refusal(seed: &[u8], mounts: &[proto::Mount]) -> Option<String> {
    if seed.len() != proto::REFRESH_SEED {
        return Some(format!(
            "A refresh carries {} bytes of seed, not {}.",
            seed.len(),
            proto::REFRESH_SEED
        ));
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

/// Serve one host connection until shutdown or close, without refreshing
/// the guest: Hello goes out at once, and a [`Message::Refresh`] is
/// refused (see [`serve_with`]).
///
/// # Errors
/// As [`serve_with`].
pub fn serve<S: Read + Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
) -> Result<SessionEnd, ProtoError> {
    write_hello(conn, runner, boot)?;
    session(conn, runner)
}

/// Serve one host connection until shutdown or close. The host's first
/// frame is the session's [`Message::Refresh`]: the agent applies it with
/// `refresh` and only then answers [`Message::Hello`] — one round trip
/// makes the guest fresh and ready. A refresh refused (a bad seed or
/// mount) or failed is answered with `Error` and ends the session: a
/// guest that may share its RNG state or clock with its snapshot's
/// siblings never runs a call.
///
/// # Errors
/// Protocol violations by the host (bad frames, a first frame that is
/// not a refresh) and a refused refresh end the session with an error; a
/// bad request later (unknown component, invalid artifact, another
/// refresh) only answers `Error`.
pub fn serve_with<S: Read + Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
    refresh: RefreshFn<'_>,
) -> Result<SessionEnd, ProtoError> {
    let Some(frame) = next_frame(conn)? else {
        return Ok(SessionEnd::Closed);
    };
    let applied = match frame.msg {
        Message::Refresh { unix_ns, mounts } => match refusal(&frame.blob, &mounts) {
            Some(why) => Err(why),
            None => refresh(&Fresh {
                seed: &frame.blob,
                unix_ns,
                mounts: &mounts,
            }),
        },
        other => Err(format!(
            "A session starts with a refresh, not a {} message.",
            kind(&other)
        )),
    };
    if let Err(message) = applied {
        proto::write_frame(
            conn,
            &Message::Error {
                id: None,
                message: message.clone(),
            },
            b"",
        )?;
        return Err(ProtoError::Refused(message));
    }
    write_hello(conn, runner, boot)?;
    session(conn, runner)
}

/// Say Hello: this guest is ready for work.
fn write_hello<S: Write>(
    conn: &mut S,
    runner: &Runner,
    boot: Vec<BootStage>,
) -> Result<(), ProtoError> {
    proto::write_frame(
        conn,
        &Message::Hello {
            protocol: proto::PROTOCOL_VERSION,
            engine: runner.fingerprint(),
            boot,
        },
        b"",
    )
}

/// The next frame, or `None` when the host closed the connection between
/// frames. A bad frame is answered with `Error` (the host learns why)
/// and ends the session: it is never trusted.
fn next_frame<S: Read + Write>(conn: &mut S) -> Result<Option<proto::Frame>, ProtoError> {
    match proto::read_frame(conn, FrameLimits::default()) {
        Ok(f) => Ok(Some(f)),
        Err(ProtoError::Closed) => Ok(None),
        Err(e) => {
            let _ = proto::write_frame(
                conn,
                &Message::Error {
                    id: None,
                    message: e.to_string(),
                },
                b"",
            );
            Err(e)
        }
    }
}

/// The session after Hello: loads, calls, shutdown.
fn session<S: Read + Write>(conn: &mut S, runner: &Runner) -> Result<SessionEnd, ProtoError> {
    let mut loaded: HashMap<String, Loaded> = HashMap::new();
    loop {
        let Some(frame) = next_frame(conn)? else {
            return Ok(SessionEnd::Closed);
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
            Message::Refresh { .. } => {
                let message = "A session is refreshed once, by its first frame.".to_string();
                proto::write_frame(conn, &Message::Error { id: None, message }, b"")?;
            }
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
