//! A jail per VM, in the style of Firecracker's jailer: the `airlock-vmm`
//! process, started as root by the daemon, moves into its own cgroup v2
//! leaf, enters new mount, pid, ipc, uts and net namespaces, `pivot_root`s
//! into a per-VM directory holding only what its VM needs, and drops to an
//! unprivileged uid/gid of its own before it reads anything the guest
//! controls.
//!
//! Both sides live here: [`VmJail::prepare`] is the parent's (the per-VM
//! directory, the uid, the cgroup and its limits; undone on drop), and
//! [`enter`] is what the VMM process does with the [`JailSpec`] it is given
//! on its command line.
//!
//! Inside, the VMM sees a read-only tmpfs root with:
//!
//! | path             | what                                       |
//! |------------------|--------------------------------------------|
//! | `/kernel`        | the guest kernel (read-only bind)          |
//! | `/initrd`        | the initramfs (read-only bind)             |
//! | `/weights.img`   | the weights image, when given (read-only bind: no copy) |
//! | `/run/vsock/`    | the VM's socket directory (bind, owned by its uid) |
//! | `/dev/kvm`       | a device node of its own, owned by its uid |
//! | `/shares/<i>`    | share `i` (virtio-fs), bound `nosuid,nodev,noexec`, read-only for a read-only share |
//! | `/snapshot/`     | a restore's `state` and `memory` (read-only binds, opened as root like the images), or the directory a snapshot is made in (bind, owned by its uid) |
//! | `/proc`          | only with shares: a procfs of the jail's own pid namespace (`subset=pid,hidepid=invisible`), for the file server's `/proc/self/fd` |
//!
//! and nothing else: no `/sys`, `/tmp`, binaries or libraries.
//! The images are opened once, as root, just before the uid drops
//! ([`open_image`] hands those files out): their host permissions need not
//! admit the jail's uid (private weights stay `0600`), and the VMM opens
//! nothing else as root.
//!
//! **Invariants:**
//! * [`enter`] runs first thing in the VMM process, single-threaded: the
//!   cgroup move, namespaces and mounts happen before any guest data is
//!   read and before any thread exists, so nothing escapes them.
//! * The process that was started forks once: the parent (the *keeper*,
//!   outside the new pid namespace) drops to the jail's uid, installs a
//!   filter that allows little but `wait4`, and ends with its child's
//!   status; the child (pid 1 of the new namespace) dies with the keeper
//!   (`PR_SET_PDEATHSIG`, checked against the race where the keeper is
//!   already gone). The daemon's handle is the keeper, so stopping and
//!   killing work as without a jail.
//! * Every VM gets a uid/gid of its own (one slot of [`UID_SLOTS`] above
//!   the configured base, never two live VMs of one daemon on one slot), so
//!   one VMM cannot signal, trace or read another even without seccomp.
//! * The cgroup leaf bounds what the VMM costs the host, not only what the
//!   guest sees: `memory.max` (guest memory plus [`MEMORY_OVERHEAD_MIB`]),
//!   `memory.swap.max` 0, `cpu.max` (its vCPUs plus one CPU for devices),
//!   `pids.max` (its threads); it is removed when the VM ends, after
//!   `cgroup.kill` ends anything still in it (a VMM whose keeper died).
//!   The attacks are tested in the nested harness through [`Selftest`]:
//!   a keeper gone before its child is tied to it, a VMM grabbing memory,
//!   a VMM starting threads.
//! * Shares are served with the host permissions of their owner, not the
//!   jail's uid: each virtio-fs worker thread (and no other thread) holds
//!   `CAP_DAC_OVERRIDE` and `CAP_FOWNER` with its file-system uid/gid set
//!   to the owner of its share's directory, so what the guest makes there
//!   belongs to that owner. Capabilities are per thread: the main thread
//!   keeps only what the workers need until they have taken it
//!   ([`become_file_server`]), then drops everything
//!   ([`end_file_server_setup`]) before any vCPU or other device thread
//!   starts; the bounding set is empty and `no_new_privs` is set. What
//!   those two capabilities can reach is only what the mount namespace
//!   holds: the shares, the read-only images, the socket directory and a
//!   procfs that shows this VMM alone (`CAP_DAC_READ_SEARCH`, which
//!   `open_by_handle_at` would need to leave a share, is never kept).

use crate::VmConfig;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{ForkResult, Gid, Uid};
use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The images the jail opened as root, by their path inside the jail,
/// until the VMM takes them (each once).
static PREOPENED: Mutex<Vec<(PathBuf, std::fs::File)>> = Mutex::new(Vec::new());

/// The shares a jailed VMM serves, by their path inside the jail, with
/// the uid/gid that own them on the host.
static FILE_SERVERS: Mutex<Vec<(PathBuf, u32, u32)>> = Mutex::new(Vec::new());

/// What a file server thread keeps.
const SERVER_CAPS: [caps::Capability; 2] = [
    caps::Capability::CAP_DAC_OVERRIDE,
    caps::Capability::CAP_FOWNER,
];
/// What it also needs, once, to take its share owner's file-system ids.
const SWITCH_CAPS: [caps::Capability; 2] =
    [caps::Capability::CAP_SETUID, caps::Capability::CAP_SETGID];

