//! Where tool calls run: one type for `airlock run`, `airlock vm multi` and
//! the service, in either wall.
//!
//! A [`CallSite`] is built once from the egress settings and, for VM
//! isolation, one [`VmSettings`]. It owns the host runner (compiling,
//! loading, process-isolation calls, both walls' egress proxy) and, in VM
//! isolation, the pool that boots microVMs. A call hands it a
//! [`Component`] (bytes from a file, or the service's stored component):
//! in process isolation the component is loaded and called here; in VM
//! isolation its precompiled artifact is loaded into a fresh microVM,
//! called once, and the VM is shut down.
//!
//! **Invariants:** whether this host can run the guest is checked once,
//! when the site is built, before anything is compiled; the
//! [`SandboxConfig`] every microVM boots from is made in one place
//! ([`VmSettings::sandbox_config`]); the grants a call gets in a VM are
//! the policy's decision ([`crate::policy::vm`]), never widened here.

use crate::egress::{EgressError, Proxy};
use crate::policy::vm::{SiteGrants, VmGrantError};
use crate::pool::Pool;
use crate::sandbox::{EGRESS_TIMEOUT, OpenShare, SandboxConfig, SandboxError};
use crate::weights::Weights;
use airlock_guest::{CallOutcome, EngineConfig, GrantSet, Loaded, Runner, RunnerError};
use airlock_vmm::VmmError;
use airlock_vmm::jail::JailConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// How long a guest may take to become ready: a boot takes seconds (a
/// minute nested); a guest not ready by then is retried on a fresh VM.
pub const READY_TIMEOUT: Duration = Duration::from_secs(150);

/// Errors of the call site.
#[derive(Debug, thiserror::Error)]
pub enum CallSiteError {
    /// VM isolation was asked for on a host that cannot run the guest.
    #[error("{0}")]
    Host(#[source] VmmError),
    /// The VMM binary is not where the settings say.
    #[error(
        "The VMM binary {0} is missing: build it (`cargo build -p airlock-vmm`, next to `airlock`) or name it in the settings."
    )]
    NoVmm(PathBuf),
    /// The host runner could not be made, or refused the component.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The egress proxy could not be set up (a bad extra CA).
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// The microVM (boot, load or call) failed.
    #[error("The microVM failed: {0}")]
    Vm(#[from] SandboxError),
    /// The policy's grants cannot be given to a microVM.
    #[error(transparent)]
    Grants(#[from] VmGrantError),
    /// The component could not be had (storage).
    #[error("{0}")]
    Component(String),
    /// The blocking VM task ended without an answer.
    #[error("The VM task failed: {0}")]
    Task(String),
}

/// Where the `airlock-vmm` binary is unless configured: next to this
/// program (how it is built and installed).
pub fn default_vmm_binary() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("airlock-vmm"))
        .unwrap_or_else(|_| PathBuf::from("airlock-vmm"))
}

/// The microVMs' settings: the one description of what a call's VM boots,
/// whether it comes from the CLI's flags or the service's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    /// The VMM binary every VM runs in (one process per VM).
    pub vmm: PathBuf,
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent image).
    pub initrd: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// VMs kept booted ahead of calls (0: boot per call).
    pub warm: usize,
    /// With `snapshots`: keep one VM parked (restored and waiting to run,
    /// [`crate::sandbox::Sandbox::park`]) for the next call that finds no
    /// warm one.
    pub park: bool,
    /// Calls holding a microVM at once, at most (booting, loading, running
    /// or shutting down); further calls wait for one to end, in order.
    /// With the warm pool's waiting VMs and the parked one, at most
    /// `max_vms + warm + 1` VMMs run.
    pub max_vms: usize,
    /// Weights directory and its erofs image: read-only grants inside the
    /// directory are served from the image over virtio-pmem.
    pub weights: Option<Weights>,
    /// Extra kernel command line.
    pub cmdline_extra: String,
    /// Fresh VMs tried before a call when boots or loads fail.
    pub boot_attempts: u32,
    /// How long one VM may live (warm VMs wait for calls; each call has
    /// its own limit inside).
    pub life_timeout: Duration,
    /// The jail every VMM process runs in, if any (see [`JailMode`]).
    pub jail: Option<JailConfig>,
    /// Where VM snapshots are cached (`crate::snapshots`): VMs start from
    /// one (with shares too: one per set of share tags); `None`: every VM
    /// boots.
    pub snapshots: Option<PathBuf>,
}

