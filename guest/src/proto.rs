//! The host↔guest protocol: versioned, length-prefixed frames.
//!
//! A frame is a 14-byte header — magic `ALRK`, protocol version (u16 BE),
//! JSON length (u32 BE), blob length (u32 BE) — then a JSON-encoded
//! [`Message`] and an optional binary blob (component bytes, HTTP bodies).
//! Frames over the size caps, with another magic or another version are
//! rejected before anything is allocated or parsed.

use crate::grants::GrantSet;
use crate::runner::CallOutcome;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
const MAGIC: [u8; 4] = *b"ALRK";
const HEADER_LEN: usize = 14;

/// Size caps for incoming frames.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest JSON part.
    pub max_json: u32,
    /// Largest blob.
    pub max_blob: u32,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_json: 16 << 20,
            max_blob: 256 << 20,
        }
    }
}

/// Protocol errors.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The peer closed the connection between frames.
    #[error("The connection was closed.")]
    Closed,
    /// Reading or writing failed.
    #[error("Protocol I/O failed: {0}.")]
    Io(#[from] std::io::Error),
    /// Not a frame of this protocol.
    #[error("The frame does not start with the protocol magic.")]
    BadMagic,
    /// Another protocol version.
    #[error("The frame has protocol version {found}, but this side speaks {PROTOCOL_VERSION}.")]
    Version {
        /// The version in the frame.
        found: u16,
    },
    /// A part is over its cap.
    #[error("The frame's {part} is {len} bytes, over the cap of {max}.")]
    TooLarge {
        /// `json` or `blob`.
        part: &'static str,
        /// Its announced length.
        len: u32,
        /// The cap.
        max: u32,
    },
    /// The JSON part is not a valid message.
    #[error("The frame's message is malformed: {0}.")]
    Malformed(String),
    /// The session's refresh was refused or failed (the host was told why).
    #[error("The guest could not be refreshed: {0}")]
    Refused(String),
}

pub use airlock_abi::{BOOT_MARKER_PORT, BOOT_STAGES, boot_stage_code, boot_stage_name};

/// A boot stage and when it was reached (microseconds since the guest kernel started).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStage {
    /// Stage name: `init`, `mounts`, `runner`, `ready`.
    pub stage: String,
    /// Microseconds since boot (CLOCK_BOOTTIME).
    pub at_us: u64,
}

/// A virtio-fs share the guest mounts when the host says so
/// ([`Message::Refresh`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The device's tag.
    pub tag: String,
    /// Where it is mounted: an absolute path of plain components.
    pub path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

impl Mount {
    /// Whether the guest can take it: a tag the VMM takes
    /// ([`airlock_abi::is_share_tag`]), and a path that is absolute,
    /// not `/`, and made of plain components (no `.`, `..` or empty ones).
    ///
    /// # Errors
    /// What is wrong, naming the field.
    pub fn check(&self) -> Result<(), String> {
        if !airlock_abi::is_share_tag(&self.tag) {
            return Err(format!("mount tag {:?} is not a device tag", self.tag));
        }
        let plain = self.path.strip_prefix('/').is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
        });
        if !plain {
            return Err(format!(
                "mount path {:?} is not an absolute path of plain components",
                self.path
            ));
        }
        Ok(())
    }
}

/// Bytes of entropy a [`Message::Refresh`] carries.
pub const REFRESH_SEED: usize = 64;