/// Open an image (kernel, initramfs, weights) for reading: the file the
/// jail opened as root for `path`, or else `path` itself.
///
/// # Errors
/// The file cannot be opened.
pub fn open_image(path: &Path) -> std::io::Result<std::fs::File> {
    let mut pre = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = pre.iter().position(|(p, _)| p == path) {
        return Ok(pre.swap_remove(i).1);
    }
    drop(pre);
    std::fs::File::open(path)
}

/// The first uid/gid of VM jails unless configured.
pub const DEFAULT_UID_BASE: u32 = 2_000_000;
/// How many jail uids a daemon uses above its base.
pub const UID_SLOTS: u32 = 65_536;
/// Where VM cgroups are created unless configured.
pub const DEFAULT_CGROUP_PARENT: &str = "/sys/fs/cgroup/airlock";
/// What the VMM process may use beyond its guest's memory: its own heap
/// and threads, KVM's page tables and structures charged to it, socket
/// and pipe buffers (64 MiB), and [`COLLAPSE_ALLOWANCE_MIB`].
pub const MEMORY_OVERHEAD_MIB: u64 = 64 + COLLAPSE_ALLOWANCE_MIB;
/// The huge page-cache pages a DAX window's collapses make
/// (`devices::fs::window::COLLAPSE_BUDGET` pieces of 2 MiB) are charged to
/// the VMM's cgroup: room for them, so a VM that read a host file never
/// has less room for its own guest memory.
pub const COLLAPSE_ALLOWANCE_MIB: u64 = 64;
/// Threads a VMM has besides its vCPUs (main, stop watcher, device
/// workers, the keeper), with room to spare.
pub const EXTRA_TASKS: u64 = 16;
/// `cpu.max`'s period, µs.
const CPU_PERIOD_US: u64 = 100_000;

/// The kernel inside the jail.
pub const KERNEL: &str = "/kernel";
/// The initramfs inside the jail.
pub const INITRD: &str = "/initrd";
/// The weights image inside the jail.
pub const PMEM: &str = "/weights.img";
/// The snapshot directory inside the jail: a restore's state file and
/// memory image (read-only binds), or the directory a snapshot is written
/// to (a bind the jail uid owns).
pub const SNAPSHOT: &str = "/snapshot";
/// The socket directory inside the jail.
pub const SOCKETS: &str = "/run/vsock";
/// Where shares are bound inside the jail (`/shares/<index>`).
pub const SHARES: &str = "/shares";
/// The KVM device inside the jail.
pub const KVM: &str = "/dev/kvm";
/// The hostname inside the jail.
pub const HOSTNAME: &str = "airlock-vm";
/// The namespaces a jailed VMM is in, by their `/proc/<pid>/ns` names.
pub const NAMESPACES: [&str; 5] = ["mnt", "pid", "ipc", "uts", "net"];

/// Errors of the jail, naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Only root can set up a jail.
    #[error(
        "The VM jail needs root (namespaces, mounts, a uid of its own); this process runs as uid {0}. Run as root, or turn the jail off."
    )]
    NotRoot(u32),
    /// A file the VM needs cannot be read (checked before the jail is
    /// made, so the error names the host path).
    #[error("Cannot read {path}: {reason}.")]
    Unreadable {
        /// The host path.
        path: PathBuf,
        /// The OS error (in the message: not repeated as a source).
        reason: std::io::Error,
    },
    /// Every jail uid of this daemon is in use.
    #[error("All {UID_SLOTS} jail uids are in use by this daemon's VMs.")]
    NoUid,
    /// A step of the jail failed.
    #[error("Setting up the VM jail failed at {step}: {reason}.")]
    Step {
        /// What was being done.
        step: String,
        /// The OS error (in the message: not repeated as a source).
        reason: std::io::Error,
    },
}

fn step<E: Into<std::io::Error>>(what: impl Into<String>) -> impl FnOnce(E) -> JailError {
    let step = what.into();
    move |e| JailError::Step {
        step,
        reason: e.into(),
    }
}

/// How a daemon jails its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The first jail uid/gid; each VM takes one of [`UID_SLOTS`] above it.
    pub uid_base: u32,
    /// The cgroup v2 directory VM leaves are made in (created if missing,
    /// with the cpu, memory and pids controllers enabled for its children).
    pub cgroup_parent: PathBuf,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            uid_base: DEFAULT_UID_BASE,
            cgroup_parent: PathBuf::from(DEFAULT_CGROUP_PARENT),
        }
    }
}

/// Attacks on the jail, made by a jailed VMM in place of its VM when asked
/// (`--jail-selftest`), for the tests that check the jail holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selftest {
    /// The keeper ends before the VMM has tied itself to it: the VMM must
    /// notice and end, never run on unwatched.
    KeeperGone,
    /// The VMM allocates and touches memory (up to 1 GiB) past its cgroup's
    /// `memory.max`: the kernel must kill it.
    Memory,
    /// The VMM starts threads until refused: `pids.max` and
    /// `RLIMIT_NPROC` must stop it. Reports how many started.
    Tasks,
}

