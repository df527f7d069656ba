//! The sandbox lifecycle: boot a microVM → wait until its agent says Hello
//! over vsock → load a precompiled component → invoke → shut down.
//!
//! The VM runs in its own process (`airlock-vmm`, through
//! [`VmProcess`]), so a VMM killed by its confinement takes down one VM,
//! never the daemon; the host talks to
//! the guest agent through the VM's hybrid-vsock Unix socket
//! (`CONNECT 1024\n`). Until the guest listens, its kernel resets our
//! connection and we retry, so "ready" means the agent accepted and sent
//! `Hello` with its boot-stage times.
//!
//! **Invariants:** every path out of a [`Sandbox`] — shutdown, a host-side
//! error, a guest that never becomes ready, a guest panic, drop — stops the
//! VM and joins its thread; the socket directory is removed with it.

use crate::egress::{EgressError, Proxy};
use crate::snapshots::SnapshotCache;
use airlock_guest::proto::{self, BootStage, FrameLimits, Message, ProtoError};
use airlock_guest::{CallOutcome, GrantSet};
use airlock_vmm::jail::{JailConfig, VmJail};
use airlock_vmm::process::{ProcessEnd, ProcessError, VmProcess};
use airlock_vmm::{SnapshotPlan, VmConfig, VmExit, VsockConfig};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The egress proxy's time limit per request, in both walls.
pub const EGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// How many fresh VMs [`Sandbox::boot_and_load`] tries before giving up,
/// unless [`SandboxConfig::boot_attempts`] says otherwise.
pub const BOOT_ATTEMPTS: u32 = 3;

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// Sandbox errors.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The VMM process could not start or ended without a report.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The guest ended before it was ready.
    #[error("The guest stopped before it was ready ({exit}); console tail:\n{console}")]
    GuestEnded {
        /// How it ended.
        exit: String,
        /// The last console lines.
        console: String,
    },
    /// The guest did not become ready in time.
    #[error("The guest was not ready within {0:?}; console tail:\n{1}")]
    NotReady(Duration, String),
    /// The guest's engine differs from ours: artifacts would not load.
    #[error("The guest's engine is {guest:?}, the host's is {host:?}.")]
    EngineMismatch {
        /// Guest fingerprint.
        guest: String,
        /// Host fingerprint.
        host: String,
    },
    /// The connection failed.
    #[error("The guest connection failed: {0}.")]
    Proto(#[from] ProtoError),
    /// The guest answered with an error or something unexpected.
    #[error("The guest answered: {0}.")]
    Guest(String),
    /// The guest refused its refresh (entropy, clock, or the shares a
    /// restored VM mounts then): the VM started, so its snapshot is sound.
    #[error("The guest could not take its refresh (entropy, clock or shares): {0}")]
    Refresh(String),
    /// A local I/O error.
    #[error("Sandbox I/O: {0}.")]
    Io(#[from] std::io::Error),
    /// The egress proxy could not be set up.
    #[error(transparent)]
    Egress(#[from] EgressError),
    /// The VM's jail could not be set up.
    #[error(transparent)]
    Jail(#[from] airlock_vmm::jail::JailError),
}

impl SandboxError {
    /// A failure of the VM or its connection (worth one retry on a fresh VM
    /// before a call), as opposed to a refusal that would repeat.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SandboxError::NotReady(..)
                | SandboxError::GuestEnded { .. }
                | SandboxError::Proto(_)
                | SandboxError::Io(_)
        )
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The VMM binary (`airlock-vmm`) each VM runs in.
    pub vmm: PathBuf,
    /// Guest kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Guest initramfs (the agent image, not the self-test one).
    pub initrd: PathBuf,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// How long the guest may take to become ready.
    pub ready_timeout: Duration,
    /// Upper bound on the VM's whole life.
    pub life_timeout: Duration,
    /// The host engine fingerprint the guest must match.
    pub engine: String,
    /// A read-only weights image (erofs, size a multiple of 2 MiB), shared
    /// with the guest over virtio-pmem and mounted (DAX) at `/weights`.
    pub weights: Option<PathBuf>,
    /// Extra guest kernel command line (diagnostics, e.g. `ignore_loglevel`).
    pub cmdline_extra: String,
    /// Fresh VMs [`Sandbox::boot_and_load`] tries in all (at least 1).
    pub boot_attempts: u32,
    /// The egress proxy every VM gets a [`Proxy::fresh`] copy of: its
    /// trust (the Mozilla roots and any private CA) built once.
    pub egress: Proxy,
    /// The jail each VMM process runs in (`airlock_vmm::jail`), if any.
    pub jail: Option<JailConfig>,
    /// Where VMs start from: their shape's snapshot (memory, weights,
    /// share tags), made once (`None`: every VM boots).
    pub snapshots: Option<Arc<SnapshotCache>>,
}

/// How a sandbox's VM started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Restored from its shape's snapshot.
    Restore,
    /// Booted (no snapshot, or a restore that failed).
    Boot,
}

impl Start {
    /// `restore` or `boot`, as answers and metrics say it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Restore => "restore",
            Self::Boot => "boot",
        }
    }
}

