//! Signed components and policies (ed25519).
//!
//! **Components** carry their signature the standard Wasm way: the
//! tool-conventions signature custom section, first in the binary, as the
//! `wasmsign2` crate writes and checks it (so `wasmsign2`'s own CLI can sign
//! components Airlock accepts, and the other way round). **Policies** carry
//! a detached ed25519 signature (`ed25519:<128 hex>`) over a message that
//! binds the text to its tenant and component ([`policy_message`]): a
//! policy signed for one component cannot be replayed onto another, nor
//! into another tenant.
//!
//! Keys: a public key is written `ed25519:<64 hex>` (its identity in
//! configuration and audit records), or read from a file in `wasmsign2`'s
//! raw format, PEM or DER. A secret key file is `wasmsign2`'s raw format
//! (or PEM).
//!
//! **Invariants:**
//! * A component's signature is checked only after the component itself
//!   validated (so every section length is within the file), and the
//!   signature section's own lengths are checked against its size before
//!   `wasmsign2` parses it ([`check_signature_section`]): a hostile length
//!   cannot make the parser allocate gigabytes.
//! * A signature that is present but verifies with none of the trusted keys
//!   is an error, never "unsigned"; a `signature` section anywhere but first
//!   is an error too (it would otherwise be silently ignored).

use std::path::Path;

/// The custom section that holds a component's signatures.
const SECTION: &str = "signature";
/// Most bytes a signature section may hold (64 hash sets of 256
/// signatures would be far more than anyone signs with; this is plenty).
const MAX_SECTION_BYTES: usize = 64 << 10;
/// Domain separation for policy signatures.
const POLICY_DOMAIN: &[u8] = b"airlock-policy-signature/1\n";

/// Errors of signing and verifying.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// A key that cannot be read or is not an ed25519 key.
    #[error("The key {what} cannot be used: {reason}.")]
    Key {
        /// Which key (a file or the text given).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// A signature that is malformed or verifies with no trusted key.
    #[error("The {subject}'s signature is not valid: {reason}.")]
    Invalid {
        /// `component` or `policy`.
        subject: &'static str,
        /// Why.
        reason: String,
    },
    /// Signing failed.
    #[error("Signing failed: {0}.")]
    Sign(String),
}

/// An ed25519 public key trusted to sign (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedKey {
    key: wasmsign2::PublicKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id())
    }
}

impl TrustedKey {
    /// `ed25519:<64 hex>`, or a path to a key file (raw, PEM or DER).
    ///
    /// # Errors
    /// [`SigningError::Key`] naming `text`.
    pub fn parse(text: &str) -> Result<Self, SigningError> {
        let bad = |reason: String| SigningError::Key {
            what: text.to_string(),
            reason,
        };
        if let Some(h) = text.strip_prefix("ed25519:") {
            let bytes = hex::decode(h).map_err(|e| bad(format!("not hex: {e}")))?;
            let pk = ed25519_compact::PublicKey::from_slice(&bytes)
                .map_err(|_| bad("not 32 bytes of an ed25519 public key".into()))?;
            return Ok(Self {
                key: wasmsign2::PublicKey { pk, key_id: None },
            });
        }
        let path = Path::new(text);
        if !path.is_absolute() {
            return Err(bad(
                "write a key as ed25519:<64 hex> or give the absolute path of a key file".into(),
            ));
        }
        let bytes = read_small(path).map_err(bad)?;
        let key = wasmsign2::PublicKey::from_bytes(&bytes)
            .or_else(|_| {
                std::str::from_utf8(&bytes)
                    .map_err(|_| wasmsign2::WSError::ParseError)
                    .and_then(wasmsign2::PublicKey::from_pem)
            })
            .or_else(|_| wasmsign2::PublicKey::from_der(&bytes))
            .map_err(|_| bad("not an ed25519 public key (raw, PEM or DER)".into()))?;
        Ok(Self {
            key: wasmsign2::PublicKey {
                pk: key.pk,
                key_id: None,
            },
        })
    }