impl Selftest {
    /// Its flag value.
    pub fn name(self) -> &'static str {
        match self {
            Self::KeeperGone => "keeper-gone",
            Self::Memory => "memory",
            Self::Tasks => "tasks",
        }
    }
}

impl std::str::FromStr for Selftest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::KeeperGone, Self::Memory, Self::Tasks]
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!("--jail-selftest must be keeper-gone, memory or tasks, got {s:?}")
            })
    }
}

/// Run the jail attack `t` as the jailed VMM (privileges dropped, no VM):
/// the report it prints in place of a VM's, or `None` when the attack
/// succeeded (the caller then ends with an error).
pub fn run_selftest(t: Selftest) -> Option<serde_json::Value> {
    match t {
        // Reached only when the VMM missed its keeper's end.
        Selftest::KeeperGone => None,
        Selftest::Memory => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            for _ in 0..128 {
                // 8 MiB, every page written: resident, charged to the cgroup.
                held.push(vec![0x5a; 8 << 20]);
                std::hint::black_box(&held);
            }
            eprintln!("airlock-vmm: jail selftest: 1 GiB allocated and nothing stopped it");
            None
        }
        Selftest::Tasks => {
            let mut started = 0u32;
            let refused = loop {
                match std::thread::Builder::new()
                    .stack_size(64 << 10)
                    .spawn(std::thread::park)
                {
                    Ok(_) => started += 1,
                    Err(e) => break e.to_string(),
                };
                if started >= 4096 {
                    return None;
                }
            };
            Some(serde_json::json!({
                "jail_selftest": "tasks",
                "threads_started": started,
                "refused": refused,
            }))
        }
    }
}

/// What a VMM process is told about its jail (its `--jail-*` flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// The (empty) directory it mounts its root on and pivots into.
    pub root: PathBuf,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its cgroup leaf, which it moves itself into first.
    pub cgroup: Option<PathBuf>,
}

impl JailSpec {
    /// As `airlock-vmm` flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--jail-root".into(),
            self.root.display().to_string(),
            "--jail-uid".into(),
            self.uid.to_string(),
            "--jail-gid".into(),
            self.gid.to_string(),
        ];
        if let Some(c) = &self.cgroup {
            a.extend(["--jail-cgroup".into(), c.display().to_string()]);
        }
        a
    }
}

/// The uid slots this process's live jails hold.
static SLOTS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Take a free slot, starting from a random one so two daemons on one
/// host rarely meet.
fn take_slot() -> Result<u32, JailError> {
    let mut used = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
    // Without randomness the search starts at 0: slots stay unique in this
    // daemon either way.
    let start = (random_u64().unwrap_or(0) % u64::from(UID_SLOTS)) as u32;
    let slot = (0..UID_SLOTS)
        .map(|i| (start + i) % UID_SLOTS)
        .find(|s| !used.contains(s))
        .ok_or(JailError::NoUid)?;
    used.insert(slot);
    Ok(slot)
}

fn random_u64() -> std::io::Result<u64> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(u64::from_le_bytes(rnd))
}

/// A new directory `<tmp>/<prefix>-<random>` for one VM (its sockets, its
/// jail's root), made by this call (never an existing one).
///
/// # Errors
/// No randomness, or the directory cannot be made.
pub fn fresh_dir(prefix: &str) -> std::io::Result<std::path::PathBuf> {
    fresh_dir_in(&std::env::temp_dir(), prefix)
}

