//! The steps [`crate::run`] takes, in order: create the VM and its vCPUs,
//! map guest memory, load the kernel and the initramfs, attach each device
//! from the device tables, write the command line and boot data. Each step
//! fails with its own [`VmmError`] variant.

use crate::devices::fs::device::VirtioFs;
use crate::devices::fs::window::DaxWindow;
use crate::devices::marker::BootMarker;
use crate::devices::pmem::{Pmem, PmemMapping};
use crate::devices::rtc::Rtc;
use crate::devices::serial::{self, Com1, ConsoleLog, com1};
use crate::devices::virtio_mmio::MmioTransport;
use crate::devices::vsock::Vsock;
use crate::devices::{self, Bus, MmioSlot, PioSlot, VirtioDevice};
use crate::vcpu::Buses;
use crate::{BASE_CMDLINE, PMEM_BASE, VmConfig, VmmError, kvm_err, layout, ram};
use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::loader::{Cmdline, KernelLoader, elf::Elf, load_cmdline};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Where the TSS goes (three pages below the 4 GiB boundary, as KVM wants).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Step 1: the VM (with an in-kernel irqchip and PIT) and its vCPU fds.
pub(crate) fn create_vm(kvm: &Kvm, vcpus: u8) -> Result<(VmFd, Vec<VcpuFd>), VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("set TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("create PIT"))?;
    let vcpus = (0..vcpus)
        .map(|id| {
            vm.create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))
        })
        .collect::<Result<_, _>>()?;
    Ok((vm, vcpus))
}

/// Guest RAM: the vm-memory view and the mapping under it. Fields drop in
/// order, so `mem` goes before the mapping it points into.
pub(crate) struct Memory {
    pub mem: GuestMemoryMmap,
    _ram: ram::GuestRam,
}

/// Step 2: map `size` bytes of guest RAM at guest-physical 0 and register
/// it with the VM.
pub(crate) fn guest_memory(vm: &VmFd, size: u64) -> Result<Memory, VmmError> {
    let ram = ram::GuestRam::new(size as usize).map_err(VmmError::MapRam)?;
    register_memory(vm, ram)
}

/// Step 2 of a restore: guest RAM from a snapshot's memory image, mapped
/// copy-on-write ([`ram::GuestRam::from_file`]).
pub(crate) fn guest_memory_from(
    vm: &VmFd,
    size: u64,
    image: &std::fs::File,
) -> Result<Memory, VmmError> {
    let ram = ram::GuestRam::from_file(image, size as usize).map_err(VmmError::MapRam)?;
    register_memory(vm, ram)
}

fn register_memory(vm: &VmFd, ram: ram::GuestRam) -> Result<Memory, VmmError> {
    // SAFETY: `ram` is a live private mapping of exactly this size and
    // outlives `mem` and all its clones (`Memory` drops `mem` first; the
    // devices holding clones are dropped before `Memory` by `run`).
    let region = unsafe {
        vm_memory::mmap::MmapRegionBuilder::new(ram.len())
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .with_raw_mmap_pointer(ram.as_ptr())
    }
    .build()
    .map_err(VmmError::MmapRegion)?;
    let region =
        vm_memory::GuestRegionMmap::new(region, GuestAddress(0)).ok_or(VmmError::RegionOverflow)?;
    let mem =
        GuestMemoryMmap::<()>::from_regions(vec![region]).map_err(VmmError::RegionCollection)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(VmmError::BootData)?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which
        // outlives every vCPU run: `run` joins the vCPU threads before it
        // drops `Memory` (and no vCPU runs before this function returns).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set memory region"))?;
    }
    Ok(Memory { mem, _ram: ram })
}

fn open(path: &Path) -> Result<std::fs::File, VmmError> {
    crate::jail::open_image(path).map_err(|source| VmmError::File {
        path: path.into(),
        source,
    })
}

