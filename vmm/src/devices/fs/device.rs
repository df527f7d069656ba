//! The virtio-fs device: one per granted directory, a high-priority queue
//! and one request queue, FUSE requests served by a worker thread (under
//! the device seccomp filter) from its [`Share`].
//!
//! **Invariants:** every descriptor chain the guest offers is answered
//! (used, with the bytes written, 0 for a chain the server could not
//! read); nothing the guest sends is allocated for before the server's
//! own size checks; a chain that is not a FUSE request ends that request,
//! never the device.

use super::share::Share;
use super::window::{DaxWindow, WindowRequests};
use crate::devices::virtio_mmio::{Activation, DeviceWorker, Interrupt, VirtioDevice, VirtioError};
use crate::seccomp::{BpfProgram, Role};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

/// Queue size of both queues. The guest's FUSE driver sends at most
/// `QUEUE_SIZE - 4` pages per request (a 6.1 kernel caps `max_pages` by
/// the queue): 256 lets a read or write carry 1 MiB, the most the server
/// accepts (`fuse_backend_rs` answers INIT with 256 pages).
pub const QUEUE_SIZE: u16 = 256;
/// Longest tag the config space holds.
pub const TAG_LEN: usize = airlock_abi::SHARE_TAG_LEN;

const T_STOP: u64 = 0;
const T_QUEUE0: u64 = 1;

/// The virtio-fs device.
pub struct VirtioFs {
    config: [u8; TAG_LEN + 4],
    worker: DeviceWorker,
    /// What the worker did; `requests` is also what keeps a snapshot
    /// before the first request (before the guest mounts the share), so
    /// it never carries a FUSE session the restoring VMM's server would
    /// not have.
    stats: Arc<FsStats>,
    /// The DAX window: its guest-physical base and the reservation.
    window: (u64, Arc<DaxWindow>),
}

impl VirtioFs {
    /// A device serving `share` (the directory `dir`) under `tag` (at most
    /// [`TAG_LEN`] bytes), with a DAX `window` at a guest-physical base
    /// (the caller has made it a memory slot); its worker starts
    /// now, takes the share's credentials in a jail
    /// ([`crate::jail::become_file_server`]), enters `filter` (if given)
    /// and waits for the guest's driver.
    ///
    /// # Errors
    /// A bad tag, or the worker cannot start.
    pub fn new(
        tag: &str,
        dir: &std::path::Path,
        share: Share,
        filter: Option<Arc<BpfProgram>>,
        window: (u64, Arc<DaxWindow>),
    ) -> Result<Self, VirtioError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(VirtioError::Activate(format!(
                "virtio-fs tag {tag:?} must be 1..={TAG_LEN} bytes without NUL"
            )));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        // num_request_queues
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let server = Server::new(Arc::new(share));
        let stats = Arc::new(FsStats::default());
        let counted = stats.clone();
        let dir = dir.to_path_buf();
        let requests = WindowRequests(window.1.clone());
        let setup = move || crate::jail::become_file_server(&dir).map_err(|e| e.to_string());
        let worker =
            DeviceWorker::spawn_as("airlock-fs", Role::Fs, filter, setup, move |a, stop| {
                let mut requests = requests;
                if let Err(e) = serve(a, &stop, &server, &counted, &mut requests) {
                    tracing::error!(error = %e, "virtio-fs stopped");
                }
            })?;
        Ok(Self {
            config,
            worker,
            stats,
            window,
        })
    }

    /// The worker's counters (they live on after the device).
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }
}

/// What a virtio-fs worker did, for the VMM's report: enough to tell a
/// slow file server from a slow guest or lost notifications.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Requests answered (chains used).
    pub requests: AtomicU64,
    /// Queue notifications the worker woke for.
    pub kicks: AtomicU64,
    /// Times its 100 ms look found requests that no notification had
    /// announced (each cost the guest up to 100 ms).
    pub unannounced: AtomicU64,
    /// Time spent answering requests, µs.
    pub busy_us: AtomicU64,
}

impl FsStats {
    /// As the report shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "requests": get(&self.requests),
            "kicks": get(&self.kicks),
            "unannounced": get(&self.unannounced),
            "busy_ms": get(&self.busy_us) / 1000,
        })
    }
}

