//! The wasmtime runner: one fresh store per call, built from a grant set.
//!
//! **Invariants**
//! * Every call gets a new `Store` whose WASI context holds only the granted
//!   directories and environment; sockets are always denied; outgoing HTTP
//!   passes the [`HttpGrant`](crate::grants::HttpGrant) check.
//! * Memory (all linear memories together), fuel, wall time and captured
//!   output are bounded on every call; hitting a bound ends the call with a
//!   structured [`CallError`] and an audit event.
//! * Precompiled bytes are deserialized only after the
//!   [`artifact`](crate::artifact) envelope proves they came from an engine
//!   with this exact configuration.

use crate::artifact::{self, ArtifactError};
use crate::audit::{AuditEvent, AuditLog, Decision};
use crate::grants::{GrantSet, HttpGrant, HttpVerdict};
#[cfg(feature = "compile")]
use airlock_wasm_tools::contract;
use airlock_wasm_tools::contract::ContractError;
use airlock_wasm_tools::value::{args_to_vals, val_to_json};
use airlock_wasm_tools::{Tool, ToolSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{
    Component, ComponentExportIndex, InstancePre, Linker, ResourceTable, Val,
};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// The WASI version whose `wasi:cli/environment` Airlock wraps for auditing.
const WASI_CLI_ENVIRONMENT: &str = "wasi:cli/environment@0.2.12";
/// The WASI version whose `wasi:filesystem/types` `open-at` Airlock wraps for auditing.
const WASI_FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";
/// The WASI version whose `wasi:filesystem/preopens` Airlock wraps for auditing.
const WASI_FILESYSTEM_PREOPENS: &str = "wasi:filesystem/preopens@0.2.12";
/// The WASI versions whose socket constructors Airlock replaces with an
/// audited refusal.
const WASI_TCP_CREATE: &str = "wasi:sockets/tcp-create-socket@0.2.12";
const WASI_UDP_CREATE: &str = "wasi:sockets/udp-create-socket@0.2.12";

/// How often (in fuel units) a running call yields to the executor so the
/// wall-clock timeout can fire even in a tight loop.
const FUEL_YIELD_INTERVAL: u64 = 100_000;

/// Host memory a call's resources may take is held to its memory limit
/// too: each wasi-http `fields` may hold at most this many bytes, and the
/// call's resource table at most `memory limit / this` entries (64 to
/// 16,384), so fields alone can never cost the host more than the limit.
const HOST_FIELDS_BYTES: usize = 32 << 10;

/// Resource-table entries a call with `memory_bytes` of memory may hold.
fn host_table_entries(memory_bytes: u64) -> usize {
    (memory_bytes / HOST_FIELDS_BYTES as u64).clamp(64, 16_384) as usize
}

/// The CPU baseline every artifact is compiled for, whatever CPU compiles it.
///
/// **x86-64-v2** (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B): every
/// x86-64 server since about 2009 has it, and so does the microVM, whose
/// CPUID is what the VMM offers from KVM's supported set — nested on our CI
/// machines (QEMU TCG, `-cpu EPYC`) the guest has no AVX, so v3 (AVX2, BMI,
/// FMA) is out. Code built for the baseline runs on the host that compiled
/// it, in any microVM and on any other host, older or newer.
///
/// The engine is given an explicit target, so Cranelift starts from no
/// extensions at all and never asks the build host's CPUID; then exactly
/// these flags are turned on. An extension Cranelift learns to use in a
/// later release (AVX-VNNI, AVX-512 FP16, AMX, APX, …) stays off until it is
/// added here on purpose. The engine fingerprint names the baseline.
pub mod baseline {
    /// The baseline's name (in the engine fingerprint).
    pub const NAME: &str = "x86-64-v2";
    /// The Cranelift x86 flags the baseline turns on; every other ISA flag
    /// is off.
    pub const X86_CRANELIFT_FLAGS: &[&str] = &[
        "has_sse3",
        "has_ssse3",
        "has_cmpxchg16b",
        "has_sse41",
        "has_sse42",
        "has_popcnt",
    ];
    /// `-C target-cpu` for native code built on the host to run in the
    /// guest or on another machine (the init, the static `airlock`): the
    /// same baseline, never `native`.
    pub const RUSTC_TARGET_CPU: &str = "x86-64-v2";
}

/// Errors setting up the runner or loading a component.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The wasmtime engine could not be created.
    #[error("The wasmtime engine could not be created: {0}.")]
    Engine(String),
    /// The component is invalid or cannot be linked.
    #[error(transparent)]
    Contract(#[from] ContractError),
    /// The component imports something Airlock does not provide.
    #[error("The component cannot be linked: {0}.")]
    Link(String),
    /// A precompiled artifact was refused.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// wasmtime refused the precompiled payload.
    #[error("The precompiled component could not be loaded: {0}.")]
    Deserialize(String),
    /// Precompilation failed.
    #[error("The component could not be compiled: {0}.")]
    Compile(String),
}

/// Engine settings. Host and guest must use the same settings; the
/// [`fingerprint`](EngineConfig::fingerprint) pins them into artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Use the pooling instance allocator (fast instantiation).
    pub pooling: bool,
    /// Maximum number of concurrent instances when pooling.
    pub pool_instances: u32,
    /// Largest linear memory any call may use, in bytes (the pool's slot size).
    pub max_memory_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pooling: true,
            pool_instances: 64,
            max_memory_bytes: 4 << 30,
        }
    }
}

impl EngineConfig {
    /// A string that changes whenever compiled code would be incompatible.
    /// Pooling is a runtime-only choice and is not part of it.
    pub fn fingerprint(&self) -> String {
        format!(
            "airlock-engine/3 wasmtime/48 {} isa={} fuel=1 max_memory={}",
            std::env::consts::ARCH,
            baseline::NAME,
            self.max_memory_bytes
        )
    }

