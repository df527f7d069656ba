//! One VMM per process: the `airlock-vmm` binary's command line (both
//! sides of it, defined once here) and [`VmProcess`], the parent's handle
//! on a running VMM process.
//!
//! Running each VM's VMM in its own process is what lets a per-VM jail and
//! seccomp filters confine it without confining the daemon: a VMM that is
//! killed (by a filter, an rlimit, a bug) takes one VM down, never the
//! service.
//!
//! **Invariants:**
//! * The parent holds the write end of the child's stdin; with
//!   `--stop-on-stdin-eof` the VMM stops its VM (exit `stopped`) when that
//!   pipe closes — when the parent drops the handle, stops it, or dies. No
//!   VMM outlives the process that started it.
//! * The child's report is one JSON object on stdout (what
//!   [`crate::RunReport::to_json`] prints), read whole by a thread so the
//!   child never blocks on a full pipe; a report larger than
//!   [`MAX_REPORT`] is cut (the console in it is already capped).
//! * [`VmProcess::wait`] reaps the child on every path; a child that does
//!   not end within [`STOP_GRACE`] of being stopped is killed.

use crate::{VmConfig, VmExit, VsockConfig};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Open files a VMM process may hold (soft and hard limit): its own
/// (KVM, VM, vCPUs, eventfds, epolls, the vsock listener) and the host
/// streams the guest's vsock connections are bridged to. A guest opening
/// connection after connection runs into this, not into the host's table.
pub const MAX_OPEN_FILES: u64 = 512;

/// The descriptors a VMM for `cfg` may hold: [`MAX_OPEN_FILES`], plus for
/// each virtio-fs share what its guest may make it hold (its inode and
/// handle caps, its root and `/proc/self/fd`) — so a guest walking a share
/// runs into the share's cap, never into the VMM's other descriptors.
pub fn open_files_for(cfg: &VmConfig) -> u64 {
    let l = crate::devices::fs::share::ShareLimits::default();
    MAX_OPEN_FILES + cfg.shares.len() as u64 * (l.max_inodes + l.max_handles + 2) as u64
}

