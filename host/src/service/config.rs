//! `airlock serve` configuration: a TOML file, overridable by flags.
//!
//! ```toml
//! listen = "127.0.0.1:8420"
//! data_dir = "/var/lib/airlock"
//! allowed_origins = ["http://localhost:3000"]   # for /mcp; none by default
//! allowed_host_dirs = ["/srv/airlock/shared"]   # what policies may grant
//!
//! [limits]
//! max_upload_bytes = 67108864
//! max_request_bytes = 1048576
//! max_args_bytes = 262144
//! max_concurrent_calls_per_tenant = 8
//!
//! [isolation]            # where calls run; process by default
//! mode = "vm"              # "vm": one microVM per call, booted ahead
//! kernel = "/path/vmlinux" # guest image (`cargo xtask guest-image`)
//! initrd = "/path/initramfs.cpio.gz"
//! memory_mib = 256
//! warm = 2                 # VMs kept booted and waiting
//! weights = "/srv/models:/srv/models.erofs"  # optional: DIR:IMAGE (airlock weights pack)
//! egress_ca = "/etc/airlock/private-ca.pem"   # optional: extra CAs for https egress
//!
//! [[tokens]]
//! name = "ci-admin"
//! token = "…"             # or token_sha256 = "<hex>"
//! tenant = "acme"
//! role = "admin"           # admin | invoker | auditor
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("The config file {path} could not be read: {message}.")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        message: String,
    },
    /// The file is not valid TOML or has unknown/mistyped fields.
    #[error("The config file is not valid: {0}")]
    Syntax(String),
    /// A field has a bad value.
    #[error("{field}: {message}.")]
    Field {
        /// Path of the field (`tokens[2].role`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// What a token may do inside its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: upload, delete, policies, invoke, audit.
    Admin,
    /// List and call tools.
    Invoker,
    /// Read-only: components, policies, reports, audit.
    Auditor,
}

/// One bearer token as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: Option<String>,
    token_sha256: Option<String>,
    tenant: String,
    role: Role,
}

/// A validated token: only its sha256 is kept in memory.
#[derive(Debug, Clone)]
pub struct Token {
    /// Who this is, in audit records.
    pub name: String,
    /// sha256 of the token text.
    pub sha256: [u8; 32],
    /// The tenant it acts in.
    pub tenant: String,
    /// What it may do.
    pub role: Role,
}

/// Size and concurrency limits.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest component upload, bytes.
    pub max_upload_bytes: u64,
    /// Largest other request body (JSON, policy), bytes.
    pub max_request_bytes: u64,
    /// Largest tool-call arguments object (serialized JSON), bytes.
    pub max_args_bytes: u64,
    /// Calls one tenant may have running at once; more get 429.
    pub max_concurrent_calls_per_tenant: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 64 << 20,
            max_request_bytes: 1 << 20,
            max_args_bytes: 256 << 10,
            max_concurrent_calls_per_tenant: 8,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_host_dirs: Vec<PathBuf>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    isolation: IsolationEntry,
}

/// `[isolation]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IsolationEntry {
    mode: Option<String>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    memory_mib: Option<u32>,
    warm: Option<usize>,
    weights: Option<String>,
    egress_ca: Option<PathBuf>,
}

/// Where calls run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In the service process's Wasm sandbox (development).
    Process,
    /// One KVM microVM per call.
    Vm(VmSettings),
}

/// The microVMs' settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent image).
    pub initrd: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// VMs kept booted ahead of calls.
    pub warm: usize,
    /// Weights directory and its erofs image: read-only grants inside the
    /// directory are served from the image over virtio-pmem.
    pub weights: Option<(PathBuf, PathBuf)>,
    /// CA certificates (PEM) the egress proxy trusts besides the Mozilla
    /// roots; empty for none.
    pub egress_ca: Vec<u8>,
}

/// The validated service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (127.0.0.1 by default).
    pub listen: SocketAddr,
    /// Blob store, database, compiled-artifact cache.
    pub data_dir: PathBuf,
    /// `Origin` values accepted on `/mcp` (requests without `Origin` are accepted).
    pub allowed_origins: Vec<String>,
    /// Host directories (canonical) that policies may grant, with everything below them.
    pub allowed_host_dirs: Vec<PathBuf>,
    /// Limits.
    pub limits: Limits,
    /// Bearer tokens.
    pub tokens: Vec<Token>,
    /// Where calls run.
    pub isolation: Isolation,
}

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";