/// [`fresh_dir`] in `parent`: `<parent>/<prefix>-<random>`.
///
/// # Errors
/// No randomness, or the directory cannot be made.
pub fn fresh_dir_in(parent: &Path, prefix: &str) -> std::io::Result<std::path::PathBuf> {
    let dir = parent.join(format!("{prefix}-{:016x}", random_u64()?));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Jails are made by root only.
///
/// # Errors
/// [`JailError::NotRoot`] naming this process's effective uid.
pub fn require_root() -> Result<(), JailError> {
    match nix::unistd::geteuid().as_raw() {
        0 => Ok(()),
        euid => Err(JailError::NotRoot(euid)),
    }
}

/// A VM's jail as its parent holds it: the uid slot, the root directory
/// and the cgroup leaf, released (the leaf removed) on drop — after the
/// VMM process is reaped.
#[derive(Debug)]
pub struct VmJail {
    spec: JailSpec,
    slot: u32,
    limits: Vec<(&'static str, String)>,
}

impl VmJail {
    /// Prepare the jail of `vm` in `vm_dir` (a fresh directory of this VM,
    /// which holds its socket directory when it has vsock): take a uid,
    /// make `vm_dir/root`, hand the socket directory to the uid, and make
    /// the cgroup leaf with the VM's limits.
    ///
    /// # Errors
    /// [`JailError`] naming the step.
    pub fn prepare(cfg: &JailConfig, vm_dir: &Path, vm: &VmConfig) -> Result<Self, JailError> {
        require_root()?;
        for s in &vm.shares {
            match std::fs::metadata(s.open_path()) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(JailError::Unreadable {
                        path: s.dir.clone(),
                        reason: std::io::Error::other("a share must be a directory"),
                    });
                }
                Err(reason) => {
                    return Err(JailError::Unreadable {
                        path: s.dir.clone(),
                        reason,
                    });
                }
            }
        }
        for path in [Some(&vm.kernel), Some(&vm.initrd), vm.pmem.as_ref()]
            .into_iter()
            .flatten()
        {
            std::fs::File::open(path).map_err(|reason| JailError::Unreadable {
                path: path.clone(),
                reason,
            })?;
        }
        let slot = take_slot()?;
        let mut jail = Self {
            spec: JailSpec {
                root: vm_dir.join("root"),
                uid: cfg.uid_base.saturating_add(slot),
                gid: cfg.uid_base.saturating_add(slot),
                cgroup: None,
            },
            slot,
            limits: Vec::new(),
        };
        std::fs::create_dir_all(&jail.spec.root).map_err(step("making the jail root"))?;
        if let Some(dir) = vm.vsock.as_ref().and_then(|v| v.uds_path.parent()) {
            jail.hand_over(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(step("restricting the socket directory"))?;
        }
        // A snapshot is written by the jail uid, into a directory of its own.
        if let Some(crate::SnapshotPlan::Make { dir, .. }) = &vm.snapshot {
            jail.hand_over(dir)?;
        }
        let name = vm_dir.file_name().map_or_else(
            || format!("vm-{slot}"),
            |n| n.to_string_lossy().into_owned(),
        );
        // The daemon's pid first: [`sweep`] tells a dead daemon's leaves
        // by it.
        let leaf = cfg
            .cgroup_parent
            .join(format!("{}-{name}", std::process::id()));
        enable_controllers(&cfg.cgroup_parent)?;
        std::fs::create_dir(&leaf)
            .map_err(step(format!("making the cgroup {}", leaf.display())))?;
        jail.spec.cgroup = Some(leaf.clone());
        let vcpus = u64::from(vm.vcpus);
        jail.limits = vec![
            (
                "memory.max",
                ((u64::from(vm.memory_mib) + MEMORY_OVERHEAD_MIB) << 20).to_string(),
            ),
            ("memory.swap.max", "0".into()),
            (
                "cpu.max",
                format!("{} {CPU_PERIOD_US}", (vcpus + 1) * CPU_PERIOD_US),
            ),
            ("pids.max", (vcpus + EXTRA_TASKS).to_string()),
        ];
        for (file, value) in &jail.limits {
            let path = leaf.join(file);
            // Without swap accounting there is no memory.swap.max (and no
            // swap to bound).
            if *file == "memory.swap.max" && !path.exists() {
                continue;
            }
            std::fs::write(&path, value).map_err(step(format!(
                "writing {} to {}",
                value,
                path.display()
            )))?;
        }
        Ok(jail)
    }

    /// What the VMM process is told.
    pub fn spec(&self) -> &JailSpec {
        &self.spec
    }

    /// The cgroup limits written, by file.
    pub fn limits(&self) -> &[(&'static str, String)] {
        &self.limits
    }

    /// Make `path` (a directory or socket the VMM must use) the jail
    /// uid's.
    ///
    /// # Errors
    /// [`JailError::Step`].
    pub fn hand_over(&self, path: &Path) -> Result<(), JailError> {
        nix::unistd::chown(
            path,
            Some(Uid::from_raw(self.spec.uid)),
            Some(Gid::from_raw(self.spec.gid)),
        )
        .map_err(step(format!("giving {} to the jail uid", path.display())))
    }
}

impl Drop for VmJail {
    fn drop(&mut self) {
        if let Some(leaf) = &self.spec.cgroup {
            // The keeper is reaped. Whatever is still in the leaf (a VMM
            // whose keeper died under it) goes with it: cgroup.kill.
            let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
            // The cgroup may still count the dead for a moment.
            for _ in 0..100 {
                match std::fs::remove_dir(leaf) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!(cgroup = %leaf.display(), error = %e, "cannot remove a VM's cgroup");
                        break;
                    }
                    _ => break,
                }
            }
        }
        SLOTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.slot);
    }
}

/// Remove the cgroup leaves that daemons which are gone left under
/// `cfg.cgroup_parent` (a daemon killed outright cannot remove its own);
/// a leaf still holding a process is left alone (rmdir refuses it).
/// Returns how many were removed.
pub fn sweep(cfg: &JailConfig) -> usize {
    let Ok(entries) = std::fs::read_dir(&cfg.cgroup_parent) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, _)| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if pid > 0 && gone && std::fs::remove_dir(e.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed cgroup leaves of daemons that are gone");
    }
    removed
}

