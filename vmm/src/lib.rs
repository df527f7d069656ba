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
//! Devices: COM1, and (when configured) virtio-vsock on virtio-mmio.
//! Not yet: virtio-fs, pmem.

pub mod bench;
pub mod devices;
mod layout;
mod ram;

use crate::devices::marker::{BOOT_MARKER_PORT, BootMarker, StageMark};
use crate::devices::pmem::{Pmem, PmemMapping};
use crate::devices::rtc::{RTC_DATA, RTC_INDEX, Rtc};
use crate::devices::serial::{COM1_BASE, COM1_IRQ, Com1, ConsoleLog, com1};
use crate::devices::virtio_mmio::{MMIO_SIZE, MmioTransport, VirtioDevice, VirtioError};
use crate::devices::vsock::Vsock;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{Cmdline, KernelLoader, elf::Elf, load_cmdline};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is PVM: stock guests hang on it.
    #[error(
        "/dev/kvm on this host is PVM (/sys/module/kvm_pvm exists); it cannot run Airlock's stock Linux guest. Run VM tests inside the nested harness (cargo xtask nested)."
    )]
    PvmHost,
    /// /dev/kvm cannot be opened.
    #[error("/dev/kvm cannot be opened: {0}.")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}.")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("Guest memory: {0}.")]
    Memory(String),
    /// A boot file could not be read.
    #[error("Cannot read {path}: {message}.")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// The kernel could not be loaded.
    #[error("The kernel cannot be loaded: {0}.")]
    Kernel(String),
    /// The configuration is not usable.
    #[error("Bad VM configuration: {0}.")]
    Config(String),
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
}

/// Guest-physical base of the pmem region (above RAM and the MMIO hole).
pub const PMEM_BASE: u64 = 0x1_0000_0000;
/// The pmem device's virtio-mmio window and IRQ.
pub const PMEM_MMIO_BASE: u64 = 0xd000_1000;
/// IRQ of the pmem device.
pub const PMEM_IRQ: u32 = 6;

/// The guest's vsock device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// Host-side Unix socket (`CONNECT <port>\n` → `OK <port>\n`).
    pub uds_path: PathBuf,
}

/// Guest-physical base of the virtio-mmio vsock window and its IRQ.
pub const VSOCK_MMIO_BASE: u64 = 0xd000_0000;
/// IRQ of the vsock device (an ISA pin of the IOAPIC, edge).
pub const VSOCK_IRQ: u32 = 5;

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
        serde_json::json!({
            "exit": self.exit.label(),
            "wall_ms": self.wall.as_millis() as u64,
            "stages": stages,
            "setup_us": self.setup.as_micros() as u64,
            "image_load_us": self.image_load.as_micros() as u64,
            "peak_rss_kib": ProcessUsage::now().peak_rss_kib,
            "guest_resident_kib": self.guest_resident_bytes >> 10,
            "console": self.console,
        })
    }
}

/// How much of guest memory is resident (mincore over every region).
fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host..host+len` is one live mapping owned by `mem` (page
        // aligned: mmap'd), and `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * page as u64;
        }
    }
    total
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
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(VmmError::PvmHost);
    }
    Kvm::new().map_err(|e| VmmError::NoKvm(e.to_string()))
}