/// Messages in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Guest → host, its first frame: the guest is ready for work. An
    /// agent that refreshes its guest sends it in answer to the session's
    /// [`Message::Refresh`], once that is applied (else `Error`, and the
    /// session ends).
    Hello {
        /// Protocol version.
        protocol: u16,
        /// The guest runner's engine fingerprint (artifacts must match it).
        engine: String,
        /// Boot-stage timestamps.
        boot: Vec<BootStage>,
    },
    /// Host → guest, the session's first frame: what a VM started from a
    /// snapshot must not share with the others started from it. The blob holds
    /// fresh entropy ([`REFRESH_SEED`] bytes) the guest mixes into its
    /// kernel's RNG before reseeding it; `unix_ns` is the host's wall
    /// clock, which the guest's clock takes.
    ///
    /// A VM restored from a snapshot of its shape with shares gets them
    /// here (`mounts`): the snapshot was made before anything was mounted,
    /// so the guest's FUSE sessions start with the file servers of the VMM
    /// that restored it. A booted VM mounted them from its command line
    /// and gets none.
    Refresh {
        /// Nanoseconds since the Unix epoch, on the host.
        unix_ns: u64,
        /// Shares to mount now.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mounts: Vec<Mount>,
    },
    /// Host → guest: load a precompiled component (artifact in the blob).
    Load {
        /// sha256 of the artifact payload, used to refer to it later.
        digest: String,
        /// Tool descriptions (they are not part of compiled code).
        #[serde(default)]
        docs: BTreeMap<String, String>,
    },
    /// Guest → host: the component is loaded.
    Loaded {
        /// Its digest.
        digest: String,
        /// Its tool names.
        tools: Vec<String>,
    },
    /// Host → guest: run one call.
    Invoke {
        /// Request id, echoed in the result.
        id: u64,
        /// Which loaded component.
        digest: String,
        /// Tool name.
        tool: String,
        /// JSON arguments.
        args: Value,
        /// What the call may do (decided by the host's policy module).
        grants: GrantSet,
    },
    /// Guest → host: the outcome of a call.
    Result {
        /// The request id.
        id: u64,
        /// Result, metering, audit events.
        outcome: Box<CallOutcome>,
    },
    /// Guest → host: an outgoing HTTP request for the egress proxy (body in the blob).
    HttpRequest {
        /// Request id.
        id: u64,
        /// Method.
        method: String,
        /// Absolute URL.
        url: String,
        /// Headers.
        headers: Vec<(String, String)>,
    },
    /// Host → guest: the proxied response (body in the blob).
    HttpResponse {
        /// The request id.
        id: u64,
        /// Status code, or an error.
        status: Result<u16, String>,
        /// With an error: its class (absent from older hosts: `other`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<crate::runner::EgressFailureKind>,
        /// Headers.
        headers: Vec<(String, String)>,
    },
    /// Host → guest: power off (or reboot) now.
    Shutdown,
    /// Either way: a request failed.
    Error {
        /// The request id it answers, if any.
        id: Option<u64>,
        /// What went wrong.
        message: String,
    },
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The message.
    pub msg: Message,
    /// The binary part (may be empty).
    pub blob: Vec<u8>,
}

/// Write one frame.
///
/// # Errors
/// I/O errors, or a part too large for the u32 length field.
pub fn write_frame(w: &mut impl Write, msg: &Message, blob: &[u8]) -> Result<(), ProtoError> {
    let json = serde_json::to_vec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    let jl = u32::try_from(json.len()).map_err(|_| ProtoError::TooLarge {
        part: "json",
        len: u32::MAX,
        max: u32::MAX,
    })?;
    let bl = u32::try_from(blob.len()).map_err(|_| ProtoError::TooLarge {
        part: "blob",
        len: u32::MAX,
        max: u32::MAX,
    })?;
    // One write for the header, the JSON and a small blob: over vsock
    // each write is a packet of its own (a queue notification, a wake-up
    // on the other side), and most frames are small.
    let small = blob.len() <= SMALL_BLOB;
    let mut out = Vec::with_capacity(HEADER_LEN + json.len() + if small { blob.len() } else { 0 });
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out.extend_from_slice(&jl.to_be_bytes());
    out.extend_from_slice(&bl.to_be_bytes());
    out.extend_from_slice(&json);
    if small {
        out.extend_from_slice(blob);
    }
    w.write_all(&out)?;
    if !small {
        w.write_all(blob)?;
    }
    w.flush()?;
    Ok(())
}

/// Blobs up to this size go out in the frame's one write; larger ones
/// (artifacts) are written from where they are, not copied.
const SMALL_BLOB: usize = 64 << 10;