/// Confine the calling VMM process before it does anything else: no core
/// dumps (they would hold guest memory), not dumpable (no ptrace or
/// /proc/<pid>/mem by same-uid processes), at most `open_files`
/// descriptors ([`open_files_for`] its configuration) — or, when this
/// process may not raise its hard limit that far (not root), its hard
/// limit; the shares then get less ([`ShareLimits::within`](crate::devices::fs::share::ShareLimits::within)).
///
/// # Errors
/// A limit cannot be set.
pub fn confine_self(open_files: u64) -> std::io::Result<()> {
    let open_files =
        match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((_, hard)) if hard < open_files && !nix::unistd::geteuid().is_root() => hard,
            _ => open_files,
        };
    let set = |resource, value: u64| {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit(2) with a valid, initialised struct.
        if unsafe { libc::setrlimit(resource, &lim) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::RLIMIT_CORE, 0)?;
    set(libc::RLIMIT_NOFILE, open_files)?;
    // SAFETY: prctl(2) PR_SET_DUMPABLE with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Largest report read from a child.
pub const MAX_REPORT: u64 = 4 << 20;
/// How long a stopped VMM may take to end before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Errors of the process side.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A flag is unknown, lacks its value or has a bad one.
    #[error("{0}")]
    Usage(String),
    /// The VMM binary could not be started or waited for.
    #[error("The VMM process {binary} cannot be run: {source}.")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VMM ended without a report (it was killed, or refused its
    /// configuration: its stderr says why).
    #[error("The VMM process ended without a report ({status}): {stderr}")]
    NoReport {
        /// How it ended.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
}

/// The usage line of `airlock-vmm`.
pub const USAGE: &str = "usage: airlock-vmm --kernel FILE --initrd FILE [--cmdline TEXT] [--memory-mib N] [--vcpus N] [--timeout-secs N] [--pmem FILE] [--share TAG=DIR]... [--share-ro TAG=DIR]... [--share-write-limit BYTES] [--vsock-uds PATH --guest-cid N] [--console-cap BYTES] [--stop-on-stdin-eof [--park [--park-cpu GRACE_MS,PER_MILLE]]] [--seccomp enforce|log|off] [--seccomp-selftest] [--jail-root DIR --jail-uid N --jail-gid N [--jail-cgroup DIR] [--jail-selftest keeper-gone|memory|tasks]] [--snapshot-at STAGE --snapshot-dir DIR | --restore DIR] [--snapshot-identity JSON]";

/// What `airlock-vmm`'s flags ask for.
#[derive(Debug)]
pub struct ProcessArgs {
    /// The VM (without filters or a stop flag: the process adds them).
    pub cfg: VmConfig,
    /// Stop the VM when stdin closes.
    pub stop_on_stdin_eof: bool,
    /// Seccomp filters: enforced (the default), logged, or none.
    pub seccomp: Option<crate::seccomp::Mode>,
    /// The jail to enter first, if any.
    pub jail: Option<crate::jail::JailSpec>,
    /// Park the VM ([`crate::VmConfig::park`]): its life begins when a
    /// byte arrives on stdin; until then it may use this much CPU.
    pub park: Option<crate::ParkCpu>,
}

/// A configuration as `airlock-vmm` flags, plus whether to stop on stdin EOF.
pub fn to_args(cfg: &VmConfig, stop_on_stdin_eof: bool) -> Vec<String> {
    let mut a = vec![
        "--kernel".into(),
        cfg.kernel.display().to_string(),
        "--initrd".into(),
        cfg.initrd.display().to_string(),
        "--cmdline".into(),
        cfg.cmdline_extra.clone(),
        "--memory-mib".into(),
        cfg.memory_mib.to_string(),
        "--vcpus".into(),
        cfg.vcpus.to_string(),
        "--timeout-secs".into(),
        cfg.timeout.as_secs().max(1).to_string(),
        "--console-cap".into(),
        cfg.console_cap.to_string(),
    ];
    if let Some(p) = &cfg.pmem {
        a.extend(["--pmem".into(), p.display().to_string()]);
    }
    for s in &cfg.shares {
        a.extend([
            if s.read_only { "--share-ro" } else { "--share" }.into(),
            format!("{}={}", s.tag, s.dir.display()),
        ]);
    }
    if let Some(n) = cfg.share_write_limit {
        a.extend(["--share-write-limit".into(), n.to_string()]);
    }
    if let Some(v) = &cfg.vsock {
        a.extend([
            "--vsock-uds".into(),
            v.uds_path.display().to_string(),
            "--guest-cid".into(),
            v.guest_cid.to_string(),
        ]);
    }
    if stop_on_stdin_eof {
        a.push("--stop-on-stdin-eof".into());
        if let Some(park) = &cfg.park {
            a.extend(["--park".into(), "--park-cpu".into(), park.cpu().to_arg()]);
        }
    }
    if let Some(t) = cfg.jail_selftest {
        a.extend(["--jail-selftest".into(), t.name().into()]);
    }
    if cfg.report_threads {
        a.push("--report-threads".into());
    }
    match &cfg.snapshot {
        Some(crate::SnapshotPlan::Make { at, dir, .. }) => a.extend([
            "--snapshot-at".into(),
            at.clone(),
            "--snapshot-dir".into(),
            dir.display().to_string(),
        ]),
        Some(crate::SnapshotPlan::Restore { dir, .. }) => {
            a.extend(["--restore".into(), dir.display().to_string()]);
        }
        None => {}
    }
    if let Some(
        crate::SnapshotPlan::Make { identity, .. } | crate::SnapshotPlan::Restore { identity, .. },
    ) = &cfg.snapshot
        && let Some(json) = identity
            .as_ref()
            .and_then(|i| serde_json::to_string(i).ok())
    {
        a.extend(["--snapshot-identity".into(), json]);
    }
    a
}

/// Parse `airlock-vmm` flags.
///
/// # Errors
/// [`ProcessError::Usage`] naming the flag.
pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<ProcessArgs, ProcessError> {
    let mut cfg = VmConfig::new(PathBuf::new(), PathBuf::new());
    let (mut uds, mut cid, mut stop_on_eof, mut park) = (None, None, false, false);
    let (mut jail_root, mut jail_uid, mut jail_gid, mut jail_cgroup) = (None, None, None, None);
    let (mut snapshot_at, mut snapshot_dir, mut restore) = (None, None, None);
    let (mut snapshot_identity, mut park_cpu) = (None, None);
    let mut seccomp = Some(crate::seccomp::Mode::Enforce);
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--stop-on-stdin-eof" => {
                stop_on_eof = true;
                continue;
            }
            "--park" => {
                park = true;
                continue;
            }
            "--seccomp-selftest" => {
                cfg.seccomp_selftest = true;
                continue;
            }
            "--report-threads" => {
                cfg.report_threads = true;
                continue;
            }
            _ => {}
        }
        let value = args
            .next()
            .ok_or_else(|| ProcessError::Usage(format!("{flag} needs a value")))?;
        let number = |what: &str| -> Result<u64, ProcessError> {
            value
                .parse()
                .map_err(|_| ProcessError::Usage(format!("{what} must be a number, got {value:?}")))
        };
        match flag.as_str() {
            "--kernel" => cfg.kernel = value.into(),
            "--initrd" => cfg.initrd = value.into(),
            "--cmdline" => cfg.cmdline_extra = value,
            "--pmem" => cfg.pmem = Some(value.into()),
            "--share" | "--share-ro" => {
                let (tag, dir) = value.split_once('=').ok_or_else(|| {
                    ProcessError::Usage(format!("{flag} takes TAG=DIR, got {value:?}"))
                })?;
                cfg.shares.push(crate::ShareConfig {
                    tag: tag.into(),
                    dir: dir.into(),
                    read_only: flag == "--share-ro",
                });
            }
            "--share-write-limit" => cfg.share_write_limit = Some(number("--share-write-limit")?),
            "--vsock-uds" => uds = Some(PathBuf::from(value)),
            "--guest-cid" => cid = Some(number("--guest-cid")?),
            "--memory-mib" => {
                cfg.memory_mib = number("--memory-mib")?.try_into().unwrap_or(u32::MAX)
            }
            "--vcpus" => cfg.vcpus = number("--vcpus")?.try_into().unwrap_or(u8::MAX),
            "--timeout-secs" => cfg.timeout = Duration::from_secs(number("--timeout-secs")?),
            "--seccomp" => {
                seccomp = match value.as_str() {
                    "enforce" => Some(crate::seccomp::Mode::Enforce),
                    "log" => Some(crate::seccomp::Mode::Log),
                    "off" => None,
                    other => {
                        return Err(ProcessError::Usage(format!(
                            "--seccomp must be enforce, log or off, got {other:?}"
                        )));
                    }
                };
            }
            "--jail-selftest" => {
                cfg.jail_selftest = Some(value.parse().map_err(ProcessError::Usage)?);
            }
            "--jail-root" => jail_root = Some(PathBuf::from(value)),
            "--jail-uid" => jail_uid = Some(jail_id("--jail-uid", number("--jail-uid")?)?),
            "--jail-gid" => jail_gid = Some(jail_id("--jail-gid", number("--jail-gid")?)?),
            "--jail-cgroup" => jail_cgroup = Some(PathBuf::from(value)),
            "--snapshot-at" => snapshot_at = Some(value),
            "--snapshot-dir" => snapshot_dir = Some(PathBuf::from(value)),
            "--snapshot-identity" => {
                snapshot_identity = Some(serde_json::from_str(&value).map_err(|e| {
                    ProcessError::Usage(format!(
                        "--snapshot-identity: not a snapshot identity (JSON): {e}"
                    ))
                })?);
            }
            "--restore" => restore = Some(PathBuf::from(value)),
            "--park-cpu" => {
                park_cpu = Some(crate::ParkCpu::from_arg(&value).map_err(ProcessError::Usage)?);
            }
            "--console-cap" => {
                cfg.console_cap = number("--console-cap")?.try_into().unwrap_or(usize::MAX);
            }
            other => return Err(ProcessError::Usage(format!("unknown flag {other}"))),
        }
    }
    if cfg.kernel.as_os_str().is_empty() || cfg.initrd.as_os_str().is_empty() {
        return Err(ProcessError::Usage(
            "--kernel and --initrd are required".into(),
        ));
    }
    cfg.vsock = match (uds, cid) {
        (Some(uds_path), Some(guest_cid)) => Some(VsockConfig {
            guest_cid,
            uds_path,
        }),
        (None, None) => None,
        _ => {
            return Err(ProcessError::Usage(
                "--vsock-uds and --guest-cid go together".into(),
            ));
        }
    };
    cfg.snapshot = match (snapshot_at, snapshot_dir, restore) {
        (Some(at), Some(dir), None) => Some(crate::SnapshotPlan::Make {
            at,
            dir,
            identity: snapshot_identity.take(),
        }),
        (None, None, Some(dir)) => Some(crate::SnapshotPlan::Restore {
            dir,
            identity: snapshot_identity.take(),
        }),
        (None, None, None) => None,
        _ => {
            return Err(ProcessError::Usage(
                "--snapshot-at and --snapshot-dir go together, and not with --restore".into(),
            ));
        }
    };
    let jail = match (jail_root, jail_uid, jail_gid) {
        (Some(root), Some(uid), Some(gid)) => Some(crate::jail::JailSpec {
            root,
            uid,
            gid,
            cgroup: jail_cgroup,
        }),
        (None, None, None) if jail_cgroup.is_none() => None,
        _ => {
            return Err(ProcessError::Usage(
                "--jail-root, --jail-uid and --jail-gid go together (and --jail-cgroup needs them)"
                    .into(),
            ));
        }
    };
    if snapshot_identity.is_some() {
        return Err(ProcessError::Usage(
            "--snapshot-identity goes with --snapshot-at or --restore".into(),
        ));
    }
    if cfg.jail_selftest.is_some() && jail.is_none() {
        return Err(ProcessError::Usage(
            "--jail-selftest needs the jail (--jail-*)".into(),
        ));
    }
    if park && !stop_on_eof {
        return Err(ProcessError::Usage(
            "--park needs --stop-on-stdin-eof (the word to run comes on stdin)".into(),
        ));
    }
    if park_cpu.is_some() && !park {
        return Err(ProcessError::Usage("--park-cpu goes with --park".into()));
    }
    if park && matches!(cfg.snapshot, Some(crate::SnapshotPlan::Make { .. })) {
        return Err(ProcessError::Usage(
            "--park does not go with --snapshot-at".into(),
        ));
    }
    if cfg.seccomp_selftest && seccomp.is_none() {
        return Err(ProcessError::Usage(
            "--seccomp-selftest needs the filters (not --seccomp off)".into(),
        ));
    }
    Ok(ProcessArgs {
        cfg,
        stop_on_stdin_eof: stop_on_eof,
        seccomp,
        jail,
        park: park.then(|| park_cpu.unwrap_or_default()),
    })
}

