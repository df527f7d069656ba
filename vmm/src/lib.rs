//! Airlock's VMM: boots the guest kernel (ELF `vmlinux`, 64-bit boot
//! protocol) with an initramfs on KVM, one thread per vCPU, an in-kernel
//! irqchip and PIT, and a COM1 serial console.
//!
//! **Architecture invariants**
//! * Hosts whose `/dev/kvm` cannot run the guest (PVM, missing) are refused
//!   with a clear error before anything is created — never a hang.
//! * Every run has a wall-clock limit; on the limit, on guest reset (the
//!   guest runs with `reboot=t`: triple fault → KVM shutdown exit), on a guest
//!   panic and on host-side errors, all vCPU threads are stopped and joined and
//!   every fd and mapping is dropped before [`Vm::run`] returns.
//!
//! **How a VM is built** ([`run`], the steps in [`builder`]): create the VM
//! and its vCPUs → map guest memory → load the kernel and the initramfs →
//! attach each device at its row of the device tables ([`devices`]) → write
//! the command line and boot data → set up the vCPUs ([`vcpu`]) → run them.
//! Each step fails with its own [`VmmError`] variant carrying its source.
//!
//! Devices: COM1, the boot-stage marker, the CMOS clock, and (when
//! configured) virtio-vsock and virtio-pmem on virtio-mmio.

#![deny(missing_docs)]

pub mod bench;
mod builder;
pub mod devices;
pub mod jail;
mod layout;
pub mod process;
mod ram;
pub mod seccomp;
pub mod snapshot;
mod vcpu;