/// Read one frame, enforcing `limits` before allocating.
///
/// # Errors
/// [`ProtoError::Closed`] on a clean end of stream between frames; the other
/// variants for anything that is not a valid frame.
pub fn read_frame(r: &mut impl Read, limits: FrameLimits) -> Result<Frame, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtoError::Closed),
            Ok(0) => return Err(ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    if header[0..4] != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = u16::from_be_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { found: version });
    }
    let jl = u32::from_be_bytes(header[6..10].try_into().expect("4 bytes"));
    let bl = u32::from_be_bytes(header[10..14].try_into().expect("4 bytes"));
    if jl > limits.max_json {
        return Err(ProtoError::TooLarge {
            part: "json",
            len: jl,
            max: limits.max_json,
        });
    }
    if bl > limits.max_blob {
        return Err(ProtoError::TooLarge {
            part: "blob",
            len: bl,
            max: limits.max_blob,
        });
    }
    let mut json = vec![0u8; jl as usize];
    r.read_exact(&mut json)?;
    let mut blob = vec![0u8; bl as usize];
    r.read_exact(&mut blob)?;
    let msg = serde_json::from_slice(&json).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    Ok(Frame { msg, blob })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(msg: Message, blob: &[u8]) {
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg, blob).unwrap();
        let f = read_frame(&mut buf.as_slice(), FrameLimits::default()).unwrap();
        assert_eq!(f.msg, msg);
        assert_eq!(f.blob, blob);
    }

    #[test]
    fn frames_round_trip() {
        round_trip(
            Message::Hello {
                protocol: 1,
                engine: "e".into(),
                boot: vec![BootStage {
                    stage: "init".into(),
                    at_us: 5,
                }],
            },
            b"",
        );
        round_trip(
            Message::Load {
                digest: "d".into(),
                docs: BTreeMap::new(),
            },
            b"\x00\x01artifact",
        );
        round_trip(
            Message::Invoke {
                id: 7,
                digest: "d".into(),
                tool: "t".into(),
                args: serde_json::json!({"a": [1, 2]}),
                grants: GrantSet::default(),
            },
            b"",
        );
        round_trip(
            Message::HttpResponse {
                id: 1,
                status: Err("denied".into()),
                failure: Some(crate::runner::EgressFailureKind::Tls),
                headers: vec![],
            },
            b"body",
        );
        round_trip(Message::Shutdown, b"");
    }

    #[test]
    fn bad_frames_are_rejected_not_trusted() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Message::Shutdown, b"").unwrap();
        let limits = FrameLimits::default();

        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(matches!(
            read_frame(&mut bad.as_slice(), limits),
            Err(ProtoError::BadMagic)
        ));

        let mut other = buf.clone();
        let next = PROTOCOL_VERSION + 1;
        other[4..6].copy_from_slice(&next.to_be_bytes());
        assert!(matches!(
            read_frame(&mut other.as_slice(), limits),
            Err(ProtoError::Version { found }) if found == next
        ));

        let mut huge = buf.clone();
        huge[6..10].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read_frame(&mut huge.as_slice(), limits),
            Err(ProtoError::TooLarge { part: "json", .. })
        ));

        let mut big_blob = buf.clone();
        big_blob[10..14].copy_from_slice(&(300u32 << 20).to_be_bytes());
        assert!(matches!(
            read_frame(&mut big_blob.as_slice(), limits),
            Err(ProtoError::TooLarge { part: "blob", .. })
        ));

        let truncated = &buf[..buf.len() - 1];
        assert!(matches!(
            read_frame(&mut &truncated[..], limits),
            Err(ProtoError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &b""[..], limits),
            Err(ProtoError::Closed)
        ));

        let mut junk = Vec::new();
        junk.extend_from_slice(&buf[..6]);
        junk.extend_from_slice(&3u32.to_be_bytes());
        junk.extend_from_slice(&0u32.to_be_bytes());
        junk.extend_from_slice(b"{x}");
        assert!(matches!(
            read_frame(&mut junk.as_slice(), limits),
            Err(ProtoError::Malformed(_))
        ));
    }
}