/// A host directory a VM gets over virtio-fs, opened by the host beneath
/// its grant's root before the boot (`policy::vm`): the VMM inherits this
/// descriptor, never a path.
#[derive(Debug)]
pub struct OpenShare {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where the guest mounts it.
    pub mount: PathBuf,
    /// Mounted and served read-only.
    pub read_only: bool,
    /// The directory.
    pub dir: std::os::fd::OwnedFd,
}

/// A running microVM with its agent connected.
pub struct Sandbox {
    conn: UnixStream,
    vm: Option<VmProcess>,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
    proxy: Proxy,
    egress: Option<(PathBuf, JoinHandle<()>)>,
    /// Guest boot stages (µs since its kernel started), as reported in Hello.
    pub boot: Vec<BootStage>,
    /// Host wall time from `boot()` to the agent's Hello.
    pub ready_after: Duration,
    /// How the VM started.
    pub start: Start,
    /// How long the last [`Sandbox::load`] took.
    pub load_time: Duration,
    /// When each step of becoming ready ended, from the start: the VMM
    /// process `spawned`, the agent `connected`, its `hello` read (its
    /// refresh applied).
    pub ready_steps: Vec<(&'static str, Duration)>,
    /// When the start began, on the clock the VMM reports its own times on
    /// ([`airlock_vmm::monotonic_ns`]); the VMM's report gets it as
    /// `clock_ns.host_start`.
    started_ns: u64,
    next_id: u64,
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn exit_text(e: &VmExit) -> String {
    match e {
        VmExit::Reset => "reset (power-off or panic)".into(),
        VmExit::Halted => "halted".into(),
        VmExit::Timeout => "timeout".into(),
        VmExit::Stopped => "stopped by the host".into(),
        VmExit::Paused => "paused for a snapshot".into(),
        VmExit::Error(m) => format!("KVM error: {m}"),
    }
}

/// Connect to the VM's hybrid-vsock socket and ask for the agent's port;
/// `None` when the socket is not there yet.
fn connect_request(uds: &Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .ok()?;
    Some(s)
}

/// Whether the agent accepted a [`connect_request`] (`false` while the
/// guest is not listening yet).
fn read_ok(s: &mut UnixStream) -> bool {
    let mut line = String::new();
    // Read byte by byte: the agent's first frame follows the OK line.
    let mut r = BufReader::with_capacity(1, s);
    r.read_line(&mut line).is_ok() && line.starts_with("OK ")
}

/// The largest `Result` frame an honest guest sends for a call under
/// `limits`: the result's JSON, both output streams with every byte
/// escaped (`\u00XX`), a full audit trail, and room for the rest. So no call
/// within its limits ever meets the frame cap, and a guest cannot make the
/// host read more than the limits allow.
pub fn outcome_json_cap(limits: &airlock_guest::Limits) -> u32 {
    use airlock_guest::audit::caps;
    let audit = caps::MAX_EVENTS as u64
        * (64 + caps::MAX_TARGET_BYTES + caps::MAX_REASON_BYTES + 128) as u64
        * 6;
    let total = limits.max_result_bytes + 6 * 2 * limits.max_output_bytes + audit + (256 << 10);
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// What the guest sent, held to the call's limits on the host: the guest
/// is not trusted to have kept them. A result over `max_result` becomes the
/// same `result_limit` error the runner gives; output is cut to
/// `max_output`; audit events are capped by the caller.
pub fn hold_to_limits(mut o: CallOutcome, limits: &airlock_guest::Limits) -> CallOutcome {
    use airlock_guest::{CallError, CallResult, Decision};
    if let CallResult::Ok(v) = &o.result {
        let len = serde_json::to_vec(v).map_or(u64::MAX, |b| b.len() as u64);
        if len > limits.max_result_bytes {
            tracing::warn!(
                len,
                "the guest sent a result over max_result; refused on the host"
            );
            o.result = CallResult::Error(CallError::ResultLimit {
                limit_bytes: limits.max_result_bytes,
            });
            o.audit.push(airlock_guest::AuditEvent {
                at_us: o.metering.wall_us,
                action: "limit.result".into(),
                target: format!("{} bytes", limits.max_result_bytes),
                decision: Decision::Deny,
                reason: "the guest sent a result larger than allowed; the host refused it".into(),
            });
        }
    }
    for s in [&mut o.stdout, &mut o.stderr] {
        let max = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
        if s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
    }
    o
}

impl Sandbox {
    /// Boot a VM and wait for its agent.
    ///
    /// # Errors
    /// The host cannot run VMs, the guest ends or is not ready in time, or
    /// its engine differs. The VM is stopped and joined in every case.
    pub fn boot(cfg: &SandboxConfig) -> Result<Self, SandboxError> {
        Self::boot_with(cfg, &[], 0)
    }

    /// [`Sandbox::boot`] with `shares` mounted in the guest, which may
    /// write at most `write_limit` bytes into them together (the call's
    /// write limit, held by the host's file server too). With
    /// `cfg.snapshots`, the VM is restored from its shape's snapshot (made
    /// now if there is none; the shape counts the shares' tags) and mounts
    /// the shares when its refresh names them; if the snapshot cannot be
    /// had or the restore fails, it boots, with a warning (the sandbox's
    /// `start` says which). A refresh the restored guest refuses (a share
    /// that would not mount) is the call's error, not a reason to boot.
    ///
    /// # Errors
    /// As [`Sandbox::boot`].
    pub fn boot_with(
        cfg: &SandboxConfig,
        shares: &[OpenShare],
        write_limit: u64,
    ) -> Result<Self, SandboxError> {
        // A VM with shares restores from the snapshot of its shape (how
        // many shares, their tags), made before any mount; it mounts the
        // call's directories when the refresh tells it where.
        if let Some(cache) = cfg.snapshots.as_ref() {
            let shape = vm_config(cfg, shares, write_limit, Path::new(""), false);
            match cache.plan(&cfg.vmm, &shape, &|making| make_snapshot(cfg, making)) {
                Ok(plan) => match Self::start(cfg, shares, write_limit, Some(plan.clone())) {
                    Ok(sb) => return Ok(sb),
                    // The VM restored and answered; what failed (a share
                    // that would not mount) would fail a boot as well.
                    Err(e @ SandboxError::Refresh(_)) => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "restoring the VM snapshot failed; booting instead (the snapshot will be made again)");
                        cache.forget(&plan);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "no VM snapshot; booting instead");
                }
            }
        }
        Self::start(cfg, shares, write_limit, None)
    }

    /// Start one VM: restored by `plan`, else booted.
    fn start(
        cfg: &SandboxConfig,
        shares: &[OpenShare],
        write_limit: u64,
        plan: Option<SnapshotPlan>,
    ) -> Result<Self, SandboxError> {
        Self::spawn(cfg, shares, write_limit, plan, false)?.ready(cfg, Reach::Connect)
    }

    /// A VM restored from the snapshot of the share-less shape of `cfg`
    /// and parked: its VMM process runs, jailed and filtered, the guest
    /// resumed from the snapshot, and the host connects to its agent as
    /// it does to any restored VM; but the agent gets nothing (no refresh:
    /// no fresh entropy, no clock, no share) until [`Parked::go`], and the
    /// VM's life begins then. Nothing of a call is in it.
    ///
    /// # Errors
    /// `cfg` has no snapshot cache or the snapshot cannot be had (made
    /// now when missing); the VMM process cannot be started.
    pub fn park(cfg: &SandboxConfig) -> Result<Parked, SandboxError> {
        let cache = cfg
            .snapshots
            .as_ref()
            .ok_or_else(|| SandboxError::Guest("parking needs VM snapshots".into()))?;
        let shape = vm_config(cfg, &[], 0, Path::new(""), false);
        let plan = cache
            .plan(&cfg.vmm, &shape, &|making| make_snapshot(cfg, making))
            .map_err(|e| SandboxError::Guest(format!("no snapshot to park a VM from: {e}")))?;
        let spawned = Self::spawn(cfg, &[], 0, Some(plan), true)?;
        // The host's connection is made now, while the VMM sets the VM up
        // (as for any restore): the VMM queues it for the guest, which
        // takes it once it runs; a thread waits for that.
        let poll = Duration::from_millis(2);
        loop {
            if let Some(c) = connect_request(&spawned.uds) {
                let accepted = Arc::new(Accepted::default());
                let waiting = c.try_clone()?;
                waiting.set_read_timeout(Some(cfg.ready_timeout))?;
                let a = accepted.clone();
                std::thread::Builder::new()
                    .name("airlock-park".into())
                    .spawn(move || {
                        let mut waiting = waiting;
                        a.set(read_ok(&mut waiting));
                    })?;
                return Ok(Parked {
                    spawned,
                    conn: c,
                    accepted,
                });
            }
            if spawned.sb.vm.as_ref().is_none_or(VmProcess::is_finished)
                || spawned.start.elapsed() > cfg.ready_timeout
            {
                let mut sb = spawned.sb;
                return Err(sb.ended(|end| format!("the VM to park {end}")));
            }
            std::thread::sleep(poll);
        }
    }

    /// Start the VMM process of one VM (restored by `plan`, else booted;
    /// parked first when `park`): its socket directory, jail and egress
    /// proxy, then the process. The agent is not reached yet.
    fn spawn(
        cfg: &SandboxConfig,
        shares: &[OpenShare],
        write_limit: u64,
        plan: Option<SnapshotPlan>,
        park: bool,
    ) -> Result<Spawned, SandboxError> {
        use std::os::fd::AsFd;
        // Whether this host can run the guest at all was checked once, by
        // the call site; `airlock_vmm::run` refuses such a host again.
        let start = Instant::now();
        let started_ns = airlock_vmm::monotonic_ns();
        let dir = airlock_vmm::jail::fresh_dir("airlock-vm")?;
        // The VM's sockets live in `dir/run` (the directory a jailed VMM
        // sees as its /run/vsock); a jail's root is `dir/root`.
        let sockets = dir.join("run");
        std::fs::create_dir_all(&sockets)?;
        let uds = sockets.join("vsock.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let kind = if plan.is_some() {
            Start::Restore
        } else {
            Start::Boot
        };
        // A booted VM mounts its shares from its command line, a restored
        // one when its refresh says so.
        let mut vm_cfg = vm_config(cfg, shares, write_limit, &uds, plan.is_none());
        vm_cfg.snapshot = plan;
        vm_cfg.park = park.then(|| Arc::new(airlock_vmm::Park::default()));
        let mounts: Vec<proto::Mount> = match kind {
            Start::Restore => shares
                .iter()
                .map(|s| proto::Mount {
                    tag: s.tag.clone(),
                    path: s.mount.to_string_lossy().into_owned(),
                    read_only: s.read_only,
                })
                .collect(),
            Start::Boot => Vec::new(),
        };
        let cleanup = |e: SandboxError| {
            let _ = std::fs::remove_dir_all(&dir);
            e
        };
        let jail = cfg
            .jail
            .as_ref()
            .map(|j| VmJail::prepare(j, &dir, &vm_cfg))
            .transpose()
            .map_err(|e| cleanup(e.into()))?;
        // The guest reaches the egress proxy at host port EGRESS_PORT, which
        // the vsock device bridges to `<uds>_<port>`.
        let proxy = cfg.egress.fresh();
        let egress_path = PathBuf::from(format!(
            "{}_{}",
            uds.display(),
            airlock_guest::egress::EGRESS_PORT
        ));
        let egress = spawn_egress(&egress_path, proxy.clone(), stop.clone()).map_err(cleanup)?;
        let handed = jail.as_ref().map_or(Ok(()), |j| j.hand_over(&egress_path));
        let vm = match handed.map_err(SandboxError::from).and_then(|()| {
            let fds: Vec<_> = shares.iter().map(|s| s.dir.as_fd()).collect();
            Ok(VmProcess::spawn_inheriting(&cfg.vmm, &vm_cfg, jail, &fds)?)
        }) {
            Ok(vm) => vm,
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                let _ = UnixStream::connect(&egress_path);
                let _ = egress.join();
                return Err(cleanup(e));
            }
        };
        let sb = Self {
            conn: UnixStream::pair()?.0,
            vm: Some(vm),
            stop,
            dir,
            proxy,
            egress: Some((egress_path, egress)),
            boot: Vec::new(),
            ready_after: Duration::ZERO,
            start: kind,
            load_time: Duration::ZERO,
            ready_steps: vec![("spawned", start.elapsed())],
            started_ns,
            next_id: 1,
        };
        Ok(Spawned {
            sb,
            uds,
            mounts,
            start,
        })
    }

