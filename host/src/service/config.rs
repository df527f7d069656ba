//! `airlock serve` configuration: a TOML file, overridable by flags.
//!
//! ```toml
//! listen = "127.0.0.1:8420"
//! data_dir = "/var/lib/airlock"
//! allowed_origins = ["http://localhost:3000"]   # for /mcp; none by default
//!
//! [tenants.acme]                                 # per tenant, optional
//! allowed_host_dirs = ["/srv/airlock/acme"]      # what acme's policies may grant
//! max_limits = { memory = "256 MiB", timeout = "30s" }  # the most they may ask
//! trusted_keys = ["ed25519:<64 hex>", "/etc/airlock/acme.pub"]  # who may sign its components and policies
//! require_signed = true                          # refuse unsigned uploads and policies (default: the top-level value)
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
//! max_vms = 8              # calls in microVMs at once; more wait in order
//! weights = "/srv/models:/srv/models.erofs"  # optional: DIR:IMAGE (airlock weights pack)
//! egress_ca = "/etc/airlock/private-ca.pem"   # optional, either mode: extra CAs for https egress
//! vmm = "/usr/lib/airlock/airlock-vmm"         # optional: the VMM binary (default: next to airlock)
//! start = "restore"        # VMs start from a snapshot (made once, in <data_dir>/snapshots); "boot": cold boots
//!
//! [[volumes]]           # per-tenant state a policy grants by name (`volume = "notes"`)
//! name = "notes"
//! quota = "64 MiB"        # per tenant
//!
//! node = "node-1"        # this node's name in responses, audit records and metrics (default: the host name)
//!
//! [storage]             # where components, policies and the audit chain live
//! kind = "sqlite"         # default: <data_dir>/airlock.db; "postgres": one database several nodes share
//! url_env = "AIRLOCK_POSTGRES_URL"  # postgres: the URL from this variable, or url_file = "/run/secrets/pg-url"
//!
//! [blobs]               # where component bytes live; <data_dir>/blobs by default
//! kind = "s3"             # an S3-compatible object store every node shares (blobs/ becomes a cache)
//! endpoint = "https://s3.example.com"  # optional (AWS when absent); http:// needs allow_http = true
//! bucket = "airlock"
//! region = "us-east-1"    # optional
//! prefix = "airlock/"     # optional: key prefix in the bucket
//! credentials_file = "/run/secrets/s3"  # TOML: access_key_id, secret_access_key; else the
//!                         # variables access_key_id_env / secret_access_key_env name (AWS_* by default)
//!
//! [telemetry]           # optional: spans (calls, uploads) over OTLP/HTTP to a collector
//! otlp_endpoint = "http://collector:4318"
//!
//! [[tokens]]
//! name = "ci-admin"
//! token = "…"             # or token_sha256 = "<hex>"
//! tenant = "acme"
//! role = "admin"           # admin | invoker | auditor
//! ```

use super::store::blobs::S3Config;
use super::telemetry::Telemetry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `isolation.max_vms` unless set: calls holding a microVM at once. With
/// `memory_mib` and `warm` it bounds what VM calls cost the host, however
/// many arrive: at most `(max_vms + warm + 1) × (memory_mib + 128 MiB)`
/// (the one: the pool's parked VM, `isolation.park`).
pub const DEFAULT_MAX_VMS: usize = 8;

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
    /// Client connections open at once; more wait to be accepted (in the
    /// kernel's listen queue). Unset: from the descriptor limit
    /// ([`Config::max_connections`]), so connections never take the
    /// descriptors a call's microVM needs.
    pub max_connections: Option<u32>,
    /// Seconds a connection may take to send a request's headers (and
    /// may sit idle between requests) before it is closed: idle
    /// connections cannot hold the connection slots.
    pub header_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_upload_bytes: 64 << 20,
            max_request_bytes: 1 << 20,
            max_args_bytes: 256 << 10,
            max_concurrent_calls_per_tenant: 8,
            max_connections: None,
            header_timeout_secs: 20,
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
    /// No longer accepted here (it was shared by every tenant): refused
    /// with a pointer to `[tenants.<name>]`.
    allowed_host_dirs: Option<toml::Value>,
    #[serde(default)]
    tenants: std::collections::BTreeMap<String, TenantEntry>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    isolation: IsolationEntry,
    #[serde(default)]
    volumes: Vec<VolumeEntry>,
    /// Every tenant's default for `require_signed`.
    #[serde(default)]
    require_signed: bool,
    node: Option<String>,
    #[serde(default)]
    storage: StorageEntry,
    blobs: Option<BlobsEntry>,
    telemetry: Option<TelemetryEntry>,
}

/// `[telemetry]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryEntry {
    otlp_endpoint: String,
    service_name: Option<String>,
}