fn read(path: &Path) -> Result<std::fs::File, VmmError> {
    std::fs::File::open(path).map_err(|e| VmmError::File {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Boot a VM and run it until it resets, halts, fails or times out.
///
/// # Errors
/// Anything that prevents the VM from starting; once it runs, its end is a
/// [`VmExit`] in the report.
pub fn run(cfg: &VmConfig) -> Result<RunReport, VmmError> {
    let start = Instant::now();
    if !(64..=3072).contains(&cfg.memory_mib) {
        return Err(VmmError::Config(format!(
            "memory_mib must be 64..=3072, got {}",
            cfg.memory_mib
        )));
    }
    if !(1..=16).contains(&cfg.vcpus) {
        return Err(VmmError::Config(format!(
            "vcpus must be 1..=16, got {}",
            cfg.vcpus
        )));
    }
    let kvm = check_host()?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("create PIT"))?;

    let mem_size = u64::from(cfg.memory_mib) << 20;
    // `ram` is declared before `mem`, so every early return drops `mem`
    // (and the devices holding clones of it, declared later) first.
    let ram = ram::GuestRam::new(mem_size as usize)
        .map_err(|e| VmmError::Memory(format!("mapping guest RAM: {e}")))?;
    let mem = {
        // SAFETY: `ram` is a live anonymous mapping of exactly this size and
        // outlives `mem` and all its clones (dropped last, below).
        let region = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(ram.len())
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(ram.as_ptr())
        }
        .build()
        .map_err(|e| VmmError::Memory(e.to_string()))?;
        let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| VmmError::Memory("guest RAM region overflows".into()))?;
        GuestMemoryMmap::<()>::from_regions(vec![region])
            .map_err(|e| VmmError::Memory(e.to_string()))?
    };
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives
        // the VM fd (both are dropped at the end of this function, the VM
        // first because vCPU threads are joined before `mem` goes away).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }

    // Kernel, command line, initramfs, zero page, MP table.
    let load_start = Instant::now();
    let mut kernel = read(&cfg.kernel)?;
    let loaded = Elf::load(
        &mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|e| VmmError::Kernel(e.to_string()))?;
    let mut image_load = load_start.elapsed();
    // vCPU fds first: the TSC frequency they report goes on the command line.
    let mut vcpus = Vec::new();
    for id in 0..cfg.vcpus {
        vcpus.push(
            vm.create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?,
        );
    }
    let mut cmdline =
        Cmdline::new(layout::CMDLINE_MAX).map_err(|e| VmmError::Config(e.to_string()))?;
    // The guest takes its clock from kvm-clock (see the CPUID below); the
    // TSC frequency on the command line is for the TSC clocksource it may
    // switch to, which would otherwise be calibrated against the PIT — a
    // step that fails on a busy (nested) host ("Unable to calibrate against
    // PIT") and left guests hanging without a clocksource. `tsc=reliable`
    // keeps the clocksource watchdog from judging the TSC against jiffies,
    // whose ticks a busy host delays ("skew is too large" → "No current
    // clocksource").
    if let Ok(khz) = vcpus[0].get_tsc_khz() {
        cmdline
            .insert_str(format!("tsc_early_khz={khz} tsc=reliable"))
            .map_err(|e| VmmError::Config(format!("command line: {e}")))?;
    }
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(|e| VmmError::Config(e.to_string()))?;
    if !cfg.cmdline_extra.is_empty() {
        cmdline
            .insert_str(&cfg.cmdline_extra)
            .map_err(|e| VmmError::Config(format!("command line: {e}")))?;
    }
    if cfg.pmem.is_some() {
        cmdline
            .insert_str(format!(
                "virtio_mmio.device=4K@{PMEM_MMIO_BASE:#x}:{PMEM_IRQ}"
            ))
            .map_err(|e| VmmError::Config(format!("command line: {e}")))?;
    }
    if cfg.vsock.is_some() {
        cmdline
            .insert_str(format!(
                "virtio_mmio.device=4K@{VSOCK_MMIO_BASE:#x}:{VSOCK_IRQ}"
            ))
            .map_err(|e| VmmError::Config(format!("command line: {e}")))?;
    }
    load_cmdline(&mem, GuestAddress(layout::CMDLINE), &cmdline)
        .map_err(|e| VmmError::Config(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| VmmError::Config(e.to_string()))?
        .as_bytes()
        .len();

    // Read the initramfs straight into guest memory: no heap copy, so the
    // VMM's own peak RSS does not grow with the image.
    let load_start = Instant::now();
    let mut initrd = read(&cfg.initrd)?;
    let initrd_len = initrd
        .metadata()
        .map_err(|e| VmmError::File {
            path: cfg.initrd.clone(),
            message: e.to_string(),
        })?
        .len();
    let initrd_addr = mem_size.saturating_sub(initrd_len) & !0xfff;
    if initrd_addr <= loaded.kernel_end {
        return Err(VmmError::Config(
            "the initramfs does not fit above the kernel; give the VM more memory".into(),
        ));
    }
    mem.read_exact_volatile_from(GuestAddress(initrd_addr), &mut initrd, initrd_len as usize)
        .map_err(|e| VmmError::File {
            path: cfg.initrd.clone(),
            message: e.to_string(),
        })?;
    drop(initrd);
    image_load += load_start.elapsed();

    let mut params = linux_loader::loader::bootparam::boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd_addr as u32;
    params.hdr.ramdisk_size = initrd_len as u32;
    params.e820_table[0].addr = 0;
    params.e820_table[0].size = layout::LOW_RAM_END;
    params.e820_table[0].r#type = 1;
    params.e820_table[1].addr = layout::HIGH_RAM_START;
    params.e820_table[1].size = mem_size - layout::HIGH_RAM_START;
    params.e820_table[1].r#type = 1;
    params.e820_entries = 2;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| VmmError::Memory(e.to_string()))?;
    let (mp_addr, mp) = layout::mptable(cfg.vcpus);
    mem.write_slice(&mp, GuestAddress(mp_addr))
        .map_err(|e| VmmError::Memory(e.to_string()))?;

    // Devices.
    let console = ConsoleLog::new(cfg.console_cap);
    let irq =
        EventFd::new(libc_efd_nonblock()).map_err(|e| VmmError::Memory(format!("eventfd: {e}")))?;
    vm.register_irqfd(&irq, COM1_IRQ)
        .map_err(kvm_err("register serial irqfd"))?;
    let pio = Arc::new(Pio {
        serial: Mutex::new(com1(irq, console.clone())),
        marker: BootMarker::new(start),
        rtc: Mutex::new(Rtc::default()),
    });
    let mut devices: Vec<(u64, Arc<Mutex<MmioTransport>>)> = Vec::new();
    if let Some(v) = &cfg.vsock {
        devices.push((VSOCK_MMIO_BASE, vsock_device(&vm, &mem, v)?));
    }
    // The weights mapping must outlive the VM fd: declared after `vm`, it
    // is dropped after it (explicitly below, too).
    let mut weights: Option<PmemMapping> = None;
    if let Some(path) = &cfg.pmem {
        let map = PmemMapping::open(path).map_err(|e| VmmError::Config(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: 1,
            flags: kvm_bindings::KVM_MEM_READONLY,
            guest_phys_addr: PMEM_BASE,
            memory_size: map.len(),
            userspace_addr: map.host_addr(),
        };
        // SAFETY: `map` is a live read-only mapping of `map.len()` bytes that
        // is dropped only after the VM fd (see the end of this function).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set pmem memory region"))?;
        let dev = Pmem::new(PMEM_BASE, map.len());
        devices.push((
            PMEM_MMIO_BASE,
            mmio_device(&vm, &mem, Box::new(dev), PMEM_MMIO_BASE, PMEM_IRQ)?,
        ));
        weights = Some(map);
    }

    // vCPUs.
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get supported CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    for (id, vcpu) in vcpus.iter().enumerate() {
        let id = id as u8;
        let mut c = cpuid.clone();
        for e in c.as_mut_slice() {
            if e.function == 1 {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24); // initial APIC id
                // KVM emulates the TSC-deadline timer but leaves the CPUID
                // bit to userspace. With it (and the TSC frequency from the
                // command line) the guest's LAPIC timer needs no calibration
                // against the PIT, a step that fails on a busy nested host
                // ("APIC timer disabled due to verification failure").
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
                // Tell the guest it runs on a hypervisor. With KVM's own
                // leaves (0x4000_0000.., passed through from the supported
                // CPUID) it then uses kvm-clock, x2APIC through MSRs
                // instead of xAPIC MMIO (each access an emulated
                // instruction), PV EOI and no I/O port delays: about 10 %
                // off a boot in the nested harness. (This once looked like
                // it hung nested guests; that was the two-vCPU outer-VM
                // emulation bug, see xtask's OUTER_QEMU.)
                e.ecx |= 1 << 31;
            }
        }
        vcpu.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
        set_lint(vcpu)?;
        if id == 0 {
            let mut sregs = vcpu.get_sregs().map_err(kvm_err("get sregs"))?;
            layout::setup_long_mode(&mem, &mut sregs)
                .map_err(|e| VmmError::Memory(e.to_string()))?;
            vcpu.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
            vcpu.set_regs(&layout::boot_regs(loaded.kernel_load.0))
                .map_err(kvm_err("set regs"))?;
            vcpu.set_fpu(&layout::boot_fpu())
                .map_err(kvm_err("set FPU"))?;
        }
    }

    let setup = start.elapsed();
    let exit = run_vcpus(vcpus, &pio, &devices, cfg.timeout, cfg.stop.as_deref());
    for (_, d) in &devices {
        d.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    }
    drop(devices);
    drop(vm);
    drop(weights);
    let guest_resident_bytes = resident_bytes(&mem);
    drop(mem);
    drop(ram);
    let (stages, dropped) = pio.marker.marks();
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
    })
}