/// Whether VMM processes run jailed (`airlock_vmm::jail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JailMode {
    /// Jailed when this process runs as root (the default).
    #[default]
    Auto,
    /// Always jailed: refused unless root.
    On,
    /// Never jailed (seccomp and rlimits still apply).
    Off,
}

impl std::str::FromStr for JailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "expected \"auto\", \"on\" or \"off\", got {other:?}"
            )),
        }
    }
}

impl JailMode {
    /// The jail `cfg` when this mode jails in this process.
    pub fn resolve(self, cfg: JailConfig) -> Option<JailConfig> {
        match self {
            Self::On => Some(cfg),
            Self::Off => None,
            Self::Auto => nix::unistd::geteuid().is_root().then_some(cfg),
        }
    }
}

impl VmSettings {
    /// The sandbox configuration every VM of this site boots from, for a
    /// host engine with `engine` fingerprint; each VM's egress proxy is a
    /// fresh copy of `egress`.
    pub fn sandbox_config(&self, engine: String, egress: &Proxy) -> SandboxConfig {
        SandboxConfig {
            vmm: self.vmm.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            memory_mib: self.memory_mib,
            vcpus: 1,
            ready_timeout: READY_TIMEOUT,
            life_timeout: self.life_timeout,
            engine,
            weights: self.weights.as_ref().map(|w| w.image.clone()),
            cmdline_extra: self.cmdline_extra.clone(),
            boot_attempts: self.boot_attempts,
            egress: egress.fresh(),
            jail: self.jail.clone(),
            snapshots: self
                .snapshots
                .clone()
                .map(|root| Arc::new(crate::snapshots::SnapshotCache::new(root))),
        }
    }
}

/// A component as a call site needs it: loaded (process isolation) or
/// precompiled for the runner's engine (VM isolation).
pub trait Component: Send + Sync {
    /// The component compiled and linked by `runner`.
    ///
    /// # Errors
    /// It cannot be had or does not compile.
    fn loaded(&self, runner: &Runner) -> Result<Arc<Loaded>, CallSiteError>;
    /// The component precompiled by `runner`, in its artifact envelope.
    ///
    /// # Errors
    /// It cannot be had or does not compile.
    fn artifact(&self, runner: &Runner) -> Result<Vec<u8>, CallSiteError>;
    /// Doc comments by function name (they only shape descriptions).
    fn docs(&self) -> BTreeMap<String, String> {
        BTreeMap::new()
    }
}

/// A component from its bytes (a file the CLI read). It is compiled once,
/// however many calls use it (`airlock vm multi` loads it into several VMs
/// at once): the first call compiles, the others wait for that.
#[derive(Default)]
pub struct WasmBytes {
    bytes: Vec<u8>,
    artifact: std::sync::Mutex<Option<Vec<u8>>>,
    loaded: std::sync::Mutex<Option<Arc<Loaded>>>,
}

impl std::fmt::Debug for WasmBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmBytes")
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl WasmBytes {
    /// The component in `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            ..Self::default()
        }
    }
}

impl Component for WasmBytes {
    fn loaded(&self, runner: &Runner) -> Result<Arc<Loaded>, CallSiteError> {
        let mut l = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = &*l {
            return Ok(l.clone());
        }
        let fresh = Arc::new(runner.load_wasm(&self.bytes)?);
        *l = Some(fresh.clone());
        Ok(fresh)
    }