fn field(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Read and validate a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text)
    }

    /// Validate config text.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let listen = f
            .listen
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN)
            .parse()
            .map_err(|_| field("listen", "expected an address like 127.0.0.1:8420"))?;
        let data_dir = f
            .data_dir
            .ok_or_else(|| field("data_dir", "required (or pass --data-dir)"))?;
        let mut tokens: Vec<Token> = Vec::new();
        for (i, t) in f.tokens.into_iter().enumerate() {
            let at = |k: &str| format!("tokens[{i}].{k}");
            let sha256: [u8; 32] = match (&t.token, &t.token_sha256) {
                (Some(tok), None) => {
                    if tok.len() < 16 {
                        return Err(field(at("token"), "must be at least 16 characters"));
                    }
                    Sha256::digest(tok.as_bytes()).into()
                }
                (None, Some(h)) => hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| field(at("token_sha256"), "expected 64 hex digits"))?,
                _ => {
                    return Err(field(
                        at("token"),
                        "give exactly one of `token` and `token_sha256`",
                    ));
                }
            };
            if !valid_name(&t.tenant) {
                return Err(field(
                    at("tenant"),
                    "expected 1-32 characters of a-z, 0-9 and '-'",
                ));
            }
            if t.name.is_empty() {
                return Err(field(at("name"), "must not be empty"));
            }
            if tokens.iter().any(|o| o.sha256 == sha256) {
                return Err(field(at("token"), "the same token appears twice"));
            }
            tokens.push(Token {
                name: t.name,
                sha256,
                tenant: t.tenant,
                role: t.role,
            });
        }
        if tokens.is_empty() {
            return Err(field(
                "tokens",
                "at least one token is required (every API call is authenticated)",
            ));
        }
        let l = f.limits;
        for (name, v) in [
            ("limits.max_upload_bytes", l.max_upload_bytes),
            ("limits.max_request_bytes", l.max_request_bytes),
            ("limits.max_args_bytes", l.max_args_bytes),
            (
                "limits.max_concurrent_calls_per_tenant",
                u64::from(l.max_concurrent_calls_per_tenant),
            ),
        ] {
            if v == 0 {
                return Err(field(name, "must be greater than 0"));
            }
        }
        let mut allowed_host_dirs = Vec::new();
        for (i, d) in f.allowed_host_dirs.iter().enumerate() {
            let c = std::fs::canonicalize(d).map_err(|e| {
                field(
                    format!("allowed_host_dirs[{i}]"),
                    format!("{}: {e}", d.display()),
                )
            })?;
            allowed_host_dirs.push(c);
        }
        let isolation = isolation(f.isolation)?;
        Ok(Self {
            listen,
            data_dir,
            allowed_origins: f.allowed_origins,
            allowed_host_dirs,
            limits: l,
            tokens,
            isolation,
        })
    }

    /// The token whose sha256 matches `presented`, if any.
    pub fn authenticate(&self, presented: &str) -> Option<&Token> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare digests, not tokens: the time taken does not depend on how
        // much of a real token an attacker has guessed.
        self.tokens.iter().find(|t| t.sha256 == h)
    }
}

fn isolation(i: IsolationEntry) -> Result<Isolation, ConfigError> {
    match i.mode.as_deref().unwrap_or("process") {
        "process" => {
            if i.kernel.is_some()
                || i.initrd.is_some()
                || i.warm.is_some()
                || i.weights.is_some()
                || i.egress_ca.is_some()
            {
                return Err(field(
                    "isolation.mode",
                    "kernel, initrd, warm, weights and egress_ca only apply to mode = \"vm\"",
                ));
            }
            Ok(Isolation::Process)
        }
        "vm" => {
            let file = |name: &str, p: Option<PathBuf>| {
                let p = p.ok_or_else(|| {
                    field(
                        format!("isolation.{name}"),
                        "required with mode = \"vm\" (see `cargo xtask guest-image`)",
                    )
                })?;
                if !p.is_file() {
                    return Err(field(
                        format!("isolation.{name}"),
                        format!("{} is not a file", p.display()),
                    ));
                }
                Ok(p)
            };
            let memory_mib = i.memory_mib.unwrap_or(256);
            if !(64..=3072).contains(&memory_mib) {
                return Err(field("isolation.memory_mib", "must be 64..=3072"));
            }
            let warm = i.warm.unwrap_or(1);
            if warm > 16 {
                return Err(field("isolation.warm", "must be 0..=16"));
            }
            let weights = match i.weights {
                None => None,
                Some(w) => {
                    let (dir, image) = w
                        .split_once(':')
                        .ok_or_else(|| field("isolation.weights", "expected DIR:IMAGE"))?;
                    let image = file("weights", Some(PathBuf::from(image)))?;
                    if !Path::new(dir).is_dir() {
                        return Err(field(
                            "isolation.weights",
                            format!("{dir} is not a directory"),
                        ));
                    }
                    Some((PathBuf::from(dir), image))
                }
            };
            let egress_ca = match i.egress_ca {
                None => Vec::new(),
                Some(p) => {
                    let pem = std::fs::read(&p).map_err(|e| {
                        field("isolation.egress_ca", format!("{}: {e}", p.display()))
                    })?;
                    crate::egress::extra_roots(&pem)
                        .map_err(|e| field("isolation.egress_ca", e.to_string()))?;
                    pem
                }
            };
            Ok(Isolation::Vm(VmSettings {
                kernel: file("kernel", i.kernel)?,
                initrd: file("initrd", i.initrd)?,
                memory_mib,
                warm,
                weights,
                egress_ca,
            }))
        }
        other => Err(field(
            "isolation.mode",
            format!("expected \"process\" or \"vm\", got {other:?}"),
        )),
    }
}

