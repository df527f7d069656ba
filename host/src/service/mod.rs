//! `airlock serve`: the HTTP service. Users upload components and policies,
//! LLM clients list and call tools (REST, OpenAI/Anthropic shapes, MCP), and
//! security teams read reports and the hash-chained audit log.
//!
//! * [`config`]: the config file (listen address, data dir, tokens, limits).
//! * [`store`]: data directory — sha256 blob store + SQLite metadata.
//! * [`audit`]: the hash-chained audit log and its verification.
//! * [`export`]: tool descriptions in OpenAI, Anthropic and MCP shapes.
//! * [`api`]: the axum router (`/v1`, `/mcp`, `/metrics`, health).
//! * [`mcp`]: the MCP streamable-HTTP endpoint (JSON-RPC).
//!
//! This module holds [`Service`], the HTTP-free core both the REST API and
//! MCP call: authentication result ([`Principal`]), validation, the compiled
//! component cache and invocation.
//!
//! **Invariants:** every call runs with the grant set of the component's
//! latest policy version, decided by [`crate::policy`]; a tenant only ever
//! sees its own components, policies and audit records; every invocation,
//! upload, deletion and policy change appends one audit record.

pub mod api;
pub mod audit;
pub mod config;
pub mod console;
pub mod export;
pub mod mcp;
mod metrics;
pub mod store;
pub mod telemetry;
pub mod volumes;

use crate::callsite::{CallSite, CallSiteError, Component};
use crate::policy::{self, Policy};
use airlock_guest::{CallError, CallResult, Decision, EngineConfig, Loaded, Runner};
use config::{Config, Role};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use store::{StagedBlob, Store, StoreError};
use tokio::sync::Semaphore;

pub use config::ConfigError;

/// Everything a request can fail with. Each maps to one HTTP status and a
/// JSON body `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No or unknown bearer token.
    #[error("A valid bearer token is required (Authorization: Bearer <token>).")]
    Unauthorized,
    /// The token's role may not do this.
    #[error("Role {role} may not {action}.")]
    Forbidden {
        /// The role.
        role: &'static str,
        /// What was attempted.
        action: &'static str,
    },
    /// Something named in the request does not exist (in this tenant).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed; `field` names the bad part.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code (`invalid_component`, `invalid_policy`, ...).
        code: &'static str,
        /// The field or part at fault.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A size limit was exceeded.
    #[error("{field} is larger than the limit of {limit} bytes.")]
    TooLarge {
        /// What was too large.
        field: &'static str,
        /// The limit.
        limit: u64,
    },
    /// The tenant already has the maximum number of calls running.
    #[error("This tenant already has {limit} calls running; retry later.")]
    TooManyCalls {
        /// The limit.
        limit: u32,
    },
    /// The name is taken.
    #[error("{0}")]
    Conflict(String),
    /// Storage failed.
    #[error("{0}")]
    Store(StoreError),
    /// The engine failed in a way that is not the request's fault.
    #[error("Internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoComponent(_) | StoreError::NoPolicy { .. } => {
                Self::NotFound(e.to_string())
            }
            StoreError::Exists(_) | StoreError::Conflict(_) => Self::Conflict(e.to_string()),
            other => Self::Store(other),
        }
    }
}

/// What an upload registered.
#[derive(Debug)]
pub struct Registered {
    /// Whether it is new (an identical re-upload is not).
    pub created: bool,
    /// The audit record of the upload (none for a re-upload).
    pub audit_record: Option<i64>,
    /// Its exported tool names.
    pub tools: Vec<String>,
    /// The key that signed the component, if signed.
    pub signed_by: Option<String>,
}

/// The signer's key, or `None` for unsigned `what` when `tenant` does not
/// require signatures.
fn signed_or_required(
    signed: crate::signing::Signed,
    required: bool,
    tenant: &str,
    what: &str,
    field: &str,
) -> Result<Option<String>, ServiceError> {
    match signed {
        crate::signing::Signed::By(key) => Ok(Some(key)),
        crate::signing::Signed::Unsigned if required => Err(bad(
            "signature_invalid",
            Some(field.to_string()),
            format!("the {what} is unsigned, and tenant {tenant} requires signatures"),
        )),
        crate::signing::Signed::Unsigned => Ok(None),
    }
}