    fn wasmtime_config(&self) -> wasmtime::Config {
        let mut c = wasmtime::Config::new();
        c.consume_fuel(true);
        c.wasm_component_model(true);
        // The same tunables on every machine, so artifacts move between
        // host and guest.
        c.memory_reservation(self.max_memory_bytes);
        c.memory_guard_size(32 << 20);
        c.memory_reservation_for_growth(0);
        // Code compiled on the host runs in the microVM and on other hosts:
        // an explicit target (no CPUID probing) plus exactly the baseline's
        // flags (see `baseline`). Without a compiler (the in-VM init) there
        // is nothing to set: wasmtime checks each artifact's flags against
        // this CPU when it loads it.
        #[cfg(feature = "compile")]
        {
            c.target(&target_lexicon::HOST.to_string())
                .expect("the host triple is a valid target");
            #[cfg(target_arch = "x86_64")]
            for flag in baseline::X86_CRANELIFT_FLAGS {
                // SAFETY: the baseline's extensions are present on every CPU
                // Airlock supports, and wasmtime re-checks at load time that
                // every flag enabled in an artifact is present on the CPU
                // running it (an error, not undefined behaviour).
                unsafe {
                    c.cranelift_flag_enable(flag);
                }
            }
        }
        if self.pooling {
            let mut p = wasmtime::PoolingAllocationConfig::new();
            let n = self.pool_instances;
            p.total_component_instances(n);
            p.total_core_instances(n * 4);
            p.total_memories(n * 2);
            p.total_tables(n * 4);
            p.max_memory_size(self.max_memory_bytes as usize);
            p.max_core_instances_per_component(32);
            p.max_memories_per_component(4);
            p.max_tables_per_component(16);
            c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(p));
        }
        c
    }
}

/// Everything a call's store holds.
struct CallState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    hooks: EgressHooks,
    limiter: MemoryLimiter,
    env: Vec<(String, String)>,
    audit: AuditLog,
    writes: WriteBudget,
}

/// What a call may still write into its read-write grants
/// (`limits.max_write_bytes`), shared by every stream and write of the call.
#[derive(Clone)]
struct WriteBudget {
    left: Arc<std::sync::atomic::AtomicU64>,
    hit: Arc<std::sync::atomic::AtomicBool>,
    limit: u64,
    audit: AuditLog,
}

impl WriteBudget {
    fn new(limit: u64, audit: AuditLog) -> Self {
        Self {
            left: Arc::new(limit.into()),
            hit: Arc::default(),
            limit,
            audit,
        }
    }

    /// Take `n` bytes from the budget; past it, nothing is taken, the
    /// first time is audited, and the write must fail.
    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let ok = self
            .left
            .fetch_update(SeqCst, SeqCst, |l| l.checked_sub(n))
            .is_ok();
        if !ok && !self.hit.swap(true, SeqCst) {
            self.audit.record(
                "limit.disk",
                format!("{} bytes", self.limit),
                Decision::Deny,
                "the call wrote more into its writable grants than allowed",
            );
        }
        ok
    }

    fn hit(&self) -> bool {
        self.hit.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn refused(&self) -> wasmtime_wasi::p2::StreamError {
        wasmtime_wasi::p2::StreamError::LastOperationFailed(wasmtime::format_err!(
            "the call's write limit of {} bytes is reached",
            self.limit
        ))
    }
}