/// Step 3a: the ELF kernel into guest memory; its entry point and end.
pub(crate) fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<linux_loader::loader::KernelLoaderResult, VmmError> {
    let mut kernel = open(path)?;
    Elf::load(
        mem,
        None,
        &mut kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(VmmError::Kernel)
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Initrd {
    pub addr: u64,
    pub len: u64,
}

/// Step 3b: the initramfs at the top of RAM, read straight into guest
/// memory (no heap copy, so the VMM's own peak RSS does not grow with the
/// image).
pub(crate) fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    kernel_end: u64,
) -> Result<Initrd, VmmError> {
    let mut initrd = open(path)?;
    let file_err = |source| VmmError::File {
        path: path.into(),
        source,
    };
    let len = initrd.metadata().map_err(file_err)?.len();
    let addr = mem_size.saturating_sub(len) & !0xfff;
    if addr <= kernel_end {
        return Err(VmmError::InitrdTooLarge { len, mem_size });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut initrd, len as usize)
        .map_err(VmmError::BootData)?;
    Ok(Initrd { addr, len })
}

/// The devices of one VM, attached. Dropping it stops nothing: `run`
/// shuts the virtio devices down first (see [`Devices::shutdown`]).
pub(crate) struct Devices {
    pub buses: Buses,
    pub console: ConsoleLog,
    pub marker: Arc<Mutex<BootMarker>>,
    serial: Arc<Mutex<Com1>>,
    /// Each virtio transport with its table name.
    virtio: Vec<(&'static str, Arc<Mutex<MmioTransport>>)>,
    /// The command-line entries that announce the virtio devices.
    pub cmdline: Vec<String>,
    /// The weights mapping behind the pmem memory slot; `run` drops it
    /// only after the VM fd.
    pub weights: Option<PmemMapping>,
    /// The shares' DAX windows behind their memory slots; as `weights`.
    pub windows: Vec<Arc<DaxWindow>>,
    /// The virtio devices' register pages behind their memory slots; as
    /// `weights`.
    pub register_pages: Vec<Arc<devices::virtio_mmio::RegisterPage>>,
    /// Each share's file-server counters, for the report.
    pub fs_stats: Vec<Arc<crate::devices::fs::device::FsStats>>,
    /// When each part of attaching them ended, since the run's start (the
    /// report's `setup_steps_us`, before `devices`; with several shares a
    /// share's part is the last one's).
    pub steps: Vec<(&'static str, std::time::Duration)>,
}

impl Devices {
    /// Stop every virtio device's worker thread.
    pub fn shutdown(&self) {
        for (_, d) in &self.virtio {
            d.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        }
    }

    /// Every device's state for a snapshot, by table name (COM1, then the
    /// virtio transports).
    ///
    /// # Errors
    /// A state cannot be encoded.
    pub fn save(&self) -> Result<Vec<(String, Vec<u8>)>, VmmError> {
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![(devices::COM1.name.to_string(), serial::save(&serial))];
        for (name, t) in &self.virtio {
            let t = t.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = t.snapshot_refusal() {
                return Err(restore_err(name, why));
            }
            let st = t.state();
            let bytes = postcard::to_allocvec(&st).map_err(|e| restore_err(name, e.to_string()))?;
            out.push((name.to_string(), bytes));
        }
        Ok(out)
    }

    /// Put back a snapshot's device states: the same devices must be
    /// there, no more and no fewer.
    ///
    /// # Errors
    /// A device is missing on either side, or its state does not decode or
    /// fit.
    pub fn restore(&self, states: &[(String, Vec<u8>)]) -> Result<(), VmmError> {
        let mut names: Vec<&str> = std::iter::once(devices::COM1.name)
            .chain(self.virtio.iter().map(|(n, _)| *n))
            .collect();
        let mut saved: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        saved.sort_unstable();
        if names != saved {
            return Err(restore_err(
                "devices",
                format!("the snapshot has devices {saved:?}, this VM {names:?}"),
            ));
        }
        for (name, bytes) in states {
            if name == devices::COM1.name {
                let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
                *serial = serial::restored(&serial, bytes)
                    .map_err(|e| restore_err(devices::COM1.name, e))?;
                continue;
            }
            let Some((slot, t)) = self.virtio.iter().find(|(n, _)| *n == name) else {
                continue; // the name check above makes this unreachable
            };
            let st: crate::devices::virtio_mmio::TransportState =
                postcard::from_bytes(bytes).map_err(|e| restore_err(slot, e.to_string()))?;
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(&st)
                .map_err(|source| VmmError::Device {
                    device: slot,
                    source,
                })?;
        }
        Ok(())
    }
}

fn restore_err(device: &'static str, message: String) -> VmmError {
    device_err(device, format!("snapshot state: {message}"))
}

/// `device` could not be set up: `message` says why.
fn device_err(device: &'static str, message: String) -> VmmError {
    VmmError::Device {
        device,
        source: crate::devices::virtio_mmio::VirtioError::Activate(message),
    }
}

/// Make `len` bytes at `host` the read-only memory slot `slot` at
/// guest-physical `gpa` (a guest write there is an MMIO exit).
///
/// # Safety
/// `host..host + len` must be a live mapping that outlives the VM fd.
unsafe fn read_only_slot(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    len: u64,
    host: u64,
) -> Result<(), kvm_ioctls::Error> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: kvm_bindings::KVM_MEM_READONLY,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host,
    };
    // SAFETY: the caller's promise.
    unsafe { vm.set_user_memory_region(r) }
}

fn eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)
}