/// The vsock device on its virtio-mmio window.
fn vsock_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    v: &VsockConfig,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    if v.guest_cid < 3 {
        return Err(VmmError::Config(format!(
            "the guest CID must be 3 or more, got {}",
            v.guest_cid
        )));
    }
    let device =
        Vsock::new(v.guest_cid, v.uds_path.clone()).map_err(|e| VmmError::Config(e.to_string()))?;
    mmio_device(vm, mem, Box::new(device), VSOCK_MMIO_BASE, VSOCK_IRQ)
}

/// A virtio device on the virtio-mmio window at `base`: an irqfd for its
/// IRQ, one ioeventfd per queue on the QueueNotify register.
fn mmio_device(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    base: u64,
    irq_line: u32,
) -> Result<Arc<Mutex<MmioTransport>>, VmmError> {
    let dev_err = |e: VirtioError| VmmError::Config(e.to_string());
    let irq =
        EventFd::new(libc_efd_nonblock()).map_err(|e| VmmError::Memory(format!("eventfd: {e}")))?;
    vm.register_irqfd(&irq, irq_line)
        .map_err(kvm_err("register virtio irqfd"))?;
    let mut evts = Vec::new();
    for q in 0..device.queue_max_sizes().len() as u32 {
        let e = EventFd::new(libc_efd_nonblock())
            .map_err(|e| VmmError::Memory(format!("eventfd: {e}")))?;
        vm.register_ioevent(
            &e,
            &IoEventAddress::Mmio(base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)),
            q,
        )
        .map_err(kvm_err("register virtio ioeventfd"))?;
        evts.push(e);
    }
    let t = MmioTransport::new(device, mem.clone(), Arc::new(irq), evts).map_err(dev_err)?;
    Ok(Arc::new(Mutex::new(t)))
}