use crate::devices::marker::StageMark;
use kvm_ioctls::Kvm;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Errors of the VMM, one per step that can fail.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is PVM: stock guests hang on it.
    #[error(
        "/dev/kvm on this host is PVM (/sys/module/kvm_pvm exists); it cannot run Airlock's stock Linux guest. Run VM tests inside the nested harness (cargo xtask nested)."
    )]
    PvmHost,
    /// /dev/kvm cannot be opened.
    #[error("/dev/kvm cannot be opened: {0}.")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}.")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// A configuration value is out of range.
    #[error("Bad VM configuration: {field} {message}.")]
    Config {
        /// The field of [`VmConfig`].
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Guest RAM could not be mapped.
    #[error("Guest RAM cannot be mapped: {0}.")]
    MapRam(#[source] std::io::Error),
    /// vm-memory refused the RAM mapping.
    #[error("Guest RAM cannot be wrapped as a memory region: {0}.")]
    MmapRegion(#[source] vm_memory::mmap::MmapRegionError),
    /// The RAM region's end overflows the guest address space.
    #[error("The guest RAM region overflows the guest address space.")]
    RegionOverflow,
    /// vm-memory refused the region set.
    #[error("Guest memory cannot be assembled: {0}.")]
    RegionCollection(#[source] vm_memory::GuestRegionCollectionError),
    /// Writing boot data (page tables, zero page, MP table, initramfs) into
    /// guest memory failed.
    #[error("Boot data cannot be written into guest memory: {0}.")]
    BootData(#[source] vm_memory::GuestMemoryError),
    /// A boot file could not be opened or read.
    #[error("Cannot read {path}: {source}.")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel (or its command line) could not be loaded.
    #[error("The kernel cannot be loaded: {0}.")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The command line is malformed or too long.
    #[error("The kernel command line is not valid: {0}.")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The initramfs does not fit between the kernel and the top of RAM.
    #[error(
        "The initramfs ({len} bytes) does not fit above the kernel in {mem_size} bytes of guest memory; give the VM more memory."
    )]
    InitrdTooLarge {
        /// The initramfs size.
        len: u64,
        /// Guest RAM.
        mem_size: u64,
    },
    /// An eventfd (interrupt or queue notification) could not be created.
    #[error("An eventfd cannot be created: {0}.")]
    EventFd(#[source] std::io::Error),
    /// A device could not be created.
    #[error("The {device} device cannot be created: {source}.")]
    Device {
        /// The device's table name.
        device: &'static str,
        /// Why.
        source: devices::virtio_mmio::VirtioError,
    },
    /// Two devices claim the same addresses.
    #[error("{0}")]
    Bus(#[source] devices::BusError),
    /// A vCPU thread could not be started.
    #[error("A vCPU thread cannot be started: {0}.")]
    Thread(#[source] std::io::Error),
    /// A snapshot could not be made or read.
    #[error("{0}")]
    Snapshot(#[from] snapshot::SnapshotError),
    /// KVM refused to save or restore state.
    #[error("{0}")]
    KvmState(#[from] snapshot::kvm_state::KvmStateError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF kernel.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally gzip).
    pub initrd: PathBuf,
    /// Extra kernel command line (appended to the base line).
    pub cmdline_extra: String,
    /// Guest memory in MiB (64..=3072).
    pub memory_mib: u32,
    /// vCPUs (1..=16).
    pub vcpus: u8,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
    /// Cap on the kept console log.
    pub console_cap: usize,
    /// A virtio-vsock device bridged to this Unix socket path (hybrid vsock).
    pub vsock: Option<VsockConfig>,
    /// Set to stop the VM from outside (it then ends as [`VmExit::Stopped`]).
    pub stop: Option<Arc<AtomicBool>>,
    /// A read-only weights image (erofs) behind virtio-pmem, at
    /// [`PMEM_BASE`]; the guest sees it as `/dev/pmem0`.
    pub pmem: Option<PathBuf>,
    /// Host directories served over virtio-fs, one device each (at most
    /// [`devices::FS_SLOTS`]`.len()`); the guest mounts each by its tag.
    pub shares: Vec<ShareConfig>,
    /// Bytes the guest may write into all its shares together (writes
    /// and allocations), held by the host's file server; `None`: no cap.
    pub share_write_limit: Option<u64>,
    /// Per-thread seccomp filters to install (the VMM process installs
    /// them; a VMM running inside another program leaves this `None`).
    pub seccomp: Option<seccomp::Filters>,
    /// Debug hook for the seccomp test: each vCPU thread makes a syscall
    /// its filter forbids right after installing it.
    pub seccomp_selftest: bool,
    /// Debug hook for the jail's tests: an attack on the jail made in
    /// place of the VM (see [`jail::Selftest`]).
    pub jail_selftest: Option<jail::Selftest>,
    /// Test hook: the report lists each thread's capabilities in a jail
    /// with shares (`"threads"`, [`jail::thread_caps`]). Off by default:
    /// the procfs reads cost every such boot milliseconds under emulation.
    pub report_threads: bool,
    /// Make a snapshot of this VM, or start it from one.
    pub snapshot: Option<SnapshotPlan>,
    /// Park the VM: it runs its guest as soon as it is set up (a restored
    /// one resumes and waits for the host in its agent, as any restore
    /// does), but its life — [`VmConfig::timeout`] — begins only at the
    /// word to go ([`Park::go`]); until then nothing ends it but its guest,
    /// a stop or [`Park::cancel`] (the run then ends as
    /// [`VmExit::Stopped`]). So a VM started ahead of a call has the
    /// call's whole time when the call takes it. (`airlock-vmm --park`:
    /// one byte on stdin is the word, EOF before it a stop.)
    pub park: Option<Arc<Park>>,
}

/// The word a parked VM waits for ([`VmConfig::park`]), and what it may
/// cost the host's CPU until then. The first word counts: once given or
/// cancelled it stays so.
#[derive(Debug, Default)]
pub struct Park {
    word: std::sync::Mutex<Option<(bool, Instant)>>,
    cpu: ParkCpu,
}

/// The CPU a parked VM may use before its word: its whole VMM process
/// (vCPUs' guest time, devices, file servers), counted from when its
/// vCPUs start. A restored guest runs to its agent's `accept` and then
/// idles (a tickless kernel), so after a grace for getting there a parked
/// VM may use only a small share of one CPU. One that uses more — a guest
/// kernel that spins instead of idling — is ended
/// ([`VmExit::Error`]): no tenant code has run in it yet, so nothing is
/// lost, and the pool parks another after a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkCpu {
    /// CPU time allowed outright (getting to `accept`).
    pub grace: Duration,
    /// Then this share of one CPU, in thousandths, over the time parked.
    pub per_mille: u32,
}

impl Default for ParkCpu {
    /// 10 s of CPU, then 5 % of one CPU: a restored guest reaches its
    /// agent with a small part of the grace even under the nested harness
    /// (~20× slower than hardware), and an idle one uses far less than the
    /// share; a spinning one is ended after about 10 s.
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
            per_mille: 50,
        }
    }
}

impl ParkCpu {
    /// The CPU time allowed after `parked` of wall time.
    pub fn allowed(&self, parked: Duration) -> Duration {
        self.grace + parked * self.per_mille / 1000
    }

    /// As `airlock-vmm --park-cpu` takes it: `GRACE_MS,PER_MILLE`.
    pub fn to_arg(&self) -> String {
        format!("{},{}", self.grace.as_millis(), self.per_mille)
    }

    /// Read `GRACE_MS,PER_MILLE`.
    ///
    /// # Errors
    /// A sentence naming what is wrong.
    pub fn from_arg(s: &str) -> Result<Self, String> {
        let bad = || format!("--park-cpu takes GRACE_MS,PER_MILLE (e.g. 10000,50), got {s:?}");
        let (g, p) = s.split_once(',').ok_or_else(bad)?;
        let grace = Duration::from_millis(g.trim().parse().map_err(|_| bad())?);
        let per_mille: u32 = p.trim().parse().map_err(|_| bad())?;
        if per_mille > 1000 {
            return Err(format!(
                "--park-cpu: the share of one CPU is in thousandths (0..=1000), got {per_mille}"
            ));
        }
        Ok(Self { grace, per_mille })
    }
}

impl Park {
    /// A park with this CPU allowance ([`Park::default`]: the default one).
    pub fn new(cpu: ParkCpu) -> Self {
        Self {
            word: std::sync::Mutex::default(),
            cpu,
        }
    }

    /// What it may use before its word.
    pub fn cpu(&self) -> ParkCpu {
        self.cpu
    }

    fn say(&self, go: bool) {
        self.word
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert((go, Instant::now()));
    }

    /// Its life begins now.
    pub fn go(&self) {
        self.say(true);
    }

    /// Stop it (if the word has not come first).
    pub fn cancel(&self) {
        self.say(false);
    }

    /// The word so far: none yet, or whether to go and when it came.
    pub fn word(&self) -> Option<(bool, Instant)> {
        *self.word.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What to do with snapshots ([`snapshot`]).
#[derive(Debug, Clone)]
pub enum SnapshotPlan {
    /// Boot; when the guest reaches boot stage `at` (its marker), pause
    /// the VM, write its snapshot into `dir` (`state` and `memory`) and
    /// end the run as [`VmExit::Paused`]. The main thread stays without
    /// its seccomp filter (it saves state and writes files after the
    /// vCPUs stop); vCPU and device threads keep theirs.
    Make {
        /// The boot stage to snapshot at.
        at: String,
        /// Where to write it.
        dir: PathBuf,
        /// What it is made from, when the caller has worked it out
        /// already (else it is computed from the files; a jailed VMM
        /// cannot: it has no `/proc/self/exe`).
        identity: Option<snapshot::Identity>,
    },
    /// Start from the snapshot in `dir` instead of booting: the VM's
    /// configuration must be the one the snapshot was made with.
    Restore {
        /// Where it is.
        dir: PathBuf,
        /// What the snapshot must have been made from, when the caller has
        /// worked it out already (else it is computed from the files).
        identity: Option<snapshot::Identity>,
    },
}

impl SnapshotPlan {
    /// The state file in a snapshot directory.
    pub fn state_path(dir: &Path) -> PathBuf {
        dir.join("state")
    }

    /// The memory image in a snapshot directory.
    pub fn memory_path(dir: &Path) -> PathBuf {
        dir.join("memory")
    }
}

/// One host directory for the guest (virtio-fs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The tag the guest mounts it by (1..=36 bytes: letters, digits, `-`, `_`).
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
    /// Refuse every change (the server's checks; the jail's bind is
    /// read-only too).
    pub read_only: bool,
}

impl ShareConfig {
    /// A share of the directory open at descriptor `fd` of the process
    /// that spawns the VMM, which the VMM inherits at the same number
    /// ([`process::VmProcess::spawn_inheriting`]): `dir` names it through
    /// `/proc/self/fd`, so the VMM serves the directory its parent opened,
    /// whatever its path names by then.
    pub fn by_fd(tag: String, fd: std::os::fd::RawFd, read_only: bool) -> Self {
        Self {
            tag,
            dir: PathBuf::from(format!("/proc/self/fd/{fd}")),
            read_only,
        }
    }

    /// The inherited descriptor `dir` names, if it is [`Self::by_fd`]'s.
    pub fn inherited_fd(&self) -> Option<std::os::fd::RawFd> {
        self.dir
            .strip_prefix("/proc/self/fd")
            .ok()?
            .to_str()?
            .parse()
            .ok()
            .filter(|fd| *fd > 2)
    }

    /// The path to open the directory by: `dir`, with a final `.` for a
    /// [`Self::by_fd`] share, so its magic link is followed to the
    /// directory itself.
    pub fn open_path(&self) -> PathBuf {
        match self.inherited_fd() {
            Some(_) => PathBuf::from(format!("{}/.", self.dir.display())),
            None => self.dir.clone(),
        }
    }

    /// Close the inherited descriptor, once the directory is bound into
    /// the jail: a descriptor of a host directory outside a jail's root
    /// would be a way out of it (`..`). (Unjailed, it stays open: the file
    /// server opens the root again by it at each FUSE_INIT.)
    pub fn close_inherited(&self) {
        if let Some(fd) = self.inherited_fd() {
            // SAFETY: the descriptor was inherited for this share alone
            // and nothing in this process owns or uses it after this.
            unsafe { libc::close(fd) };
        }
    }
}

/// Guest-physical base of the pmem region (above RAM and the MMIO hole).
pub const PMEM_BASE: u64 = devices::MMIO_HOLE.end;
/// The largest weights image: the pmem region ends below the virtio-fs
/// DAX windows ([`devices::FS_WINDOWS_BASE`]).
pub const MAX_PMEM_BYTES: u64 = devices::FS_WINDOWS_BASE - PMEM_BASE;

/// The guest's vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// Host-side Unix socket (`CONNECT <port>\n` → `OK <port>\n`).
    pub uds_path: PathBuf,
}

/// The base kernel command line: serial console, reset by triple fault,
/// no legacy probing, RNG trusted at once.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 random.trust_cpu=on i8042.noaux i8042.nomux i8042.dumbkbd quiet";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (its way of powering off) or panicked (panic=-1 → reset).
    Reset,
    /// The guest halted with interrupts off.
    Halted,
    /// The wall-clock limit passed and the VM was stopped.
    Timeout,
    /// The host asked the VM to stop.
    Stopped,
    /// The guest reached the stage a snapshot was asked for; the VM was
    /// paused and saved ([`SnapshotPlan::Make`]).
    Paused,
    /// KVM reported an error exit (failed entry, internal error).
    Error(String),
}

impl VmExit {
    /// Short text for reports: `reset`, `halted`, `timeout`, `stopped`, `error: …`.
    pub fn label(&self) -> String {
        match self {
            VmExit::Reset => "reset".into(),
            VmExit::Halted => "halted".into(),
            VmExit::Timeout => "timeout".into(),
            VmExit::Stopped => "stopped".into(),
            VmExit::Paused => "snapshot".into(),
            VmExit::Error(e) => format!("error: {e}"),
        }
    }
}

/// The result of one VM run.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How it ended.
    pub exit: VmExit,
    /// The guest console.
    pub console: String,
    /// Wall time from VM creation to the end.
    pub wall: Duration,
    /// Guest memory pages resident in this process at the end (the pages
    /// the guest touched), bytes: what to subtract from the process RSS to
    /// get the VMM's own footprint.
    pub guest_resident_bytes: u64,
    /// Boot-stage markers the guest wrote, stamped on the host's clock.
    pub stages: Vec<StageMark>,
    /// Host-side setup before the first vCPU entry (VM, memory, images,
    /// devices, registers), measured from VM creation.
    pub setup: Duration,
    /// The part of `setup` spent copying the kernel and initramfs into
    /// guest memory.
    pub image_load: Duration,
    /// In a jail with shares: each thread's capabilities once the devices
    /// were made ([`jail::thread_caps`]); empty otherwise.
    pub threads: Vec<serde_json::Value>,
    /// This process's anonymous resident memory at the end, guest memory
    /// still mapped, KiB: what this VM costs the host beyond shared file
    /// pages (a restored guest's unchanged pages are the snapshot's page
    /// cache). `None` where there is no `/proc` (a jail without shares).
    pub rss_anon_kib: Option<u64>,
    /// When each setup step ended, from VM creation: host checks, a
    /// restore's state file, the VM, its memory, images, devices,
    /// registers (or the snapshot's KVM and device state).
    pub setup_steps: Vec<(&'static str, Duration)>,
    /// Each share's file server: requests, notifications, requests found
    /// without one, time busy ([`devices::fs::device::FsStats`]).
    pub fs: Vec<serde_json::Value>,
}

impl RunReport {
    /// The report as `airlock vm boot` and `airlock-vmm` print it (the boot
    /// benchmark reads this shape): exit, wall_ms, this process's peak RSS,
    /// guest pages resident, boot stages (host clock), console.
    pub fn to_json(&self) -> serde_json::Value {
        let stages: Vec<_> = self
            .stages
            .iter()
            .map(|m| {
                serde_json::json!({
                    "stage": m.stage.map_or_else(|| format!("code {}", m.code), str::to_string),
                    "after_us": m.after.as_micros() as u64,
                })
            })
            .collect();
        let mut json = serde_json::json!({
            "exit": self.exit.label(),
            "wall_ms": self.wall.as_millis() as u64,
            "stages": stages,
            "setup_us": self.setup.as_micros() as u64,
            "image_load_us": self.image_load.as_micros() as u64,
            "peak_rss_kib": peak_rss_kib(),
            "rusage": rusage(),
            "guest_resident_kib": self.guest_resident_bytes >> 10,
            "console": self.console,
        });
        if !self.threads.is_empty() {
            json["threads"] = self.threads.clone().into();
        }
        if let Some(kib) = self.rss_anon_kib {
            json["rss_anon_kib"] = kib.into();
        }
        if !self.fs.is_empty() {
            json["fs"] = self.fs.clone().into();
        }
        json["setup_steps_us"] = self
            .setup_steps
            .iter()
            .map(|(name, at)| ((*name).to_string(), (at.as_micros() as u64).into()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        json
    }
}

/// This process's resource use so far (getrusage: a jailed VMM has no
/// /proc), if the kernel tells.
fn usage() -> Option<libc::rusage> {
    usage_of(libc::RUSAGE_SELF)
}

/// `who`'s resource use so far (`RUSAGE_SELF`, `RUSAGE_THREAD`), if the
/// kernel tells.
pub(crate) fn usage_of(who: libc::c_int) -> Option<libc::rusage> {
    // SAFETY: an all-zero rusage is a valid value of the C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) writes the struct we pass.
    (unsafe { libc::getrusage(who, &mut usage) } == 0).then_some(usage)
}

/// A `getrusage` time as a duration.
fn timeval(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
}

/// The CPU time (user and system) a `getrusage` result counts.
pub(crate) fn cpu_of(u: &libc::rusage) -> Duration {
    timeval(u.ru_utime) + timeval(u.ru_stime)
}

/// The CPU time this whole process has used (all its threads; vCPUs'
/// guest time counts as user time).
pub(crate) fn cpu_used() -> Duration {
    usage().map_or(Duration::ZERO, |u| cpu_of(&u))
}

/// This process's peak resident set, KiB.
fn peak_rss_kib() -> u64 {
    usage().map_or(0, |u| u64::try_from(u.ru_maxrss).unwrap_or(0))
}

/// Where this process's time went (its vCPUs' guest time counts as
/// user time) and how often it faulted and waited: what tells a guest
/// that computes from one that waits.
fn rusage() -> serde_json::Value {
    let Some(u) = usage() else {
        return serde_json::Value::Null;
    };
    let ms = |t: libc::timeval| timeval(t).as_millis() as u64;
    serde_json::json!({
        "user_ms": ms(u.ru_utime),
        "sys_ms": ms(u.ru_stime),
        "minor_faults": u.ru_minflt,
        "major_faults": u.ru_majflt,
        "waits": u.ru_nvcsw,
        "preempted": u.ru_nivcsw,
    })
}

/// `RssAnon` of /proc/self/status, KiB, if there is a /proc.
fn rss_anon_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How much of guest memory is resident (mincore over every region).
fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter_map(|region| region_mapping(mem, region).ok()?.2)
        .map(|pages| pages.iter().filter(|b| **b & 1 == 1).count() as u64 * 4096)
        .sum()
}

/// One region's host mapping (its start and length) and which of its
/// 4 KiB pages are resident (`mincore`: bit 0 of each byte; `None` when
/// `mincore` fails).
fn region_mapping(
    mem: &GuestMemoryMmap,
    region: &vm_memory::GuestRegionMmap,
) -> Result<(*mut u8, usize, Option<Vec<u8>>), vm_memory::GuestMemoryError> {
    let host = mem.get_host_address(region.start_addr())?;
    let len = region.len() as usize;
    let mut pages = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `host..host+len` is one live mapping owned by `mem` (page
    // aligned: mmap'd), and `pages` has one byte per page of it.
    let rc = unsafe { libc::mincore(host.cast(), len, pages.as_mut_ptr()) };
    Ok((host, len, (rc == 0).then_some(pages)))
}

/// This process's resource usage, for leak checks across many boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProcessUsage {
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub peak_rss_kib: u64,
}

impl ProcessUsage {
    /// Read it from /proc/self.
    pub fn now() -> Self {
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Self {
            fds,
            threads: field("Threads:") as usize,
            rss_kib: field("VmRSS:"),
            peak_rss_kib: field("VmHWM:"),
        }
    }
}

/// Refuse hosts whose KVM cannot run the guest.
///
/// # Errors
/// [`VmmError::PvmHost`] or [`VmmError::NoKvm`].
pub fn check_host() -> Result<Kvm, VmmError> {
    refuse_pvm()?;
    Kvm::new().map_err(VmmError::NoKvm)
}

/// Refuse a PVM host (whose KVM hangs stock guests). A jailed VMM checks
/// this before entering its jail, which has no /sys.
///
/// # Errors
/// [`VmmError::PvmHost`].
pub fn refuse_pvm() -> Result<(), VmmError> {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(VmmError::PvmHost);
    }
    Ok(())
}

impl VmConfig {
    /// A VM of `kernel` and `initrd` with the defaults of `airlock-vmm`'s
    /// flags: 256 MiB, one vCPU, 60 s, a 1 MiB console, no devices beyond
    /// the always-present ones, no filters.
    pub fn new(kernel: PathBuf, initrd: PathBuf) -> Self {
        Self {
            kernel,
            initrd,
            cmdline_extra: String::new(),
            memory_mib: 256,
            vcpus: 1,
            timeout: Duration::from_secs(60),
            console_cap: 1 << 20,
            vsock: None,
            stop: None,
            pmem: None,
            shares: Vec::new(),
            seccomp: None,
            seccomp_selftest: false,
            jail_selftest: None,
            report_threads: false,
            share_write_limit: None,
            snapshot: None,
            park: None,
        }
    }

    /// Refuse values the VMM cannot run with, naming the field.
    ///
    /// # Errors
    /// [`VmmError::Config`].
    pub fn validate(&self) -> Result<(), VmmError> {
        if !(64..=3072).contains(&self.memory_mib) {
            return Err(VmmError::Config {
                field: "memory_mib",
                message: format!("must be 64..=3072, got {}", self.memory_mib),
            });
        }
        if !(1..=16).contains(&self.vcpus) {
            return Err(VmmError::Config {
                field: "vcpus",
                message: format!("must be 1..=16, got {}", self.vcpus),
            });
        }
        if self.shares.len() > devices::FS_SLOTS.len() {
            return Err(VmmError::Config {
                field: "shares",
                message: format!(
                    "at most {} directories, got {}",
                    devices::FS_SLOTS.len(),
                    self.shares.len()
                ),
            });
        }
        for (i, s) in self.shares.iter().enumerate() {
            if !airlock_abi::is_share_tag(&s.tag) {
                return Err(VmmError::Config {
                    field: "shares",
                    message: format!(
                        "share {i}: tag {:?} must be 1..=36 letters, digits, - or _",
                        s.tag
                    ),
                });
            }
            if self.shares[..i].iter().any(|o| o.tag == s.tag) {
                return Err(VmmError::Config {
                    field: "shares",
                    message: format!("share {i}: tag {:?} is used twice", s.tag),
                });
            }
            if !s.dir.is_absolute() {
                return Err(VmmError::Config {
                    field: "shares",
                    message: format!(
                        "share {:?}: {} is not an absolute path",
                        s.tag,
                        s.dir.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// What a snapshot of `cfg` must have been made from: this VMM's build
/// (its executable), the kernel, initramfs and weights (their digests), the
/// VM's shape and its extra command line.
///
/// # Errors
/// A file cannot be read.
pub fn snapshot_identity(cfg: &VmConfig) -> Result<snapshot::Identity, VmmError> {
    let exe = std::env::current_exe().map_err(|source| VmmError::File {
        path: "/proc/self/exe".into(),
        source,
    })?;
    snapshot_identity_with(&exe, cfg, &mut snapshot::file_sha256_hex)
}

/// The identity a caller gave, else this VMM's own ([`snapshot_identity`]).
fn given_or_own_identity(
    given: &Option<snapshot::Identity>,
    cfg: &VmConfig,
) -> Result<snapshot::Identity, VmmError> {
    match given {
        Some(i) => Ok(i.clone()),
        None => snapshot_identity(cfg),
    }
}

/// [`snapshot_identity`] of `cfg` run by the VMM binary `vmm`, each file's
/// digest (hex SHA-256) from `digest` — a caller that starts many VMs
/// keeps the digests of files it has hashed.
///
/// # Errors
/// `digest` fails for a file.
pub fn snapshot_identity_with(
    vmm: &Path,
    cfg: &VmConfig,
    digest: &mut dyn FnMut(&Path) -> std::io::Result<String>,
) -> Result<snapshot::Identity, VmmError> {
    let mut digest = |path: &Path| -> Result<String, VmmError> {
        digest(path).map_err(|source| VmmError::File {
            path: path.into(),
            source,
        })
    };
    Ok(snapshot::Identity {
        vmm: digest(vmm)?,
        kernel: digest(&cfg.kernel)?,
        initrd: digest(&cfg.initrd)?,
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        cmdline: cfg.cmdline_extra.clone(),
        weights: cfg.pmem.as_deref().map(&mut digest).transpose()?,
        shares: cfg.shares.iter().map(|s| s.tag.clone()).collect(),
    })
}

/// `CLOCK_MONOTONIC` now, in ns: one clock for the daemon and its VMM
/// processes, so a VM's start can be followed across both (the VMM's
/// report gives its `clock_ns`; `cargo xtask bench start` lines them up).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// Boot a VM (or restore it from a snapshot, see [`VmConfig::snapshot`])
/// and run it until it resets, halts, fails, times out or pauses for a
/// snapshot.
///
/// # Errors
/// Anything that prevents the VM from starting; once it runs, its end is a
/// [`VmExit`] in the report.
pub fn run(cfg: &VmConfig) -> Result<RunReport, VmmError> {
    let start = Instant::now();
    // Where setup time goes, step by step (the report's `setup_steps_us`).
    let mut steps: Vec<(&'static str, Duration)> = Vec::new();
    let mut step = |name: &'static str| steps.push((name, start.elapsed()));
    cfg.validate()?;
    let kvm = check_host()?;
    step("host");
    // A restore reads and checks the whole state file before KVM is asked
    // for anything.
    let restoring = match &cfg.snapshot {
        Some(SnapshotPlan::Restore { dir, identity }) => {
            let identity = given_or_own_identity(identity, cfg)?;
            let state = snapshot::read_state(&SnapshotPlan::state_path(dir), &identity)?;
            step("state_file");
            let image = SnapshotPlan::memory_path(dir);
            let file = jail::open_image(&image).map_err(|source| VmmError::File {
                path: image.clone(),
                source,
            })?;
            Some((state, file))
        }
        _ => None,
    };
    step("snapshot_state");
    let making = match &cfg.snapshot {
        Some(SnapshotPlan::Make { at, dir, identity }) => {
            let code = airlock_abi::boot_stage_code(at).ok_or_else(|| VmmError::Config {
                field: "snapshot.at",
                message: format!(
                    "{at:?} is not a boot stage ({:?})",
                    airlock_abi::BOOT_STAGES
                ),
            })?;
            Some((code, dir.clone(), given_or_own_identity(identity, cfg)?))
        }
        _ => None,
    };
    // Until `vcpu::run`, no vCPU has entered the guest, so an early return
    // may drop memory and mappings in any order.
    let (vm, vcpus) = builder::create_vm(&kvm, cfg.vcpus)?;
    step("vm");
    let mem_size = u64::from(cfg.memory_mib) << 20;
    let memory = match &restoring {
        Some((_, file)) => builder::guest_memory_from(&vm, mem_size, file)?,
        None => builder::guest_memory(&vm, mem_size)?,
    };
    step("memory");
    let load_start = Instant::now();
    let loaded = match restoring {
        Some(_) => None,
        None => {
            let kernel = builder::load_kernel(&memory.mem, &cfg.kernel)?;
            let initrd =
                builder::load_initrd(&memory.mem, &cfg.initrd, mem_size, kernel.kernel_end)?;
            Some((kernel, initrd))
        }
    };
    let image_load = load_start.elapsed();
    step("images");
    let devices = builder::attach_devices(&vm, &memory.mem, cfg, start)?;
    step("devices");
    // Each thread's capabilities, when the report is to list them: read
    // now, while the device threads live (they end with the guest's reset,
    // before the run returns).
    let threads = if cfg.report_threads {
        jail::thread_caps()
    } else {
        Vec::new()
    };
    match (&restoring, loaded) {
        (Some((state, _)), _) => {
            // The guest's memory is the snapshot's: set KVM's state, then
            // each device's (virtio devices resume at their used rings).
            snapshot::kvm_state::restore(&vm, &vcpus, &state.vm)?;
            step("kvm_state");
            devices.restore(&state.devices)?;
        }
        (None, Some((kernel, initrd))) => {
            let cmdline = builder::kernel_cmdline(cfg, &vcpus[0], &devices.cmdline)?;
            builder::configure_boot(&memory.mem, mem_size, &cmdline, initrd, cfg.vcpus)?;
            vcpu::configure(&kvm, &vcpus, &memory.mem, kernel.kernel_load)?;
        }
        (None, None) => unreachable!("a boot loads its images"),
    }
    let pause = making.as_ref().map(|(code, _, _)| {
        let flag = Arc::new(AtomicBool::new(false));
        devices
            .marker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pause_at(*code, flag.clone());
        flag
    });

    step("registers");
    let setup = start.elapsed();
    let mut setup_steps = steps;
    // The devices step in its parts, before it.
    if let Some(at) = setup_steps.iter().position(|(n, _)| *n == "devices") {
        setup_steps.splice(at..at, devices.steps.iter().copied());
    }
    let ran = vcpu::run(vcpus, &devices.buses, cfg, pause);
    // A parked VM's word, if it came while the VM ran.
    if let Some((true, at)) = cfg.park.as_ref().and_then(|p| p.word()) {
        setup_steps.push(("go", at.saturating_duration_since(start)));
    }
    let saved = match (&ran, making) {
        (Ok((VmExit::Paused, vcpus)), Some((_, dir, identity))) => Some(save_snapshot(
            &kvm,
            &vm,
            vcpus,
            &memory.mem,
            &devices,
            &dir,
            identity,
        )),
        _ => None,
    };
    // Every vCPU thread is joined. Stop the device workers, then drop the
    // VM fd before the mappings its memory slots point into.
    devices.shutdown();
    let builder::Devices {
        buses,
        console,
        marker,
        weights,
        windows,
        register_pages,
        fs_stats,
        ..
    } = devices;
    let fs = fs_stats.iter().map(|s| s.to_json()).collect();
    drop(buses);
    let (exit, vcpus) = ran?;
    drop(vcpus);
    drop(vm);
    drop(weights);
    drop(windows);
    drop(register_pages);
    let guest_resident_bytes = resident_bytes(&memory.mem);
    let rss_anon_kib = rss_anon_kib();
    drop(memory);
    if let Some(saved) = saved {
        saved?;
    }
    let (stages, dropped) = marker.lock().unwrap_or_else(|p| p.into_inner()).marks();
    if dropped > 0 {
        tracing::warn!(
            dropped,
            "the guest wrote more boot-stage markers than are kept"
        );
    }
    Ok(RunReport {
        exit,
        console: console.text(),
        wall: start.elapsed(),
        guest_resident_bytes,
        stages,
        setup,
        image_load,
        threads,
        rss_anon_kib,
        setup_steps,
        fs,
    })
}

/// Write the snapshot of a paused VM into `dir`: the memory image first,
/// then the state file that names it (so a state file never points at an
/// image that is not all there).
fn save_snapshot(
    kvm: &Kvm,
    vm: &kvm_ioctls::VmFd,
    vcpus: &[kvm_ioctls::VcpuFd],
    mem: &GuestMemoryMmap,
    devices: &builder::Devices,
    dir: &Path,
    identity: snapshot::Identity,
) -> Result<(), VmmError> {
    let vm_state = snapshot::kvm_state::save(kvm, vm, vcpus)?;
    let device_states = devices.save()?;
    std::fs::create_dir_all(dir).map_err(|source| VmmError::File {
        path: dir.into(),
        source,
    })?;
    let region = mem.iter().next().ok_or(VmmError::RegionOverflow)?;
    let (host, len, resident) = region_mapping(mem, region).map_err(VmmError::BootData)?;
    // Without mincore every page is written (those that are not zero).
    let resident = resident.unwrap_or_else(|| vec![1; len.div_ceil(4096)]);
    // SAFETY: the vCPUs are stopped and joined; the RAM mapping lives
    // until `run` drops `memory`, after this returns. Device threads are
    // idle at the snapshot stage (no host connection, no share request).
    let ram = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
    let image = snapshot::write_memory(&SnapshotPlan::memory_path(dir), ram, |i| {
        resident.get(i).is_some_and(|b| b & 1 == 1)
    })?;
    snapshot::write_state(
        &SnapshotPlan::state_path(dir),
        &snapshot::SnapshotState {
            identity,
            memory: image,
            vm: vm_state,
            devices: device_states,
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_checked_before_anything_is_made() {
        let share = |tag: &str, dir: &str| ShareConfig {
            tag: tag.into(),
            dir: dir.into(),
            read_only: true,
        };
        let with = |shares: Vec<ShareConfig>| {
            let mut c = VmConfig::new("/k".into(), "/i".into());
            c.shares = shares;
            c.validate()
        };
        assert!(with(vec![share("grant0", "/srv/a"), share("grant_1", "/srv/b")]).is_ok());
        for (bad, why) in [
            (vec![share("", "/srv/a")], "tag"),
            (vec![share("a b", "/srv/a")], "tag"),
            (vec![share("a/b", "/srv/a")], "tag"),
            (vec![share(&"x".repeat(37), "/srv/a")], "tag"),
            (vec![share("g", "/srv/a"), share("g", "/srv/b")], "twice"),
            (vec![share("g", "relative")], "absolute"),
            (
                (0..5).map(|i| share(&format!("g{i}"), "/srv/a")).collect(),
                "at most 4",
            ),
        ] {
            match with(bad) {
                Err(VmmError::Config { field, message }) => {
                    assert_eq!(field, "shares");
                    assert!(message.contains(why), "{message}");
                }
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_parked_vm_takes_the_first_word_only() {
        let park = Park::default();
        assert!(park.word().is_none());
        park.go();
        let (went, at) = park.word().unwrap();
        assert!(went);
        // The parent's stop after the word does not take it back.
        park.cancel();
        assert_eq!(park.word(), Some((true, at)));
        // Stopped before the word: it never comes.
        let stopped = Park::default();
        stopped.cancel();
        stopped.go();
        assert!(!stopped.word().unwrap().0);
    }

    #[test]
    fn a_snapshot_names_how_many_shares_its_vm_has() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["vmm", "k", "i"] {
            std::fs::write(dir.path().join(f), f).unwrap();
        }
        let mut c = VmConfig::new(dir.path().join("k"), dir.path().join("i"));
        let digest = &mut crate::snapshot::file_sha256_hex;
        let none = snapshot_identity_with(&dir.path().join("vmm"), &c, digest).unwrap();
        c.shares = vec![ShareConfig {
            tag: "fs0".into(),
            dir: "/srv/a".into(),
            read_only: true,
        }];
        // A VM with shares is snapshotted and restored (before its guest
        // mounts them); its shape is another one.
        assert!(c.validate().is_ok());
        let one = snapshot_identity_with(&dir.path().join("vmm"), &c, digest).unwrap();
        assert_eq!(one.shares, ["fs0"]);
        assert!(matches!(
            one.check(&none),
            Err(crate::snapshot::SnapshotError::Mismatch {
                field: "shares",
                ..
            })
        ));
    }
}