    /// The key's identity: `ed25519:<64 hex>`.
    pub fn id(&self) -> String {
        format!("ed25519:{}", hex::encode(self.key.pk.as_ref()))
    }
}

/// A secret key to sign with.
pub struct SigningKey {
    sk: wasmsign2::SecretKey,
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self {
            sk: wasmsign2::KeyPair::generate().sk,
        }
    }

    /// Read a secret key file (`wasmsign2`'s raw format or PEM).
    ///
    /// # Errors
    /// [`SigningError::Key`] naming the file.
    pub fn from_file(path: &Path) -> Result<Self, SigningError> {
        let bad = |reason: String| SigningError::Key {
            what: path.display().to_string(),
            reason,
        };
        let bytes = read_small(path).map_err(bad)?;
        let sk = wasmsign2::SecretKey::from_bytes(&bytes)
            .or_else(|_| {
                std::str::from_utf8(&bytes)
                    .map_err(|_| wasmsign2::WSError::ParseError)
                    .and_then(wasmsign2::SecretKey::from_pem)
            })
            .map_err(|_| bad("not an ed25519 secret key (raw or PEM)".into()))?;
        Ok(Self { sk })
    }

    /// The secret key file's bytes (`wasmsign2`'s raw format).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.sk.to_bytes()
    }

    /// The public half, as trusted by a verifier.
    pub fn public(&self) -> TrustedKey {
        TrustedKey {
            key: wasmsign2::PublicKey {
                pk: self.sk.sk.public_key(),
                key_id: None,
            },
        }
    }

    /// `component` with its signature section (replacing any).
    ///
    /// # Errors
    /// [`SigningError::Sign`] when `component` is not a Wasm binary.
    pub fn sign_component(&self, component: &[u8]) -> Result<Vec<u8>, SigningError> {
        let module = wasmsign2::Module::deserialize(&mut std::io::Cursor::new(component))
            .map_err(|e| SigningError::Sign(format!("not a Wasm binary: {e}")))?;
        let signed = self
            .sk
            .sign(module, None)
            .map_err(|e| SigningError::Sign(e.to_string()))?;
        let mut out = Vec::with_capacity(component.len() + 256);
        signed
            .serialize(&mut out)
            .map_err(|e| SigningError::Sign(e.to_string()))?;
        Ok(out)
    }

    /// The detached signature of a policy (`ed25519:<128 hex>`).
    pub fn sign_policy(&self, tenant: &str, component: &str, text: &str) -> String {
        let sig = self
            .sk
            .sk
            .sign(policy_message(tenant, component, text), None);
        format!("ed25519:{}", hex::encode(sig.as_ref()))
    }
}

/// Whether something carried a signature, and whose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signed {
    /// Verified with this trusted key (its id).
    By(String),
    /// No signature.
    Unsigned,
}

/// The signature state shown for something stored: `verified` when a
/// trusted key signed it (`signed_by`), else `unsigned`.
pub fn state(signed_by: Option<&str>) -> &'static str {
    if signed_by.is_some() {
        "verified"
    } else {
        "unsigned"
    }
}

/// The message a policy signature signs: the domain, then the tenant, the
/// component and the text, each length-prefixed.
pub fn policy_message(tenant: &str, component: &str, text: &str) -> Vec<u8> {
    let mut m = POLICY_DOMAIN.to_vec();
    for part in [tenant, component, text] {
        m.extend_from_slice(&(part.len() as u64).to_le_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m
}

/// Check a (validated) component's signature against `trusted`.
///
/// # Errors
/// [`SigningError::Invalid`]: a signature section that is malformed, not
/// first, or verifies with no trusted key.
pub fn check_component(bytes: &[u8], trusted: &[TrustedKey]) -> Result<Signed, SigningError> {
    let invalid = |reason: String| SigningError::Invalid {
        subject: "component",
        reason,
    };
    // Only the outermost binary's sections: a nested module or component
    // may carry its own signature, which is not this one's.
    let mut first = true;
    let mut depth = 0u32;
    let mut section = None;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| invalid(e.to_string()))?;
        let top = depth == 0;
        match payload {
            wasmparser::Payload::Version { .. } => continue,
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::CustomSection(c) if top && c.name() == SECTION => {
                if !first || section.is_some() {
                    return Err(invalid(
                        "a signature section must come first, and only once".into(),
                    ));
                }
                section = Some(c.data());
            }
            _ => {}
        }
        if top {
            first = false;
        }
    }
    let Some(data) = section else {
        return Ok(Signed::Unsigned);
    };
    check_signature_section(data).map_err(invalid)?;
    for key in trusted {
        if key
            .key
            .verify(&mut std::io::Cursor::new(bytes), None)
            .is_ok()
        {
            return Ok(Signed::By(key.id()));
        }
    }
    Err(invalid(if trusted.is_empty() {
        "it is signed, and this tenant trusts no key".into()
    } else {
        "no key this tenant trusts made it (a key for another tenant, or the component changed after signing)".into()
    }))
}