/// A jail uid or gid: never root's.
fn jail_id(flag: &str, n: u64) -> Result<u32, ProcessError> {
    match u32::try_from(n) {
        Ok(id) if id != 0 && id != u32::MAX => Ok(id),
        _ => Err(ProcessError::Usage(format!(
            "{flag} must be an unprivileged id (1..4294967295), got {n}"
        ))),
    }
}

/// How a VMM process's run ended, from its report.
#[derive(Debug, Clone)]
pub struct ProcessEnd {
    /// How the VM ended.
    pub exit: VmExit,
    /// The guest console (capped by the child).
    pub console: String,
    /// The child's wall time from VM creation to the end.
    pub wall: Duration,
    /// The whole report.
    pub report: serde_json::Value,
}

impl VmExit {
    /// The exit a [`VmExit::label`] names.
    pub fn from_label(label: &str) -> Self {
        match label {
            "reset" => VmExit::Reset,
            "halted" => VmExit::Halted,
            "timeout" => VmExit::Timeout,
            "stopped" => VmExit::Stopped,
            "snapshot" => VmExit::Paused,
            other => VmExit::Error(other.strip_prefix("error: ").unwrap_or(other).to_string()),
        }
    }
}

/// A VMM running in its own process.
pub struct VmProcess {
    binary: PathBuf,
    child: Child,
    /// The stop pipe: dropping it stops the VM.
    stdin: Option<ChildStdin>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    stopped_at: Option<Instant>,
    /// Released (its cgroup removed) after the child is reaped.
    jail: Option<crate::jail::VmJail>,
}

