//! Capability policies: the file format, its validation, and the decision
//! that turns a policy into a [`GrantSet`] for one call.
//!
//! The format is TOML, documented with a full example in `docs/policy.md`.
//! Deny by default: a policy that says nothing grants nothing but default
//! limits.
//!
//! **Architecture invariant:** this module is the only place that decides
//! what a tool may do. The runner enforces the [`GrantSet`] it is given and
//! never widens it.

mod parse;

use airlock_guest::grants::{DirGrant, GrantSet, HttpGrant, HttpRule, Limits};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use parse::parse;

/// Largest memory limit a policy may ask for (the engine's slot size).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Smallest memory limit (below this nothing useful runs).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// Longest wall-clock timeout.
pub const MAX_TIMEOUT_MS: u64 = 60 * 60 * 1000;
/// Largest output cap.
pub const MAX_OUTPUT_BYTES: u64 = 64 << 20;

/// A policy problem, naming the field (`filesystem[1].mode`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum PolicyError {
    /// The text is not valid TOML.
    #[error("The policy is not valid TOML (line {line}, column {column}): {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// A field has a bad value.
    #[error("{field}: {message}")]
    Field {
        /// Path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The policy file could not be read.
    #[error("The policy file {path} could not be read: {message}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        message: String,
    },
}

/// Read access or read-write access to a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read-only.
    Ro,
    /// Read-write.
    Rw,
}

/// One filesystem grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsRule {
    /// Host directory (absolute after loading).
    pub host: PathBuf,
    /// Path inside the sandbox.
    pub guest: String,
    /// Access mode.
    pub mode: Mode,
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Limits (defaults filled in).
    pub limits: Limits,
    /// Directory grants.
    pub filesystem: Vec<FsRule>,
    /// Environment variables, with operator-supplied values.
    pub env: BTreeMap<String, String>,
    /// Outgoing HTTP rules.
    pub http: HttpGrant,
}

impl Default for Policy {
    /// The empty policy: nothing granted, default limits.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            filesystem: vec![],
            env: BTreeMap::new(),
            http: HttpGrant::default(),
        }
    }
}

impl Policy {
    /// Load and validate a policy file. Relative `host` paths resolve against
    /// the file's directory.
    ///
    /// # Errors
    /// [`PolicyError`] naming the file or the field.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        parse(&text, &base)
    }

    /// The grant set for one call: the policy decision.
    pub fn grant_set(&self) -> GrantSet {
        GrantSet {
            dirs: self
                .filesystem
                .iter()
                .map(|f| DirGrant {
                    host_path: f.host.clone(),
                    guest_path: f.guest.clone(),
                    writable: f.mode == Mode::Rw,
                })
                .collect(),
            env: self.env.clone(),
            http: self.http.clone(),
            limits: self.limits,
        }
    }

    /// The HTTP allow rules as text (for reports).
    pub fn http_rules(rules: &[HttpRule]) -> Vec<String> {
        rules.iter().map(ToString::to_string).collect()
    }
}