/// Make `parent` (and its parent's controllers) ready for VM leaves.
fn enable_controllers(parent: &Path) -> Result<(), JailError> {
    const WANT: &str = "+cpu +memory +pids";
    if let Some(grand) = parent.parent() {
        let control = grand.join("cgroup.subtree_control");
        if !control.exists() {
            return Err(JailError::Step {
                step: format!(
                    "finding cgroup v2 at {} (is cgroup2 mounted there?)",
                    grand.display()
                ),
                reason: std::io::ErrorKind::NotFound.into(),
            });
        }
        std::fs::write(&control, WANT)
            .map_err(step(format!("enabling {WANT} in {}", control.display())))?;
    }
    std::fs::create_dir_all(parent).map_err(step(format!("making {}", parent.display())))?;
    let control = parent.join("cgroup.subtree_control");
    std::fs::write(&control, WANT)
        .map_err(step(format!("enabling {WANT} in {}", control.display())))
}

/// What a jailed VMM reports about its jail (in its run report), with
/// the cgroup limits it read before it lost sight of them.
fn report(
    spec: &JailSpec,
    cgroup_limits: serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let max_tasks = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
        .ok()
        .map(|l| l.0);
    let hostname = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned());
    serde_json::json!({
        "uid": nix::unistd::getuid().as_raw(),
        "gid": nix::unistd::getgid().as_raw(),
        "pid_in_namespace": nix::unistd::getpid().as_raw(),
        "namespaces": NAMESPACES,
        "root": spec.root.display().to_string(),
        "hostname": hostname,
        "cgroup": spec.cgroup.as_ref().map(|c| c.display().to_string()),
        "cgroup_limits": cgroup_limits,
        "max_tasks": max_tasks,
    })
}

/// Enter the jail `spec` and point `vm`'s paths inside it. Returns in the
/// jailed VMM: pid 1 of its namespace, as the jail's uid. The keeper (see
/// the module invariants) never returns: it ends the process with its
/// child's status. `keeper_filter` is the keeper's seccomp filter, if any.
///
/// Call first thing, single-threaded, as root. Returns what the run
/// report says of the jail.
///
/// # Errors
/// [`JailError::Step`] naming the step; the process must then end.
pub fn enter(
    spec: &JailSpec,
    vm: &mut VmConfig,
    keeper_filter: Option<&seccompiler::BpfProgram>,
) -> Result<serde_json::Value, JailError> {
    let mut limits = serde_json::Map::new();
    if let Some(cg) = &spec.cgroup {
        let procs = cg.join("cgroup.procs");
        std::fs::write(&procs, "0").map_err(step(format!("joining {}", procs.display())))?;
        for file in ["memory.max", "memory.swap.max", "cpu.max", "pids.max"] {
            if let Ok(v) = std::fs::read_to_string(cg.join(file)) {
                limits.insert(file.into(), v.trim().into());
            }
        }
    }
    let kvm_dev = nix::sys::stat::stat("/dev/kvm")
        .map_err(step("finding /dev/kvm"))?
        .st_rdev;
    // Shares are cloned as detached mounts while this process still sees
    // the daemon's mounts: a directory the daemon opened and handed over
    // (`ShareConfig::by_fd`) lives on a mount of its namespace, which a
    // bind made in the new namespace refuses. Then the inherited
    // descriptors go: one of a host directory would lead out of the jail.
    let share_trees = vm
        .shares
        .iter()
        .map(|s| clone_tree(&s.open_path()))
        .collect::<Result<Vec<_>, _>>()?;
    for s in &vm.shares {
        s.close_inherited();
    }
    nix::sched::unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(step("making namespaces"))?;
    let (alive_r, alive_w) = nix::unistd::pipe().map_err(step("making the keeper pipe"))?;
    // SAFETY: the process is single-threaded (see the invariants), so the
    // child may do anything the parent could.
    match unsafe { nix::unistd::fork() }.map_err(step("forking into the pid namespace"))? {
        ForkResult::Parent { child } => {
            drop(alive_r);
            if vm.jail_selftest == Some(Selftest::KeeperGone) {
                // The attack: the keeper ends at once, before its child
                // can tie itself to it.
                // SAFETY: _exit ends this process without destructors.
                unsafe { libc::_exit(3) }
            }
            keep(spec, child, alive_w, keeper_filter)
        }
        ForkResult::Child => {
            drop(alive_w);
            if vm.jail_selftest == Some(Selftest::KeeperGone) {
                // Widen the race: the keeper is surely gone by now.
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(step("tying the VMM to its keeper"))?;
            // The keeper may have died before the line above: then its end
            // of the pipe is closed and poll sees the hang-up at once.
            let mut fds = [nix::poll::PollFd::new(
                alive_r.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)
                .map_err(step("checking the keeper"))?;
            if ready > 0 {
                return Err(JailError::Step {
                    step: "checking the keeper".into(),
                    reason: std::io::Error::other("the keeper ended"),
                });
            }
            drop(alive_r);
            build_root(spec, vm, kvm_dev, share_trees)?;
            // As root still: the images, whatever their host permissions.
            let mut pre = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
            let snapshot = match &vm.snapshot {
                Some(crate::SnapshotPlan::Restore { dir, .. }) => vec![
                    crate::SnapshotPlan::state_path(dir),
                    crate::SnapshotPlan::memory_path(dir),
                ],
                _ => Vec::new(),
            };
            for path in [Some(&vm.kernel), Some(&vm.initrd), vm.pmem.as_ref()]
                .into_iter()
                .flatten()
                .chain(&snapshot)
            {
                let f = std::fs::File::open(path)
                    .map_err(step(format!("opening {} in the jail", path.display())))?;
                pre.push((path.clone(), f));
            }
            drop(pre);
            // Threads count against the uid's process limit (the uid is
            // this VM's alone, keeper included).
            let tasks = u64::from(vm.vcpus) + EXTRA_TASKS;
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, tasks, tasks)
                .map_err(step("limiting tasks"))?;
            drop_privileges(spec, !vm.shares.is_empty())?;
            Ok(report(spec, limits))
        }
    }
}

/// The keeper: wait for the jailed VMM and end with its status.
fn keep(
    spec: &JailSpec,
    child: nix::unistd::Pid,
    alive: std::os::fd::OwnedFd,
    filter: Option<&seccompiler::BpfProgram>,
) -> ! {
    use nix::sys::wait::{WaitStatus, waitpid};
    let confined = set_ids(spec).and_then(|()| {
        nix::sys::prctl::set_dumpable(false).map_err(step("making the keeper undumpable"))
    });
    if let Err(e) = confined {
        eprintln!("airlock-vmm: keeper: {e}");
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    if let Some(f) = filter
        && let Err(e) = seccompiler::apply_filter(f)
    {
        eprintln!("airlock-vmm: keeper: its seccomp filter cannot be installed: {e}");
        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
    }
    let code = loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(_) => break 2,
        }
    };
    // `alive` is closed by _exit (its drop would make a syscall the
    // keeper's filter forbids in debug builds).
    std::mem::forget(alive);
    // SAFETY: _exit ends the process without running destructors; the
    // keeper has nothing to flush.
    unsafe { libc::_exit(code) }
}

