//! The virtio-mmio transport (virtio 1.x "modern" register layout).
//!
//! The guest finds the device from the kernel command line
//! (`virtio_mmio.device=4K@<base>:<irq>`). Register reads and writes arrive
//! on vCPU threads as MMIO exits; queue notifications do not: each queue's
//! `QueueNotify` write is bound to an eventfd with KVM ioeventfd, so the
//! device's own thread wakes without a vCPU exit. Interrupts go out through
//! an irqfd after setting `InterruptStatus`.
//!
//! Register *reads* need no exit either: each device's window is also a
//! read-only KVM memory slot backed by its [`RegisterPage`], which holds
//! what a read of each register would return. The guest reads it as
//! memory (a probe reads ~60 registers, every interrupt `InterruptStatus`);
//! its writes still exit (a read-only slot's writes are MMIO), and each
//! write's handling brings the page up to date before the vCPU runs on.
//!
//! **Invariants:** the device is activated (handed its queues and guest
//! memory) exactly once, when the driver sets DRIVER_OK after negotiating
//! `VIRTIO_F_VERSION_1`; queue configuration written after that is ignored.
//! The register page shows exactly what [`MmioTransport::read`] would
//! return, at every moment the guest can run: registers change only on a
//! guest write (the page is updated before that exit completes), a
//! restore, or `InterruptStatus` — whose only copy is the page's word. A
//! device's configuration space is fixed when the transport is made.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

// Shared-memory region registers (virtio 1.2 MMIO layout).
const SHM_SEL: u32 = 0x0ac;
const SHM_LEN_LOW: u32 = 0x0b0;
const SHM_LEN_HIGH: u32 = 0x0b4;
const SHM_BASE_LOW: u32 = 0x0b8;
const SHM_BASE_HIGH: u32 = 0x0bc;

/// Size of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;

/// The registers below the configuration space that read as anything but
/// zero, other than `InterruptStatus` (the register page's own word).
const READABLE: [u32; 13] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_CONFIG_GENERATION,
    SHM_LEN_LOW,
    SHM_LEN_HIGH,
    SHM_BASE_LOW,
    SHM_BASE_HIGH,
];

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// An eventfd could not be created.
    #[error("An eventfd for a virtio device could not be created: {0}.")]
    EventFd(std::io::Error),
    /// The device could not start.
    #[error("The virtio device could not start: {0}.")]
    Activate(String),
}

/// A device worker's epoll, watching each `(fd, token)` for input: what
/// every device thread starts with.
///
/// # Errors
/// [`VirtioError::Activate`] when epoll refuses.
pub fn epoll_for(
    fds: &[(std::os::fd::RawFd, u64)],
) -> Result<vmm_sys_util::epoll::Epoll, VirtioError> {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let epoll = Epoll::new().map_err(|e| VirtioError::Activate(format!("epoll: {e}")))?;
    for &(fd, token) in fds {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| VirtioError::Activate(format!("epoll add: {e}")))?;
    }
    Ok(epoll)
}

/// One page of host memory holding what a read of each of a device's
/// registers returns (little-endian words at the registers' offsets, the
/// configuration space from 0x100), for the guest to read through a
/// read-only memory slot instead of exiting. The host writes it with
/// atomic stores; the guest cannot write it.
pub struct RegisterPage {
    addr: std::ptr::NonNull<u8>,
}

// SAFETY: the page is plain memory owned by this value; every access from
// Rust goes through `word`, i.e. through atomics.
unsafe impl Send for RegisterPage {}
// SAFETY: as above.
unsafe impl Sync for RegisterPage {}

impl RegisterPage {
    /// The page's size (one device window).
    pub const LEN: usize = MMIO_SIZE as usize;

    /// A zeroed page.
    ///
    /// # Errors
    /// The mapping cannot be made.
    pub fn new() -> std::io::Result<Arc<Self>> {
        // SAFETY: a new private anonymous mapping; no existing memory is
        // named, and the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        let page = Self { addr };
        // Present before KVM maps it: a read fault on an untouched page
        // would give the guest the shared zero page until the first store.
        page.word(0).store(0, Ordering::SeqCst);
        Ok(Arc::new(page))
    }