/// `[telemetry]`, validated.
fn telemetry(e: Option<TelemetryEntry>) -> Result<Option<Telemetry>, ConfigError> {
    let Some(e) = e else { return Ok(None) };
    if !matches!(e.otlp_endpoint.split_once("://"), Some(("http" | "https", rest)) if !rest.is_empty())
    {
        return Err(field(
            "telemetry.otlp_endpoint",
            "expected the collector's OTLP/HTTP URL, like http://collector:4318",
        ));
    }
    let service_name = e.service_name.unwrap_or_else(|| "airlock".into());
    if service_name.is_empty() {
        return Err(field("telemetry.service_name", "must not be empty"));
    }
    Ok(Some(Telemetry {
        otlp_endpoint: e.otlp_endpoint,
        service_name,
    }))
}

/// `[blobs]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobsEntry {
    kind: String,
    endpoint: Option<String>,
    bucket: String,
    region: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    allow_http: bool,
    credentials_file: Option<PathBuf>,
    access_key_id_env: Option<String>,
    secret_access_key_env: Option<String>,
}

/// The credentials file of `[blobs]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Credentials {
    access_key_id: String,
    secret_access_key: String,
}

/// `[blobs]`, validated, credentials read from where they are kept.
fn blobs(e: Option<BlobsEntry>) -> Result<Option<S3Config>, ConfigError> {
    let Some(e) = e else { return Ok(None) };
    if e.kind != "s3" {
        return Err(field(
            "blobs.kind",
            format!(
                "expected \"s3\", got {:?} (leave [blobs] out for <data_dir>/blobs)",
                e.kind
            ),
        ));
    }
    if e.bucket.is_empty() {
        return Err(field("blobs.bucket", "must not be empty"));
    }
    if let Some(url) = &e.endpoint {
        match url.split_once("://") {
            Some(("https", _)) => {}
            Some(("http", _)) if e.allow_http => {}
            Some(("http", _)) => {
                return Err(field(
                    "blobs.endpoint",
                    "is plain http: set allow_http = true to send keys and components unencrypted",
                ));
            }
            _ => return Err(field("blobs.endpoint", "expected an http(s):// URL")),
        }
    }
    let (access_key_id, secret_access_key) = match &e.credentials_file {
        Some(path) => {
            if e.access_key_id_env.is_some() || e.secret_access_key_env.is_some() {
                return Err(field(
                    "blobs.credentials_file",
                    "give either credentials_file or the *_env names, not both",
                ));
            }
            let text = std::fs::read_to_string(path).map_err(|err| {
                field(
                    "blobs.credentials_file",
                    format!("{}: {err}", path.display()),
                )
            })?;
            let c: S3Credentials = toml::from_str(&text).map_err(|err| {
                field(
                    "blobs.credentials_file",
                    format!(
                        "{}: expected access_key_id and secret_access_key: {}",
                        path.display(),
                        err.message()
                    ),
                )
            })?;
            (c.access_key_id, c.secret_access_key)
        }
        None => {
            let var = |name: &Option<String>, default: &str, at: &str| {
                let name = name.clone().unwrap_or_else(|| default.to_string());
                std::env::var(&name)
                    .map_err(|_| field(at, format!("the environment has no {name}")))
            };
            (
                var(
                    &e.access_key_id_env,
                    "AWS_ACCESS_KEY_ID",
                    "blobs.access_key_id_env",
                )?,
                var(
                    &e.secret_access_key_env,
                    "AWS_SECRET_ACCESS_KEY",
                    "blobs.secret_access_key_env",
                )?,
            )
        }
    };
    let mut prefix = e.prefix.unwrap_or_else(|| "airlock/".into());
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    Ok(Some(S3Config {
        endpoint: e.endpoint,
        bucket: e.bucket,
        region: e.region.unwrap_or_else(|| "us-east-1".into()),
        prefix,
        access_key_id,
        secret_access_key,
        allow_http: e.allow_http,
    }))
}

/// `[storage]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageEntry {
    kind: Option<String>,
    url: Option<String>,
    url_env: Option<String>,
    url_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

/// Where the metadata (components, policies, the audit chain) lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Storage {
    /// `<data_dir>/airlock.db`: one node.
    Sqlite,
    /// One PostgreSQL database every node shares.
    Postgres {
        /// Its URL, credentials included (from the environment or a file).
        url: String,
        /// CA certificates (PEM) its TLS certificate may chain to besides
        /// the Mozilla roots; empty for none.
        ca: Vec<u8>,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it holds the password.
        match self {
            Self::Sqlite => f.write_str("Sqlite"),
            Self::Postgres { .. } => f.write_str("Postgres"),
        }
    }
}