impl std::fmt::Debug for VmProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmProcess")
            .field("binary", &self.binary)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

/// How often [`VmProcess::wait_until_finished`] looks where it has no pidfd.
const LOOK_EVERY: Duration = Duration::from_millis(10);

/// A pidfd for the (unreaped) child `pid`, if the kernel has them.
fn open_pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; nothing of this process's memory is passed. The
    // pid is our own child, not yet reaped, so it names that process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Block until `fd` is readable (a pidfd: its process has ended), a
/// signal, or `timeout` (none: no limit) has passed.
fn wait_readable(fd: &std::os::fd::OwnedFd, timeout: Option<Duration>) {
    use std::os::fd::AsRawFd;
    // Rounded up, so a wait shorter than a millisecond does not spin.
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    });
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call and
    // `fd` stays open (borrowed) across it; the result is only a count.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// Read `r` whole (at most [`MAX_REPORT`] kept) on a thread of its own.
fn read_capped(r: impl Read + Send + 'static, name: &str) -> std::io::Result<JoinHandle<String>> {
    std::thread::Builder::new()
        .name(format!("airlock-vmm-{name}"))
        .stack_size(crate::devices::THREAD_STACK)
        .spawn(move || {
            let mut buf = Vec::new();
            let mut r = r.take(MAX_REPORT);
            let _ = r.read_to_end(&mut buf);
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut r.into_inner(), &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        })
}

