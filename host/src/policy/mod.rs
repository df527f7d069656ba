//! Capability policies: the file format, its validation, and the decision
//! that turns a policy into a [`GrantSet`] for one call.
//!
//! The format is TOML, documented with a full example in `docs/policy.md`.
//! Deny by default: a policy that says nothing grants nothing but default
//! limits.
//!
//! **Architecture invariant:** this module is the only place that decides
//! what a tool may do. The runner enforces the [`GrantSet`] it is given and
//! never widens it. Its rooms: [`parse`] (the format), [`tenant`] (what a
//! service tenant may grant: allowed directories, ceilings), [`vm`] (the
//! grant set a microVM gets), [`report`] (imports against grants).

mod parse;
pub mod report;
pub mod tenant;
pub mod vm;

use airlock_guest::grants::{DirGrant, GrantSet, HttpGrant, Limits, ModelGrant};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use parse::{limits_over, parse, size, valid_volume_name};

/// Largest memory limit a policy may ask for (the engine's slot size).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Smallest memory limit (below this nothing useful runs).
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
/// Longest wall-clock timeout.
pub const MAX_TIMEOUT_MS: u64 = 60 * 60 * 1000;
/// Largest output cap.
pub const MAX_OUTPUT_BYTES: u64 = 64 << 20;
/// Largest result cap (the result's JSON).
pub const MAX_RESULT_BYTES: u64 = 16 << 20;
/// Largest per-call write cap into read-write grants.
pub const MAX_WRITE_BYTES: u64 = 4 << 30;

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
    /// Host directory (absolute after loading); empty for a volume until
    /// the service resolves it ([`tenant::check`]).
    pub host: PathBuf,
    /// A state volume of the service (`volume = "name"`), in place of a
    /// host directory.
    pub volume: Option<String>,
    /// Path inside the sandbox.
    pub guest: String,
    /// Access mode.
    pub mode: Mode,
}

/// One environment value as the policy gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    /// `KEY = "value"`: shown wherever the policy is shown.
    Plain(String),
    /// `KEY = { secret = "value" }`: given to the call, never shown; every
    /// route and report shows `{"secret_sha256": "<hex>"}` instead.
    Secret(String),
}

impl EnvValue {
    /// The value the call sees.
    pub fn value(&self) -> &str {
        match self {
            Self::Plain(v) | Self::Secret(v) => v,
        }
    }
}

impl Serialize for EnvValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Plain(v) => s.serialize_str(v),
            Self::Secret(v) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("secret_sha256", &secret_digest(v))?;
                m.end()
            }
        }
    }
}

/// How a secret is shown: its sha256, hex.
pub fn secret_digest(v: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(v.as_bytes()))
}

/// Policy text as it may be shown: each `env` secret
/// (`KEY = { secret = "..." }`) replaced by `{ secret_sha256 = "<hex>" }`,
/// everything else (comments included) as written. Text that does not
/// parse is not shown at all.
pub fn redact_text(text: &str) -> String {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return "# (this policy text does not parse and is not shown)\n".into();
    };
    if let Some(env) = doc.get_mut("env").and_then(|e| e.as_table_like_mut()) {
        let keys: Vec<String> = env.iter().map(|(k, _)| k.to_string()).collect();
        for k in keys {
            let Some(item) = env.get_mut(&k) else {
                continue;
            };
            let secret = item
                .as_table_like()
                .and_then(|t| t.get("secret"))
                .and_then(|v| v.as_str())
                .map(str::to_string);
            if let Some(v) = secret {
                let mut t = toml_edit::InlineTable::new();
                t.insert("secret_sha256", secret_digest(&v).into());
                *item = toml_edit::Item::Value(toml_edit::Value::InlineTable(t));
            }
        }
    }
    doc.to_string()
}

/// A validated policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// Limits (defaults filled in).
    pub limits: Limits,
    /// Directory grants.
    pub filesystem: Vec<FsRule>,
    /// Environment variables, with operator-supplied values.
    pub env: BTreeMap<String, EnvValue>,
    /// Outgoing HTTP rules.
    pub http: HttpGrant,
    /// Models by the name a component loads them by (`wasi:nn`
    /// `load-by-name`) → the host directory holding the model
    /// (`config.json`, `model.safetensors`; absolute after loading).
    pub models: BTreeMap<String, PathBuf>,
}