fn bad(
    code: &'static str,
    field: impl Into<Option<String>>,
    message: impl Into<String>,
) -> ServiceError {
    ServiceError::BadRequest {
        code,
        field: field.into(),
        message: message.into(),
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Token name (the actor in audit records).
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// Role.
    pub role: Role,
}

/// What a principal wants to do, for role checks.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    /// Upload, delete, put policies.
    Manage,
    /// Call tools (and list them).
    Invoke,
    /// Read components and tools (names, schemas, descriptions).
    Read,
    /// Read policies, their versions and diffs, and capability reports:
    /// what a tool may do, with `env` values. Not for invokers.
    ReadPolicy,
    /// Read and verify the audit log.
    Audit,
}

impl Principal {
    /// Check the role.
    ///
    /// # Errors
    /// [`ServiceError::Forbidden`].
    pub fn require(&self, action: Action) -> Result<(), ServiceError> {
        let ok = matches!(
            (self.role, action),
            (Role::Admin, _)
                | (Role::Invoker, Action::Invoke | Action::Read)
                | (
                    Role::Auditor,
                    Action::Read | Action::ReadPolicy | Action::Audit
                )
        );
        if ok {
            return Ok(());
        }
        Err(ServiceError::Forbidden {
            role: match self.role {
                Role::Admin => "admin",
                Role::Invoker => "invoker",
                Role::Auditor => "auditor",
            },
            action: match action {
                Action::Manage => "change components or policies",
                Action::Invoke => "call tools",
                Action::Read => "read components",
                Action::ReadPolicy => "read policies or reports",
                Action::Audit => "read the audit log",
            },
        })
    }
}

/// The separator between component and tool in exported tool names
/// (`kitchen__word-count`): allowed by OpenAI, Anthropic and MCP name rules.
pub const TOOL_SEP: &str = "__";

/// A tool as offered to LLMs: one of a component's tools, under its
/// exported name.
#[derive(Debug, Clone)]
pub struct OfferedTool {
    /// `component__tool`.
    pub name: String,
    /// Component name.
    pub component: String,
    /// The tool.
    pub tool: airlock_wasm_tools::Tool,
}

/// The answer to one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    /// Component name.
    pub component: String,
    /// Exported tool name.
    pub tool: String,
    /// `{"ok": value}` or `{"error": {...}}`.
    pub result: CallResult,
    /// What it cost.
    pub metering: airlock_guest::Metering,
    /// The audit record of this call and its capability events.
    pub audit: InvocationAudit,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// Where the call ran.
    pub isolation: &'static str,
    /// Policy version the call ran under (0: none).
    pub policy_version: i64,
    /// In VM isolation, how the call's VM started: `restore` (from its
    /// snapshot) or `boot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<&'static str>,
}

/// Audit ids of one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationAudit {
    /// Sequence number of the audit record.
    pub record: i64,
    /// The capability decisions, each with an id `<record>.<n>`.
    pub events: Vec<serde_json::Value>,
}

/// The service core.
pub struct Service {
    /// Configuration.
    pub config: Config,
    store: Store,
    /// Where calls run (process or microVMs), and the runner.
    site: Arc<CallSite>,
    engine_id: String,
    cache: Mutex<HashMap<String, Arc<Loaded>>>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    metrics: metrics::Metrics,
    /// MCP sessions: id → (tenant, last used).
    sessions: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// Per-tenant state volumes.
    volumes: volumes::Volumes,
    /// Web console sessions.
    pub(crate) console: console::Sessions,
}

/// An MCP session unused this long is gone.
pub const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(60 * 60);
/// MCP sessions one tenant may hold; a new one evicts the least recently used.
pub const MAX_SESSIONS_PER_TENANT: usize = 256;

/// The egress proxy's limit per request (both walls; the sandbox's own
/// proxy uses the same).
pub const EGRESS_TIMEOUT: std::time::Duration = crate::sandbox::EGRESS_TIMEOUT;

/// How much [`Service::validate_policy`] checks (the policy's own rule).
pub use crate::policy::tenant::Check as PolicyCheck;