    /// Boot a VM and load `artifact` into it. If the guest never became
    /// ready, ended early, or the connection failed during the load, the VM
    /// is reaped and the whole thing is tried again on a fresh VM (up to
    /// `cfg.boot_attempts` in all): the tool has not run yet, so nothing can happen twice. Refusals (engine
    /// mismatch, an artifact the guest rejects) are not retried.
    ///
    /// # Errors
    /// The last attempt's error.
    pub fn boot_and_load(
        cfg: &SandboxConfig,
        artifact: &[u8],
        engine: &str,
        docs: &std::collections::BTreeMap<String, String>,
    ) -> Result<(Self, String), SandboxError> {
        Self::retry_before_call(
            || Self::boot(cfg),
            cfg.boot_attempts,
            artifact,
            engine,
            docs,
        )
    }

    /// Load into a sandbox from `get`, with the retry of [`boot_and_load`](Self::boot_and_load).
    ///
    /// # Errors
    /// The last attempt's error.
    pub fn retry_before_call(
        mut get: impl FnMut() -> Result<Self, SandboxError>,
        attempts: u32,
        artifact: &[u8],
        engine: &str,
        docs: &std::collections::BTreeMap<String, String>,
    ) -> Result<(Self, String), SandboxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = get().and_then(|mut sb| match sb.load(artifact, engine, docs.clone()) {
                Ok((digest, _tools)) => Ok((sb, digest)),
                Err(e) => {
                    // Reap the VM now and keep what its console said.
                    if let Ok(r) = sb.finish() {
                        tracing::warn!(exit = %exit_text(&r.exit), console = %tail(&r.console, 20), "the load failed");
                    }
                    Err(e)
                }
            });
            match result {
                Err(e) if attempt < attempts && e.is_transient() => {
                    tracing::warn!(error = %e, "the microVM failed before the call; retrying on a fresh one");
                }
                other => return other,
            }
        }
    }

    /// Whether the VM is still running (a warm sandbox may have ended).
    pub fn is_alive(&self) -> bool {
        self.vm.as_ref().is_some_and(|p| !p.is_finished())
    }

    /// Give the guest fresh entropy and the wall clock
    /// ([`Message::Refresh`]): every VM gets its own, whether it booted or
    /// was restored from a snapshot its siblings share. It is the
    /// session's first frame; the agent's Hello answers it once applied.
    fn send_refresh(&mut self, mounts: Vec<proto::Mount>) -> Result<(), SandboxError> {
        let mut seed = [0u8; airlock_guest::proto::REFRESH_SEED];
        getrandom::fill(&mut seed)
            .map_err(|e| SandboxError::Guest(format!("no host entropy for the guest: {e}")))?;
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        proto::write_frame(&mut self.conn, &Message::Refresh { unix_ns, mounts }, &seed)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Message, SandboxError> {
        Ok(proto::read_frame(&mut self.conn, FrameLimits::default())?.msg)
    }

    /// Load a precompiled artifact (made by the host runner with the same
    /// engine). Returns its digest and tool names.
    ///
    /// # Errors
    /// The guest refused it.
    pub fn load(
        &mut self,
        artifact: &[u8],
        engine: &str,
        docs: std::collections::BTreeMap<String, String>,
    ) -> Result<(String, Vec<String>), SandboxError> {
        let started = Instant::now();
        let payload = airlock_guest::artifact::unwrap(engine, artifact)
            .map_err(|e| SandboxError::Guest(e.to_string()))?;
        let digest = hex::encode(Sha256::digest(payload));
        tracing::debug!(%digest, artifact_bytes = artifact.len(), "loading into the guest");
        proto::write_frame(
            &mut self.conn,
            &Message::Load {
                digest: digest.clone(),
                docs,
            },
            artifact,
        )?;
        let answer = self.recv()?;
        self.load_time = started.elapsed();
        match answer {
            Message::Loaded { digest, tools } => Ok((digest, tools)),
            Message::Error { message, .. } => Err(SandboxError::Guest(message)),
            other => Err(SandboxError::Guest(format!(
                "expected Loaded, got {other:?}"
            ))),
        }
    }

    /// Run one call in the guest.
    ///
    /// # Errors
    /// The connection failed or the guest refused the call.
    pub fn invoke(
        &mut self,
        digest: &str,
        tool: &str,
        args: &serde_json::Value,
        grants: &GrantSet,
    ) -> Result<CallOutcome, SandboxError> {
        let id = self.next_id;
        self.next_id += 1;
        // The guest enforces the call's wall limit; waiting a little longer
        // than that here catches a guest that stopped answering.
        let limit = Duration::from_millis(grants.limits.timeout_ms) + Duration::from_secs(30);
        self.conn.set_read_timeout(Some(limit))?;
        self.proxy.begin_call(grants.http.clone());
        let answer = self.call(id, digest, tool, args, grants);
        let proxied = self.proxy.end_call();
        let mut outcome = answer?;
        // The host proxy's own decisions join the guest's record of the
        // call, under the same caps the guest's runner keeps (the guest is
        // not trusted to have kept them).
        let log = airlock_guest::audit::AuditLog::new(std::time::Instant::now());
        log.extend(std::mem::take(&mut outcome.audit), outcome.audit_dropped);
        log.extend(proxied, 0);
        outcome.audit = log.snapshot();
        outcome.audit_dropped = log.dropped();
        outcome.audit.sort_by_key(|e| e.at_us);
        Ok(outcome)
    }

    fn call(
        &mut self,
        id: u64,
        digest: &str,
        tool: &str,
        args: &serde_json::Value,
        grants: &GrantSet,
    ) -> Result<CallOutcome, SandboxError> {
        proto::write_frame(
            &mut self.conn,
            &Message::Invoke {
                id,
                digest: digest.to_string(),
                tool: tool.to_string(),
                args: args.clone(),
                grants: grants.clone(),
            },
            b"",
        )?;
        let limits = FrameLimits {
            max_json: outcome_json_cap(&grants.limits),
            max_blob: 0,
        };
        match proto::read_frame(&mut self.conn, limits)?.msg {
            Message::Result { id: got, outcome } if got == id => {
                Ok(hold_to_limits(*outcome, &grants.limits))
            }
            Message::Error { message, .. } => Err(SandboxError::Guest(message)),
            other => Err(SandboxError::Guest(format!(
                "expected Result {id}, got {other:?}"
            ))),
        }
    }

    /// Ask the guest to power off and wait for the VM to end.
    ///
    /// # Errors
    /// The VMM process ended without a report.
    pub fn shutdown(mut self) -> Result<ProcessEnd, SandboxError> {
        let _ = proto::write_frame(&mut self.conn, &Message::Shutdown, b"");
        if let Some(p) = &self.vm {
            p.wait_until_finished(Some(Instant::now() + Duration::from_secs(30)));
        }
        self.finish()
    }

    /// Stop and reap the VM ([`Sandbox::finish`]) and say how it ended:
    /// `exit` words its end (`reset`, `timeout`, …), the console's tail
    /// goes along. A failure to reap is the error instead.
    fn ended(&mut self, exit: impl FnOnce(String) -> String) -> SandboxError {
        match self.finish() {
            Ok(report) => SandboxError::GuestEnded {
                exit: exit(exit_text(&report.exit)),
                console: tail(&report.console, 30),
            },
            Err(e) => e,
        }
    }

    /// Stop the VM (if still running), reap its process, remove the socket
    /// directory.
    fn finish(&mut self) -> Result<ProcessEnd, SandboxError> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if let Some((path, t)) = self.egress.take() {
            // Wake the accept loop so it sees `stop`.
            let _ = UnixStream::connect(&path);
            let _ = t.join();
        }
        let r = match self.vm.take() {
            Some(p) => p.wait(),
            None => {
                return Err(SandboxError::Guest("the VM was already finished".into()));
            }
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        let mut end = r?;
        if end.report.is_object() {
            end.report["clock_ns"]["host_start"] = self.started_ns.into();
        }
        Ok(end)
    }
}