fn libc_efd_nonblock() -> i32 {
    libc::EFD_NONBLOCK
}

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's BIOS would leave them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const LINT0: usize = 0x350;
    const LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get LAPIC"))?;
    for (off, mode) in [(LINT0, 7u32), (LINT1, 4u32)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *b as i8;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))
}

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The virtio-mmio devices by window base.
type Mmio = Arc<Vec<(u64, Arc<Mutex<MmioTransport>>)>>;

/// The port-I/O devices: COM1, the boot-stage marker and the CMOS clock.
struct Pio {
    serial: Mutex<Com1>,
    marker: BootMarker,
    rtc: Mutex<Rtc>,
}

fn run_vcpus(
    vcpus: Vec<VcpuFd>,
    pio: &Arc<Pio>,
    devices: &[(u64, Arc<Mutex<MmioTransport>>)],
    timeout: Duration,
    external_stop: Option<&AtomicBool>,
) -> VmExit {
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            tracing::warn!(error = %e, "cannot install the vCPU kick handler");
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<VmExit>();
    let mut threads = Vec::new();
    let devices: Mmio = Arc::new(devices.to_vec());
    for (i, mut vcpu) in vcpus.into_iter().enumerate() {
        let stop = stop.clone();
        let tx = tx.clone();
        let pio = pio.clone();
        let devices = devices.clone();
        let t = std::thread::Builder::new()
            .name(format!("airlock-vcpu{i}"))
            .stack_size(crate::devices::THREAD_STACK)
            .spawn(move || {
                let exit = vcpu_loop(&mut vcpu, &pio, &devices, &stop);
                stop.store(true, Ordering::SeqCst);
                let _ = tx.send(exit);
            })
            .expect("spawn vCPU thread");
        threads.push(t);
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let exit = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break VmExit::Timeout;
        }
        if external_stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
            break VmExit::Stopped;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok(e) => break e,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break VmExit::Error("vCPU threads ended without a report".into());
            }
        }
    };
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        // Kick every vCPU until it leaves KVM_RUN and sees `stop`.
        while !t.is_finished() {
            use vmm_sys_util::signal::Killable;
            let _ = t.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = t.join();
    }
    exit
}