/// Step 4: every device the configuration asks for, at its table row.
pub(crate) fn attach_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    start: Instant,
) -> Result<Devices, VmmError> {
    let console = ConsoleLog::new(cfg.console_cap);
    let marker = Arc::new(Mutex::new(BootMarker::new(start)));
    let mut pio = Bus::default();
    let serial_irq = eventfd()?;
    if let Some(irq) = devices::COM1.irq {
        vm.register_irqfd(&serial_irq, irq)
            .map_err(kvm_err("register serial irqfd"))?;
    }
    let serial = Arc::new(Mutex::new(com1(serial_irq, console.clone())));
    place_pio(&mut pio, devices::COM1, serial.clone())?;
    place_pio(&mut pio, devices::RTC, Arc::new(Mutex::new(Rtc::default())))?;
    place_pio(&mut pio, devices::MARKER, marker.clone())?;

    let mut devs = Devices {
        buses: Buses {
            pio,
            mmio: Bus::default(),
        },
        console,
        marker,
        serial,
        virtio: Vec::new(),
        cmdline: Vec::new(),
        weights: None,
        windows: Vec::new(),
        register_pages: Vec::new(),
        fs_stats: Vec::new(),
        steps: vec![("devices_pio", start.elapsed())],
    };
    // Shares first: their worker threads take what they need of a jail's
    // capabilities, then this thread drops them all, before any other
    // device thread (or vCPU) is started from it.
    attach_shares(&mut devs, vm, mem, cfg, start)?;
    crate::jail::end_file_server_setup().map_err(|e| device_err("jail", e.to_string()))?;
    devs.steps.push(("file_server_setup_end", start.elapsed()));
    if let Some(v) = &cfg.vsock {
        if v.guest_cid < 3 {
            return Err(VmmError::Config {
                field: "vsock.guest_cid",
                message: format!("must be 3 or more, got {}", v.guest_cid),
            });
        }
        let device =
            Vsock::new(v.guest_cid, v.uds_path.clone(), device_filter(cfg)).map_err(|source| {
                VmmError::Device {
                    device: devices::VSOCK.name,
                    source,
                }
            })?;
        attach_virtio(&mut devs, vm, mem, devices::VSOCK, Box::new(device))?;
        devs.steps.push(("vsock", start.elapsed()));
    }
    if let Some(path) = &cfg.pmem {
        let map = PmemMapping::open(path).map_err(|source| VmmError::Device {
            device: devices::PMEM.name,
            source,
        })?;
        // SAFETY: `map` is a live read-only mapping of `map.len()` bytes;
        // it moves into `Devices`, which `run` drops only after the VM fd
        // (and no vCPU runs before this function returns).
        unsafe {
            read_only_slot(
                vm,
                devices::PMEM_SLOT,
                PMEM_BASE,
                map.len(),
                map.host_addr(),
            )
        }
        .map_err(kvm_err("set pmem memory region"))?;
        let dev = Pmem::new(PMEM_BASE, map.len(), device_filter(cfg)).map_err(|source| {
            VmmError::Device {
                device: devices::PMEM.name,
                source,
            }
        })?;
        devs.weights = Some(map);
        attach_virtio(&mut devs, vm, mem, devices::PMEM, Box::new(dev))?;
        devs.steps.push(("pmem", start.elapsed()));
    }
    Ok(devs)
}

