//! Precompiled component artifacts.
//!
//! Layout: `AIRLOCK-ARTIFACT\n` magic, a line with the engine fingerprint, a
//! line with the hex sha256 of the payload, then the payload produced by
//! `Engine::precompile_component`. The runner refuses an artifact whose
//! fingerprint differs from its own engine's or whose hash does not match,
//! before wasmtime ever sees the bytes.

use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"AIRLOCK-ARTIFACT\n";

/// Problems with an artifact envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArtifactError {
    /// Not an Airlock artifact at all.
    #[error("The bytes are not an Airlock precompiled artifact (bad magic).")]
    BadMagic,
    /// The header is cut short or malformed.
    #[error("The artifact header is truncated or malformed.")]
    BadHeader,
    /// Built by an engine with another configuration.
    #[error(
        "The artifact was compiled for engine {found:?}, but this runner's engine is {expected:?}; recompile it."
    )]
    EngineMismatch {
        /// This runner's engine fingerprint.
        expected: String,
        /// The artifact's.
        found: String,
    },
    /// The payload does not match its hash.
    #[error("The artifact payload does not match its sha256; it is corrupt or was altered.")]
    HashMismatch,
}

/// Wrap a precompiled payload.
pub fn wrap(fingerprint: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 200);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(fingerprint.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(hex::encode(Sha256::digest(payload)).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Check an artifact and return its payload.
///
/// # Errors
/// See [`ArtifactError`].
pub fn unwrap<'a>(expected_fingerprint: &str, bytes: &'a [u8]) -> Result<&'a [u8], ArtifactError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(ArtifactError::BadMagic)?;
    let (fp, rest) = split_line(rest)?;
    let (hash, payload) = split_line(rest)?;
    let fp = std::str::from_utf8(fp).map_err(|_| ArtifactError::BadHeader)?;
    if fp != expected_fingerprint {
        return Err(ArtifactError::EngineMismatch {
            expected: expected_fingerprint.into(),
            found: fp.into(),
        });
    }
    if hash != hex::encode(Sha256::digest(payload)).as_bytes() {
        return Err(ArtifactError::HashMismatch);
    }
    Ok(payload)
}

fn split_line(b: &[u8]) -> Result<(&[u8], &[u8]), ArtifactError> {
    let i = b
        .iter()
        .take(512)
        .position(|&c| c == b'\n')
        .ok_or(ArtifactError::BadHeader)?;
    Ok((&b[..i], &b[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let a = wrap("fp1", b"payload");
        assert_eq!(unwrap("fp1", &a).unwrap(), b"payload");
        assert!(matches!(
            unwrap("fp2", &a),
            Err(ArtifactError::EngineMismatch { .. })
        ));
        let mut bad = a.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(unwrap("fp1", &bad), Err(ArtifactError::HashMismatch));
        assert_eq!(unwrap("fp1", b"\0asm"), Err(ArtifactError::BadMagic));
        assert_eq!(
            unwrap("fp1", &a[..MAGIC.len() + 2]),
            Err(ArtifactError::BadHeader)
        );
    }
}