/// A VM whose VMM process runs (booting, restoring, or parked) and whose
/// agent the host has not reached yet.
struct Spawned {
    sb: Sandbox,
    uds: PathBuf,
    mounts: Vec<proto::Mount>,
    /// When its start began: what its ready time counts from.
    start: Instant,
}

/// How [`Spawned::ready`] reaches the agent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Poll the VM's socket until the agent takes a connection, then
    /// refresh it.
    Connect,
    /// Connected and refreshed already (a parked VM taken).
    Refreshed,
}

impl Spawned {
    /// Reach the agent (as `reach` says), refresh it and read its Hello:
    /// the sandbox is ready.
    fn ready(self, cfg: &SandboxConfig, reach: Reach) -> Result<Sandbox, SandboxError> {
        let Spawned {
            mut sb,
            uds,
            mounts,
            start,
        } = self;
        let kind = sb.start;
        match reach {
            Reach::Refreshed => {}
            Reach::Connect => {
                // A restored guest listens already: its socket appears
                // with the VMM's devices, so look often. A booting one
                // takes a second or more, and every early connection costs
                // it a reset.
                let poll = Duration::from_millis(if kind == Start::Restore { 2 } else { 20 });
                loop {
                    if sb.vm.as_ref().is_some_and(VmProcess::is_finished) {
                        return Err(sb.ended(|end| end));
                    }
                    if start.elapsed() > cfg.ready_timeout {
                        let report = sb.finish()?;
                        return Err(SandboxError::NotReady(
                            cfg.ready_timeout,
                            tail(&report.console, 30),
                        ));
                    }
                    if let Some(mut c) = connect_request(&uds)
                        && read_ok(&mut c)
                    {
                        sb.conn = c;
                        break;
                    }
                    std::thread::sleep(poll);
                }
                sb.ready_steps.push(("connected", start.elapsed()));
                // Fresh entropy and the clock go out at once: the guest
                // answers Hello once it has applied them.
                sb.send_refresh(mounts)?;
            }
        }
        // The agent's Hello (its refresh applied) makes it ready.
        let left = cfg.ready_timeout.saturating_sub(start.elapsed());
        sb.conn
            .set_read_timeout(Some(left.max(Duration::from_secs(1))))?;
        let hello = match sb.recv() {
            Ok(m) => m,
            Err(e) => {
                // Say what became of the VM, not only of its connection.
                return Err(sb.ended(|end| format!("{e}; then the VM {end}")));
            }
        };
        match hello {
            Message::Hello { engine, boot, .. } => {
                if engine != cfg.engine {
                    return Err(SandboxError::EngineMismatch {
                        guest: engine,
                        host: cfg.engine.clone(),
                    });
                }
                sb.boot = boot;
            }
            Message::Error { message, .. } => return Err(SandboxError::Refresh(message)),
            other => {
                return Err(SandboxError::Guest(format!(
                    "expected Hello, got {other:?}"
                )));
            }
        }
        sb.conn.set_read_timeout(Some(cfg.life_timeout))?;
        sb.ready_after = start.elapsed();
        sb.ready_steps.push(("hello", sb.ready_after));
        Ok(sb)
    }
}