/// One virtio-fs device per share of `cfg`.
fn attach_shares(
    devs: &mut Devices,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    start: Instant,
) -> Result<(), VmmError> {
    let step = |devs: &mut Devices, name| {
        let at = start.elapsed();
        match devs.steps.iter_mut().find(|(n, _)| *n == name) {
            Some(s) => s.1 = at,
            None => devs.steps.push((name, at)),
        }
    };
    let cap = cfg.share_write_limit.map(devices::fs::share::WriteCap::new);
    // What this process may hold decides what each share may: the limit
    // `confine_self` set (less where it could not be raised as far).
    let open_files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(crate::process::MAX_OPEN_FILES, |(soft, _)| soft);
    let limits = devices::fs::share::ShareLimits::within(
        open_files,
        crate::process::MAX_OPEN_FILES,
        cfg.shares.len(),
    );
    // One collapse budget for all the VM's windows: what its cgroup
    // allows for (`jail::COLLAPSE_ALLOWANCE_MIB`).
    let budget = DaxWindow::budget();
    for (i, (share, slot)) in cfg.shares.iter().zip(devices::FS_SLOTS).enumerate() {
        let window = dax_window(vm, i, &budget)
            .map_err(|e| device_err(slot.name, format!("DAX window: {e}")))?;
        devs.windows.push(window.clone());
        step(devs, "share_window");
        let opened = devices::fs::share::Share::new(&share.open_path(), share.read_only, limits)
            .map(|s| match &cap {
                Some(c) => s.capped(c.clone()),
                None => s,
            });
        step(devs, "share_open");
        // An inherited descriptor is still here only when the VMM is not
        // jailed (a jail binds the share and closes it first): there is no
        // jail root to leave through it, and the file server opens the
        // share's root again by it at the guest's FUSE_INIT — closed, that
        // failed every call with a share in an unjailed VMM (the guest saw
        // ECONNREFUSED), and a reused number could have named another
        // file. It lives as long as the process.
        let device = opened
            .map_err(|e| device_err(slot.name, format!("sharing {}: {e}", share.dir.display())))
            .and_then(|s| {
                VirtioFs::new(
                    &share.tag,
                    &share.dir,
                    s,
                    cfg.seccomp.as_ref().map(|f| f.fs.clone()),
                    (devices::fs_window_base(i), window),
                )
                .map_err(|source| VmmError::Device {
                    device: slot.name,
                    source,
                })
            })?;
        step(devs, "share_server");
        devs.fs_stats.push(device.stats());
        attach_virtio(devs, vm, mem, slot, Box::new(device))?;
        step(devs, "share_attach");
    }
    Ok(())
}

/// Share `i`'s DAX window, reserved and made its read-only memory slot
/// (every share has one, so a VM's devices — and its snapshot's shape —
/// do not depend on which shares the guest maps files from).
fn dax_window(
    vm: &VmFd,
    i: usize,
    budget: &Arc<std::sync::atomic::AtomicU32>,
) -> Result<Arc<DaxWindow>, String> {
    let window = DaxWindow::sharing(devices::fs::window::WINDOW_SIZE, budget.clone())
        .map_err(|e| e.to_string())?;
    // SAFETY: `window` is a live reservation of `window.len()` bytes that
    // only its file server maps files into; it is kept in `Devices`, which
    // `run` drops only after the VM fd.
    unsafe {
        read_only_slot(
            vm,
            devices::FS_WINDOW_FIRST_SLOT + i as u32,
            devices::fs_window_base(i),
            window.len(),
            window.host_addr(),
        )
    }
    .map_err(|e| format!("set memory region: {e}"))?;
    Ok(window)
}

/// The filter device threads install, if the VMM runs filtered.
fn device_filter(cfg: &VmConfig) -> Option<Arc<crate::seccomp::BpfProgram>> {
    cfg.seccomp.as_ref().map(|f| f.device.clone())
}

fn place_pio(bus: &mut Bus, slot: PioSlot, device: devices::SharedDevice) -> Result<(), VmmError> {
    bus.insert(slot.name, slot.base.into(), slot.len.into(), device)
        .map_err(VmmError::Bus)
}