fn vcpu_loop(vcpu: &mut VcpuFd, pio: &Pio, devices: &Mmio, stop: &AtomicBool) -> VmExit {
    let com1 = COM1_BASE..COM1_BASE + 8;
    // The device decides what each of its two ports does.
    let rtc = RTC_INDEX..=RTC_DATA;
    let find = |addr: u64| {
        devices
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr))
            .map(|(base, d)| (addr - base, d))
    };
    loop {
        if stop.load(Ordering::SeqCst) {
            return VmExit::Timeout;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(&b) = data.first() {
                    if com1.contains(&port) {
                        let mut s = pio.serial.lock().unwrap_or_else(|p| p.into_inner());
                        let _ = s.write((port - COM1_BASE) as u8, b);
                    } else if port == BOOT_MARKER_PORT {
                        pio.marker.record(b);
                    } else if rtc.contains(&port) {
                        let mut r = pio.rtc.lock().unwrap_or_else(|p| p.into_inner());
                        r.write(port, b);
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if com1.contains(&port) {
                    let mut s = pio.serial.lock().unwrap_or_else(|p| p.into_inner());
                    data[0] = s.read((port - COM1_BASE) as u8);
                } else if rtc.contains(&port) {
                    let r = pio.rtc.lock().unwrap_or_else(|p| p.into_inner());
                    data.fill(0);
                    data[0] = r.read(port);
                } else {
                    data.fill(0xff); // no device
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match find(addr) {
                Some((off, d)) => d.lock().unwrap_or_else(|p| p.into_inner()).read(off, data),
                None => data.fill(0),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                // Writes outside every device window (including the guest
                // writing to its read-only pmem region) are dropped.
                if let Some((off, d)) = find(addr) {
                    d.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                }
            }
            Ok(VcpuExit::Shutdown) => return VmExit::Reset,
            Ok(VcpuExit::Hlt) => return VmExit::Halted,
            Ok(VcpuExit::SystemEvent(..)) => return VmExit::Reset,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExit::Error(format!("entry failed: reason {reason:#x} on cpu {cpu}"));
            }
            Ok(VcpuExit::InternalError) => return VmExit::Error("KVM internal error".into()),
            Ok(other) => tracing::debug!(exit = ?other, "unhandled vCPU exit"),
            Err(e) if e.errno() == 4 || e.errno() == 11 => {} // EINTR/EAGAIN: kicked
            Err(e) => return VmExit::Error(format!("KVM_RUN: {e}")),
        }
    }
}