/// Whether a parked VM's agent took the host's connection: unknown
/// until the thread reading the VMM's answer sets it.
#[derive(Default)]
struct Accepted {
    answer: Mutex<Option<bool>>,
    told: Condvar,
}

impl Accepted {
    fn set(&self, ok: bool) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(ok);
        self.told.notify_all();
    }

    fn now(&self) -> Option<bool> {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for the answer (the reading thread gives one within the ready
    /// timeout: the socket's own).
    fn wait(&self) -> bool {
        let mut answer = self.answer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(ok) = *answer {
                return ok;
            }
            answer = self.told.wait(answer).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A restored VM started ahead of a call ([`Sandbox::park`]): its guest
/// runs and its agent has (or is about to have) the host's connection,
/// but has been told nothing. Dropped without [`Parked::go`], its VMM is
/// stopped.
pub struct Parked {
    spawned: Spawned,
    /// Its `CONNECT` line written; the VMM's `OK` goes to `accepted`.
    conn: UnixStream,
    accepted: Arc<Accepted>,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("vm", &self.spawned.sb.vm)
            .field("accepted", &self.accepted.now())
            .finish_non_exhaustive()
    }
}

impl Parked {
    /// Whether its VMM process still runs and its agent has not failed to
    /// take the host's connection.
    pub fn is_alive(&self) -> bool {
        self.spawned.sb.is_alive() && self.accepted.now() != Some(false)
    }

    /// Reap it and say how it ended (for one found not alive: its VMM's
    /// exit, e.g. past its parked CPU allowance, and the console's tail).
    pub fn end(mut self) -> SandboxError {
        self.spawned
            .sb
            .ended(|exit| format!("the parked VM ended before its call: {exit}"))
    }

    /// Whether its agent has taken the host's connection (else the guest
    /// is still getting there: [`Parked::go`] then waits for it too).
    pub fn is_parked(&self) -> bool {
        self.accepted.now() == Some(true)
    }

    /// Refresh its guest (entropy, clock), begin its life and make the
    /// sandbox ready; its ready time counts from this call.
    ///
    /// # Errors
    /// As [`Sandbox::boot`]; the VM is stopped and reaped.
    pub fn go(self, cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let Parked {
            mut spawned,
            conn,
            accepted,
        } = self;
        spawned.start = Instant::now();
        spawned.sb.started_ns = airlock_vmm::monotonic_ns();
        spawned.sb.ready_steps.clear();
        if !accepted.wait() {
            return Err(spawned
                .sb
                .ended(|end| format!("the parked VM did not accept the host; then it {end}")));
        }
        spawned
            .sb
            .ready_steps
            .push(("connected", spawned.start.elapsed()));
        // The refresh first, so the guest is at it while the VMM hears
        // that the VM's life begins.
        spawned.sb.conn = conn;
        let mounts = std::mem::take(&mut spawned.mounts);
        spawned.sb.send_refresh(mounts)?;
        spawned
            .sb
            .ready_steps
            .push(("refresh", spawned.start.elapsed()));
        let went = spawned.sb.vm.as_mut().map(VmProcess::go);
        spawned.sb.ready_steps.push(("go", spawned.start.elapsed()));
        match went {
            Some(Ok(())) => spawned.ready(cfg, Reach::Refreshed),
            _ => Err(spawned
                .sb
                .ended(|end| format!("the parked VM could not go; it {end}"))),
        }
    }
}

/// The VMM configuration of a VM of `cfg` with `shares` (its vsock socket
/// at `uds`); `mount_at_boot`: its command line tells the guest where to
/// mount them (a booted VM), else its refresh will (a restored one — the
/// snapshot's command line names no mounts).
fn vm_config(
    cfg: &SandboxConfig,
    shares: &[OpenShare],
    write_limit: u64,
    uds: &Path,
    mount_at_boot: bool,
) -> VmConfig {
    use std::os::fd::AsRawFd;
    VmConfig {
        kernel: cfg.kernel.clone(),
        initrd: cfg.initrd.clone(),
        cmdline_extra: {
            let mut c = format!("airlock.port={AGENT_PORT}");
            if cfg.weights.is_some() {
                c.push_str(" airlock.weights=/dev/pmem0:/weights");
            }
            if mount_at_boot && !shares.is_empty() {
                let mounts: Vec<String> = shares
                    .iter()
                    .map(|s| {
                        let ro = if s.read_only { ":ro" } else { "" };
                        format!("{}:{}{ro}", s.tag, s.mount.display())
                    })
                    .collect();
                c.push_str(" airlock.fs=");
                c.push_str(&mounts.join(","));
            }
            if !cfg.cmdline_extra.is_empty() {
                c.push(' ');
                c.push_str(&cfg.cmdline_extra);
            }
            c
        },
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        timeout: cfg.life_timeout,
        console_cap: 256 << 10,
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: uds.to_path_buf(),
        }),
        // The VMM process is stopped through its stdin pipe.
        stop: None,
        pmem: cfg.weights.clone(),
        shares: shares
            .iter()
            .map(|s| airlock_vmm::ShareConfig::by_fd(s.tag.clone(), s.dir.as_raw_fd(), s.read_only))
            .collect(),
        seccomp: None,
        seccomp_selftest: false,
        jail_selftest: None,
        report_threads: false,
        share_write_limit: (!shares.is_empty()).then_some(write_limit),
        snapshot: None,
        park: None,
    }
}