/// A file's output stream that draws on the call's [`WriteBudget`].
struct Budgeted {
    inner: wasmtime_wasi::p2::DynOutputStream,
    budget: WriteBudget,
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::Pollable for Budgeted {
    async fn ready(&mut self) {
        self.inner.ready().await;
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime_wasi::p2::OutputStream for Budgeted {
    fn write(&mut self, bytes: bytes::Bytes) -> wasmtime_wasi::p2::StreamResult<()> {
        if !self.budget.take(bytes.len() as u64) {
            return Err(self.budget.refused());
        }
        self.inner.write(bytes)
    }

    fn write_zeroes(&mut self, n: usize) -> wasmtime_wasi::p2::StreamResult<()> {
        if !self.budget.take(n as u64) {
            return Err(self.budget.refused());
        }
        self.inner.write_zeroes(n)
    }

    fn flush(&mut self) -> wasmtime_wasi::p2::StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> wasmtime_wasi::p2::StreamResult<usize> {
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await;
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// An outgoing HTTP request the grant allowed, with its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRequest {
    /// Method.
    pub method: String,
    /// Absolute URL.
    pub url: String,
    /// Headers (names lower-case).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// The answer to an [`EgressRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// Why an [`Egress`] has no response, in the classes wasi-http's error
/// codes tell apart. The guest answers the component with the same code
/// `wasmtime-wasi-http` gives in process for the same cause, so a failed
/// request looks the same in both isolation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EgressFailureKind {
    /// The proxy's own check refused it (grant, scheme, URL).
    Denied,
    /// The host name did not resolve.
    Dns,
    /// Nothing accepted the connection.
    ConnectionRefused,
    /// The proxy's time limit passed.
    Timeout,
    /// TLS failed (handshake, certificate).
    Tls,
    /// The response body is over [`EGRESS_MAX_BODY`].
    TooLarge,
    /// Anything else (proxy unreachable, protocol error).
    Other,
}

/// An egress failure: its class and a sentence saying what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressFailure {
    /// The class.
    pub kind: EgressFailureKind,
    /// What happened.
    pub message: String,
}

impl EgressFailure {
    /// A failure of `kind`.
    pub fn new(kind: EgressFailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A failure of kind [`EgressFailureKind::Other`].
    pub fn other(message: impl Into<String>) -> Self {
        Self::new(EgressFailureKind::Other, message)
    }

    /// The wasi-http error code the component sees: what
    /// `wasmtime-wasi-http`'s own client reports for the same cause.
    pub fn error_code(&self) -> wasmtime_wasi_http::p2::bindings::http::types::ErrorCode {
        use wasmtime_wasi_http::p2::bindings::http::types::{DnsErrorPayload, ErrorCode};
        match self.kind {
            EgressFailureKind::Denied => ErrorCode::HttpRequestDenied,
            EgressFailureKind::Dns => ErrorCode::DnsError(DnsErrorPayload {
                rcode: Some("address not available".into()),
                info_code: None,
            }),
            EgressFailureKind::ConnectionRefused => ErrorCode::ConnectionRefused,
            EgressFailureKind::Timeout => ErrorCode::ConnectionTimeout,
            EgressFailureKind::Tls => ErrorCode::TlsProtocolError,
            EgressFailureKind::TooLarge => {
                ErrorCode::HttpResponseBodySize(Some(EGRESS_MAX_BODY as u64))
            }
            EgressFailureKind::Other => ErrorCode::DestinationUnavailable,
        }
    }
}

impl std::fmt::Display for EgressFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Largest request or response body that goes through an [`Egress`].
pub const EGRESS_MAX_BODY: usize = 8 << 20;

/// The call a request belongs to: its grant and its audit trail.
#[derive(Debug, Clone)]
pub struct EgressCall {
    /// The call's HTTP grant (the runner already checked the request's
    /// name against it).
    pub grant: Arc<HttpGrant>,
    /// The call's audit trail, for the egress's own decisions.
    pub audit: AuditLog,
}

/// Where requests the grant allowed by name go: the host's egress proxy,
/// called directly in process isolation and over vsock from the microVM
/// (there it checks again with the host's own copy of the grant, ignoring
/// `call`). It resolves the name, checks each address, connects only to an
/// address it checked, and says why it refused. Blocking; called off the
/// async runtime. A runner without one sends nothing.
pub trait Egress: Send + Sync {
    /// Send one request.
    ///
    /// # Errors
    /// Why there is no response (refused by the proxy's own check,
    /// unreachable, TLS, too large).
    fn send(
        &self,
        request: EgressRequest,
        call: &EgressCall,
    ) -> Result<EgressResponse, EgressFailure>;
}

/// Outgoing HTTP: every request is checked against the grant and recorded.
struct EgressHooks {
    grant: Arc<HttpGrant>,
    audit: AuditLog,
    egress: Option<Arc<dyn Egress>>,
}

impl WasiHttpHooks for EgressHooks {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> EgressFuture {
        drop(fut);
        let uri = request.uri().clone();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let host = uri.host().unwrap_or("").to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let target = format!(
            "{} {scheme}://{host}:{port}{}",
            request.method(),
            uri.path()
        );
        match self.grant.check(&scheme, &host, port) {
            HttpVerdict::Denied(reason) => {
                self.audit
                    .record("http.request", target, Decision::Deny, reason);
                let pause = self.audit.denial_pause();
                Box::new(async move {
                    tokio::time::sleep(pause).await;
                    Err(wasmtime_wasi_http::Error::HttpRequestDenied)
                })
            }
            HttpVerdict::Allowed(reason) => {
                self.audit
                    .record("http.request", target, Decision::Allow, reason);
                match &self.egress {
                    Some(e) => send_via(
                        e.clone(),
                        request,
                        EgressCall {
                            grant: self.grant.clone(),
                            audit: self.audit.clone(),
                        },
                    ),
                    None => no_egress(),
                }
            }
        }
    }
}

type EgressFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

/// Send a request the grant allowed through an [`Egress`].
fn send_via(
    egress: Arc<dyn Egress>,
    request: http::Request<wasmtime_wasi_http::WasiBody>,
    call: EgressCall,
) -> EgressFuture {
    use http_body_util::{BodyExt, Full, Limited};
    use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
    Box::new(async move {
        let (parts, body) = request.into_parts();
        let body = Limited::new(body, EGRESS_MAX_BODY)
            .collect()
            .await
            .map_err(|_| {
                wasmtime_wasi_http::Error::from(ErrorCode::HttpRequestBodySize(Some(
                    EGRESS_MAX_BODY as u64,
                )))
            })?
            .to_bytes();
        let req = EgressRequest {
            method: parts.method.to_string(),
            url: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        };
        let resp = tokio::task::spawn_blocking(move || egress.send(req, &call))
            .await
            .map_err(|e| {
                wasmtime_wasi_http::Error::from(ErrorCode::InternalError(Some(e.to_string())))
            })?
            .map_err(|f| {
                tracing::warn!(error = %f.message, kind = ?f.kind, "egress proxy refused or failed");
                wasmtime_wasi_http::Error::from(f.error_code())
            })?;
        let mut builder = http::Response::builder().status(resp.status);
        for (k, v) in &resp.headers {
            builder = builder.header(k, v);
        }
        let res = builder
            .body(
                Full::new(bytes::Bytes::from(resp.body))
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .map_err(|e| {
                tracing::warn!(error = %e, "the egress proxy's response is not valid HTTP");
                wasmtime_wasi_http::Error::from(ErrorCode::HttpProtocolError)
            })?;
        Ok((
            res,
            Box::new(async { Ok(()) })
                as Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
        ))
    })
}

/// A runner built without an [`Egress`] sends nothing: allowed requests
/// fail closed.
fn no_egress() -> EgressFuture {
    tracing::warn!(
        "outgoing HTTP allowed by the grant, but this runner has no egress; failing closed"
    );
    Box::new(async { Err(wasmtime_wasi_http::Error::DestinationUnavailable) })
}

/// Memory limiter that also measures the peak.
struct MemoryLimiter {
    limit: u64,
    total: u64,
    peak: u64,
    hit: bool,
    audit: AuditLog,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let next = self.total - current as u64 + desired as u64;
        if next > self.limit {
            self.hit = true;
            self.audit.record(
                "limit.memory",
                format!("{next} bytes"),
                Decision::Deny,
                format!(
                    "linear memory would exceed the limit of {} bytes",
                    self.limit
                ),
            );
            wasmtime::bail!("memory limit of {} bytes exceeded", self.limit);
        }
        self.total = next;
        self.peak = self.peak.max(next);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A component ready to be called.
pub struct Loaded {
    component: Component,
    pre: InstancePre<CallState>,
    /// Tool name → the function's export index, resolved once at load time.
    exports: BTreeMap<String, ComponentExportIndex>,
    /// Its tools, schemas and imports.
    pub tools: ToolSet,
    /// sha256 of the component bytes (or of the artifact payload).
    pub digest: String,
}

impl Loaded {
    /// The underlying wasmtime component.
    pub fn component(&self) -> &Component {
        &self.component
    }
}

/// Why a call did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallError {
    /// No tool of that name.
    #[error("The component has no tool named {tool:?}.")]
    UnknownTool {
        /// The requested name.
        tool: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// The JSON arguments do not fit the tool's parameters.
    #[error("Bad arguments: {path}: {message}.")]
    BadArguments {
        /// Path of the bad field, e.g. `args.filter.limit`.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The component trapped (panic, unreachable, exit with an error code...).
    #[error("The tool trapped: {message}.")]
    Trap {
        /// wasmtime's description of the trap.
        message: String,
    },
    /// The wall-clock limit passed.
    #[error("The tool did not finish within {limit_ms} ms.")]
    Timeout {
        /// The limit.
        limit_ms: u64,
    },
    /// Linear memory would have grown past the limit.
    #[error("The tool tried to use more than {limit_bytes} bytes of memory.")]
    OutOfMemory {
        /// The limit.
        limit_bytes: u64,
    },
    /// The fuel (CPU budget) ran out.
    #[error("The tool used up its CPU budget of {fuel} fuel.")]
    CpuLimit {
        /// The budget.
        fuel: u64,
    },
    /// The tool wrote more than the output cap.
    #[error("The tool wrote more than {limit_bytes} bytes to {stream}.")]
    OutputLimit {
        /// `stdout` or `stderr`.
        stream: String,
        /// The cap.
        limit_bytes: u64,
    },
    /// The tool wrote more into its read-write grants than the cap.
    #[error("The tool wrote more than {limit_bytes} bytes into its writable directories.")]
    WriteLimit {
        /// The cap (`limits.max_write`).
        limit_bytes: u64,
    },
    /// The result, as JSON, is larger than the cap.
    #[error("The tool's result is larger than {limit_bytes} bytes as JSON.")]
    ResultLimit {
        /// The cap (`limits.max_result`).
        limit_bytes: u64,
    },
    /// The tool recursed too deep: its call stack ran out.
    #[error("The tool ran out of call stack: {message}.")]
    StackOverflow {
        /// What wasmtime said, and where.
        message: String,
    },
    /// The tool failed after a capability was denied.
    #[error("The tool was denied {action} on {target}: {reason}.")]
    Denied {
        /// What was attempted (`http.request`, `socket.connect`...).
        action: String,
        /// On what.
        target: String,
        /// Why it was denied.
        reason: String,
        /// How the tool failed afterwards.
        message: String,
    },
    /// A granted resource could not be set up (e.g. a granted directory is missing).
    #[error("The grant could not be applied: {message}.")]
    Grant {
        /// What failed.
        message: String,
    },
    /// The component could not be instantiated or its result not converted.
    #[error("The component is invalid: {message}.")]
    InvalidComponent {
        /// What failed.
        message: String,
    },
}

/// A value or an error, serialized as `{"ok": value}` or `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallResult {
    /// The tool returned this value.
    Ok(Value),
    /// The call failed.
    Error(CallError),
}

/// What a call cost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metering {
    /// Wall time of the whole call (instantiation included), microseconds.
    pub wall_us: u64,
    /// Fuel budget.
    pub fuel_limit: u64,
    /// Fuel used.
    pub fuel_used: u64,
    /// Peak linear memory, bytes.
    pub peak_memory_bytes: u64,
    /// Bytes the tool wrote to stdout.
    pub stdout_bytes: u64,
    /// Bytes the tool wrote to stderr.
    pub stderr_bytes: u64,
}

/// Everything a call produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallOutcome {
    /// The tool called.
    pub tool: String,
    /// Value or error.
    pub result: CallResult,
    /// Cost.
    pub metering: Metering,
    /// Capability decisions, in order (at most
    /// [`caps::MAX_EVENTS`](crate::audit::caps::MAX_EVENTS)).
    pub audit: Vec<AuditEvent>,
    /// Decisions past the cap: counted, not kept.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audit_dropped: u64,
    /// Captured stdout (lossy UTF-8).
    pub stdout: String,
    /// Captured stderr (lossy UTF-8).
    pub stderr: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The runner: an engine, a linker with WASI + WASI-HTTP, and a tokio runtime.
pub struct Runner {
    engine: Engine,
    linker: Linker<CallState>,
    config: EngineConfig,
    rt: tokio::runtime::Runtime,
    egress: Option<Arc<dyn Egress>>,
}

impl Runner {
    /// Create a runner.
    ///
    /// # Errors
    /// [`RunnerError::Engine`] when wasmtime rejects the configuration (for
    /// example, the pooling allocator cannot reserve address space).
    pub fn new(config: EngineConfig) -> Result<Self, RunnerError> {
        let engine = Engine::new(&config.wasmtime_config())
            .map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        // Wrap `get-environment` so every read of the environment is audited.
        linker.allow_shadowing(true);
        linker
            .instance(WASI_CLI_ENVIRONMENT)
            .and_then(|mut i| {
                i.func_wrap("get-environment", |mut store, (): ()| {
                    let state: &mut CallState = store.data_mut();
                    let keys: Vec<&str> = state.env.iter().map(|(k, _)| k.as_str()).collect();
                    let target = if keys.is_empty() {
                        "(none)".to_string()
                    } else {
                        keys.join(",")
                    };
                    state.audit.record(
                        "env.read",
                        target,
                        Decision::Allow,
                        "the component read its environment; only granted keys are present",
                    );
                    Ok((state.env.clone(),))
                })
            })
            .map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_audited_open_at(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_refused_sockets(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_audited_changes(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_budgeted_writes(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        linker.allow_shadowing(false);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("airlock-runner")
            .build()
            .map_err(|e| RunnerError::Engine(format!("tokio runtime: {e}")))?;
        Ok(Self {
            engine,
            linker,
            config,
            rt,
            egress: None,
        })
    }

    /// Send allowed outgoing HTTP through `egress` instead of from this
    /// process (the grant is still checked and audited here first).
    #[must_use]
    pub fn with_egress(mut self, egress: Arc<dyn Egress>) -> Self {
        self.egress = Some(egress);
        self
    }

    /// The engine (for reading types).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// This runner's engine fingerprint.
    pub fn fingerprint(&self) -> String {
        self.config.fingerprint()
    }

    /// Compile component bytes into an artifact for [`Runner::load_precompiled`].
    ///
    /// # Errors
    /// The bytes are not a valid component.
    #[cfg(feature = "compile")]
    pub fn precompile(&self, wasm: &[u8]) -> Result<Vec<u8>, RunnerError> {
        contract::compile(&self.engine, wasm)?;
        let payload = self
            .engine
            .precompile_component(wasm)
            .map_err(|e| RunnerError::Compile(format!("{e:#}")))?;
        Ok(artifact::wrap(&self.fingerprint(), &payload))
    }

    /// Compile and load component bytes.
    ///
    /// # Errors
    /// Invalid component, or imports Airlock does not provide.
    #[cfg(feature = "compile")]
    pub fn load_wasm(&self, wasm: &[u8]) -> Result<Loaded, RunnerError> {
        let (component, tools) = ToolSet::from_bytes(&self.engine, wasm)?;
        self.finish_load(component, tools, hex::encode(Sha256::digest(wasm)))
    }

    /// Load an artifact made by [`Runner::precompile`] with the same engine
    /// configuration. `docs` supplies tool descriptions (they are not part of
    /// the compiled code).
    ///
    /// # Errors
    /// A foreign, corrupt or incompatible artifact.
    pub fn load_precompiled(
        &self,
        bytes: &[u8],
        docs: &airlock_wasm_tools::docs::Docs,
    ) -> Result<Loaded, RunnerError> {
        let payload = artifact::unwrap(&self.fingerprint(), bytes)?;
        // SAFETY: `artifact::unwrap` verified that the payload's sha256 matches
        // the envelope and that the envelope was written by an engine with this
        // exact configuration via `Engine::precompile_component`; wasmtime
        // additionally checks its own version and settings header and returns
        // an error (not UB) on mismatch. The payload comes from the host, which
        // is the trusted side of the sandbox.
        let component = unsafe { Component::deserialize(&self.engine, payload) }
            .map_err(|e| RunnerError::Deserialize(format!("{e:#}")))?;
        let tools = ToolSet::from_component(&self.engine, &component, docs);
        self.finish_load(component, tools, hex::encode(Sha256::digest(payload)))
    }

    fn finish_load(
        &self,
        component: Component,
        tools: ToolSet,
        digest: String,
    ) -> Result<Loaded, RunnerError> {
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| RunnerError::Link(format!("{e:#}")))?;
        let mut exports = BTreeMap::new();
        for t in &tools.tools {
            let idx = export_index(&component, t).ok_or_else(|| {
                RunnerError::Link(format!("export for tool {} not found", t.name))
            })?;
            exports.insert(t.name.clone(), idx);
        }
        Ok(Loaded {
            component,
            pre,
            exports,
            tools,
            digest,
        })
    }

    /// Run one call, blocking the current thread.
    pub fn invoke(
        &self,
        loaded: &Loaded,
        tool: &str,
        args: &Value,
        grants: &GrantSet,
    ) -> CallOutcome {
        self.rt
            .block_on(self.invoke_async(loaded, tool, args, grants))
    }

    /// Run one call.
    pub async fn invoke_async(
        &self,
        loaded: &Loaded,
        tool: &str,
        args: &Value,
        grants: &GrantSet,
    ) -> CallOutcome {
        let start = Instant::now();
        let audit = AuditLog::new(start);
        let limits = grants.limits;
        let stdout = MemoryOutputPipe::new(limits.max_output_bytes as usize);
        let stderr = MemoryOutputPipe::new(limits.max_output_bytes as usize);
        let mut metering = Metering {
            fuel_limit: limits.fuel,
            ..Metering::default()
        };
        let finish = |result: CallResult, metering: Metering| CallOutcome {
            tool: tool.to_string(),
            result,
            metering: Metering {
                wall_us: start.elapsed().as_micros() as u64,
                stdout_bytes: stdout.contents().len() as u64,
                stderr_bytes: stderr.contents().len() as u64,
                ..metering
            },
            audit: audit.snapshot(),
            audit_dropped: audit.dropped(),
            stdout: String::from_utf8_lossy(&stdout.contents()).into_owned(),
            stderr: String::from_utf8_lossy(&stderr.contents()).into_owned(),
        };

        let Some(t) = loaded.tools.tool(tool) else {
            let available = loaded.tools.tools.iter().map(|t| t.name.clone()).collect();
            return finish(
                CallResult::Error(CallError::UnknownTool {
                    tool: tool.into(),
                    available,
                }),
                metering,
            );
        };
        let params = match args_to_vals(&t.param_types, args) {
            Ok(p) => p,
            Err(e) => {
                return finish(
                    CallResult::Error(CallError::BadArguments {
                        path: e.path,
                        message: e.message,
                    }),
                    metering,
                );
            }
        };
        let wasi = match build_wasi(grants, &audit, &stdout, &stderr) {
            Ok(w) => w,
            Err(message) => {
                return finish(CallResult::Error(CallError::Grant { message }), metering);
            }
        };
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(HOST_FIELDS_BYTES);
        let mut table = ResourceTable::new();
        table.set_max_capacity(host_table_entries(limits.memory_bytes));
        let state = CallState {
            wasi,
            http,
            table,
            hooks: EgressHooks {
                grant: Arc::new(grants.http.clone()),
                audit: audit.clone(),
                egress: self.egress.clone(),
            },
            limiter: MemoryLimiter {
                limit: limits.memory_bytes,
                total: 0,
                peak: 0,
                hit: false,
                audit: audit.clone(),
            },
            env: grants
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            audit: audit.clone(),
            writes: WriteBudget::new(limits.max_write_bytes, audit.clone()),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        if let Err(e) = store.set_fuel(limits.fuel) {
            return finish(
                CallResult::Error(CallError::Grant {
                    message: format!("{e:#}"),
                }),
                metering,
            );
        }
        if let Err(e) = store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL)) {
            return finish(
                CallResult::Error(CallError::Grant {
                    message: format!("{e:#}"),
                }),
                metering,
            );
        }

        let idx = loaded.exports[&t.name];
        let n_results = usize::from(t.result_type.is_some());
        let run = async {
            let instance = loaded.pre.instantiate_async(&mut store).await?;
            let func = instance
                .get_func(&mut store, idx)
                .ok_or_else(|| wasmtime::format_err!("export {} is not a function", t.function))?;
            let mut results = vec![Val::Bool(false); n_results];
            func.call_async(&mut store, &params, &mut results).await?;
            wasmtime::Result::<Vec<Val>>::Ok(results)
        };
        let outcome = tokio::time::timeout(Duration::from_millis(limits.timeout_ms), run).await;

        metering.fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        metering.peak_memory_bytes = store.data().limiter.peak;
        let result = match outcome {
            Err(_elapsed) => {
                audit.record(
                    "limit.time",
                    format!("{} ms", limits.timeout_ms),
                    Decision::Deny,
                    "the call ran past its wall-clock limit and was stopped",
                );
                CallResult::Error(CallError::Timeout {
                    limit_ms: limits.timeout_ms,
                })
            }
            // Whether the tool handled a refused write itself or failed on
            // it, it was stopped by the cap: report the limit.
            Ok(_) if store.data().writes.hit() => CallResult::Error(CallError::WriteLimit {
                limit_bytes: limits.max_write_bytes,
            }),
            Ok(Ok(results)) => {
                match output_overflow(&audit, limits, [("stdout", &stdout), ("stderr", &stderr)]) {
                    // The tool handled the failed write itself, but it was still
                    // stopped by the cap: report the limit, not its partial answer.
                    Some(e) => CallResult::Error(e),
                    None => match results.first() {
                        None => CallResult::Ok(Value::Null),
                        Some(v) => result_json(v, limits, &audit),
                    },
                }
            }
            Ok(Err(e)) => CallResult::Error(classify(
                &e,
                &store.data().limiter,
                &audit,
                limits,
                [("stdout", &stdout), ("stderr", &stderr)],
            )),
        };
        drop(store);
        finish(result, metering)
    }
}

/// Wrap `descriptor.open-at` so every file open is an audit event: denials
/// (outside the preopen, writing a read-only grant) as `deny`, the rest as
/// `allow` with their outcome.
fn add_audited_open_at(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::preopens::Host as _;
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        self as fs, DescriptorFlags, Host as _, HostDescriptor as _, OpenFlags, PathFlags,
    };
    linker.instance(WASI_FILESYSTEM_PREOPENS)?.func_wrap(
        "get-directories",
        |mut store, (): ()| {
            let state: &mut CallState = store.data_mut();
            let audit = state.audit.clone();
            let dirs = state.filesystem().get_directories()?;
            let names: Vec<&str> = dirs.iter().map(|(_, n)| n.as_str()).collect();
            audit.record(
                "fs.preopens",
                if names.is_empty() {
                    "(none)".to_string()
                } else {
                    names.join(",")
                },
                Decision::Allow,
                "only granted directories are visible; any other path cannot even be named",
            );
            Ok((dirs,))
        },
    )?;
    type Args = (
        Resource<Descriptor>,
        PathFlags,
        String,
        OpenFlags,
        DescriptorFlags,
    );
    linker.instance(WASI_FILESYSTEM_TYPES)?.func_wrap_async(
        "[method]descriptor.open-at",
        |mut store, (fd, path_flags, path, open_flags, flags): Args| {
            Box::new(async move {
                let state: &mut CallState = store.data_mut();
                let audit = state.audit.clone();
                let writes = flags
                    .intersects(DescriptorFlags::WRITE | DescriptorFlags::MUTATE_DIRECTORY)
                    || open_flags.intersects(OpenFlags::CREATE | OpenFlags::TRUNCATE);
                let target = format!("{path} ({})", if writes { "write" } else { "read" });
                let mut view = state.filesystem();
                match view.open_at(fd, path_flags, path, open_flags, flags).await {
                    Ok(new_fd) => {
                        record_fs(&audit, "fs.open", target, Ok("inside a granted directory"))
                            .await;
                        Ok((Ok(new_fd),))
                    }
                    Err(e) => {
                        let code: fs::ErrorCode = view.convert_error_code(e)?;
                        record_fs(&audit, "fs.open", target, Err(&code)).await;
                        Ok((Err(code),))
                    }
                }
            })
        },
    )
}

/// Record how a filesystem operation ended (`fs.open`, `fs.change`): the
/// sandbox's refusals (not permitted, access, read-only) as `deny`, paused
/// past the free denials; success and other failures as `allow`.
async fn record_fs(
    audit: &AuditLog,
    action: &str,
    target: String,
    r: Result<&str, &wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode>,
) {
    use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;
    let (decision, reason) = match r {
        Ok(why) => (Decision::Allow, why.to_string()),
        Err(code @ (ErrorCode::NotPermitted | ErrorCode::Access | ErrorCode::ReadOnly)) => (
            Decision::Deny,
            format!("refused by the sandbox ({code:?}): outside the grant or not writable"),
        ),
        Err(other) => (Decision::Allow, format!("permitted, but failed: {other:?}")),
    };
    audit.record(action, target, decision, reason);
    if decision == Decision::Deny {
        tokio::time::sleep(audit.denial_pause()).await;
    }
}

/// Wrap every `descriptor` method that changes the filesystem (mkdir,
/// rmdir, unlink, rename, link, symlink, set-times, set-size) so each is an
/// `fs.change` audit event, refused ones included: before, only opens left
/// a trace.
fn add_audited_changes(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        Filesize, Host as _, HostDescriptor as _, NewTimestamp, PathFlags,
    };
    type D = Resource<Descriptor>;
    /// One wrapper: `$args` as the component passes them, `$target` the
    /// event's target, `$call` the wasmtime-wasi method it wraps.
    macro_rules! wrap {
        ($name:literal, ($($a:ident : $t:ty),*), $target:expr, |$view:ident| $call:expr) => {
            linker.instance(WASI_FILESYSTEM_TYPES)?.func_wrap_async(
                concat!("[method]descriptor.", $name),
                |mut store, ($($a,)*): ($($t,)*)| {
                    Box::new(async move {
                        let state: &mut CallState = store.data_mut();
                        let audit = state.audit.clone();
                        let target: String = $target;
                        let mut $view = state.filesystem();
                        let r = match $call.await {
                            Ok(()) => Ok(()),
                            Err(e) => Err($view.convert_error_code(e)?),
                        };
                        let how = r.as_ref().map(|()| "inside a granted, writable directory");
                        record_fs(&audit, "fs.change", target, how).await;
                        Ok((r,))
                    })
                },
            )?;
        };
    }
    wrap!("create-directory-at", (fd: D, path: String),
        format!("mkdir {path}"), |v| v.create_directory_at(fd, path));
    wrap!("remove-directory-at", (fd: D, path: String),
        format!("rmdir {path}"), |v| v.remove_directory_at(fd, path));
    wrap!("unlink-file-at", (fd: D, path: String),
        format!("unlink {path}"), |v| v.unlink_file_at(fd, path));
    wrap!("symlink-at", (fd: D, src: String, dest: String),
        format!("symlink {dest} -> {src}"), |v| v.symlink_at(fd, src, dest));
    wrap!("rename-at", (fd: D, old: String, new_fd: D, new: String),
        format!("rename {old} -> {new}"), |v| v.rename_at(fd, old, new_fd, new));
    wrap!("link-at", (fd: D, flags: PathFlags, old: String, new_fd: D, new: String),
        format!("link {new} -> {old}"), |v| v.link_at(fd, flags, old, new_fd, new));
    wrap!("set-times-at", (fd: D, flags: PathFlags, path: String, a: NewTimestamp, m: NewTimestamp),
        format!("set-times {path}"), |v| v.set_times_at(fd, flags, path, a, m));
    wrap!("set-times", (fd: D, a: NewTimestamp, m: NewTimestamp),
        "set-times (open file)".to_string(), |v| v.set_times(fd, a, m));
    wrap!("set-size", (fd: D, size: Filesize),
        format!("set-size (open file) {size}"), |v| v.set_size(fd, size));
    Ok(())
}

/// Hold every write into a read-write grant to the call's
/// [`WriteBudget`]: `descriptor.write` checks it, and the streams of
/// `write-via-stream`/`append-via-stream` are wrapped so each write draws
/// on it. A write past the budget fails (audited once as `limit.disk`) and
/// the call ends as `write_limit`.
fn add_budgeted_writes(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::DynOutputStream;
    use wasmtime_wasi::p2::bindings::filesystem::types::{
        ErrorCode, Filesize, Host as _, HostDescriptor as _,
    };
    type Stream = Result<Resource<DynOutputStream>, ErrorCode>;
    /// Swap the stream wasmtime-wasi made for one that draws on the budget.
    fn budgeted(
        state: &mut CallState,
        made: Result<Resource<DynOutputStream>, wasmtime_wasi::p2::FsError>,
    ) -> wasmtime::Result<(Stream,)> {
        let stream = match made {
            Ok(s) => s,
            Err(e) => return Ok((Err(state.filesystem().convert_error_code(e)?),)),
        };
        let inner: DynOutputStream = state.table.delete(stream)?;
        let wrapped: DynOutputStream = Box::new(Budgeted {
            inner,
            budget: state.writes.clone(),
        });
        Ok((Ok(state.table.push(wrapped)?),))
    }
    let mut types = linker.instance(WASI_FILESYSTEM_TYPES)?;
    types.func_wrap(
        "[method]descriptor.write-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, Filesize)| {
            let state: &mut CallState = store.data_mut();
            let made = state.filesystem().write_via_stream(fd, offset);
            budgeted(state, made)
        },
    )?;
    types.func_wrap(
        "[method]descriptor.append-via-stream",
        |mut store, (fd,): (Resource<Descriptor>,)| {
            let state: &mut CallState = store.data_mut();
            let made = state.filesystem().append_via_stream(fd);
            budgeted(state, made)
        },
    )?;
    types.func_wrap_async(
        "[method]descriptor.write",
        |mut store, (fd, buf, offset): (Resource<Descriptor>, Vec<u8>, Filesize)| {
            Box::new(async move {
                let state: &mut CallState = store.data_mut();
                if !state.writes.take(buf.len() as u64) {
                    return Ok((Err::<Filesize, _>(ErrorCode::InsufficientSpace),));
                }
                let mut view = state.filesystem();
                Ok((match view.write(fd, buf, offset).await {
                    Ok(n) => Ok(n),
                    Err(e) => Err(view.convert_error_code(e)?),
                },))
            })
        },
    )?;
    Ok(())
}

/// Replace `create-tcp-socket` and `create-udp-socket` with a refusal that
/// is audited (`socket.create deny`) and, past the free denials, paused.
/// No host socket is ever made for a tool: a flood of creations cost the
/// server its file descriptors before. The same refusal in both walls (in
/// the microVM the guest kernel has no network stack at all).
fn add_refused_sockets(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpAddressFamily};
    use wasmtime_wasi::p2::{TcpSocket, UdpSocket};
    fn refuse(state: &CallState, kind: &str, family: IpAddressFamily) -> Duration {
        let family = match family {
            IpAddressFamily::Ipv4 => "ipv4",
            IpAddressFamily::Ipv6 => "ipv6",
        };
        state.audit.record(
            "socket.create",
            format!("{kind} {family}"),
            Decision::Deny,
            "raw sockets are never granted; use outgoing HTTP",
        );
        state.audit.denial_pause()
    }
    linker.instance(WASI_TCP_CREATE)?.func_wrap_async(
        "create-tcp-socket",
        |store, (family,): (IpAddressFamily,)| {
            let pause = refuse(store.data(), "tcp", family);
            Box::new(async move {
                tokio::time::sleep(pause).await;
                Ok((Err::<Resource<TcpSocket>, _>(ErrorCode::AccessDenied),))
            })
        },
    )?;
    linker.instance(WASI_UDP_CREATE)?.func_wrap_async(
        "create-udp-socket",
        |store, (family,): (IpAddressFamily,)| {
            let pause = refuse(store.data(), "udp", family);
            Box::new(async move {
                tokio::time::sleep(pause).await;
                Ok((Err::<Resource<UdpSocket>, _>(ErrorCode::AccessDenied),))
            })
        },
    )?;
    Ok(())
}

/// The export index of a tool's function (inside its interface, if any).
/// Component-level indices are valid for every instance of the component, so
/// calls need no name lookups.
fn export_index(component: &Component, t: &Tool) -> Option<ComponentExportIndex> {
    let outer = match &t.interface {
        Some(i) => Some(component.get_export_index(None, i)?),
        None => None,
    };
    component.get_export_index(outer.as_ref(), &t.function)
}

fn build_wasi(
    grants: &GrantSet,
    audit: &AuditLog,
    stdout: &MemoryOutputPipe,
    stderr: &MemoryOutputPipe,
) -> Result<WasiCtx, String> {
    let mut b = WasiCtxBuilder::new();
    b.stdout(stdout.clone()).stderr(stderr.clone());
    for (k, v) in &grants.env {
        b.env(k, v);
    }
    for d in &grants.dirs {
        let perms = if d.writable {
            FsPerms::ReadWrite
        } else {
            FsPerms::ReadOnly
        };
        let mode = if d.writable { "rw" } else { "ro" };
        let dir = open_beneath(&d.root, &d.host_path).map_err(|e| {
            format!(
                "directory {} (granted as {}) cannot be opened beneath {}: {e}",
                d.host_path.display(),
                d.guest_path,
                d.root.display()
            )
        })?;
        // wasmtime-wasi takes a path, not a descriptor: hand it the one we
        // opened through /proc, which names this very directory whatever
        // happens to its path from now on.
        let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        b.preopened_dir(&by_fd, &d.guest_path, perms).map_err(|e| {
            format!(
                "directory {} (granted as {}) cannot be opened: {e:#}",
                d.host_path.display(),
                d.guest_path
            )
        })?;
        drop(dir);
        audit.record(
            "fs.preopen",
            format!("{} ({mode})", d.guest_path),
            Decision::Allow,
            format!(
                "granted by policy from host directory {}",
                d.host_path.display()
            ),
        );
    }
    // Sockets: off. Creating one is refused and audited by the wrapped
    // constructors (`add_refused_sockets`); the address check below stays
    // as a second wall.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    let sock_audit = audit.clone();
    b.socket_addr_check(move |addr, usage| {
        sock_audit.record(
            "socket.connect",
            format!("{usage:?} {addr}"),
            Decision::Deny,
            "raw sockets are never granted; use outgoing HTTP",
        );
        let pause = sock_audit.denial_pause();
        Box::pin(async move {
            tokio::time::sleep(pause).await;
            false
        })
    });
    Ok(b.build())
}

/// Open directory `path` beneath `root`: `root` is opened as given (it is
/// the operator's), then `path`'s components below it with `openat2`,
/// refusing `..`, symbolic links and magic links and anything that would
/// resolve outside `root`, so no rename or symlink swapped in by another
/// call can move the grant elsewhere.
fn open_beneath(
    root: &std::path::Path,
    path: &std::path::Path,
) -> Result<std::os::fd::OwnedFd, String> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    use nix::sys::stat::Mode;
    let rel = path
        .strip_prefix(root)
        .map_err(|_| "it is not inside its root".to_string())?;
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let root_fd =
        open(root, dir_flags, Mode::empty()).map_err(|e| format!("opening the root: {e}"))?;
    let rel = if rel.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new().flags(dir_flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    openat2(&root_fd, rel, how).map_err(|e| match e {
        nix::errno::Errno::ELOOP => {
            "a symbolic link is in the way (grants never follow links)".into()
        }
        nix::errno::Errno::EXDEV => "it resolves outside its root".into(),
        nix::errno::Errno::ENOTDIR => "it is not a directory".into(),
        e => e.desc().to_string(),
    })
}

fn classify(
    e: &wasmtime::Error,
    limiter: &MemoryLimiter,
    audit: &AuditLog,
    limits: crate::grants::Limits,
    pipes: [(&str, &MemoryOutputPipe); 2],
) -> CallError {
    let message = first_line(e);
    if limiter.hit {
        return CallError::OutOfMemory {
            limit_bytes: limits.memory_bytes,
        };
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
        audit.record(
            "limit.cpu",
            format!("{} fuel", limits.fuel),
            Decision::Deny,
            "the call used up its CPU budget",
        );
        return CallError::CpuLimit { fuel: limits.fuel };
    }
    if let Some(e) = output_overflow(audit, limits, pipes) {
        return e;
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::StackOverflow)) {
        audit.record(
            "limit.stack",
            "call stack",
            Decision::Deny,
            "the tool recursed until its call stack ran out",
        );
        return CallError::StackOverflow { message };
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return CallError::Trap {
            message: format!("the tool exited with status {}", exit.0),
        };
    }
    if let Some(d) = audit.first_denial() {
        return CallError::Denied {
            action: d.action,
            target: d.target,
            reason: d.reason,
            message,
        };
    }
    CallError::Trap { message }
}

/// The call's result as JSON, unless it is over `limits.max_result_bytes`
/// (refused before the JSON is built when even a lower bound of its size is
/// over, so a huge result costs no more host memory than it already did).
fn result_json(v: &Val, limits: crate::grants::Limits, audit: &AuditLog) -> CallResult {
    let max = limits.max_result_bytes;
    let too_large = || {
        audit.record(
            "limit.result",
            format!("{max} bytes"),
            Decision::Deny,
            "the tool's result is larger than allowed",
        );
        CallResult::Error(CallError::ResultLimit { limit_bytes: max })
    };
    if airlock_wasm_tools::value::json_size_at_least(v) > max {
        return too_large();
    }
    match val_to_json(v, "result") {
        Ok(json) => {
            if json_len(&json) > max {
                return too_large();
            }
            CallResult::Ok(json)
        }
        Err(e) => CallResult::Error(CallError::InvalidComponent {
            message: e.to_string(),
        }),
    }
}

/// The length of `v` serialized, without keeping the bytes.
fn json_len(v: &Value) -> u64 {
    struct Count(u64);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len() as u64;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// A stream that reached its cap: further writes failed (or trapped).
fn output_overflow(
    audit: &AuditLog,
    limits: crate::grants::Limits,
    pipes: [(&str, &MemoryOutputPipe); 2],
) -> Option<CallError> {
    let (name, _) = pipes
        .into_iter()
        .find(|(_, p)| p.contents().len() as u64 >= limits.max_output_bytes)?;
    audit.record(
        "limit.output",
        format!("{name} {} bytes", limits.max_output_bytes),
        Decision::Deny,
        "the call wrote more output than allowed; further writes failed",
    );
    Some(CallError::OutputLimit {
        stream: name.to_string(),
        limit_bytes: limits.max_output_bytes,
    })
}

/// One line saying what went wrong: each message of the error chain but
/// the "error while executing at wasm backtrace:" wrapper (its first line
/// alone said nothing), then the innermost named wasm function.
fn first_line(e: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let m = cause.to_string();
        let m = m.lines().next().unwrap_or("").trim();
        if m.is_empty()
            || m.starts_with("error while executing at wasm backtrace")
            || parts.iter().any(|p| p == m)
        {
            continue;
        }
        parts.push(m.to_string());
    }
    if let Some(name) = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
    {
        parts.push(format!("in {name}"));
    }
    if parts.is_empty() {
        return format!("{e}");
    }
    audit_safe(parts.join(": "))
}

/// Error messages are cut like audit targets: a tool chooses their text.
fn audit_safe(s: String) -> String {
    crate::audit::truncate(s, 1024)
}

#[cfg(all(test, feature = "compile", target_arch = "x86_64"))]
mod baseline_tests {
    use super::*;
    use wasmtime_environ::FlagValue;

    /// The ISA flags an engine enabled, as it wrote them into the engine
    /// section of an artifact (the list wasmtime checks against the CPU
    /// when the artifact is loaded).
    fn enabled_isa_flags(payload: &[u8]) -> Vec<String> {
        use object::{Object, ObjectSection};
        let file = object::File::parse(payload).expect("an artifact is an ELF file");
        let data = file
            .section_by_name(wasmtime_environ::obj::ELF_WASM_ENGINE)
            .expect("the engine section")
            .data()
            .expect("its data");
        // [section format 0][n][wasmtime version: n bytes][postcard metadata]
        let (&format, rest) = data.split_first().expect("format byte");
        assert_eq!(format, 0, "wasmtime changed its engine section format");
        let (&n, rest) = rest.split_first().expect("version length");
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[allow(dead_code)]
            target: String,
            #[allow(dead_code)]
            #[serde(borrow)]
            shared_flags: Vec<(&'a str, FlagValue<'a>)>,
            #[serde(borrow)]
            isa_flags: Vec<(&'a str, FlagValue<'a>)>,
        }
        let head: Head<'_> =
            postcard::from_bytes(&rest[usize::from(n)..]).expect("the engine metadata");
        head.isa_flags
            .into_iter()
            .filter(|(_, v)| *v == FlagValue::Bool(true))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// An empty component: enough to make the engine write its settings.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    fn compiled_code_uses_exactly_the_baseline_whatever_this_cpu_has() {
        let runner = Runner::new(EngineConfig {
            pooling: false,
            ..EngineConfig::default()
        })
        .unwrap();
        let payload = runner
            .engine()
            .precompile_component(EMPTY_COMPONENT)
            .unwrap();
        let mut enabled = enabled_isa_flags(&payload);
        enabled.sort();
        let mut want: Vec<String> = baseline::X86_CRANELIFT_FLAGS
            .iter()
            .map(|s| s.to_string())
            .collect();
        want.sort();
        let outside: Vec<&String> = enabled.iter().filter(|f| !want.contains(f)).collect();
        assert!(
            outside.is_empty(),
            "ISA flags outside the {} baseline: {outside:?} (all enabled: {enabled:?})",
            baseline::NAME
        );
        assert_eq!(enabled, want, "the baseline is not fully enabled");
        // And what `precompile` wraps is the same code.
        let wrapped = runner.precompile(EMPTY_COMPONENT).unwrap();
        let inner = artifact::unwrap(&runner.fingerprint(), &wrapped).unwrap();
        let mut again = enabled_isa_flags(inner);
        again.sort();
        assert_eq!(again, want);
    }

    #[test]
    fn the_fingerprint_names_the_baseline() {
        let f = EngineConfig::default().fingerprint();
        assert!(f.contains("isa=x86-64-v2"), "{f}");
    }
}