impl Service {
    /// Open the data directory and create the engine.
    ///
    /// # Errors
    /// The data directory or the engine cannot be set up.
    pub fn new(config: Config) -> Result<Self, ServiceError> {
        let store = match &config.storage {
            config::Storage::Sqlite => Store::embedded(&config.data_dir, config.blobs.as_ref())?,
            config::Storage::Postgres { url, ca } => Store::with(
                &config.data_dir,
                Box::new(store::postgres::Postgres::connect(url, ca)?),
                config.blobs.as_ref(),
            )?,
        }
        .on_node(&config.node);
        config
            .check_data_dir_not_grantable()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        // Volume paths are compared with grant roots: by their real path.
        let data_dir = std::fs::canonicalize(&config.data_dir).map_err(|e| {
            ServiceError::Internal(format!("data_dir {}: {e}", config.data_dir.display()))
        })?;
        let volumes = volumes::Volumes::new(&data_dir, config.volumes.clone());
        let vm = match &config.isolation {
            config::Isolation::Process => None,
            config::Isolation::Vm(v) => Some(v.as_ref().clone()),
        };
        let site = CallSite::new(EngineConfig::default(), &config.egress_ca, vm).map_err(|e| {
            ServiceError::Internal(match e {
                CallSiteError::Host(e) => {
                    format!("isolation.mode is \"vm\", but this host cannot run the guest: {e}")
                }
                e => e.to_string(),
            })
        })?;
        let engine_id = hex::encode(&Sha256::digest(site.runner().fingerprint().as_bytes())[..8]);
        let metrics = metrics::Metrics::new(&config.node);
        Ok(Self {
            config,
            store,
            site: Arc::new(site),
            engine_id,
            cache: Mutex::new(HashMap::new()),
            tenants: Mutex::new(HashMap::new()),
            metrics,
            sessions: Mutex::new(HashMap::new()),
            volumes,
            console: console::Sessions::default(),
        })
    }