/// Mount the jail's root, pivot into it and point `vm` at what is inside
/// (its shares are `share_trees`, one per share, from [`clone_tree`]).
fn build_root(
    spec: &JailSpec,
    vm: &mut VmConfig,
    kvm_dev: libc::dev_t,
    share_trees: Vec<std::os::fd::OwnedFd>,
) -> Result<(), JailError> {
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(step("making mounts private"))?;
    let root = &spec.root;
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )
    .map_err(step(format!("mounting a tmpfs on {}", root.display())))?;
    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    bind_file(&vm.kernel, &inside(KERNEL))?;
    vm.kernel = KERNEL.into();
    bind_file(&vm.initrd, &inside(INITRD))?;
    vm.initrd = INITRD.into();
    if let Some(p) = &vm.pmem {
        bind_file(p, &inside(PMEM))?;
        vm.pmem = Some(PMEM.into());
    }
    match vm.snapshot.as_mut() {
        Some(crate::SnapshotPlan::Restore { dir, .. }) => {
            std::fs::create_dir_all(inside(SNAPSHOT)).map_err(step("making /snapshot"))?;
            for path in [
                crate::SnapshotPlan::state_path,
                crate::SnapshotPlan::memory_path,
            ] {
                bind_file(&path(dir), &path(&inside(SNAPSHOT)))?;
            }
            *dir = SNAPSHOT.into();
        }
        Some(crate::SnapshotPlan::Make { dir, .. }) => {
            std::fs::create_dir_all(inside(SNAPSHOT)).map_err(step("making /snapshot"))?;
            bind(dir, &inside(SNAPSHOT), false)?;
            *dir = SNAPSHOT.into();
        }
        None => {}
    }
    if let Some(v) = vm.vsock.as_mut() {
        let (Some(dir), Some(name)) = (v.uds_path.parent(), v.uds_path.file_name()) else {
            return Err(JailError::Step {
                step: format!("finding the directory of {}", v.uds_path.display()),
                reason: std::io::ErrorKind::InvalidInput.into(),
            });
        };
        let target = inside(SOCKETS);
        std::fs::create_dir_all(&target).map_err(step("making /run/vsock"))?;
        bind(dir, &target, false)?;
        v.uds_path = Path::new(SOCKETS).join(name);
    }
    if !vm.shares.is_empty() {
        let mut servers = FILE_SERVERS.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (share, tree)) in vm.shares.iter_mut().zip(share_trees).enumerate() {
            let meta = nix::sys::stat::fstat(&tree)
                .map_err(step(format!("finding the share {}", share.dir.display())))?;
            let path = Path::new(SHARES).join(i.to_string());
            let target = inside(&path.to_string_lossy());
            std::fs::create_dir_all(&target).map_err(step(format!("making {}", path.display())))?;
            attach_tree(tree, &target)?;
            restrict(&target, share.read_only, &share.dir)?;
            share.dir = path.clone();
            servers.push((path, meta.st_uid, meta.st_gid));
        }
        // The passthrough reopens files through /proc/self/fd: a procfs of
        // this pid namespace (this VMM alone), nothing but pid entries.
        let proc = inside("/proc");
        std::fs::create_dir_all(&proc).map_err(step("making /proc"))?;
        mount(
            Some("proc"),
            &proc,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
            Some("subset=pid,hidepid=invisible"),
        )
        .map_err(step("mounting the jail's procfs"))?;
    }
    let kvm = inside(KVM);
    std::fs::create_dir_all(inside("/dev")).map_err(step("making /dev"))?;
    nix::sys::stat::mknod(
        &kvm,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        kvm_dev,
    )
    .map_err(step("making /dev/kvm"))?;
    nix::unistd::chown(
        &kvm,
        Some(Uid::from_raw(spec.uid)),
        Some(Gid::from_raw(spec.gid)),
    )
    .map_err(step("giving /dev/kvm to the jail uid"))?;
    let old = inside("/old");
    std::fs::create_dir(&old).map_err(step("making the old-root mount point"))?;
    nix::unistd::pivot_root(root, &old).map_err(step(format!(
        "pivot_root into {} (a host whose root is an initramfs cannot pivot)",
        root.display()
    )))?;
    nix::unistd::chdir("/").map_err(step("entering the new root"))?;
    umount2("/old", MntFlags::MNT_DETACH).map_err(step("detaching the old root"))?;
    std::fs::remove_dir("/old").map_err(step("removing the old-root mount point"))?;
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(step("making the root read-only"))?;
    nix::unistd::sethostname(HOSTNAME).map_err(step("naming the host"))
}