/// `[storage]`, validated: the PostgreSQL URL read from where it is kept.
fn storage(e: StorageEntry) -> Result<Storage, ConfigError> {
    match e.kind.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            if e.url.is_some() || e.url_env.is_some() || e.url_file.is_some() || e.ca_file.is_some()
            {
                return Err(field("storage.url", "only kind = \"postgres\" takes a URL"));
            }
            Ok(Storage::Sqlite)
        }
        "postgres" => {
            let url = match (e.url, e.url_env, e.url_file) {
                (Some(u), None, None) => {
                    if u.parse::<::postgres::Config>()
                        .is_ok_and(|c| c.get_password().is_some())
                    {
                        return Err(field(
                            "storage.url",
                            "holds a password; keep it out of the config file with url_env or url_file",
                        ));
                    }
                    u
                }
                (None, Some(var), None) => std::env::var(&var).map_err(|_| {
                    field("storage.url_env", format!("the environment has no {var}"))
                })?,
                (None, None, Some(path)) => std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| field("storage.url_file", format!("{}: {e}", path.display())))?,
                _ => {
                    return Err(field(
                        "storage.url",
                        "give exactly one of url, url_env and url_file",
                    ));
                }
            };
            let parsed = url.parse::<::postgres::Config>().map_err(|e| {
                field(
                    "storage.url",
                    format!("not a PostgreSQL URL or connection string: {e}"),
                )
            })?;
            // Credentials and the audit chain cross the network only over
            // TLS: a database beyond this host needs sslmode=require
            // (verified against the Mozilla roots and ca_file).
            if parsed.get_ssl_mode() != ::postgres::config::SslMode::Require
                && let Some(host) = parsed.get_hosts().iter().find_map(|h| match h {
                    ::postgres::config::Host::Tcp(name) if !loopback(name) => Some(name.clone()),
                    _ => None,
                })
            {
                return Err(field(
                    "storage.url",
                    format!("reaches {host} without sslmode=require: add it (TLS, verified)"),
                ));
            }
            let ca = match &e.ca_file {
                Some(path) => std::fs::read(path).map_err(|err| {
                    field("storage.ca_file", format!("{}: {err}", path.display()))
                })?,
                None => Vec::new(),
            };
            Ok(Storage::Postgres { url, ca })
        }
        other => Err(field(
            "storage.kind",
            format!("expected \"sqlite\" or \"postgres\", got {other:?}"),
        )),
    }
}

/// `host` is this machine (`localhost`, 127.0.0.0/8, `::1`).
fn loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A node name: 1-63 characters of letters, digits, `.`, `-` and `_`.
fn valid_node(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// `node`, else the host name (else `airlock`, if the host's name is not
/// a valid node name).
fn node_name(given: Option<String>) -> Result<String, ConfigError> {
    match given {
        Some(n) if valid_node(&n) => Ok(n),
        Some(_) => Err(field(
            "node",
            "expected 1-63 characters of letters, digits, '.', '-' and '_'",
        )),
        None => Ok(nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| valid_node(h))
            .unwrap_or_else(|| "airlock".into())),
    }
}

/// `[[volumes]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeEntry {
    name: String,
    quota: toml::Value,
}

/// The most a volume's quota may be (per tenant).
pub const MAX_VOLUME_QUOTA: u64 = 1 << 40;

/// `[tenants.<name>]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    #[serde(default)]
    allowed_host_dirs: Vec<PathBuf>,
    /// A `[limits]`-shaped table: the most a policy of this tenant may ask.
    max_limits: Option<toml::Value>,
    #[serde(default)]
    trusted_keys: Vec<String>,
    require_signed: Option<bool>,
}

/// The most a policy may ask for when its tenant's config says nothing:
/// 512 MiB, 10 billion fuel, 60 s, 4 MiB of output and of result, 256 MiB
/// written into read-write grants.
pub fn default_ceiling() -> airlock_guest::Limits {
    airlock_guest::Limits {
        memory_bytes: 512 << 20,
        fuel: 10_000_000_000,
        timeout_ms: 60_000,
        max_output_bytes: 4 << 20,
        max_result_bytes: 4 << 20,
        max_write_bytes: 256 << 20,
    }
}

/// One tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Host directories (canonical) this tenant's policies may grant, with
    /// everything below them. No two tenants' directories overlap.
    pub allowed_host_dirs: Vec<PathBuf>,
    /// The most its policies may ask for (`max_limits`, over
    /// [`default_ceiling`]).
    pub max_limits: airlock_guest::Limits,
    /// Keys whose signatures on this tenant's components and policies are
    /// accepted (no other tenant's).
    pub trusted_keys: Vec<crate::signing::TrustedKey>,
    /// Whether unsigned components and policies are refused.
    pub require_signed: bool,
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            allowed_host_dirs: Vec::new(),
            max_limits: default_ceiling(),
            trusted_keys: Vec::new(),
            require_signed: false,
        }
    }
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
    max_vms: Option<usize>,
    weights: Option<String>,
    egress_ca: Option<PathBuf>,
    vmm: Option<PathBuf>,
    jail: Option<String>,
    jail_uid_base: Option<u32>,
    jail_cgroup: Option<PathBuf>,
    start: Option<String>,
    park: Option<bool>,
}

/// Where calls run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// In the service process's Wasm sandbox (development).
    Process,
    /// One KVM microVM per call.
    Vm(Box<VmSettings>),
}

/// The microVMs' settings (the call site's own type).
pub use crate::callsite::VmSettings;