    /// Where calls run: `"vm"` or `"process"`.
    pub fn isolation(&self) -> &'static str {
        self.site.isolation()
    }

    /// Stop the warm pool and reap its VMs (also done on drop).
    pub fn shutdown_vms(&self) {
        self.site.shutdown();
    }

    /// The compiled artifact of a stored component for this engine: from
    /// the artifact cache, else compiled from the blob and cached.
    fn artifact(&self, digest: &str) -> Result<Vec<u8>, ServiceError> {
        if let Some(a) = self.store.artifact(digest, &self.engine_id) {
            return Ok(a);
        }
        // `precompile` returns the artifact in its envelope already.
        let wasm = self.store.read_blob(digest)?;
        let a = self
            .runner()
            .precompile(&wasm)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.store.put_artifact(digest, &self.engine_id, &a)?;
        Ok(a)
    }

    fn runner(&self) -> &Runner {
        self.site.runner()
    }

    /// The data store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Resolve a bearer token.
    ///
    /// # Errors
    /// [`ServiceError::Unauthorized`].
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, ServiceError> {
        let t = token
            .and_then(|t| self.config.authenticate(t))
            .ok_or(ServiceError::Unauthorized)?;
        Ok(Principal {
            name: t.name.clone(),
            tenant: t.tenant.clone(),
            role: t.role,
        })
    }

    /// Parse and validate policy text for `tenant` by the policy's own
    /// rules for tenants ([`crate::policy::tenant`]): directories only
    /// inside the tenant's `allowed_host_dirs`, limits under its ceiling,
    /// and with [`PolicyCheck::Store`] directories that exist now by their
    /// real path.
    ///
    /// # Errors
    /// [`ServiceError::BadRequest`] (`invalid_policy`) naming the policy field.
    pub fn validate_policy(
        &self,
        tenant: &str,
        text: &str,
        check: PolicyCheck,
    ) -> Result<policy::tenant::Checked, ServiceError> {
        let ceiling = self.config.max_limits(tenant);
        let volumes = self
            .volumes
            .dirs(tenant)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let rules = policy::tenant::TenantRules {
            tenant,
            allowed_host_dirs: self.config.allowed_host_dirs(tenant),
            ceiling: &ceiling,
            volumes: &volumes,
        };
        policy::tenant::check(text, &rules, check).map_err(|e| {
            let field = match &e {
                policy::PolicyError::Field { field, .. } => format!("policy.{field}"),
                _ => "policy".to_string(),
            };
            bad("invalid_policy", field, e.to_string())
        })
    }

    /// A stored policy version, checked for use under the current config.
    /// Policies were validated when stored; a failure here means the
    /// server's config changed since: refused, never widened.
    ///
    /// # Errors
    /// `policy_no_longer_valid`.
    pub fn checked_stored(
        &self,
        tenant: &str,
        row: &store::PolicyRow,
    ) -> Result<policy::tenant::Checked, ServiceError> {
        self.validate_policy(tenant, &row.text, PolicyCheck::Use)
            .map_err(|e| {
                bad(
                    "policy_no_longer_valid",
                    Some(format!("policy v{}", row.version)),
                    format!("the stored policy is not valid under this server's config: {e}"),
                )
            })
    }

    /// The policy a component's calls run under at `version` (latest when
    /// `None`; the empty policy, version 0, when the component has none):
    /// the one path from stored text to grants, for calls, reports and
    /// diffs alike.
    ///
    /// # Errors
    /// Unknown version, storage failure, `policy_no_longer_valid`.
    pub fn policy_at(
        &self,
        tenant: &str,
        component: &str,
        version: Option<i64>,
    ) -> Result<(policy::tenant::Checked, i64), ServiceError> {
        match self.store.policy(tenant, component, version) {
            Ok(row) => Ok((self.checked_stored(tenant, &row)?, row.version)),
            Err(StoreError::NoPolicy { .. }) if version.is_none() => {
                let policy = Policy::default();
                let grants = policy.grant_set();
                Ok((policy::tenant::Checked { policy, grants }, 0))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The key that signed `text` as `component`'s policy (`signature`:
    /// the detached signature given), or `None` for an unsigned policy
    /// the tenant accepts.
    ///
    /// # Errors
    /// `signature_invalid` (field `policy_signature`): a signature no key
    /// the tenant trusts made for this text and component, or none when
    /// the tenant requires one.
    pub fn policy_signer(
        &self,
        tenant: &str,
        component: &str,
        text: &str,
        signature: Option<&str>,
    ) -> Result<Option<String>, ServiceError> {
        let (keys, required) = self.config.signing(tenant);
        let signed = crate::signing::check_policy(signature, tenant, component, text, keys)
            .map_err(|e| {
                bad(
                    "signature_invalid",
                    Some("policy_signature".into()),
                    e.to_string(),
                )
            })?;
        signed_or_required(signed, required, tenant, "policy", "policy_signature")
    }

    /// Validate a staged upload, check its signatures, cache its compiled
    /// form, and register it.
    ///
    /// # Errors
    /// Invalid name, component or policy; a signature that does not verify
    /// or is missing where required; name taken.
    #[tracing::instrument(
        name = "airlock.upload",
        skip_all,
        fields(tenant = %who.tenant, actor = %who.name, component = name, node = %self.config.node)
    )]
    pub fn register_upload(
        &self,
        who: &Principal,
        name: &str,
        staged: StagedBlob,
        policy_text: Option<&str>,
        policy_signature: Option<&str>,
    ) -> Result<Registered, ServiceError> {
        who.require(Action::Manage)?;
        if !config::valid_name(name) {
            return Err(bad(
                "invalid_name",
                Some("name".to_string()),
                "a component name is 1-32 characters of a-z, 0-9 and '-', not starting with '-'",
            ));
        }
        let policy_signed_by = match policy_text {
            Some(t) => {
                self.validate_policy(&who.tenant, t, PolicyCheck::Store)?;
                self.policy_signer(&who.tenant, name, t, policy_signature)?
            }
            None if policy_signature.is_some() => {
                return Err(bad(
                    "invalid_multipart",
                    Some("policy_signature".into()),
                    "a policy signature without a policy",
                ));
            }
            None => None,
        };
        let bytes = staged.read()?;
        let loaded = self.runner().load_wasm(&bytes).map_err(|e| {
            bad(
                "invalid_component",
                Some("component".to_string()),
                e.to_string(),
            )
        })?;
        // Signatures are checked on a component that validated: every
        // section length is within the file.
        let (keys, required) = self.config.signing(&who.tenant);
        let signed = crate::signing::check_component(&bytes, keys)
            .map_err(|e| bad("signature_invalid", Some("component".into()), e.to_string()))?;
        let signed_by =
            signed_or_required(signed, required, &who.tenant, "component", "component")?;
        let mut names = Vec::new();
        for t in &loaded.tools.tools {
            let exported = format!("{name}{TOOL_SEP}{}", t.name);
            if exported.len() > 64 {
                return Err(bad(
                    "invalid_name",
                    Some("name".to_string()),
                    format!(
                        "the exported tool name {exported:?} would be longer than 64 characters; choose a shorter component name"
                    ),
                ));
            }
            names.push(exported);
        }
        let payload = loaded
            .component()
            .serialize()
            .map_err(|e| ServiceError::Internal(format!("serializing compiled code: {e}")))?;
        let artifact = airlock_guest::artifact::wrap(&self.runner().fingerprint(), &payload);
        let digest = staged.digest.clone();
        self.store
            .put_artifact(&digest, &self.engine_id, &artifact)?;
        let (created, seq) = self.store.register(
            &who.tenant,
            &who.name,
            name,
            staged,
            policy_text,
            store::SignedBy {
                component: signed_by.as_deref(),
                policy: policy_signed_by.as_deref(),
            },
        )?;
        self.cache_put(digest, Arc::new(loaded));
        if created {
            self.metrics.uploads.inc();
        }
        Ok(Registered {
            created,
            audit_record: seq,
            tools: names,
            signed_by,
        })
    }

    fn cache_put(&self, digest: String, l: Arc<Loaded>) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, l);
    }

    /// The loaded (compiled, linked) component, from memory, the artifact
    /// cache, or compiled from the blob.
    fn loaded(&self, digest: &str) -> Result<Arc<Loaded>, ServiceError> {
        if let Some(l) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(l.clone());
        }
        let wasm = self.store.read_blob(digest)?;
        let docs = airlock_wasm_tools::docs::from_component(&wasm);
        let loaded = match self.store.artifact(digest, &self.engine_id) {
            Some(a) => self.runner().load_precompiled(&a, &docs),
            None => self.runner().load_wasm(&wasm),
        }
        .or_else(|e| {
            tracing::warn!(%digest, error = %e, "cached artifact refused; compiling from the blob");
            self.runner().load_wasm(&wasm)
        })
        .map_err(|e| ServiceError::Internal(format!("stored component {digest}: {e}")))?;
        let l = Arc::new(loaded);
        self.cache_put(digest.to_string(), l.clone());
        Ok(l)
    }

    /// The tools of one component.
    ///
    /// # Errors
    /// Unknown component.
    pub fn component_tools(
        &self,
        tenant: &str,
        component: &str,
    ) -> Result<(store::ComponentRow, Arc<Loaded>), ServiceError> {
        let row = self.store.get(tenant, component)?;
        let l = self.loaded(&row.digest)?;
        Ok((row, l))
    }

    /// Every tool the tenant can call, sorted by exported name.
    ///
    /// # Errors
    /// Storage failure.
    pub fn offered_tools(&self, tenant: &str) -> Result<Vec<OfferedTool>, ServiceError> {
        let mut out = Vec::new();
        for c in self.store.list(tenant)? {
            let l = self.loaded(&c.digest)?;
            for t in &l.tools.tools {
                out.push(OfferedTool {
                    name: format!("{}{TOOL_SEP}{}", c.name, t.name),
                    component: c.name.clone(),
                    tool: t.clone(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn tenant_slot(&self, tenant: &str) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let limit = self.config.limits.max_concurrent_calls_per_tenant;
        let sem = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit as usize)))
            .clone();
        sem.try_acquire_owned()
            .map_err(|_| ServiceError::TooManyCalls { limit })
    }

    /// Call a tool by exported name (`component__tool`) with JSON arguments.
    ///
    /// # Errors
    /// Role, unknown tool, argument size or shape, tenant concurrency.
    #[tracing::instrument(
        name = "airlock.invoke",
        skip_all,
        fields(tenant = %who.tenant, actor = %who.name, tool = exported, node = %self.config.node)
    )]
    pub async fn invoke(
        self: &Arc<Self>,
        who: &Principal,
        exported: &str,
        args: serde_json::Value,
    ) -> Result<Invocation, ServiceError> {
        who.require(Action::Invoke)?;
        let args_len = args.to_string().len() as u64;
        if args_len > self.config.limits.max_args_bytes {
            return Err(ServiceError::TooLarge {
                field: "arguments",
                limit: self.config.limits.max_args_bytes,
            });
        }
        if !args.is_object() {
            return Err(bad(
                "bad_arguments",
                Some("arguments".to_string()),
                "arguments must be a JSON object of parameter names to values",
            ));
        }
        let (component, tool) = exported.split_once(TOOL_SEP).ok_or_else(|| {
            ServiceError::NotFound(format!(
                "No tool named {exported:?}: tool names are <component>{TOOL_SEP}<tool>."
            ))
        })?;
        let (row, loaded) = self.component_tools(&who.tenant, component)?;
        if loaded.tools.tool(tool).is_none() {
            return Err(ServiceError::NotFound(format!(
                "Component {component:?} has no tool named {tool:?}."
            )));
        }
        let (checked, policy_version) = self.policy_at(&who.tenant, component, None)?;
        let mut grants = self.site.grants(checked.grants).map_err(|e| {
            use crate::policy::vm::VmGrantError;
            let field = match &e {
                VmGrantError::TooManyShares { index } => format!("policy.filesystem[{index}]"),
                VmGrantError::ModelOutsideWeights { name, .. } => format!("policy.models.{name}"),
            };
            bad("unsupported_in_vm", Some(field), e.to_string())
        })?;
        let permit = self.tenant_slot(&who.tenant)?;
        let svc = self.clone();
        let (tenant, actor) = (who.tenant.clone(), who.name.clone());
        let (component, tool) = (component.to_string(), tool.to_string());
        // The call, its metrics and its audit record live in their own task:
        // if the client goes away, the call still finishes (or times out),
        // holds its tenant slot until then, and is recorded.
        let task = tokio::spawn(async move {
            let _permit = permit;
            // The volumes it grants: one call at a time each, and room left.
            let _volumes = svc
                .volumes
                .hold(&tenant, &mut grants.grants)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            svc.metrics.running.inc();
            let stored: Arc<dyn Component> = Arc::new(Stored {
                svc: svc.clone(),
                digest: row.digest.clone(),
                loaded,
            });
            let called = svc
                .site
                .call_async(stored, tool.clone(), args.clone(), grants)
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()));
            svc.metrics.running.dec();
            let called = called?;
            let start = called.start.map(crate::sandbox::Start::label);
            if let Some(s) = start {
                svc.metrics.observe_start(s);
            }
            let outcome = called.outcome;
            if matches!(
                outcome.result,
                CallResult::Error(CallError::BadArguments { .. })
            ) {
                // Refused before running: nothing happened to record.
                return Ok((outcome, 0, start));
            }
            let denied = outcome.audit.iter().any(|e| e.decision == Decision::Deny);
            let decision = match (&outcome.result, denied) {
                (_, true) => "deny",
                (CallResult::Error(_), false) => "error",
                (CallResult::Ok(_), false) => "allow",
            };
            let result_kind = match &outcome.result {
                CallResult::Ok(_) => "ok",
                CallResult::Error(e) => e.kind(),
            };
            svc.metrics.observe_call(&tenant, result_kind, &outcome);
            let body = serde_json::json!({
                "digest": row.digest,
                "policy_version": policy_version,
                "isolation": svc.isolation(),
                "start": start,
                "result": result_kind,
                "metering": outcome.metering,
                "events": outcome.audit,
                "dropped": outcome.audit_dropped,
            });
            // SQLite commits fsync: keep them off the async workers.
            let seq = tokio::task::spawn_blocking(move || {
                let record = |body| {
                    svc.store.audit_append(&audit::NewRecord {
                        tenant: &tenant,
                        actor: &actor,
                        kind: "invoke",
                        component: &component,
                        tool: &tool,
                        decision,
                        body,
                    })
                };
                let events = body["events"].as_array().map_or(0, Vec::len) as u64;
                let dropped = body["dropped"].as_u64().unwrap_or(0);
                let mut lean = body.clone();
                record(body).or_else(|e| {
                    // A call that ran always leaves a record: without its
                    // events if they could not be stored, saying so.
                    tracing::error!(error = %e, "audit record refused; storing it without events");
                    lean["events"] = serde_json::json!([]);
                    lean["dropped"] = (events + dropped).into();
                    lean["audit_error"] = e.to_string().into();
                    record(lean)
                })
            })
            .await
            .map_err(|e| ServiceError::Internal(format!("the audit task failed: {e}")))??;
            Ok::<_, ServiceError>((outcome, seq, start))
        });
        let (outcome, seq, start) = task
            .await
            .map_err(|e| ServiceError::Internal(format!("the call task failed: {e}")))??;
        if let CallResult::Error(CallError::BadArguments { path, message }) = &outcome.result {
            return Err(bad(
                "bad_arguments",
                Some(path.clone()),
                format!("{path}: {message}"),
            ));
        }
        let events = outcome
            .audit
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["id"] = format!("{seq}.{i}").into();
                v
            })
            .collect();
        Ok(Invocation {
            component: exported
                .split_once(TOOL_SEP)
                .map(|(c, _)| c.to_string())
                .unwrap_or_default(),
            tool: exported.to_string(),
            result: outcome.result,
            metering: outcome.metering,
            audit: InvocationAudit {
                record: seq,
                events,
            },
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            isolation: self.isolation(),
            policy_version,
            start,
        })
    }

    /// Start an MCP session for a principal; returns its id.
    pub fn new_session(&self, who: &Principal) -> String {
        let mut b = [0u8; 16];
        let _ = getrandom::fill(&mut b);
        let id = hex::encode(b);
        let now = std::time::Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, (_, used)| now.duration_since(*used) < SESSION_IDLE);
        let mut mine: Vec<(std::time::Instant, String)> = sessions
            .iter()
            .filter(|(_, (t, _))| *t == who.tenant)
            .map(|(k, (_, used))| (*used, k.clone()))
            .collect();
        if mine.len() >= MAX_SESSIONS_PER_TENANT {
            mine.sort();
            for (_, old) in &mine[..=mine.len() - MAX_SESSIONS_PER_TENANT] {
                sessions.remove(old);
            }
        }
        sessions.insert(id.clone(), (who.tenant.clone(), now));
        id
    }

    /// Whether `id` is a live session of `who`'s tenant (using it keeps it
    /// alive).
    pub fn session_valid(&self, id: &str, who: &Principal) -> bool {
        let now = std::time::Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get_mut(id) {
            Some((t, used)) if *t == who.tenant && now.duration_since(*used) < SESSION_IDLE => {
                *used = now;
                true
            }
            _ => false,
        }
    }

    /// Live MCP sessions of `tenant` (for tests and metrics).
    pub fn sessions_of(&self, tenant: &str) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|(t, _)| t == tenant)
            .count()
    }

    /// End an MCP session.
    pub fn end_session(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
            .is_some()
    }

    /// Prometheus text, as `tenant` may see it: series labelled with
    /// another tenant are left out.
    pub fn metrics_text_for(&self, tenant: &str) -> String {
        let mine = format!("tenant=\"{tenant}\"");
        self.metrics_text()
            .lines()
            .filter(|l| l.starts_with('#') || !l.contains("tenant=\"") || l.contains(&mine))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Prometheus text (every tenant's series).
    pub fn metrics_text(&self) -> String {
        if let Some(p) = self.site.pool() {
            let in_calls = self.site.vm_calls();
            self.metrics.vms.set(p.ready() as i64 + in_calls);
            self.metrics.vm_waiting.set(self.site.vm_waiting());
            let booted = p.booted();
            let seen = self.metrics.vms_booted.get();
            self.metrics.vms_booted.inc_by(booted.saturating_sub(seen));
        }
        self.metrics.encode()
    }
}

/// A stored component as the call site needs it: the loaded form the
/// service already holds, or its cached artifact.
struct Stored {
    svc: Arc<Service>,
    digest: String,
    loaded: Arc<Loaded>,
}

impl Component for Stored {
    fn loaded(&self, _runner: &Runner) -> Result<Arc<Loaded>, CallSiteError> {
        Ok(self.loaded.clone())
    }

    fn artifact(&self, _runner: &Runner) -> Result<Vec<u8>, CallSiteError> {
        self.svc
            .artifact(&self.digest)
            .map_err(|e| CallSiteError::Component(e.to_string()))
    }
}