/// Bind `src` (a file) read-only at `target`, made first.
fn bind_file(src: &Path, target: &Path) -> Result<(), JailError> {
    std::fs::File::create(target).map_err(step(format!("making {}", target.display())))?;
    bind(src, target, true)
}

/// Bind `src` at `target`: never suid, devices or exec; read-only when asked.
fn bind(src: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    let none = None::<&str>;
    mount(Some(src), target, none, MsFlags::MS_BIND, none)
        .map_err(step(format!("binding {}", src.display())))?;
    restrict(target, read_only, src)
}

/// A detached copy of the mount at directory `dir` (not its submounts),
/// to attach later with [`attach_tree`], in another mount namespace.
fn clone_tree(dir: &Path) -> Result<std::os::fd::OwnedFd, JailError> {
    use std::os::fd::FromRawFd;
    let failed = || step(format!("cloning the mount of {}", dir.display()));
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| failed()(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: open_tree(2) reads the NUL-terminated path and returns a new
    // descriptor or -1; nothing else is touched.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(failed()(std::io::Error::last_os_error()));
    }
    // SAFETY: a descriptor open_tree just returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Attach the detached mount `tree` ([`clone_tree`]) at `target`.
fn attach_tree(tree: std::os::fd::OwnedFd, target: &Path) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let failed = || step(format!("attaching a share at {}", target.display()));
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| failed()(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    // SAFETY: move_mount(2) reads the empty string and the NUL-terminated
    // target path; `tree` is a live descriptor of a detached mount.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(failed()(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Make the mount at `target` (of `src`) never suid, devices or exec, and
/// read-only when asked.
fn restrict(target: &Path, read_only: bool, src: &Path) -> Result<(), JailError> {
    let none = None::<&str>;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(none, target, none, flags, none)
        .map_err(step(format!("restricting the bind of {}", src.display())))
}

/// Become the jail's uid/gid with no supplementary groups, no way back
/// and no new privileges. No capabilities remain, except, when the VM has
/// shares, those its file server threads take (see the invariants):
/// permitted, not effective, until [`end_file_server_setup`].
fn drop_privileges(spec: &JailSpec, file_servers: bool) -> Result<(), JailError> {
    if file_servers {
        caps::clear(None, caps::CapSet::Bounding)
            .map_err(caps_step("emptying the capability bounding set"))?;
        nix::sys::prctl::set_keepcaps(true).map_err(step("keeping capabilities"))?;
    }
    set_ids(spec)?;
    if file_servers {
        nix::sys::prctl::set_keepcaps(false).map_err(step("ending keepcaps"))?;
        let keep: caps::CapsHashSet = SERVER_CAPS.into_iter().chain(SWITCH_CAPS).collect();
        caps::clear(None, caps::CapSet::Effective)
            .and_then(|()| caps::set(None, caps::CapSet::Permitted, &keep))
            .and_then(|()| caps::clear(None, caps::CapSet::Inheritable))
            .and_then(|()| caps::clear(None, caps::CapSet::Ambient))
            .map_err(caps_step("keeping the file servers' capabilities"))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(step("setting no_new_privs"))
}

fn caps_step(what: &str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    let what = what.to_string();
    move |e| JailError::Step {
        step: what,
        reason: std::io::Error::other(e.to_string()),
    }
}

/// Called first thing by the thread that serves the share at `dir` (its
/// path inside the jail): take the share owner's file-system uid/gid and
/// keep only `CAP_DAC_OVERRIDE` and `CAP_FOWNER`, effective. Outside a
/// jail it does nothing.
///
/// # Errors
/// [`JailError::Step`]: the thread must not serve the share.
pub fn become_file_server(dir: &Path) -> Result<(), JailError> {
    let ids = FILE_SERVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(p, _, _)| p == dir)
        .map(|&(_, uid, gid)| (uid, gid));
    let Some((uid, gid)) = ids else {
        return Ok(());
    };
    let switch: caps::CapsHashSet = SWITCH_CAPS.into_iter().collect();
    caps::set(None, caps::CapSet::Effective, &switch)
        .map_err(caps_step("raising the file server's setuid capabilities"))?;
    // setfsuid/setfsgid report the previous id, never an error: a second
    // call tells whether the first took.
    nix::unistd::setfsgid(Gid::from_raw(gid));
    nix::unistd::setfsuid(Uid::from_raw(uid));
    let (now_gid, now_uid) = (
        nix::unistd::setfsgid(Gid::from_raw(gid)),
        nix::unistd::setfsuid(Uid::from_raw(uid)),
    );
    if now_uid.as_raw() != uid || now_gid.as_raw() != gid {
        return Err(JailError::Step {
            step: format!("serving as {uid}:{gid}"),
            reason: std::io::Error::from_raw_os_error(libc::EPERM),
        });
    }
    let keep: caps::CapsHashSet = SERVER_CAPS.into_iter().collect();
    caps::set(None, caps::CapSet::Effective, &keep)
        .and_then(|()| caps::set(None, caps::CapSet::Permitted, &keep))
        .map_err(caps_step("keeping the file server's capabilities"))
}

/// Called by the main thread once every file server thread has started
/// (before any other thread): it drops every capability, for itself and
/// every thread it starts from now on. Does nothing when it holds none.
///
/// # Errors
/// [`JailError::Step`]: the VM must not run.
pub fn end_file_server_setup() -> Result<(), JailError> {
    caps::clear(None, caps::CapSet::Effective)
        .and_then(|()| caps::clear(None, caps::CapSet::Permitted))
        .map_err(caps_step("dropping the setup capabilities"))
}

/// The capabilities each thread of this process holds (permitted and
/// effective masks and the file-system uid from `/proc/self/task/*/status`,
/// by thread name) in a jail with shares; empty otherwise. For the tests
/// that check only file servers hold any.
pub fn thread_caps() -> Vec<serde_json::Value> {
    if FILE_SERVERS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_empty()
    {
        return Vec::new();
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // One procfs file per thread (its `Name:` is its comm): each read
    // costs milliseconds under emulation, on every boot with a share.
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        out.push(serde_json::json!({
            "thread": field("Name:").unwrap_or_default(),
            "permitted": field("CapPrm:"),
            "effective": field("CapEff:"),
            "fsuid": field("Uid:").and_then(|u| u.split_whitespace().nth(3).map(str::to_string)),
        }));
    }
    out
}

fn set_ids(spec: &JailSpec) -> Result<(), JailError> {
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));
    nix::unistd::setgroups(&[]).map_err(step("dropping supplementary groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(step("setting the jail gid"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(step("setting the jail uid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_never_shared_while_held() {
        let a = take_slot().unwrap();
        let b = take_slot().unwrap();
        assert_ne!(a, b);
        SLOTS.lock().unwrap().remove(&a);
        SLOTS.lock().unwrap().remove(&b);
    }

    #[test]
    fn sweep_removes_only_leaves_of_daemons_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = JailConfig {
            uid_base: DEFAULT_UID_BASE,
            cgroup_parent: dir.path().to_path_buf(),
        };
        // No pid is this large (pid_max is at most 2^22).
        let dead = dir.path().join("2147483646-airlock-vm-aa");
        let ours = dir
            .path()
            .join(format!("{}-airlock-vm-bb", std::process::id()));
        let other = dir.path().join("cgroup.procs-like");
        for d in [&dead, &ours, &other] {
            std::fs::create_dir(d).unwrap();
        }
        assert_eq!(sweep(&cfg), 1);
        assert!(!dead.exists());
        assert!(ours.exists() && other.exists());
    }

    #[test]
    fn a_preopened_image_is_handed_out_once_then_the_path_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("kernel");
        std::fs::write(&real, b"elf").unwrap();
        let inside = PathBuf::from("/nonexistent-jail/kernel");
        PREOPENED
            .lock()
            .unwrap()
            .push((inside.clone(), std::fs::File::open(&real).unwrap()));
        let mut f = open_image(&inside).unwrap();
        let mut got = String::new();
        std::io::Read::read_to_string(&mut f, &mut got).unwrap();
        assert_eq!(got, "elf");
        let again = open_image(&inside).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn flags_name_every_part() {
        let s = JailSpec {
            root: "/tmp/vm/root".into(),
            uid: 2_000_007,
            gid: 2_000_007,
            cgroup: Some("/sys/fs/cgroup/airlock/vm".into()),
        };
        assert_eq!(
            s.to_args().join(" "),
            "--jail-root /tmp/vm/root --jail-uid 2000007 --jail-gid 2000007 --jail-cgroup /sys/fs/cgroup/airlock/vm"
        );
    }
}