/// The validated service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen (127.0.0.1 by default).
    pub listen: SocketAddr,
    /// Blob store, database, compiled-artifact cache.
    pub data_dir: PathBuf,
    /// `Origin` values accepted on `/mcp` (requests without `Origin` are accepted).
    pub allowed_origins: Vec<String>,
    /// CA certificates (PEM) the egress proxy trusts besides the Mozilla
    /// roots, in either isolation mode; empty for none.
    pub egress_ca: Vec<u8>,
    /// Per-tenant settings (`[tenants.<name>]`); a tenant not named here
    /// may grant no host directory.
    pub tenants: std::collections::BTreeMap<String, Tenant>,
    /// Limits.
    pub limits: Limits,
    /// Bearer tokens.
    pub tokens: Vec<Token>,
    /// Where calls run.
    pub isolation: Isolation,
    /// State volumes every tenant has one of (`[[volumes]]`).
    pub volumes: Vec<super::volumes::VolumeSpec>,
    /// Whether a tenant without a `[tenants.<name>]` table (so without
    /// trusted keys) must sign: then it can upload nothing.
    pub require_signed: bool,
    /// This node's name (responses' `Airlock-Node`, audit records, metrics).
    pub node: String,
    /// Where the metadata lives.
    pub storage: Storage,
    /// The object store component bytes live in (`None`: `<data_dir>/blobs`).
    pub blobs: Option<S3Config>,
    /// Where spans are exported (`None`: nowhere).
    pub telemetry: Option<Telemetry>,
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
            (
                "limits.max_connections",
                l.max_connections.map_or(1, u64::from),
            ),
            ("limits.header_timeout_secs", l.header_timeout_secs),
        ] {
            if v == 0 {
                return Err(field(name, "must be greater than 0"));
            }
        }
        if f.allowed_host_dirs.is_some() {
            return Err(field(
                "allowed_host_dirs",
                "directories are granted per tenant: move them under [tenants.<name>] allowed_host_dirs (one tenant may not grant another's)",
            ));
        }
        let tenants = tenants(f.tenants, f.require_signed)?;
        let egress_ca = egress_ca(&f.isolation)?;
        let isolation = isolation(f.isolation, &data_dir)?;
        let volumes = volumes(f.volumes)?;
        Ok(Self {
            listen,
            data_dir,
            allowed_origins: f.allowed_origins,
            tenants,
            egress_ca,
            limits: l,
            tokens,
            isolation,
            volumes,
            require_signed: f.require_signed,
            node: node_name(f.node)?,
            storage: storage(f.storage)?,
            blobs: blobs(f.blobs)?,
            telemetry: telemetry(f.telemetry)?,
        })
    }

    /// Connections served at once when this process may hold
    /// `open_files` descriptors: `limits.max_connections` if set, else
    /// what is left after a reserve for the store, the listener and each
    /// microVM's descriptors (pipes, sockets, shares), at least 16.
    pub fn max_connections(&self, open_files: u64) -> usize {
        if let Some(n) = self.limits.max_connections {
            return n as usize;
        }
        let vms = match &self.isolation {
            Isolation::Process => 0,
            Isolation::Vm(v) => (v.max_vms + v.warm + usize::from(v.park)) as u64,
        };
        let reserve = 256 + vms * 32;
        open_files.saturating_sub(reserve).clamp(16, 1 << 20) as usize
    }

    /// The keys `tenant` trusts to sign, and whether it must.
    pub fn signing(&self, tenant: &str) -> (&[crate::signing::TrustedKey], bool) {
        self.tenants
            .get(tenant)
            .map_or((&[], self.require_signed), |t| {
                (t.trusted_keys.as_slice(), t.require_signed)
            })
    }

    /// The most `tenant`'s policies may ask for.
    pub fn max_limits(&self, tenant: &str) -> airlock_guest::Limits {
        self.tenants
            .get(tenant)
            .map_or_else(default_ceiling, |t| t.max_limits)
    }

    /// The directories `tenant`'s policies may grant (none if the tenant
    /// has no `[tenants.<name>]` table).
    pub fn allowed_host_dirs(&self, tenant: &str) -> &[PathBuf] {
        self.tenants
            .get(tenant)
            .map_or(&[], |t| t.allowed_host_dirs.as_slice())
    }

    /// Refuse a grantable directory that holds the data directory or lies
    /// inside it: blobs, artifacts and the audit database are never a
    /// tool's to read or write. Called once the data directory exists.
    ///
    /// # Errors
    /// [`ConfigError::Field`] naming the tenant's directory.
    pub fn check_data_dir_not_grantable(&self) -> Result<(), ConfigError> {
        let data = std::fs::canonicalize(&self.data_dir)
            .map_err(|e| field("data_dir", format!("{}: {e}", self.data_dir.display())))?;
        for (name, t) in &self.tenants {
            for (i, d) in t.allowed_host_dirs.iter().enumerate() {
                if d.starts_with(&data) || data.starts_with(d) {
                    return Err(field(
                        format!("tenants.{name}.allowed_host_dirs[{i}]"),
                        format!(
                            "{} overlaps the data directory {}, which is never grantable",
                            d.display(),
                            data.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The token whose sha256 matches `presented`, if any.
    pub fn authenticate(&self, presented: &str) -> Option<&Token> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare digests, not tokens: the time taken does not depend on how
        // much of a real token an attacker has guessed.
        self.tokens.iter().find(|t| t.sha256 == h)
    }
}

/// Validate `[tenants.*]`: names, directories that exist (kept canonical),
/// and no directory of one tenant inside (or holding) another tenant's.
fn tenants(
    entries: std::collections::BTreeMap<String, TenantEntry>,
    require_signed: bool,
) -> Result<std::collections::BTreeMap<String, Tenant>, ConfigError> {
    let mut out = std::collections::BTreeMap::new();
    let mut seen: Vec<(String, usize, PathBuf)> = Vec::new();
    for (name, t) in entries {
        if !valid_name(&name) {
            return Err(field(
                format!("tenants.{name}"),
                "a tenant name is 1-32 characters of a-z, 0-9 and '-'",
            ));
        }
        let mut dirs = Vec::new();
        for (i, d) in t.allowed_host_dirs.iter().enumerate() {
            let at = format!("tenants.{name}.allowed_host_dirs[{i}]");
            if !d.is_absolute() {
                return Err(field(
                    at,
                    format!("{} is not an absolute path", d.display()),
                ));
            }
            let c = std::fs::canonicalize(d)
                .map_err(|e| field(&at, format!("{}: {e}", d.display())))?;
            if !c.is_dir() {
                return Err(field(at, format!("{} is not a directory", d.display())));
            }
            if c == Path::new("/") {
                return Err(field(at, "`/` would grant the whole host"));
            }
            if let Some((other, j, o)) = seen
                .iter()
                .find(|(other, _, o)| *other != name && (c.starts_with(o) || o.starts_with(&c)))
            {
                return Err(field(
                    at,
                    format!(
                        "{} overlaps tenants.{other}.allowed_host_dirs[{j}] ({}): one tenant could grant itself another's files",
                        c.display(),
                        o.display()
                    ),
                ));
            }
            seen.push((name.clone(), i, c.clone()));
            dirs.push(c);
        }
        let max_limits = match &t.max_limits {
            None => default_ceiling(),
            Some(v) => crate::policy::limits_over(v, default_ceiling()).map_err(|e| match e {
                crate::policy::PolicyError::Field { field: f, message } => {
                    field(format!("tenants.{name}.max_{f}"), message)
                }
                other => field(format!("tenants.{name}.max_limits"), other.to_string()),
            })?,
        };
        let mut trusted_keys = Vec::new();
        for (i, k) in t.trusted_keys.iter().enumerate() {
            let key = crate::signing::TrustedKey::parse(k)
                .map_err(|e| field(format!("tenants.{name}.trusted_keys[{i}]"), e.to_string()))?;
            if let Some((other, j)) = out.iter().find_map(|(o, ot): (&String, &Tenant)| {
                ot.trusted_keys
                    .iter()
                    .position(|x| *x == key)
                    .map(|j| (o.clone(), j))
            }) {
                return Err(field(
                    format!("tenants.{name}.trusted_keys[{i}]"),
                    format!(
                        "the same key as tenants.{other}.trusted_keys[{j}]: a key signs for one tenant, so one tenant's signed component is not another's"
                    ),
                ));
            }
            trusted_keys.push(key);
        }
        let require_signed = t.require_signed.unwrap_or(require_signed);
        if require_signed && trusted_keys.is_empty() {
            return Err(field(
                format!("tenants.{name}.require_signed"),
                "signatures are required but no key is trusted (tenants.<name>.trusted_keys)",
            ));
        }
        out.insert(
            name,
            Tenant {
                allowed_host_dirs: dirs,
                max_limits,
                trusted_keys,
                require_signed,
            },
        );
    }
    Ok(out)
}

/// `[[volumes]]`: names valid and unique, quotas sizes.
fn volumes(entries: Vec<VolumeEntry>) -> Result<Vec<super::volumes::VolumeSpec>, ConfigError> {
    let mut out: Vec<super::volumes::VolumeSpec> = Vec::new();
    for (i, v) in entries.into_iter().enumerate() {
        if !crate::policy::valid_volume_name(&v.name) {
            return Err(field(
                format!("volumes[{i}].name"),
                format!(
                    "expected 1-32 characters of a-z, 0-9, '-' and '_', got {:?}",
                    v.name
                ),
            ));
        }
        if out.iter().any(|o| o.name == v.name) {
            return Err(field(
                format!("volumes[{i}].name"),
                format!("{:?} is named twice", v.name),
            ));
        }
        let at = format!("volumes[{i}].quota");
        let quota_bytes = crate::policy::size(&v.quota, &at).map_err(|e| match e {
            crate::policy::PolicyError::Field { message, .. } => field(at.clone(), message),
            other => field(at.clone(), other.to_string()),
        })?;
        if !(super::volumes::ENTRY_BYTES..=MAX_VOLUME_QUOTA).contains(&quota_bytes) {
            return Err(field(at, "must be between 4 KiB and 1 TiB"));
        }
        out.push(super::volumes::VolumeSpec {
            name: v.name,
            quota_bytes,
        });
    }
    Ok(out)
}

/// `[isolation] egress_ca`: the extra CA certificates the egress proxy
/// trusts, in either mode (both send through the same proxy).
fn egress_ca(i: &IsolationEntry) -> Result<Vec<u8>, ConfigError> {
    match &i.egress_ca {
        None => Ok(Vec::new()),
        Some(p) => {
            crate::egress::read_ca_file(p).map_err(|e| field("isolation.egress_ca", e.to_string()))
        }
    }
}

fn isolation(i: IsolationEntry, data_dir: &std::path::Path) -> Result<Isolation, ConfigError> {
    match i.mode.as_deref().unwrap_or("process") {
        "process" => {
            if i.kernel.is_some()
                || i.initrd.is_some()
                || i.warm.is_some()
                || i.max_vms.is_some()
                || i.weights.is_some()
                || i.vmm.is_some()
                || i.start.is_some()
            {
                return Err(field(
                    "isolation.mode",
                    "kernel, initrd, warm, max_vms, weights, vmm and start only apply to mode = \"vm\"",
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
            let max_vms = i.max_vms.unwrap_or(DEFAULT_MAX_VMS);
            if !(1..=1024).contains(&max_vms) {
                return Err(field("isolation.max_vms", "must be 1..=1024"));
            }
            let weights = i
                .weights
                .as_deref()
                .map(crate::weights::Weights::parse)
                .transpose()
                .map_err(|e| field("isolation.weights", e.to_string()))?;
            let vmm = match i.vmm {
                Some(p) => file("vmm", Some(p))?,
                None => crate::callsite::default_vmm_binary(),
            };
            let jail_mode: crate::callsite::JailMode = i
                .jail
                .as_deref()
                .unwrap_or("auto")
                .parse()
                .map_err(|e: String| field("isolation.jail", e))?;
            let mut jail = airlock_vmm::jail::JailConfig::default();
            if let Some(base) = i.jail_uid_base {
                if base == 0 || base.checked_add(airlock_vmm::jail::UID_SLOTS).is_none() {
                    return Err(field(
                        "isolation.jail_uid_base",
                        format!("must be 1..={}", u32::MAX - airlock_vmm::jail::UID_SLOTS),
                    ));
                }
                jail.uid_base = base;
            }
            if let Some(c) = i.jail_cgroup {
                if !c.is_absolute() {
                    return Err(field("isolation.jail_cgroup", "must be an absolute path"));
                }
                jail.cgroup_parent = c;
            }
            Ok(Isolation::Vm(Box::new(VmSettings {
                vmm,
                kernel: file("kernel", i.kernel)?,
                initrd: file("initrd", i.initrd)?,
                memory_mib,
                warm,
                // One VM restored ahead and waiting (with snapshots).
                park: i.park.unwrap_or(true),
                max_vms,
                weights,
                cmdline_extra: String::new(),
                boot_attempts: crate::sandbox::BOOT_ATTEMPTS,
                // Warm VMs wait for calls; each call has its own limit.
                life_timeout: std::time::Duration::from_secs(24 * 3600),
                jail: jail_mode.resolve(jail),
                snapshots: match i.start.as_deref().unwrap_or("restore") {
                    "restore" => Some(data_dir.join("snapshots")),
                    "boot" => None,
                    other => {
                        return Err(field(
                            "isolation.start",
                            format!("expected \"restore\" or \"boot\", got {other:?}"),
                        ));
                    }
                },
            })))
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
    fn storage_keeps_the_postgres_password_out_of_the_file() {
        // Top-level lines go first, tables after the tokens.
        let with = |t: &str| match t.split_once("[storage]") {
            Some((top, table)) => Config::parse(&format!("{top}\n{OK}\n[storage]{table}")),
            None => Config::parse(&format!("{t}\n{OK}")),
        };
        let c = with("").unwrap();
        assert_eq!(c.storage, Storage::Sqlite);
        assert!(valid_node(&c.node));
        let c = with("node = \"eu-1\"\n[storage]\nkind = \"postgres\"\nurl = \"postgres://airlock@db/airlock?sslmode=require\"").unwrap();
        assert_eq!(c.node, "eu-1");
        assert!(matches!(c.storage, Storage::Postgres { .. }));
        // A password in the file is refused; from a file or the environment it is fine.
        let e =
            with("[storage]\nkind = \"postgres\"\nurl = \"postgres://a:secret@db/x\"").unwrap_err();
        assert!(
            e.to_string().starts_with("storage.url: holds a password"),
            "{e}"
        );
        assert!(
            !format!(
                "{:?}",
                with("[storage]\nkind = \"postgres\"\nurl = \"postgres://a@db/x?sslmode=require\"")
                    .unwrap()
                    .storage
            )
            .contains("db")
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pg-url");
        std::fs::write(&f, "postgres://a:secret@127.0.0.1/x\n").unwrap();
        let c = with(&format!("[storage]\nkind = \"postgres\"\nurl_file = {f:?}")).unwrap();
        assert_eq!(
            c.storage,
            Storage::Postgres {
                url: "postgres://a:secret@127.0.0.1/x".into(),
                ca: Vec::new(),
            }
        );
        // Beyond this host only with TLS.
        let e = with("[storage]\nkind = \"postgres\"\nurl = \"postgres://a@db.example/x\"")
            .unwrap_err();
        assert!(e.to_string().contains("without sslmode=require"), "{e}");
        for local in ["localhost", "127.0.0.1", "[::1]"] {
            with(&format!(
                "[storage]\nkind = \"postgres\"\nurl = \"postgres://a@{local}/x\""
            ))
            .unwrap();
        }
        for (text, field) in [
            (
                "[storage]\nkind = \"postgres\"\nurl_env = \"AIRLOCK_NO_SUCH_VARIABLE\"",
                "storage.url_env",
            ),
            ("[storage]\nkind = \"postgres\"", "storage.url"),
            (
                "[storage]\nkind = \"postgres\"\nurl = \"x\"\nurl_env = \"Y\"",
                "storage.url",
            ),
            (
                "[storage]\nkind = \"postgres\"\nurl = \"postgres://a@db:notaport/x\"",
                "storage.url",
            ),
            ("[storage]\nkind = \"mysql\"", "storage.kind"),
            ("[storage]\nurl = \"postgres://a@db/x\"", "storage.url"),
            (
                "[storage]\nkind = \"postgres\"\nurl = \"postgres://a@localhost/x\"\nca_file = \"/nonexistent/ca.pem\"",
                "storage.ca_file",
            ),
            ("node = \"a b\"", "node"),
            ("node = \"\"", "node"),
        ] {
            let e = with(text).unwrap_err().to_string();
            assert!(e.starts_with(&format!("{field}:")), "{text}: {e}");
        }
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
            Isolation::Vm(v) => {
                assert_eq!((v.warm, v.memory_mib, v.max_vms), (3, 256, DEFAULT_MAX_VMS))
            }
            other => panic!("{other:?}"),
        }
        match Config::parse(&format!("{vm}max_vms = 2\n"))
            .unwrap()
            .isolation
        {
            Isolation::Vm(v) => assert_eq!(v.max_vms, 2),
            other => panic!("{other:?}"),
        }
        // VMs start from snapshots under the data directory unless told to
        // boot; anything else is named.
        let data = Config::parse(&vm).unwrap().data_dir;
        for (extra, want) in [
            ("", Some(data.join("snapshots"))),
            ("start = \"restore\"", Some(data.join("snapshots"))),
            ("start = \"boot\"", None),
        ] {
            match Config::parse(&format!("{vm}{extra}\n")).unwrap().isolation {
                Isolation::Vm(v) => assert_eq!(v.snapshots, want, "{extra}"),
                other => panic!("{other:?}"),
            }
        }
        let e = Config::parse(&format!("{vm}start = \"thaw\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.start"), "{e}");
        let e = Config::parse(&format!("{OK}\n[isolation]\nstart = \"boot\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("start only apply"), "{e}");
        let e = Config::parse(&vm.replace("warm = 3", "warm = 99"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("isolation.warm"), "{e}");
        // The jail: on and off are what they say; its fields are checked.
        let jail = |extra: &str| Config::parse(&format!("{vm}{extra}\n"));
        match jail("jail = \"on\"\njail_uid_base = 3000000\njail_cgroup = \"/sys/fs/cgroup/x\"")
            .unwrap()
            .isolation
        {
            Isolation::Vm(v) => {
                let j = v.jail.expect("jail = on jails");
                assert_eq!(
                    (j.uid_base, j.cgroup_parent.to_str()),
                    (3_000_000, Some("/sys/fs/cgroup/x"))
                );
            }
            other => panic!("{other:?}"),
        }
        match jail("jail = \"off\"").unwrap().isolation {
            Isolation::Vm(v) => assert!(v.jail.is_none()),
            other => panic!("{other:?}"),
        }
        for (bad, name) in [
            ("jail = \"sometimes\"", "isolation.jail"),
            ("jail_uid_base = 0", "isolation.jail_uid_base"),
            ("jail_uid_base = 4294967000", "isolation.jail_uid_base"),
            ("jail_cgroup = \"relative/x\"", "isolation.jail_cgroup"),
            ("max_vms = 0", "isolation.max_vms"),
            ("max_vms = 5000", "isolation.max_vms"),
        ] {
            let e = jail(bad).unwrap_err().to_string();
            assert!(e.starts_with(name), "{bad}: {e}");
        }
        // Extra egress CAs: a real PEM certificate is taken, anything else
        // is refused naming the field, and process mode has no proxy.
        let ca = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let with_ca = format!("{vm}egress_ca = {ca:?}\n");
        assert!(
            Config::parse(&with_ca)
                .unwrap()
                .egress_ca
                .starts_with(b"-----BEGIN CERTIFICATE")
        );
        std::fs::write(&ca, b"not a certificate").unwrap();
        let e = Config::parse(&with_ca).unwrap_err().to_string();
        assert!(e.starts_with("isolation.egress_ca"), "{e}");
        // In process mode too: calls send through the same proxy.
        std::fs::write(&ca, params.self_signed(&key).unwrap().pem()).unwrap();
        let c = Config::parse(&format!("{OK}\n[isolation]\negress_ca = {ca:?}\n")).unwrap();
        assert!(c.egress_ca.starts_with(b"-----BEGIN CERTIFICATE"));
    }

    #[test]
    fn host_dirs_are_granted_per_tenant_and_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for d in ["acme", "globex", "acme/inner"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let with = |t: &str| format!("{OK}\n{t}\n");
        let c = Config::parse(&with(&format!(
            "[tenants.acme]\nallowed_host_dirs = [{:?}]\n[tenants.globex]\nallowed_host_dirs = [{:?}]",
            root.join("acme/../acme"),
            root.join("globex")
        )))
        .unwrap();
        assert_eq!(c.allowed_host_dirs("acme"), [root.join("acme")]);
        assert_eq!(c.allowed_host_dirs("globex"), [root.join("globex")]);
        assert!(c.allowed_host_dirs("initech").is_empty());
        // One shared list for every tenant is refused, naming where it goes.
        let e = Config::parse(&format!(
            "allowed_host_dirs = [{:?}]\n{OK}",
            root.join("acme")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("allowed_host_dirs") && e.contains("[tenants."),
            "{e}"
        );
        // One tenant's directory inside (or holding) another's is refused.
        for (a, b) in [("acme", "acme/inner"), ("acme/inner", "acme")] {
            let e = Config::parse(&with(&format!(
                "[tenants.acme]\nallowed_host_dirs = [{:?}]\n[tenants.globex]\nallowed_host_dirs = [{:?}]",
                root.join(a),
                root.join(b)
            )))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("tenants.globex.allowed_host_dirs[0]"), "{e}");
            assert!(e.contains("overlaps tenants.acme"), "{e}");
        }
        // Missing, relative, `/`.
        for (d, want) in [
            (root.join("nope").display().to_string(), "No such file"),
            ("rel/dir".to_string(), "not an absolute path"),
            ("/".to_string(), "whole host"),
        ] {
            let e = Config::parse(&with(&format!(
                "[tenants.acme]\nallowed_host_dirs = [{d:?}]"
            )))
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("tenants.acme.allowed_host_dirs[0]"), "{e}");
            assert!(e.contains(want), "{e}");
        }
        // The data directory is never grantable, nor anything around it.
        for data in ["acme", "acme/inner"] {
            let text = with(&format!(
                "[tenants.acme]\nallowed_host_dirs = [{:?}]",
                root.join("acme")
            ))
            .replace("/tmp/x", &root.join(data).display().to_string());
            let e = Config::parse(&text)
                .unwrap()
                .check_data_dir_not_grantable()
                .unwrap_err()
                .to_string();
            assert!(e.contains("never grantable"), "{e}");
        }
    }

    #[test]
    fn trusted_keys_belong_to_one_tenant_and_required_signatures_need_one() {
        let k = crate::signing::SigningKey::generate().public().id();
        let c = Config::parse(&format!(
            "{OK}\n[tenants.acme]\ntrusted_keys = [{k:?}]\nrequire_signed = true\n"
        ))
        .unwrap();
        let (keys, required) = c.signing("acme");
        assert_eq!((keys.len(), required), (1, true));
        // Unnamed tenants follow the top level.
        assert_eq!(c.signing("other"), (&[][..], false));
        let c = Config::parse(&format!("require_signed = true\n{OK}")).unwrap();
        assert!(c.signing("other").1);
        for (extra, at) in [
            (
                format!(
                    "[tenants.acme]\ntrusted_keys = [{k:?}]\n[tenants.beta]\ntrusted_keys = [{k:?}]\n"
                ),
                "tenants.beta.trusted_keys[0]",
            ),
            (
                "[tenants.acme]\ntrusted_keys = [\"ed25519:00\"]\n".to_string(),
                "tenants.acme.trusted_keys[0]",
            ),
            (
                "[tenants.acme]\nrequire_signed = true\n".to_string(),
                "tenants.acme.require_signed",
            ),
        ] {
            let e = Config::parse(&format!("{OK}\n{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(at), "{e}");
        }
    }

    #[test]
    fn tenants_have_ceilings_on_what_policies_may_ask() {
        let c = Config::parse(OK).unwrap();
        assert_eq!(c.max_limits("acme"), default_ceiling());
        let c = Config::parse(&format!(
            "{OK}\n[tenants.acme]\nmax_limits = {{ memory = \"128 MiB\", timeout = \"5s\" }}\n"
        ))
        .unwrap();
        let m = c.max_limits("acme");
        assert_eq!((m.memory_bytes, m.timeout_ms), (128 << 20, 5000));
        assert_eq!(m.fuel, default_ceiling().fuel);
        let e = Config::parse(&format!(
            "{OK}\n[tenants.acme]\nmax_limits = {{ memory = \"lots\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tenants.acme.max_limits.memory"), "{e}");
    }
}