/// Answer every chain on `queue`; whether any was used.
fn drain(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    server: &Server<Arc<Share>>,
    stats: &FsStats,
    window: &mut WindowRequests,
) -> bool {
    let start = std::time::Instant::now();
    let used = answer_all(mem, queue, server, stats, window);
    let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    stats.busy_us.fetch_add(us, Ordering::Relaxed);
    used
}

fn answer_all(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    server: &Server<Arc<Share>>,
    stats: &FsStats,
    window: &mut WindowRequests,
) -> bool {
    let mut used = false;
    loop {
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(it) => it.collect(),
            Err(e) => {
                tracing::warn!(error = %e, "virtio-fs queue unreadable");
                return used;
            }
        };
        if chains.is_empty() {
            return used;
        }
        for chain in chains {
            stats.requests.fetch_add(1, Ordering::Relaxed);
            let head = chain.head_index();
            let written = match (
                Reader::from_descriptor_chain(mem, chain.clone()),
                VirtioFsWriter::new(mem, chain),
            ) {
                (Ok(r), Ok(w)) => server
                    .handle_message(r, w.into(), Some(&mut *window), None)
                    .unwrap_or_else(|e| {
                        tracing::debug!(error = %e, "virtio-fs request failed");
                        0
                    }),
                _ => {
                    tracing::warn!("virtio-fs: a chain that is not a request");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written as u32) {
                tracing::warn!(error = %e, "virtio-fs used ring");
            }
            used = true;
        }
    }
}

fn serve(
    a: Activation,
    stop: &EventFd,
    server: &Server<Arc<Share>>,
    stats: &FsStats,
    window: &mut WindowRequests,
) -> Result<(), VirtioError> {
    let Activation {
        mem,
        mut queues,
        queue_evts,
        interrupt,
    } = a;
    let mut fds = vec![(stop.as_raw_fd(), T_STOP)];
    for (i, e) in queue_evts.iter().enumerate() {
        fds.push((e.as_raw_fd(), T_QUEUE0 + i as u64));
    }
    let epoll = crate::devices::virtio_mmio::epoll_for(&fds)?;
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(100, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VirtioError::Activate(format!("epoll: {e}"))),
        };
        let mut used = false;
        if n == 0 {
            // No event for 100 ms: look anyway, so a missed notification
            // costs latency, never a stall.
            for q in queues.iter_mut() {
                used |= drain(&mem, q, server, stats, window);
            }
            if used {
                stats.unannounced.fetch_add(1, Ordering::Relaxed);
            }
        }
        for ev in &events[..n] {
            match ev.data() {
                T_STOP => return Ok(()),
                t => {
                    let i = (t - T_QUEUE0) as usize;
                    if let (Some(e), Some(q)) = (queue_evts.get(i), queues.get_mut(i)) {
                        let _ = e.read();
                        stats.kicks.fetch_add(1, Ordering::Relaxed);
                        used |= drain(&mem, q, server, stats, window);
                    }
                }
            }
        }
        if used {
            signal(&interrupt);
        }
    }
}

fn signal(interrupt: &Interrupt) {
    interrupt.signal_used_queue();
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        26 // VIRTIO_ID_FS
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if a.queues.len() != 2 || a.queue_evts.len() != 2 {
            return Err(VirtioError::Activate(
                "virtio-fs needs two queues and two queue eventfds".into(),
            ));
        }
        self.worker.activate(a)
    }
    fn shutdown(&mut self) {
        self.worker.stop();
    }
    fn shm_region(&self, id: u32) -> Option<(u64, u64)> {
        // Region 0 is the cache (VIRTIO_FS_SHMCAP_ID_CACHE).
        let (base, w) = &self.window;
        (id == 0).then(|| (*base, w.len()))
    }
    fn snapshot_refusal(&self) -> Option<String> {
        let n = self.stats.requests.load(Ordering::Relaxed);
        (n > 0).then(|| {
            format!(
                "the guest has used this share ({n} requests): a snapshot is made before any share is mounted"
            )
        })
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.shutdown();
    }
}