/// A virtio device on its table row's window: an irqfd for its IRQ, one
/// ioeventfd per queue on the QueueNotify register, its command-line entry.
fn attach_virtio(
    devs: &mut Devices,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    slot: MmioSlot,
    device: Box<dyn VirtioDevice>,
) -> Result<(), VmmError> {
    let irq = eventfd()?;
    vm.register_irqfd(&irq, slot.irq)
        .map_err(kvm_err("register virtio irqfd"))?;
    let mut evts = Vec::new();
    for q in 0..device.queue_max_sizes().len() as u32 {
        let e = eventfd()?;
        vm.register_ioevent(
            &e,
            &IoEventAddress::Mmio(slot.base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY)),
            q,
        )
        .map_err(kvm_err("register virtio ioeventfd"))?;
        evts.push(e);
    }
    let t = MmioTransport::new(device, mem.clone(), Arc::new(irq), evts).map_err(|source| {
        VmmError::Device {
            device: slot.name,
            source,
        }
    })?;
    // Reads of the registers from the page, without an exit; writes
    // still exit to the bus below (and KVM's ioeventfds).
    let page = t.register_page();
    let index = devices::MMIO_SLOTS
        .iter()
        .position(|s| s.base == slot.base)
        .ok_or_else(|| device_err(slot.name, "not in the virtio-mmio table".into()))?;
    // SAFETY: `page` is a live mapping of one window's bytes; a clone is
    // kept in `Devices::register_pages`, which `run` drops only after the
    // VM fd.
    unsafe {
        read_only_slot(
            vm,
            devices::REGISTER_PAGE_FIRST_SLOT + index as u32,
            slot.base,
            devices::virtio_mmio::MMIO_SIZE,
            page.host_addr(),
        )
    }
    .map_err(kvm_err("set a register page's memory region"))?;
    devs.register_pages.push(page);
    let t = Arc::new(Mutex::new(t));
    devs.buses
        .mmio
        .insert(
            slot.name,
            slot.base,
            devices::virtio_mmio::MMIO_SIZE,
            t.clone(),
        )
        .map_err(VmmError::Bus)?;
    devs.virtio.push((slot.name, t));
    devs.cmdline.push(slot.cmdline());
    Ok(())
}

/// Step 5a: the kernel command line — the TSC frequency, the base line,
/// the caller's extra words, then one entry per virtio device.
pub(crate) fn kernel_cmdline(
    cfg: &VmConfig,
    boot_vcpu: &VcpuFd,
    device_entries: &[String],
) -> Result<Cmdline, VmmError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(VmmError::Cmdline)?;
    // The guest takes its clock from kvm-clock (see the CPUID in `vcpu`);
    // the TSC frequency on the command line is for the TSC clocksource it
    // may switch to, which would otherwise be calibrated against the PIT —
    // a step that fails on a busy (nested) host ("Unable to calibrate
    // against PIT") and left guests hanging without a clocksource.
    // `tsc=reliable` keeps the clocksource watchdog from judging the TSC
    // against jiffies, whose ticks a busy host delays ("skew is too large"
    // → "No current clocksource").
    if let Ok(khz) = boot_vcpu.get_tsc_khz() {
        cmdline
            .insert_str(format!("tsc_early_khz={khz} tsc=reliable"))
            .map_err(VmmError::Cmdline)?;
    }
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(VmmError::Cmdline)?;
    if !cfg.cmdline_extra.is_empty() {
        cmdline
            .insert_str(&cfg.cmdline_extra)
            .map_err(VmmError::Cmdline)?;
    }
    for entry in device_entries {
        cmdline.insert_str(entry).map_err(VmmError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Step 5b: the boot data the kernel reads: the command line, the zero
/// page (header, initramfs, e820 map) and the MP table for `vcpus`.
pub(crate) fn configure_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    cmdline: &Cmdline,
    initrd: Initrd,
    vcpus: u8,
) -> Result<(), VmmError> {
    load_cmdline(mem, GuestAddress(layout::CMDLINE), cmdline).map_err(VmmError::Kernel)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(VmmError::Cmdline)?
        .as_bytes()
        .len();
    let mut params = linux_loader::loader::bootparam::boot_params::default();
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x0100_0000;
    params.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.ramdisk_image = initrd.addr as u32;
    params.hdr.ramdisk_size = initrd.len as u32;
    params.e820_table[0].addr = 0;
    params.e820_table[0].size = layout::LOW_RAM_END;
    params.e820_table[0].type_ = 1;
    params.e820_table[1].addr = layout::HIGH_RAM_START;
    params.e820_table[1].size = mem_size - layout::HIGH_RAM_START;
    params.e820_table[1].type_ = 1;
    params.e820_entries = 2;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE))
        .map_err(VmmError::BootData)?;
    let (mp_addr, mp) = layout::mptable(vcpus);
    mem.write_slice(&mp, GuestAddress(mp_addr))
        .map_err(VmmError::BootData)?;
    Ok(())
}