    /// The word at `offset` (4-aligned, inside the page; else the last
    /// word, which no register uses).
    fn word(&self, offset: u32) -> &AtomicU32 {
        let offset = if offset.is_multiple_of(4) && (offset as usize) < Self::LEN {
            offset as usize
        } else {
            Self::LEN - 4
        };
        // SAFETY: `offset` is 4-aligned and at most LEN - 4, the mapping
        // is page-aligned and LEN bytes long and lives as long as `self`;
        // all Rust access to it is atomic (the guest only reads it).
        unsafe { &*self.addr.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// What a 4-byte read at `offset` returns now.
    pub fn load(&self, offset: u32) -> u32 {
        self.word(offset).load(Ordering::SeqCst)
    }

    fn store(&self, offset: u32, v: u32) {
        self.word(offset).store(v, Ordering::SeqCst);
    }

    /// Host address of the page (for its memory slot).
    pub fn host_addr(&self) -> u64 {
        self.addr.as_ptr() as u64
    }
}

impl Drop for RegisterPage {
    fn drop(&mut self) {
        // SAFETY: `addr` is the mapping `new` made, LEN bytes long; no
        // reference into it outlives `self` (`word` borrows `self`).
        unsafe { libc::munmap(self.addr.as_ptr().cast(), Self::LEN) };
    }
}

/// The device's way to interrupt the guest.
#[derive(Clone)]
pub struct Interrupt {
    /// `InterruptStatus` lives in the register page: the guest reads it
    /// there.
    page: Arc<RegisterPage>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`, its status word in `page`.
    pub fn new(page: Arc<RegisterPage>, irqfd: Arc<EventFd>) -> Self {
        Self { page, irqfd }
    }

    fn status(&self) -> &AtomicU32 {
        self.page.word(VIRTIO_MMIO_INTERRUPT_STATUS)
    }

    /// Tell the guest that used buffers are ready.
    pub fn signal_used_queue(&self) {
        self.status()
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "virtio interrupt could not be raised");
        }
    }
}

/// What the device gets when the driver is ready.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The configured queues, in index order.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, written by KVM when the guest notifies it.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt.
    pub interrupt: Interrupt,
}

/// A device's worker thread. It is started when the device is made —
/// before any vCPU runs, so it never inherits a vCPU's seccomp filter —
/// installs the device filter, and waits for its [`Activation`]; it then
/// runs until its stop eventfd becomes readable.
pub struct DeviceWorker {
    activate: Option<std::sync::mpsc::Sender<Activation>>,
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DeviceWorker {
    /// Start thread `name` with the device role: see [`Self::spawn_as`].
    ///
    /// # Errors
    /// An eventfd or the thread cannot be made.
    pub fn spawn(
        name: &str,
        filter: Option<Arc<crate::seccomp::BpfProgram>>,
        body: impl FnOnce(Activation, EventFd) + Send + 'static,
    ) -> Result<Self, VirtioError> {
        Self::spawn_as(name, crate::seccomp::Role::Device, filter, || Ok(()), body)
    }

    /// Start thread `name`: it runs `setup` (unfiltered: what the thread
    /// must do before its filter, such as taking its credentials; its
    /// error is this call's), applies `filter` (when given) as `role`,
    /// waits for the activation, then runs `body` with it and a stop
    /// eventfd that `body` must watch.
    ///
    /// # Errors
    /// An eventfd or the thread cannot be made, or `setup` failed.
    pub fn spawn_as(
        name: &str,
        role: crate::seccomp::Role,
        filter: Option<Arc<crate::seccomp::BpfProgram>>,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
        body: impl FnOnce(Activation, EventFd) + Send + 'static,
    ) -> Result<Self, VirtioError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let stop2 = stop.try_clone().map_err(VirtioError::EventFd)?;
        let (tx, rx) = std::sync::mpsc::channel::<Activation>();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .stack_size(super::THREAD_STACK)
            .spawn(move || {
                let ready = setup();
                let ok = ready.is_ok();
                let _ = ready_tx.send(ready);
                if !ok {
                    return;
                }
                if let Some(f) = filter {
                    crate::seccomp::enter(role, &f);
                }
                // No activation (the sender dropped): the VM ended first.
                if let Ok(a) = rx.recv() {
                    body(a, stop2);
                }
            })
            .map_err(|e| VirtioError::Activate(format!("thread: {e}")))?;
        let mut worker = Self {
            activate: Some(tx),
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => {
                worker.stop();
                Err(VirtioError::Activate(format!("{name}: {e}")))
            }
            Err(_) => {
                worker.stop();
                Err(VirtioError::Activate(format!("{name}: the thread ended")))
            }
        }
    }

    /// Hand the worker its queues.
    ///
    /// # Errors
    /// Activated twice, or the worker is gone.
    pub fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let tx = self
            .activate
            .take()
            .ok_or_else(|| VirtioError::Activate("activated twice".into()))?;
        tx.send(a)
            .map_err(|_| VirtioError::Activate("the device thread has ended".into()))
    }

    /// Signal the thread and join it (idempotent).
    pub fn stop(&mut self) {
        self.activate = None;
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DeviceWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (19 = vsock).
    fn device_type(&self) -> u32;
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read the device-specific configuration space: `data.len()` bytes
    /// from `offset`, zeros past its end. The transport reads it once,
    /// whole, when it is made (for the register page): it must not change
    /// after that.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Start working.
    ///
    /// # Errors
    /// The device cannot start.
    fn activate(&mut self, a: Activation) -> Result<(), VirtioError>;
    /// Stop any thread and release resources (idempotent).
    fn shutdown(&mut self);
    /// Why a snapshot of this device now would be wrong (state of its own
    /// that the snapshot cannot carry), if it would.
    fn snapshot_refusal(&self) -> Option<String> {
        None
    }
    /// Shared-memory region `id` (virtio 1.2, 2.10): its guest-physical
    /// base and length, if the device has one.
    fn shm_region(&self, _id: u32) -> Option<(u64, u64)> {
        None
    }
}

/// How the driver configured one queue (fixed once the device runs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Its size.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl QueueConfig {
    fn of(q: &Queue) -> Self {
        Self {
            size: q.size(),
            ready: q.ready(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
        }
    }

    fn apply(&self, q: &mut Queue) {
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(self.ready);
    }
}

/// A transport's registers, for a snapshot. Queue positions are not kept:
/// a snapshot is taken with every queue idle (each chain the device took
/// is in the used ring), so both positions are the used ring's index,
/// which is in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device's virtio id (a check on restore).
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// Features the driver took.
    pub driver_features: u64,
    /// Selectors.
    pub device_features_sel: u32,
    /// Selectors.
    pub driver_features_sel: u32,
    /// Selectors.
    pub queue_sel: u32,
    /// Config generation.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was running.
    pub activated: bool,
    /// Each queue's configuration.
    pub queues: Vec<QueueConfig>,
}

/// One virtio-mmio device: registers + the device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_evts: Vec<Option<EventFd>>,
    interrupt: Interrupt,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The queues' configuration as the device took them.
    configured: Vec<QueueConfig>,
}

impl MmioTransport {
    /// Wrap a device. `queue_evts` are the ioeventfds already registered
    /// with KVM for this device's QueueNotify register (one per queue).
    ///
    /// # Errors
    /// Queue creation failed.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Arc<EventFd>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n).map_err(|e| VirtioError::Activate(e.to_string())))
            .collect::<Result<_, _>>()?;
        let page = RegisterPage::new()
            .map_err(|e| VirtioError::Activate(format!("register page: {e}")))?;
        let t = Self {
            device,
            mem,
            queues,
            queue_evts: queue_evts.into_iter().map(Some).collect(),
            interrupt: Interrupt::new(page, irqfd),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            configured: Vec::new(),
        };
        // The configuration space, once (see the module's invariants).
        let mut config = [0u8; RegisterPage::LEN - 0x100];
        t.device.read_config(0, &mut config);
        for (i, w) in config.chunks_exact(4).enumerate() {
            t.interrupt.page.store(
                0x100 + 4 * i as u32,
                u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            );
        }
        t.sync_page();
        Ok(t)
    }

    /// The page the guest reads the registers from (for its memory slot).
    pub fn register_page(&self) -> Arc<RegisterPage> {
        self.interrupt.page.clone()
    }

    /// Bring the register page up to what [`read`](Self::read) returns
    /// (every register below the configuration space but
    /// `InterruptStatus`, which lives there).
    fn sync_page(&self) {
        for off in READABLE {
            let mut b = [0u8; 4];
            self.read(u64::from(off), &mut b);
            self.interrupt.page.store(off, u32::from_le_bytes(b));
        }
    }

    fn all_features(&self) -> u64 {
        self.device.features() | (1u64 << VIRTIO_F_VERSION_1)
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` into the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => 0x7472_6976, // "virt"
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => 0x4b4c_5241, // "ARLK"
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.all_features() as u32,
                1 => (self.all_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status().load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            // The selected shared-memory region; none: SHMLen and SHMBase
            // read all ones (virtio 1.2, 4.2.2). Zero would announce an
            // empty region at address 0, which Linux's virtio-fs fails to
            // reserve (EBUSY).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => {
                let (base, len) = self
                    .device
                    .shm_region(self.shm_sel)
                    .unwrap_or((u64::MAX, u64::MAX));
                match offset as u32 {
                    SHM_LEN_LOW => len as u32,
                    SHM_LEN_HIGH => (len >> 32) as u32,
                    SHM_BASE_LOW => base as u32,
                    _ => (base >> 32) as u32,
                }
            }
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest write at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.write_register(offset, data);
        // Before the exit completes: the guest's next read sees it.
        self.sync_page();
    }

    fn write_register(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 || data.len() != 4 {
            return; // vsock's config space is read-only; registers are 32-bit
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let configurable = !self.activated
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            SHM_SEL => self.shm_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configurable => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if configurable => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW if configurable => {
                if let Some(q) = self.queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configurable => {
                if let Some(q) = self.queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configurable => {
                if let Some(q) = self.queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if configurable => {
                if let Some(q) = self.queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt.status().fetch_and(!v, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            if self.activated {
                tracing::warn!("the guest reset an active virtio device; it stays stopped");
                self.device.shutdown();
            }
            self.status = 0;
            self.driver_features = 0;
            for q in &mut self.queues {
                q.reset();
            }
            return;
        }
        if v & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            // Only features we offered, and VERSION_1 must be among them.
            let ok = self.driver_features & !self.all_features() == 0
                && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if !self.activated && v & ready == ready && v & VIRTIO_CONFIG_S_FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let evts: Option<Vec<EventFd>> = self.queue_evts.iter_mut().map(Option::take).collect();
        let Some(queue_evts) = evts else { return };
        // The device thread owns the queues from now on.
        self.configured = self.queues.iter().map(QueueConfig::of).collect();
        let queues = std::mem::take(&mut self.queues);
        let r = self.device.activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
        });
        match r {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(error = %e, "virtio device activation failed");
                self.status |= VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    /// Stop the device (at VM teardown).
    pub fn shutdown(&mut self) {
        self.device.shutdown();
    }

    /// Why the device cannot be snapshotted now, if it cannot
    /// ([`VirtioDevice::snapshot_refusal`]).
    pub fn snapshot_refusal(&self) -> Option<String> {
        self.device.snapshot_refusal()
    }

    /// The registers, for a snapshot (see [`TransportState`]).
    pub fn state(&self) -> TransportState {
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status().load(Ordering::SeqCst),
            activated: self.activated,
            queues: if self.activated {
                self.configured.clone()
            } else {
                self.queues.iter().map(QueueConfig::of).collect()
            },
        }
    }

    /// Take a snapshot's registers on a transport that has not run, and
    /// start the device if it was running: each queue resumes at its used
    /// ring's index, read from the restored guest memory.
    ///
    /// # Errors
    /// The state is another device's or does not fit this one, a used
    /// ring cannot be read, or the device cannot start.
    pub fn restore(&mut self, s: &TransportState) -> Result<(), VirtioError> {
        let bad = |m: String| Err(VirtioError::Activate(format!("restoring: {m}")));
        if self.activated || self.status != 0 {
            return bad("the device has already run".into());
        }
        if s.device_type != self.device.device_type() {
            return bad(format!(
                "the snapshot has device type {} here, this VM {}",
                s.device_type,
                self.device.device_type()
            ));
        }
        if s.queues.len() != self.queues.len() {
            return bad(format!(
                "the snapshot has {} queues, the device {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        for (q, c) in self.queues.iter_mut().zip(&s.queues) {
            if c.size > q.max_size() {
                return bad(format!("queue size {} above {}", c.size, q.max_size()));
            }
            c.apply(q);
            if s.activated && c.ready {
                let at = q
                    .used_idx(&self.mem, Ordering::Acquire)
                    .map_err(|e| VirtioError::Activate(format!("restoring a used ring: {e}")))?;
                q.set_next_avail(at.0);
                q.set_next_used(at.0);
            }
        }
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt
            .status()
            .store(s.interrupt_status, Ordering::SeqCst);
        self.status = s.status;
        if s.activated {
            self.activate();
            if !self.activated {
                return bad("the device did not start".into());
            }
        }
        self.sync_page();
        Ok(())
    }
}
impl super::BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    /// A device that does nothing, with shared-memory region 0 if given.
    struct Quiet(Option<(u64, u64)>);
    impl VirtioDevice for Quiet {
        fn device_type(&self) -> u32 {
            26
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn activate(&mut self, _: Activation) -> Result<(), VirtioError> {
            Ok(())
        }
        fn shutdown(&mut self) {}
        fn shm_region(&self, id: u32) -> Option<(u64, u64)> {
            self.0.filter(|_| id == 0)
        }
    }

    /// Each queue's (next avail, next used, ready) as the device got it.
    type Starts = Vec<(u16, u16, bool)>;

    /// A device that reports where its queues start.
    struct Probe(std::sync::mpsc::Sender<Starts>);
    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            19
        }
        fn features(&self) -> u64 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
            let at = a
                .queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used(), q.ready()))
                .collect();
            self.0.send(at).unwrap();
            Ok(())
        }
        fn shutdown(&mut self) {}
    }

    fn probe() -> (MmioTransport, std::sync::mpsc::Receiver<Starts>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = MmioTransport::new(Box::new(Probe(tx)), mem, irq, evts).unwrap();
        (t, rx)
    }

    fn reg(t: &mut MmioTransport, r: u32, v: u32) {
        t.write(u64::from(r), &v.to_le_bytes());
    }

    #[test]
    fn a_restored_transport_resumes_its_queues_at_the_used_index_in_memory() {
        use vm_memory::Bytes;
        let (mut t, rx) = probe();
        reg(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1); // VERSION_1
        reg(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        // Queue 0 only; queue 1 stays not ready.
        reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        reg(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        reg(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        reg(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        reg(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        assert_eq!(rx.recv().unwrap()[0], (0, 0, true));
        let saved = t.state();
        assert!(saved.activated);
        assert_eq!(saved.queues[0].used, 0x3000);

        // The guest had 5 chains used when the snapshot was taken.
        let (mut back, rx) = probe();
        back.mem.write_obj(5u16, GuestAddress(0x3002)).unwrap();
        back.restore(&saved).unwrap();
        assert_eq!(rx.recv().unwrap(), vec![(5, 5, true), (0, 0, false)]);
        assert_eq!(back.state(), saved);
        // Once running, it cannot be restored again; nor can another
        // device's state be restored onto it.
        assert!(back.restore(&saved).is_err());
        let (mut other, _rx) = probe();
        let foreign = TransportState {
            device_type: 26,
            ..saved
        };
        assert!(other.restore(&foreign).is_err());
    }

    /// A device with a configuration space, features in both words, two
    /// queues and a shared-memory region: every register has something
    /// to show.
    struct Shown;
    const SHOWN_CONFIG: &[u8] = b"a-tag-of-eleven\0\x01\0\0\0";
    impl VirtioDevice for Shown {
        fn device_type(&self) -> u32 {
            26
        }
        fn features(&self) -> u64 {
            (1 << 3) | (1 << 40)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 256]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = SHOWN_CONFIG.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn activate(&mut self, _: Activation) -> Result<(), VirtioError> {
            Ok(())
        }
        fn shutdown(&mut self) {}
        fn shm_region(&self, id: u32) -> Option<(u64, u64)> {
            (id == 0).then_some((0x10_0000_0000, 64 << 20))
        }
    }

    /// Every word of the page against what an exit's read returns.
    fn assert_page_shows_reads(t: &MmioTransport, when: &str) {
        let page = t.register_page();
        for off in (0..RegisterPage::LEN as u32).step_by(4) {
            let mut b = [0u8; 4];
            t.read(u64::from(off), &mut b);
            assert_eq!(
                page.load(off),
                u32::from_le_bytes(b),
                "register {off:#x} {when}"
            );
        }
    }

    /// The guest reads the registers from the page, without exits: at
    /// each step of a driver's life the page must say what a read would.
    #[test]
    fn the_register_page_shows_what_a_read_returns_at_every_step() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let mut t = MmioTransport::new(Box::new(Shown), mem, irq.clone(), evts).unwrap();
        assert_page_shows_reads(&t, "when made");
        let page = t.register_page();
        assert_eq!(page.load(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(page.load(0x100), u32::from_le_bytes(*b"a-ta"));
        assert_eq!(page.load(0x110), 1, "the config's last word");
        let steps: &[(&str, u32, u32)] = &[
            ("reset", VIRTIO_MMIO_STATUS, 0),
            ("acknowledge", VIRTIO_MMIO_STATUS, 1),
            ("driver", VIRTIO_MMIO_STATUS, 1 | 2),
            ("features word 1", VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1),
            ("features word 0", VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0),
            ("features word 7", VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7),
            ("driver features sel", VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
            ("driver features", VIRTIO_MMIO_DRIVER_FEATURES, 1),
            ("features ok", VIRTIO_MMIO_STATUS, 1 | 2 | 8),
            ("queue 1", VIRTIO_MMIO_QUEUE_SEL, 1),
            ("queue 1 size", VIRTIO_MMIO_QUEUE_NUM, 128),
            ("queue 1 ready", VIRTIO_MMIO_QUEUE_READY, 1),
            ("queue 9", VIRTIO_MMIO_QUEUE_SEL, 9),
            ("queue 0", VIRTIO_MMIO_QUEUE_SEL, 0),
            ("queue 0 ready", VIRTIO_MMIO_QUEUE_READY, 1),
            ("region 0", SHM_SEL, 0),
            ("region 3", SHM_SEL, 3),
            ("driver ok", VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4),
            (
                "write-only register",
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                0xdead_0000,
            ),
            ("a write past the registers", 0x200, 0xffff_ffff),
        ];
        for &(when, r, v) in steps {
            reg(&mut t, r, v);
            assert_page_shows_reads(&t, when);
        }
        assert_eq!(page.load(VIRTIO_MMIO_STATUS), 1 | 2 | 8 | 4);
        assert_eq!(
            page.load(0x200),
            0,
            "the guest's writes never land in the page"
        );
        // An interrupt: set by the device's thread, seen in the page
        // before the irqfd fires; the guest's acknowledgement clears it.
        t.interrupt.signal_used_queue();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(
            page.load(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        assert_page_shows_reads(&t, "after an interrupt");
        reg(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(page.load(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // A reset of the running device (it stays stopped).
        reg(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_page_shows_reads(&t, "after a reset");
        // A restored transport's page is its state's, not a fresh one's.
        let saved = t.state();
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let mut back = MmioTransport::new(Box::new(Shown), mem, irq, evts).unwrap();
        let mut running = saved.clone();
        running.status = 1 | 2 | 8;
        running.queue_sel = 1;
        running.interrupt_status = VIRTIO_MMIO_INT_VRING;
        back.restore(&running).unwrap();
        assert_page_shows_reads(&back, "after a restore");
        assert_eq!(back.register_page().load(VIRTIO_MMIO_STATUS), 1 | 2 | 8);
        assert_eq!(
            back.register_page().load(VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
    }

    /// Linux's virtio-fs probes for a DAX window through the shared-memory
    /// registers; a device without one must say so with all ones, or the
    /// probe fails ("could not reserve region addr=0x0 len=0x0").
    #[test]
    fn a_device_without_shared_memory_says_so() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Quiet(None)), mem, irq, vec![evt]).unwrap();
        t.write(u64::from(SHM_SEL), &0u32.to_le_bytes());
        for reg in [SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH] {
            let mut v = [0u8; 4];
            t.read(u64::from(reg), &mut v);
            assert_eq!(u32::from_le_bytes(v), u32::MAX, "register {reg:#x}");
        }
        let mut v = [0u8; 4];
        t.read(u64::from(VIRTIO_MMIO_DEVICE_ID), &mut v);
        assert_eq!(u32::from_le_bytes(v), 26);
    }

    /// A device with a region reports its base and length when it is
    /// selected, and all ones for any other id.
    #[test]
    fn a_device_with_shared_memory_reports_it_by_id() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(
            Box::new(Quiet(Some((0x10_2000_0000, 0x400_0000)))),
            mem,
            irq,
            vec![evt],
        )
        .unwrap();
        let read = |t: &MmioTransport, reg: u32| {
            let mut v = [0u8; 4];
            t.read(u64::from(reg), &mut v);
            u32::from_le_bytes(v)
        };
        let regs = [SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH];
        let got: Vec<u32> = regs.iter().map(|r| read(&t, *r)).collect();
        assert_eq!(got, [0x400_0000, 0, 0x2000_0000, 0x10]);
        t.write(u64::from(SHM_SEL), &1u32.to_le_bytes());
        for reg in regs {
            assert_eq!(read(&t, reg), u32::MAX, "register {reg:#x}");
        }
    }
}