/// Run `making` (a VM of `cfg` that snapshots itself, see
/// [`SnapshotCache::plan`]) to its end, jailed like every VM of `cfg`,
/// within `cfg.ready_timeout`.
fn make_snapshot(cfg: &SandboxConfig, making: &VmConfig) -> Result<(), String> {
    use std::os::fd::{AsFd, AsRawFd};
    let dir = airlock_vmm::jail::fresh_dir("airlock-snap").map_err(|e| e.to_string())?;
    let made = (|| {
        let sockets = dir.join("run");
        std::fs::create_dir_all(&sockets).map_err(|e| e.to_string())?;
        let mut making = making.clone();
        making.timeout = cfg.ready_timeout;
        // The making VM never mounts its shares (the snapshot is taken
        // before): each is served from an empty read-only directory, never
        // from the directories of the call that asked for the shape.
        let empty = dir.join("empty");
        std::fs::create_dir(&empty).map_err(|e| e.to_string())?;
        let empty = std::fs::File::open(&empty).map_err(|e| e.to_string())?;
        for s in &mut making.shares {
            *s = airlock_vmm::ShareConfig::by_fd(s.tag.clone(), empty.as_raw_fd(), true);
        }
        if let Some(v) = making.vsock.as_mut() {
            v.uds_path = sockets.join("vsock.sock");
        }
        let jail = cfg
            .jail
            .as_ref()
            .map(|j| VmJail::prepare(j, &dir, &making))
            .transpose()
            .map_err(|e| e.to_string())?;
        let vm = VmProcess::spawn_inheriting(&cfg.vmm, &making, jail, &[empty.as_fd()])
            .map_err(|e| e.to_string())?;
        // The VM ends by itself (paused, or at its timeout); `wait` stops
        // whatever is still running.
        vm.wait_until_finished(Some(
            Instant::now() + cfg.ready_timeout + Duration::from_secs(30),
        ));
        let end = vm.wait().map_err(|e| e.to_string())?;
        match end.exit {
            VmExit::Paused => Ok(()),
            other => Err(format!(
                "ended as {} instead of pausing at the guest's listening stage; its console: {}",
                exit_text(&other),
                tail(&end.console, 20)
            )),
        }
    })();
    let _ = std::fs::remove_dir_all(&dir);
    made
}

