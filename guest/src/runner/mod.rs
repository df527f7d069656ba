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
//!
//! Rooms: [`engine`] (the engine configuration and its CPU baseline),
//! [`outcome`] (what a call returns: result, error kinds, metering),
//! [`egress`] (the seam to the host's egress proxy), and `wasi` — what a
//! call's WASI world is made of, by capability (`fs`, `env`, `http`,
//! `sockets`).

pub mod egress;
pub mod engine;
pub mod outcome;
mod wasi;

pub use egress::*;
pub use engine::{EngineConfig, baseline};
pub use outcome::*;
use wasi::fs::{add_audited_changes, add_audited_open_at, add_budgeted_writes};
use wasi::sockets::add_refused_sockets;
use wasi::{
    CallState, EgressHooks, HOST_FIELDS_BYTES, WriteBudget, build_wasi, host_table_entries,
};

use crate::artifact::{self, ArtifactError};
use crate::audit::{AuditLog, Decision};
use crate::grants::GrantSet;
#[cfg(feature = "compile")]
use airlock_wasm_tools::contract;
use airlock_wasm_tools::contract::ContractError;
use airlock_wasm_tools::value::args_to_vals;
use airlock_wasm_tools::{Tool, ToolSet};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{
    Component, ComponentExportIndex, InstancePre, Linker, ResourceTable, Val,
};
use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi_http::WasiHttpCtx;

/// How often (in fuel units) a running call yields to the executor so the
/// wall-clock timeout can fire even in a tight loop.
pub(crate) const FUEL_YIELD_INTERVAL: u64 = 100_000;

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

/// Memory limiter that also measures the peak. The limit covers the
/// call's linear memories (`total`) and the bytes the host holds for it on
/// its behalf (`host`: `wasi:nn` tensors) together.
pub(crate) struct MemoryLimiter {
    pub(crate) limit: u64,
    pub(crate) total: u64,
    pub(crate) host: u64,
    pub(crate) peak: u64,
    pub(crate) hit: bool,
    pub(crate) audit: AuditLog,
}

impl MemoryLimiter {
    /// Hold `bytes` more on the host for the call: whether they fit beside
    /// its linear memory. When they do not, a `limit.memory` event names
    /// `what` (the caller decides whether the call ends: set `hit` and trap
    /// for `out_of_memory`).
    pub(crate) fn hold(&mut self, bytes: u64, what: &str) -> bool {
        let next = self.total + self.host.saturating_add(bytes);
        if next > self.limit {
            self.audit.record(
                "limit.memory",
                format!("{next} bytes"),
                Decision::Deny,
                format!(
                    "{what} beside linear memory would exceed the limit of {} bytes",
                    self.limit
                ),
            );
            return false;
        }
        self.host += bytes;
        self.peak = self.peak.max(next);
        true
    }

    /// The host no longer holds `bytes` for the call.
    pub(crate) fn release(&mut self, bytes: u64) {
        self.host = self.host.saturating_sub(bytes);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let next = self.total - current as u64 + desired as u64;
        if next + self.host > self.limit {
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
        self.peak = self.peak.max(next + self.host);
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
        linker.allow_shadowing(true);
        wasi::env::add_audited_environment(&mut linker)
            .map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_audited_open_at(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_refused_sockets(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_audited_changes(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        add_budgeted_writes(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
        wasi::nn::add_to_linker(&mut linker).map_err(|e| RunnerError::Engine(format!("{e:#}")))?;
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
                host: 0,
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
            nn: wasi::nn::NnState {
                models: grants.models.clone(),
            },
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

/// The export index of a tool's function (inside its interface, if any).
/// Component-level indices are valid for every instance of the component, so
/// calls need no name lookups.
pub(crate) fn export_index(component: &Component, t: &Tool) -> Option<ComponentExportIndex> {
    let outer = match &t.interface {
        Some(i) => Some(component.get_export_index(None, i)?),
        None => None,
    };
    component.get_export_index(outer.as_ref(), &t.function)
}