    fn artifact(&self, runner: &Runner) -> Result<Vec<u8>, CallSiteError> {
        let mut a = self.artifact.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = &*a {
            return Ok(a.clone());
        }
        let fresh = runner.precompile(&self.bytes)?;
        *a = Some(fresh.clone());
        Ok(fresh)
    }

    fn docs(&self) -> BTreeMap<String, String> {
        airlock_wasm_tools::docs::from_component(&self.bytes).functions
    }
}

/// One call's answer.
#[derive(Debug, Clone)]
pub struct Called {
    /// The outcome.
    pub outcome: CallOutcome,
    /// In VM isolation: how long the guest took to be ready.
    pub ready_after: Option<Duration>,
    /// In VM isolation: how its VM started.
    pub start: Option<crate::sandbox::Start>,
    /// In VM isolation: when each step of the VM's becoming ready ended
    /// ([`Sandbox::ready_steps`](crate::sandbox::Sandbox::ready_steps)).
    pub ready_steps: Vec<(&'static str, Duration)>,
    /// In VM isolation: from the VM ready to the component loaded in it.
    pub load: Option<Duration>,
    /// In VM isolation: the call itself, sent to answered.
    pub invoke: Option<Duration>,
    /// In VM isolation: the VMM's report of its VM's end (`airlock-vmm`'s
    /// JSON: exit, wall time, memory), when it ended cleanly.
    pub vm_end: Option<serde_json::Value>,
}

struct VmSite {
    settings: VmSettings,
    pool: Pool,
    /// One permit per VM a call may hold (`max_vms`); FIFO, so a flood
    /// queues in arrival order and no call starves.
    slots: Arc<tokio::sync::Semaphore>,
    /// Calls waiting for a permit now.
    waiting: AtomicI64,
}

impl VmSite {
    /// Calls holding a VM now.
    fn holding(&self) -> i64 {
        (self.settings.max_vms.max(1) - self.slots.available_permits()) as i64
    }

    /// Wait (counted in `waiting`) for one of the `max_vms` permits.
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CallSiteError> {
        let _w = Waiting::new(&self.waiting);
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| CallSiteError::Task(e.to_string()))
    }
}

/// Counts a waiting call for as long as it lives.
struct Waiting<'a>(&'a AtomicI64);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicI64) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Self(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where calls run (see the module docs).
pub struct CallSite {
    runner: Runner,
    vm: Option<VmSite>,
    /// Calls in this process at once, at most: the engine's instance pool.
    /// Further async calls wait for a slot instead of failing.
    slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for CallSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSite")
            .field("isolation", &self.isolation())
            .finish_non_exhaustive()
    }
}

impl CallSite {
    /// A site with a runner made from `engine` whose HTTP (in either wall)
    /// goes through one egress proxy trusting `egress_ca` besides the
    /// Mozilla roots; with `vm`, calls run in microVMs booted from it.
    ///
    /// # Errors
    /// [`CallSiteError::Host`] when VM isolation is asked for on a host
    /// that cannot run the guest (checked first, before anything else);
    /// a bad CA; an engine or pool that cannot start.
    pub fn new(
        engine: EngineConfig,
        egress_ca: &[u8],
        vm: Option<VmSettings>,
    ) -> Result<Self, CallSiteError> {
        if let Some(v) = &vm {
            airlock_vmm::check_host().map_err(CallSiteError::Host)?;
            if !v.vmm.is_file() {
                return Err(CallSiteError::NoVmm(v.vmm.clone()));
            }
            if let Some(j) = &v.jail {
                airlock_vmm::jail::require_root()
                    .map_err(|e| CallSiteError::Vm(SandboxError::Jail(e)))?;
                airlock_vmm::jail::sweep(j);
            }
        }
        let proxy = Proxy::with_extra_roots(EGRESS_TIMEOUT, egress_ca)?;
        let template = proxy.fresh();
        let slots = Arc::new(tokio::sync::Semaphore::new(
            engine.pool_instances.max(1) as usize
        ));
        let runner = Runner::new(engine)?.with_egress(Arc::new(proxy));
        let vm = match vm {
            None => None,
            Some(settings) => {
                let cfg = settings.sandbox_config(runner.fingerprint(), &template);
                let pool = Pool::start(cfg, settings.warm, settings.park)?;
                Some(VmSite {
                    slots: Arc::new(tokio::sync::Semaphore::new(settings.max_vms.max(1))),
                    settings,
                    pool,
                    waiting: AtomicI64::new(0),
                })
            }
        };
        Ok(Self { runner, vm, slots })
    }