impl VmProcess {
    /// Start `binary` (`airlock-vmm`) for `cfg`, in `jail` when given; it
    /// stops when this handle is stopped or dropped, and the jail is
    /// released once it is reaped.
    ///
    /// # Errors
    /// [`ProcessError::Spawn`].
    pub fn spawn(
        binary: &Path,
        cfg: &VmConfig,
        jail: Option<crate::jail::VmJail>,
    ) -> Result<Self, ProcessError> {
        Self::spawn_inheriting(binary, cfg, jail, &[])
    }

    /// [`VmProcess::spawn`], the child inheriting `fds` at the same
    /// numbers (a share given as [`ShareConfig::by_fd`](crate::ShareConfig::by_fd)
    /// names one); no other descriptor of this process reaches it.
    ///
    /// # Errors
    /// [`ProcessError::Spawn`].
    pub fn spawn_inheriting(
        binary: &Path,
        cfg: &VmConfig,
        jail: Option<crate::jail::VmJail>,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<Self, ProcessError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let spawn_err = |source| ProcessError::Spawn {
            binary: binary.to_path_buf(),
            source,
        };
        let mut args = to_args(cfg, true);
        if let Some(j) = &jail {
            args.extend(j.spec().to_args());
        }
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !fds.is_empty() {
            let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: the closure runs in the forked child before exec and
            // only calls fcntl(2), which is async-signal-safe, on
            // descriptors the caller keeps open across this call; it
            // allocates nothing (`raw` was built before the fork).
            unsafe {
                cmd.pre_exec(move || {
                    for &fd in &raw {
                        if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let stdin = child.stdin.take();
        let out = child.stdout.take().map(|o| read_capped(o, "out"));
        let err = child.stderr.take().map(|e| read_capped(e, "err"));
        let (stdout, stderr) = match (out, err) {
            (Some(Ok(o)), Some(Ok(e))) => (Some(o), Some(e)),
            (o, e) => {
                let _ = child.kill();
                let _ = child.wait();
                let failed = [o, e]
                    .into_iter()
                    .find_map(|r| r.and_then(Result::err))
                    .unwrap_or_else(|| std::io::Error::other("no pipe"));
                return Err(spawn_err(failed));
            }
        };
        Ok(Self {
            binary: binary.to_path_buf(),
            child,
            stdin,
            stdout,
            stderr,
            stopped_at: None,
            jail,
        })
    }

    /// Tell a parked VMM that its VM's life begins (one byte on its stdin;
    /// a VMM still setting up finds it when its VM runs).
    ///
    /// # Errors
    /// The pipe is closed (the VMM has ended or was stopped).
    pub fn go(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        match self.stdin.as_mut() {
            Some(pipe) => pipe.write_all(b"g"),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the VMM was stopped",
            )),
        }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the VMM process has ended (it is not reaped: [`wait`](Self::wait) does that).
    pub fn is_finished(&self) -> bool {
        // SAFETY: an all-zero siginfo_t is a valid value of the C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the pid is our own child, not yet reaped (only `wait` and
        // drop reap it, and both consume or end the handle); `info` is
        // valid for writes. WNOWAIT leaves the child waitable.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled `info` (or left it zeroed); si_pid is valid
        // to read for a SIGCHLD-style siginfo.
        rc != 0 || unsafe { info.si_pid() } != 0
    }

    /// Wait until the VMM process has ended (not reaping it), at most
    /// until `deadline` when one is given; whether it has ended. Woken by
    /// the process's end (a pidfd), not by polling: a poll wakes this
    /// thread — and, on a small host, preempts the guest's vCPU — every
    /// few milliseconds of a VM's life, and finds the end late. Where
    /// pidfds are missing (Linux before 5.3) it looks every 10 ms.
    pub fn wait_until_finished(&self, deadline: Option<Instant>) -> bool {
        let pidfd = open_pidfd(self.child.id());
        loop {
            if self.is_finished() {
                return true;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return false;
            }
            match &pidfd {
                Some(fd) => wait_readable(fd, left),
                None => std::thread::sleep(left.map_or(LOOK_EVERY, |l| l.min(LOOK_EVERY))),
            }
        }
    }

    /// Ask the VMM to stop its VM (it then reports `stopped`).
    pub fn stop(&mut self) {
        self.stdin = None;
        self.stopped_at.get_or_insert_with(Instant::now);
    }

    /// Stop the VMM and reap it, killing it if it has not ended within
    /// [`STOP_GRACE`] of being stopped; how it ended.
    fn reap(&mut self) -> String {
        let status = self.reap_child();
        self.jail = None;
        status
    }

    fn reap_child(&mut self) -> String {
        self.stop();
        let deadline = self.stopped_at.unwrap_or_else(Instant::now) + STOP_GRACE;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return s.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    self.wait_until_finished(Some(deadline));
                }
                Ok(None) => {
                    tracing::warn!(
                        pid = self.child.id(),
                        "the VMM did not stop in time; killing it"
                    );
                    let _ = self.child.kill();
                    return self
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                }
                Err(e) => return e.to_string(),
            }
        }
    }

    /// Stop (if not already ended), reap the child, read its report.
    ///
    /// # Errors
    /// [`ProcessError::NoReport`] when it ended without one.
    pub fn wait(mut self) -> Result<ProcessEnd, ProcessError> {
        let status = self.reap();
        let out = self
            .stdout
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let err = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let report: serde_json::Value = match serde_json::from_str(out.trim()) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => {
                let tail: Vec<&str> = err.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(ProcessError::NoReport {
                    status,
                    stderr: tail.join("\n"),
                });
            }
        };
        Ok(ProcessEnd {
            exit: VmExit::from_label(
                report["exit"]
                    .as_str()
                    .unwrap_or("error: no exit in the report"),
            ),
            console: report["console"].as_str().unwrap_or_default().to_string(),
            wall: Duration::from_millis(report["wall_ms"].as_u64().unwrap_or(0)),
            report,
        })
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        // Not yet waited for: reap it so no zombie (or VMM) remains.
        if self.stdout.is_some() {
            self.reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_share_brings_its_own_descriptor_budget() {
        let mut cfg = VmConfig::new("/k".into(), "/i".into());
        assert_eq!(open_files_for(&cfg), MAX_OPEN_FILES);
        for i in 0..2 {
            cfg.shares.push(crate::ShareConfig {
                tag: format!("g{i}"),
                dir: "/srv".into(),
                read_only: true,
            });
        }
        let l = crate::devices::fs::share::ShareLimits::default();
        // Both shares full (every inode held, every handle open) still
        // leave the VMM its own 512.
        assert!(
            open_files_for(&cfg) >= MAX_OPEN_FILES + 2 * (l.max_inodes + l.max_handles + 2) as u64
        );
    }

    #[test]
    fn a_report_is_read_whole_up_to_its_cap() {
        let t = read_capped(&b"{\"exit\": \"stopped\"}\n"[..], "t").unwrap();
        assert_eq!(t.join().unwrap(), "{\"exit\": \"stopped\"}\n");
        let flood = std::io::repeat(b'x').take(MAX_REPORT + 4096);
        let t = read_capped(flood, "t").unwrap();
        assert_eq!(t.join().unwrap().len() as u64, MAX_REPORT);
    }

    #[test]
    fn flags_round_trip_and_bad_ones_are_named() {
        let cfg = VmConfig {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline_extra: "airlock.port=1024 quiet".into(),
            memory_mib: 512,
            vcpus: 2,
            timeout: Duration::from_secs(90),
            console_cap: 4096,
            vsock: Some(VsockConfig {
                guest_cid: 7,
                uds_path: "/tmp/v.sock".into(),
            }),
            stop: None,
            pmem: Some("/w.erofs".into()),
            shares: vec![
                crate::ShareConfig {
                    tag: "grant0".into(),
                    dir: "/srv/data".into(),
                    read_only: true,
                },
                crate::ShareConfig {
                    tag: "grant1".into(),
                    dir: "/srv/state".into(),
                    read_only: false,
                },
            ],
            share_write_limit: Some(64 << 20),
            seccomp: None,
            seccomp_selftest: false,
            jail_selftest: None,
            report_threads: true,
            snapshot: Some(crate::SnapshotPlan::Make {
                identity: None,
                at: "ready".into(),
                dir: "/snap".into(),
            }),
            park: None,
        };
        let parsed = from_args(to_args(&cfg, true)).unwrap();
        assert!(parsed.stop_on_stdin_eof);
        assert!(parsed.park.is_none());
        assert_eq!(
            parsed.seccomp,
            Some(crate::seccomp::Mode::Enforce),
            "filters by default"
        );
        let back = parsed.cfg;
        assert_eq!(back.shares, cfg.shares);
        assert_eq!(back.share_write_limit, cfg.share_write_limit);
        assert_eq!(
            (back.kernel, back.initrd, back.cmdline_extra.as_str()),
            (
                cfg.kernel.clone(),
                cfg.initrd.clone(),
                "airlock.port=1024 quiet"
            )
        );
        assert_eq!(
            (back.memory_mib, back.vcpus, back.timeout, back.console_cap),
            (512, 2, cfg.timeout, 4096)
        );
        let v = back.vsock.unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (7, PathBuf::from("/tmp/v.sock")));
        assert_eq!(back.pmem, cfg.pmem);
        assert!(matches!(
            &back.snapshot,
            Some(crate::SnapshotPlan::Make { at, dir, .. }) if at == "ready" && dir == Path::new("/snap")
        ));
        let restore = VmConfig {
            snapshot: Some(crate::SnapshotPlan::Restore {
                dir: "/snap".into(),
                identity: None,
            }),
            ..VmConfig::new("/k".into(), "/i".into())
        };
        assert!(matches!(
            from_args(to_args(&restore, false)).unwrap().cfg.snapshot,
            Some(crate::SnapshotPlan::Restore { dir, identity: None }) if dir == Path::new("/snap")
        ));
        // A parked restore: the word to run comes on stdin, so `--park`
        // goes out only with the stop pipe.
        let parked = VmConfig {
            park: Some(std::sync::Arc::new(crate::Park::default())),
            ..restore.clone()
        };
        assert_eq!(
            from_args(to_args(&parked, true)).unwrap().park,
            Some(crate::ParkCpu::default())
        );
        // Its CPU allowance goes along.
        let cpu = crate::ParkCpu {
            grace: Duration::from_millis(200),
            per_mille: 0,
        };
        let tight = VmConfig {
            park: Some(std::sync::Arc::new(crate::Park::new(cpu))),
            ..parked.clone()
        };
        assert_eq!(from_args(to_args(&tight, true)).unwrap().park, Some(cpu));
        assert!(!to_args(&parked, false).contains(&"--park".to_string()));
        // An identity the caller worked out travels whole.
        let identity = crate::snapshot::Identity {
            vmm: "aa".into(),
            kernel: "bb".into(),
            initrd: "cc".into(),
            memory_mib: 256,
            vcpus: 1,
            cmdline: "airlock.port=1024".into(),
            weights: Some("dd".into()),
            shares: vec!["grant0".into(), "grant1".into()],
        };
        let known = VmConfig {
            snapshot: Some(crate::SnapshotPlan::Restore {
                dir: "/snap".into(),
                identity: Some(identity.clone()),
            }),
            ..VmConfig::new("/k".into(), "/i".into())
        };
        assert!(matches!(
            from_args(to_args(&known, false)).unwrap().cfg.snapshot,
            Some(crate::SnapshotPlan::Restore { identity: Some(i), .. }) if i == identity
        ));

        // A parked VMM's flags, and more.
        let parked = |more: &[&'static str]| {
            let mut a = vec![
                "--kernel",
                "k",
                "--initrd",
                "i",
                "--stop-on-stdin-eof",
                "--park",
            ];
            a.extend_from_slice(more);
            a
        };
        for (args, says) in [
            (vec!["--kernel"], "needs a value"),
            (
                vec!["--kernel", "k", "--initrd", "i", "--vcpus", "two"],
                "must be a number",
            ),
            (
                vec!["--kernel", "k", "--initrd", "i", "--bogus", "1"],
                "unknown flag",
            ),
            (vec!["--kernel", "k"], "required"),
            (
                vec!["--kernel", "k", "--initrd", "i", "--park"],
                "--park needs --stop-on-stdin-eof",
            ),
            (
                vec!["--kernel", "k", "--initrd", "i", "--park-cpu", "100,0"],
                "--park-cpu goes with --park",
            ),
            (
                parked(&["--park-cpu", "100"]),
                "--park-cpu takes GRACE_MS,PER_MILLE",
            ),
            (
                parked(&["--snapshot-at", "listening", "--snapshot-dir", "/s"]),
                "--park does not go with --snapshot-at",
            ),
            (
                vec!["--kernel", "k", "--initrd", "i", "--guest-cid", "3"],
                "go together",
            ),
            (
                vec!["--kernel", "k", "--initrd", "i", "--snapshot-at", "ready"],
                "go together",
            ),
            (
                vec![
                    "--kernel",
                    "k",
                    "--initrd",
                    "i",
                    "--snapshot-at",
                    "ready",
                    "--snapshot-dir",
                    "/s",
                    "--restore",
                    "/s",
                ],
                "not with --restore",
            ),
            (
                vec![
                    "--kernel",
                    "k",
                    "--initrd",
                    "i",
                    "--snapshot-identity",
                    r#"{"vmm":"a","kernel":"b","initrd":"c","memory_mib":1,"vcpus":1,"cmdline":"","weights":null,"shares":[]}"#,
                ],
                "goes with --snapshot-at or --restore",
            ),
            (
                vec![
                    "--kernel",
                    "k",
                    "--initrd",
                    "i",
                    "--restore",
                    "/s",
                    "--snapshot-identity",
                    "{\"vmm\": 1}",
                ],
                "not a snapshot identity",
            ),
        ] {
            let e = from_args(args.into_iter().map(String::from))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn exits_read_back_from_their_labels() {
        for e in [
            VmExit::Reset,
            VmExit::Halted,
            VmExit::Timeout,
            VmExit::Stopped,
            VmExit::Paused,
            VmExit::Error("KVM_RUN: EFAULT".into()),
        ] {
            assert_eq!(VmExit::from_label(&e.label()), e);
        }
    }

    #[test]
    fn a_child_without_a_report_is_reaped_and_its_stderr_kept() {
        // `false` stands in for a VMM that refuses its configuration.
        let cfg = from_args(["--kernel", "k", "--initrd", "i"].map(String::from))
            .unwrap()
            .cfg;
        let p = VmProcess::spawn(Path::new("/bin/false"), &cfg, None).unwrap();
        let e = p.wait().unwrap_err().to_string();
        assert!(e.contains("without a report"), "{e}");
        let e = VmProcess::spawn(Path::new("/nonexistent/airlock-vmm"), &cfg, None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/airlock-vmm"), "{e}");
    }

    /// A "VMM" that ignores its arguments, prints nothing and ends after
    /// `secs`.
    fn sleeping_vmm(dir: &Path, secs: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("vmm.sh");
        std::fs::write(&path, format!("#!/bin/sh\nexec sleep {secs}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn waiting_for_a_vmm_ends_with_it_or_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = VmConfig::new("/k".into(), "/i".into());
        let vm = VmProcess::spawn(&sleeping_vmm(dir.path(), "1"), &cfg, None).unwrap();
        // Alive: the deadline ends the wait, and says so — having slept
        // through it, not spun.
        let thread_cpu = || crate::cpu_of(&crate::usage_of(libc::RUSAGE_THREAD).unwrap());
        let (start, cpu) = (Instant::now(), thread_cpu());
        assert!(!vm.wait_until_finished(Some(start + Duration::from_millis(300))));
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(thread_cpu() - cpu < Duration::from_millis(100));
        assert!(!vm.is_finished());
        // Ended: the wait returns with it, long before a far deadline.
        assert!(vm.wait_until_finished(Some(Instant::now() + Duration::from_secs(60))));
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        assert!(vm.is_finished());
        // Not reaped by the wait: `wait` reaps it (no report from `sleep`).
        assert!(matches!(vm.wait(), Err(ProcessError::NoReport { .. })));
        // No deadline: until it ends.
        let vm = VmProcess::spawn(&sleeping_vmm(dir.path(), "0.1"), &cfg, None).unwrap();
        assert!(vm.wait_until_finished(None));
        assert!(vm.is_finished());
    }
}