/// The egress proxy's accept loop: one request per connection, in order.
fn spawn_egress(
    path: &Path,
    proxy: Proxy,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, SandboxError> {
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    Ok(std::thread::Builder::new()
        .name("airlock-egress".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                if let Err(e) = airlock_guest::egress::serve_one(&mut conn, |r| proxy.handle(r)) {
                    tracing::warn!(error = %e, "egress connection failed");
                }
            }
        })?)
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.vm.is_some() {
            let _ = self.finish();
        }
    }
}

#[cfg(test)]
mod limits_tests {
    use super::*;
    use airlock_guest::{CallError, CallResult, Limits, Metering};

    fn outcome(result: CallResult, stdout: String) -> CallOutcome {
        CallOutcome {
            tool: "t".into(),
            result,
            metering: Metering::default(),
            audit: Vec::new(),
            audit_dropped: 0,
            stdout,
            stderr: String::new(),
        }
    }

    /// Review items 11 and 13: the worst an honest guest sends under the
    /// limits fits the frame cap; what a lying guest sends past them is
    /// cut back on the host.
    #[test]
    fn guest_outcomes_are_held_to_the_calls_limits_on_the_host() {
        let limits = Limits::default();
        let worst = outcome(
            CallResult::Ok(serde_json::Value::String(
                "r".repeat(limits.max_result_bytes as usize - 2),
            )),
            "\u{1}".repeat(limits.max_output_bytes as usize),
        );
        let mut worst = worst;
        worst.stderr = worst.stdout.clone();
        let json = serde_json::to_vec(&Message::Result {
            id: 1,
            outcome: Box::new(worst),
        })
        .unwrap();
        assert!(
            (json.len() as u64) < u64::from(outcome_json_cap(&limits)),
            "{} bytes over the cap of {}",
            json.len(),
            outcome_json_cap(&limits)
        );
        // A guest that claims a 2 MiB result under a 1 MiB cap, and more
        // output than allowed.
        let lying = outcome(
            CallResult::Ok(serde_json::Value::String("x".repeat(2 << 20))),
            "y".repeat((limits.max_output_bytes + 10) as usize),
        );
        let held = hold_to_limits(lying, &limits);
        assert_eq!(
            held.result,
            CallResult::Error(CallError::ResultLimit {
                limit_bytes: limits.max_result_bytes
            })
        );
        assert_eq!(held.stdout.len() as u64, limits.max_output_bytes);
        assert!(held.audit.iter().any(|e| e.action == "limit.result"));
        // Within limits nothing changes.
        let fine = outcome(CallResult::Ok(serde_json::json!({"a": 1})), "ok".into());
        assert_eq!(hold_to_limits(fine.clone(), &limits), fine);
    }
}