    /// The host runner (compiles, loads, inspects; runs process calls).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }

    /// `"vm"` or `"process"`.
    pub fn isolation(&self) -> &'static str {
        if self.vm.is_some() { "vm" } else { "process" }
    }

    /// The VM pool, in VM isolation.
    pub fn pool(&self) -> Option<&Pool> {
        self.vm.as_ref().map(|v| &v.pool)
    }

    /// Calls holding a microVM now (booting, loading, running or shutting
    /// it down).
    pub fn vm_calls(&self) -> i64 {
        self.vm.as_ref().map_or(0, VmSite::holding)
    }

    /// Calls waiting for a microVM now (`max_vms` are held).
    pub fn vm_waiting(&self) -> i64 {
        self.vm
            .as_ref()
            .map_or(0, |v| v.waiting.load(Ordering::SeqCst))
    }

    /// Stop the pool and reap its VMs (also done on drop).
    pub fn shutdown(&self) {
        if let Some(v) = &self.vm {
            v.pool.shutdown();
        }
    }

    /// The grants a call gets at this site, from the policy's grant set:
    /// unchanged in process isolation, translated for the guest (and its
    /// shares) by [`crate::policy::vm::for_vm`] in VM isolation.
    ///
    /// # Errors
    /// A grant a microVM cannot be given, named.
    pub fn grants(&self, grants: GrantSet) -> Result<SiteGrants, VmGrantError> {
        match &self.vm {
            None => Ok(SiteGrants {
                grants,
                shares: Vec::new(),
            }),
            Some(v) => crate::policy::vm::for_vm(
                &grants,
                v.settings.weights.as_ref().map(|w| w.dir.as_path()),
            ),
        }
    }

    /// One call, blocking: in this process, or in a fresh microVM that is
    /// shut down after.
    ///
    /// # Errors
    /// The component cannot be had; the microVM failed. (A tool's own
    /// failure is an outcome, not an error.)
    pub fn call(
        &self,
        component: &dyn Component,
        tool: &str,
        args: &serde_json::Value,
        grants: &SiteGrants,
    ) -> Result<Called, CallSiteError> {
        self.call_when(component, tool, args, grants, &|| {})
    }

    /// [`CallSite::call`], running `ready` once the component is loaded
    /// (or failed to be) and before the call is sent — `airlock vm multi`
    /// waits there until every VM is up, so the calls overlap.
    ///
    /// # Errors
    /// As [`CallSite::call`].
    pub fn call_when(
        &self,
        component: &dyn Component,
        tool: &str,
        args: &serde_json::Value,
        grants: &SiteGrants,
        ready: &dyn Fn(),
    ) -> Result<Called, CallSiteError> {
        let Some(vm) = &self.vm else {
            let loaded = component.loaded(&self.runner);
            ready();
            let loaded = loaded?;
            return Ok(Called {
                outcome: self.runner.invoke(&loaded, tool, args, &grants.grants),
                ready_after: None,
                start: None,
                ready_steps: Vec::new(),
                load: None,
                invoke: None,
                vm_end: None,
            });
        };
        let _slot = futures_executor::block_on(vm.permit())?;
        Self::call_in_vm(&self.runner, vm, component, tool, args, grants, ready)
    }

    /// A call in a fresh microVM, its `max_vms` permit held by the caller.
    /// A call with shares starts a VM of its own with them (warm VMs have
    /// none), each directory opened here beneath its root first; one that
    /// cannot be opened is not shared, and the guest's runner fails the
    /// call with the process wall's error at the same point of the call.
    fn call_in_vm(
        runner: &Runner,
        vm: &VmSite,
        component: &dyn Component,
        tool: &str,
        args: &serde_json::Value,
        grants: &SiteGrants,
        ready: &dyn Fn(),
    ) -> Result<Called, CallSiteError> {
        let mut guest = grants.grants.clone();
        let mut shares = Vec::new();
        for share in &grants.shares {
            match share.open() {
                Ok(dir) => shares.push(OpenShare {
                    tag: share.tag.clone(),
                    mount: share.mount.clone(),
                    read_only: !share.grant.writable,
                    dir,
                }),
                Err(why) => {
                    for d in guest.dirs.iter_mut().filter(|d| d.host_path == share.mount) {
                        d.refused = Some(why.clone());
                    }
                }
            }
        }
        let taken = component.artifact(runner).and_then(|artifact| {
            Ok(vm.pool.take_loaded_with(
                &shares,
                guest.limits.max_write_bytes,
                &artifact,
                &runner.fingerprint(),
                &component.docs(),
            )?)
        });
        // The VMM has what it needs of the directories.
        drop(shares);
        ready();
        let (mut sb, digest) = taken?;
        tracing::debug!(ready_ms = sb.ready_after.as_millis() as u64, start = sb.start.label(), boot = ?sb.boot, "guest ready");
        let load = Some(sb.load_time);
        let invoking = Instant::now();
        let result = sb.invoke(&digest, tool, args, &guest);
        let invoke = Some(invoking.elapsed());
        let ready_after = Some(sb.ready_after);
        let start = Some(sb.start);
        let ready_steps = sb.ready_steps.clone();
        let vm_end = match sb.shutdown() {
            Ok(r) => {
                tracing::debug!(exit = ?r.exit, wall_ms = r.wall.as_millis() as u64, "VM ended");
                Some(r.report)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a microVM did not shut down cleanly");
                None
            }
        };
        Ok(Called {
            outcome: result?,
            ready_after,
            start,
            ready_steps,
            load,
            invoke,
            vm_end,
        })
    }

    /// One call from async code: process calls run on the runner's async
    /// path, waiting for a slot of the engine's instance pool when every
    /// slot is taken (a burst queues instead of failing); VM calls wait
    /// for one of `max_vms` permits here, without a thread, then run on a
    /// blocking thread.
    ///
    /// # Errors
    /// As [`CallSite::call`].
    pub async fn call_async(
        self: &Arc<Self>,
        component: Arc<dyn Component>,
        tool: String,
        args: serde_json::Value,
        grants: SiteGrants,
    ) -> Result<Called, CallSiteError> {
        let Some(vm) = &self.vm else {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|e| CallSiteError::Task(e.to_string()))?;
            let loaded = component.loaded(&self.runner)?;
            let outcome = self
                .runner
                .invoke_async(&loaded, &tool, &args, &grants.grants)
                .await;
            return Ok(Called {
                outcome,
                ready_after: None,
                start: None,
                ready_steps: Vec::new(),
                load: None,
                invoke: None,
                vm_end: None,
            });
        };
        let slot = vm.permit().await?;
        let site = self.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            match &site.vm {
                Some(vm) => {
                    Self::call_in_vm(&site.runner, vm, &*component, &tool, &args, &grants, &|| {})
                }
                None => Err(CallSiteError::Task("the site lost its VMs".into())),
            }
        })
        .await
        .map_err(|e| CallSiteError::Task(e.to_string()))?
    }
}