impl Default for Policy {
    /// The empty policy: nothing granted, default limits.
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            filesystem: vec![],
            env: BTreeMap::new(),
            http: HttpGrant::default(),
            models: BTreeMap::new(),
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
        let mut policy = parse(&text, &base)?;
        if let Some(i) = policy.filesystem.iter().position(|f| f.volume.is_some()) {
            return Err(PolicyError::Field {
                field: format!("filesystem[{i}].volume"),
                message: "state volumes belong to the service (`airlock serve`, [[volumes]]); grant a host directory with `host` here".into(),
            });
        }
        // The operator's own file: a granted directory reached through a
        // symlink is taken at its real path now; at call time the runner
        // opens that path from `/` following no link, so a link swapped in
        // later is refused rather than followed.
        for f in &mut policy.filesystem {
            if let Ok(real) = std::fs::canonicalize(&f.host) {
                f.host = real;
            }
        }
        for dir in policy.models.values_mut() {
            if let Ok(real) = std::fs::canonicalize(&*dir) {
                *dir = real;
            }
        }
        Ok(policy)
    }

    /// The grant set for one call with `airlock run`: each directory is
    /// opened beneath `/` (without following links).
    pub fn grant_set(&self) -> GrantSet {
        self.grant_set_beneath(&[PathBuf::from("/")], &BTreeMap::new())
            .expect("every absolute path is beneath /, and load refuses volumes")
    }

    /// The grant set for one call, each directory bound to the first of
    /// `roots` it lies in (compared component by component; host paths hold
    /// no `..`), each volume to its directory in `volumes` (name →
    /// directory, which is also its root). The runner opens it beneath
    /// that root.
    ///
    /// # Errors
    /// [`PolicyError::Field`] naming `filesystem[i].host` when a directory is
    /// inside none of `roots`, or `filesystem[i].volume` when `volumes` has
    /// no such volume.
    pub fn grant_set_beneath(
        &self,
        roots: &[PathBuf],
        volumes: &BTreeMap<String, PathBuf>,
    ) -> Result<GrantSet, PolicyError> {
        let mut dirs = Vec::with_capacity(self.filesystem.len());
        for (i, f) in self.filesystem.iter().enumerate() {
            let (root, host) = match &f.volume {
                Some(name) => {
                    let dir = volumes.get(name).ok_or_else(|| PolicyError::Field {
                        field: format!("filesystem[{i}].volume"),
                        message: format!(
                            "no volume named {name:?} on this server (its [[volumes]]: {})",
                            if volumes.is_empty() {
                                "none".to_string()
                            } else {
                                volumes.keys().cloned().collect::<Vec<_>>().join(", ")
                            }
                        ),
                    })?;
                    (dir.clone(), dir.clone())
                }
                None => {
                    let root = roots
                        .iter()
                        .find(|r| f.host.is_absolute() && f.host.starts_with(r))
                        .ok_or_else(|| PolicyError::Field {
                            field: format!("filesystem[{i}].host"),
                            message: format!(
                                "{} is not inside a directory this server allows this tenant to grant (allowed_host_dirs)",
                                f.host.display()
                            ),
                        })?;
                    (root.clone(), f.host.clone())
                }
            };
            dirs.push(DirGrant {
                root,
                host_path: host,
                guest_path: f.guest.clone(),
                writable: f.mode == Mode::Rw,
                origin: None,
                refused: None,
            });
        }
        let mut models = BTreeMap::new();
        for (name, dir) in &self.models {
            let root = roots
                .iter()
                .find(|r| dir.is_absolute() && dir.starts_with(r))
                .ok_or_else(|| PolicyError::Field {
                    field: format!("models.{name}"),
                    message: format!(
                        "{} is not inside a directory this server allows this tenant to grant (allowed_host_dirs)",
                        dir.display()
                    ),
                })?;
            models.insert(
                name.clone(),
                ModelGrant {
                    root: root.clone(),
                    dir: dir.clone(),
                    origin: None,
                },
            );
        }
        Ok(GrantSet {
            models,
            dirs,
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.value().to_string()))
                .collect(),
            http: self.http.clone(),
            limits: self.limits,
        })
    }

    /// The first limit over `ceiling`, as (`limits.<key>`, the asked
    /// value, the ceiling), if any.
    pub fn over_ceiling(&self, ceiling: &Limits) -> Option<(&'static str, u64, u64)> {
        let l = &self.limits;
        [
            ("limits.memory", l.memory_bytes, ceiling.memory_bytes),
            ("limits.fuel", l.fuel, ceiling.fuel),
            ("limits.timeout", l.timeout_ms, ceiling.timeout_ms),
            (
                "limits.max_output",
                l.max_output_bytes,
                ceiling.max_output_bytes,
            ),
            (
                "limits.max_result",
                l.max_result_bytes,
                ceiling.max_result_bytes,
            ),
            (
                "limits.max_write",
                l.max_write_bytes,
                ceiling.max_write_bytes,
            ),
        ]
        .into_iter()
        .find(|(_, asked, max)| asked > max)
    }
}