/// Check a policy's detached signature (`None`: unsigned).
///
/// # Errors
/// [`SigningError::Invalid`]: malformed, or made by no trusted key for this
/// tenant, component and text.
pub fn check_policy(
    signature: Option<&str>,
    tenant: &str,
    component: &str,
    text: &str,
    trusted: &[TrustedKey],
) -> Result<Signed, SigningError> {
    let invalid = |reason: &str| SigningError::Invalid {
        subject: "policy",
        reason: reason.to_string(),
    };
    let Some(sig) = signature else {
        return Ok(Signed::Unsigned);
    };
    let bytes = sig
        .strip_prefix("ed25519:")
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| invalid("write it as ed25519:<128 hex>"))?;
    let sig = ed25519_compact::Signature::from_slice(&bytes)
        .map_err(|_| invalid("an ed25519 signature is 64 bytes"))?;
    let message = policy_message(tenant, component, text);
    trusted
        .iter()
        .find(|k| k.key.pk.verify(&message, &sig).is_ok())
        .map(|k| Signed::By(k.id()))
        .ok_or_else(|| {
            invalid(
                "no key this tenant trusts signed this text for this component (another tenant's key, another component, or an edited text)",
            )
        })
}

/// Check the lengths inside a signature section before `wasmsign2` reads
/// it: every length-prefixed part must fit in what is left, counts within
/// the format's bounds. (`wasmsign2` allocates a part's declared length
/// before reading it.)
pub fn check_signature_section(data: &[u8]) -> Result<(), String> {
    if data.len() > MAX_SECTION_BYTES {
        return Err(format!(
            "the signature section is {} bytes, more than {MAX_SECTION_BYTES}",
            data.len()
        ));
    }
    let mut r = Reader(data);
    for what in ["version", "content type", "hash function"] {
        r.byte(what)?;
    }
    for _ in 0..r.count("signed hash sets", 64)? {
        let mut set = Reader(r.slice("a signed hash set")?);
        for _ in 0..set.count("hashes", 64)? {
            set.take(32, "a hash")?;
        }
        for _ in 0..set.count("signatures", 256)? {
            let mut s = Reader(set.slice("a signature")?);
            s.slice("a key id")?;
            s.byte("an algorithm")?;
            s.slice("a signature's bytes")?;
        }
    }
    Ok(())
}

/// A cursor over a signature section's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!(
                "{what} of {n} bytes does not fit in the {} left",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn byte(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, what: &str) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..5 {
            let b = self.byte(what)?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("{what} is not a valid length"))
    }

    fn count(&mut self, what: &str, max: u64) -> Result<u64, String> {
        let n = self.varint(what)?;
        if n > max {
            return Err(format!("{n} {what}, more than {max}"));
        }
        Ok(n)
    }

    fn slice(&mut self, what: &str) -> Result<&'a [u8], String> {
        let n = self.varint(what)?;
        self.take(usize::try_from(n).unwrap_or(usize::MAX), what)
    }
}

/// A key file's bytes (at most 64 KiB).
fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.take(64 << 10)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests;
