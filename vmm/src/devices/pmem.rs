//! virtio-pmem for model weights: a host file (an erofs image, usually on
//! tmpfs) mapped **read-only and shared** into guest-physical memory. The
//! guest mounts it with DAX, so reads go straight to the host's page cache:
//! no copy in guest RAM, and every VM maps the same host pages.
//!
//! The mapping is a KVM memory slot with `KVM_MEM_READONLY` (a guest write
//! becomes an MMIO exit the VMM drops). The device itself only answers the
//! driver's flush requests (nothing to flush: the image is read-only).
//!
//! **Invariants:** the image size is a non-zero multiple of
//! [`PMEM_ALIGN`] (the guest's memory hotplug granularity) so every guest
//! page is backed by the file; the mapping outlives the VM fd (see
//! `vmm::run`); the worker thread is joined on shutdown.

use super::virtio_mmio::{Activation, DeviceWorker, VirtioDevice, VirtioError};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device id of pmem.
pub const VIRTIO_ID_PMEM: u32 = 27;
/// Size and guest-address alignment of a pmem region.
pub const PMEM_ALIGN: u64 = 2 << 20;

/// A read-only shared mapping of the image file.
#[derive(Debug)]
pub struct PmemMapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is a plain read-only memory range; nothing in it is
// tied to the creating thread.
unsafe impl Send for PmemMapping {}
// SAFETY: as above; it is only read (by KVM on the guest's behalf).
unsafe impl Sync for PmemMapping {}

impl PmemMapping {
    /// Map `path` read-only and shared.
    ///
    /// # Errors
    /// The file cannot be opened or mapped, or its size is not a non-zero
    /// multiple of [`PMEM_ALIGN`].
    pub fn open(path: &Path) -> Result<Self, VirtioError> {
        let err =
            |m: String| VirtioError::Activate(format!("weights image {}: {m}", path.display()));
        let file = crate::jail::open_image(path).map_err(|e| err(e.to_string()))?;
        let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        if len == 0 || len % PMEM_ALIGN != 0 {
            return Err(err(format!(
                "its size ({len} bytes) must be a non-zero multiple of {PMEM_ALIGN} bytes (pad it with truncate)"
            )));
        }
        if len > crate::MAX_PMEM_BYTES {
            return Err(err(format!(
                "its size ({len} bytes) is more than the {} bytes a VM maps",
                crate::MAX_PMEM_BYTES
            )));
        }
        let len = usize::try_from(len).map_err(|_| err("too large".into()))?;
        // At a 2 MiB-aligned host address, like its guest address, so the
        // image's huge page-cache folios (see `huge`) map whole.
        let at =
            super::huge::reserve(len).map_err(|e| err(format!("reserving address space: {e}")))?;
        // SAFETY: `at` is the reservation just made (`len` bytes, owned
        // here, the file's size); it is given back on failure.
        if let Err(e) = unsafe { super::huge::map_over(at, len, file.as_raw_fd(), 0) } {
            // SAFETY: the reservation made above, unused.
            unsafe { libc::munmap(at, len) };
            return Err(err(format!("mmap: {e}")));
        }
        Ok(Self { addr: at, len })
    }

    /// Host address of the mapping.
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether it is empty (never: `open` refuses empty images).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PmemMapping {
    fn drop(&mut self) {
        // SAFETY: `addr..addr+len` is the mapping made in `open`, unmapped
        // exactly once here; KVM no longer uses it (the VM fd is dropped first).
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

/// The device: config space (start, size) and the flush queue.
pub struct Pmem {
    start: u64,
    size: u64,
    worker: DeviceWorker,
}

impl Pmem {
    /// A device describing a region at guest-physical `start` of `size`
    /// bytes; its worker thread starts now (under `filter`, if given).
    ///
    /// # Errors
    /// The worker cannot start.
    pub fn new(
        start: u64,
        size: u64,
        filter: Option<Arc<crate::seccomp::BpfProgram>>,
    ) -> Result<Self, VirtioError> {
        Ok(Self {
            start,
            size,
            worker: DeviceWorker::spawn("airlock-pmem", filter, serve)?,
        })
    }
}

const T_STOP: u64 = 0;
const T_REQ: u64 = 1;

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_PMEM
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.start.to_le_bytes());
        cfg[8..].copy_from_slice(&self.size.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        self.worker.activate(a)
    }

    fn shutdown(&mut self) {
        self.worker.stop();
    }
}

/// The worker: answer flush requests until stopped.
fn serve(a: Activation, stop: EventFd) {
    let (Some(mut queue), Some(evt)) =
        (a.queues.into_iter().next(), a.queue_evts.into_iter().next())
    else {
        tracing::error!("pmem needs one queue");
        return;
    };
    let fds = [(stop.as_raw_fd(), T_STOP), (evt.as_raw_fd(), T_REQ)];
    let epoll = match super::virtio_mmio::epoll_for(&fds) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "pmem epoll");
            return;
        }
    };
    let (mem, interrupt) = (a.mem, a.interrupt);
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "pmem epoll");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == T_STOP {
                return;
            }
        }
        let _ = evt.read();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            // Request: le32 type (flush); response: le32 ret.
            // The image is read-only: a flush always succeeds.
            let mut written = 0;
            for d in chain {
                if d.is_write_only() && d.len() >= 4 {
                    if mem.write_obj(0u32, d.addr()).is_ok() {
                        written = 4;
                    }
                    break;
                }
            }
            if let Err(e) = queue.add_used(&mem, head, written) {
                tracing::warn!(error = %e, "pmem queue");
            }
            used = true;
        }
        if used {
            interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_is_start_then_size_little_endian() {
        let p = Pmem::new(0x1_0000_0000, 4 << 20, None).unwrap();
        let mut b = [0u8; 16];
        p.read_config(0, &mut b);
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap()),
            0x1_0000_0000
        );
        assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), 4 << 20);
        let mut tail = [0xffu8; 4];
        p.read_config(14, &mut tail);
        assert_eq!(tail, [0, 0, 0, 0]);
    }

    #[test]
    fn images_must_be_aligned_and_are_mapped_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.img");
        std::fs::write(&bad, vec![1u8; 4096]).unwrap();
        let e = PmemMapping::open(&bad).unwrap_err().to_string();
        assert!(e.contains("multiple of"), "{e}");
        let good = dir.path().join("good.img");
        let mut data = vec![0u8; PMEM_ALIGN as usize];
        data[..5].copy_from_slice(b"erofs");
        std::fs::write(&good, &data).unwrap();
        let m = PmemMapping::open(&good).unwrap();
        assert_eq!(m.len(), PMEM_ALIGN);
        assert_eq!(m.host_addr() % PMEM_ALIGN, 0, "2 MiB-aligned on the host");
        // SAFETY: the mapping is live and at least 5 bytes long.
        let head = unsafe { std::slice::from_raw_parts(m.host_addr() as *const u8, 5) };
        assert_eq!(head, b"erofs");
        let e = PmemMapping::open(&dir.path().join("missing.img"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.img"), "{e}");
    }
}