/// Tenant and component names: 1-32 of `a-z 0-9 -`, not starting with `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
data_dir = "/tmp/x"
[[tokens]]
name = "a"
token = "0123456789abcdef"
tenant = "acme"
role = "admin"
"#;

    #[test]
    fn minimal_config_validates_with_defaults() {
        let c = Config::parse(OK).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.authenticate("0123456789abcdef").is_some());
        assert!(c.authenticate("0123456789abcdeX").is_none());
        assert_eq!(c.limits.max_concurrent_calls_per_tenant, 8);
    }

    #[test]
    fn errors_name_the_field() {
        let bad_role = OK.replace("\"admin\"", "\"root\"");
        assert!(
            matches!(Config::parse(&bad_role), Err(ConfigError::Syntax(m)) if m.contains("root"))
        );
        let short = OK.replace("0123456789abcdef", "short");
        let e = Config::parse(&short).unwrap_err().to_string();
        assert!(e.starts_with("tokens[0].token"), "{e}");
        let tenant = OK.replace("acme", "Acme Corp");
        let e = Config::parse(&tenant).unwrap_err().to_string();
        assert!(e.starts_with("tokens[0].tenant"), "{e}");
        let zero = format!("{OK}\n[limits]\nmax_args_bytes = 0\n");
        let e = Config::parse(&zero).unwrap_err().to_string();
        assert!(e.starts_with("limits.max_args_bytes"), "{e}");
        let none = "data_dir = \"/x\"\n";
        let e = Config::parse(none).unwrap_err().to_string();
        assert!(e.starts_with("tokens"), "{e}");
    }

    #[test]
    fn isolation_is_process_by_default_and_vm_needs_an_image() {
        assert_eq!(Config::parse(OK).unwrap().isolation, Isolation::Process);
        let e = Config::parse(&format!("{OK}\n[isolation]\nmode = \"vm\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.kernel"), "{e}");
        let e = Config::parse(&format!(
            "{OK}\n[isolation]\nmode = \"vm\"\nkernel = \"/nonexistent/vmlinux\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/vmlinux is not a file"), "{e}");
        let e = Config::parse(&format!("{OK}\n[isolation]\nmode = \"docker\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.mode"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("k"), dir.path().join("i"));
        std::fs::write(&k, b"x").unwrap();
        std::fs::write(&i, b"x").unwrap();
        let vm =
            format!("{OK}\n[isolation]\nmode = \"vm\"\nkernel = {k:?}\ninitrd = {i:?}\nwarm = 3\n");
        match Config::parse(&vm).unwrap().isolation {
            Isolation::Vm(v) => assert_eq!((v.warm, v.memory_mib), (3, 256)),
            other => panic!("{other:?}"),
        }
        let e = Config::parse(&vm.replace("warm = 3", "warm = 99"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.warm"), "{e}");
        // Extra egress CAs: a real PEM certificate is taken, anything else
        // is refused naming the field, and process mode has no proxy.
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let with_ca = format!("{vm}egress_ca = {ca:?}\n");
        match Config::parse(&with_ca).unwrap().isolation {
            Isolation::Vm(v) => assert!(v.egress_ca.starts_with(b"-----BEGIN CERTIFICATE")),
            other => panic!("{other:?}"),
        }
        std::fs::write(&ca, b"not a certificate").unwrap();
        let e = Config::parse(&with_ca).unwrap_err().to_string();
        assert!(e.starts_with("isolation.egress_ca"), "{e}");
        let e = Config::parse(&format!("{OK}\n[isolation]\negress_ca = {ca:?}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.mode"), "{e}");
    }
}
