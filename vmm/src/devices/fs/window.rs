//! The DAX window of a virtio-fs device: a range of guest-physical memory
//! (a read-only KVM memory slot) into which the file server maps pieces
//! of the share's files at the guest's request (`FUSE_SETUPMAPPING`), so
//! the guest reads them straight from the host's page cache — no FUSE
//! round trip per read, no copy into fresh guest pages, and every VM
//! reading one file reads the same host pages.
//!
//! The window is reserved once (`PROT_NONE`, no memory behind it); a
//! mapping replaces a piece with the file's pages, read-only and shared;
//! a removal puts the reservation back.
//!
//! **Invariants** (the first two have unit tests in `tests.rs`; the last
//! two follow from where the builder puts the window):
//! * Only this reservation is ever mapped over: a request whose offset or
//!   length is not a multiple of [`MAP_ALIGN`] (the guest kernel's own
//!   unit), or that reaches past the window's end (checked without
//!   overflow), is `EINVAL` before any `mmap`; so the pieces, and the
//!   host's memory-map entries for them, are at most `len / MAP_ALIGN`.
//! * Mappings are never writable: a request with the write flag is
//!   `EPERM` whatever the share (the slot is `KVM_MEM_READONLY` too, so a
//!   guest write is an MMIO exit, never a store into a host file).
//! * The window is not part of the guest memory the devices use
//!   (`GuestMemoryMmap`): a guest pointing a queue descriptor into it gets
//!   an invalid-address error, never a VMM thread reading a file mapping
//!   (which could fault past the end of a file).
//! * A guest that reads a piece it never mapped (or a mapped file past its
//!   end) makes `KVM_RUN` fail: its own VM ends, nothing else.
//! * At most [`COLLAPSE_BUDGET`] pieces per window are collapsed into huge
//!   host pages (`huge::collapse_file`, at most [`COLLAPSE_AHEAD`] per
//!   request), and only whole pieces of a file without holes (a collapse
//!   fills holes with memory); the others map as they are.

use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::transport::FsCacheReqHandler;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// Size of each share's window (guest-physical): 32 pieces of
/// [`MAP_ALIGN`]. The guest holds a `struct page` per 4 KiB of it (1 MiB
/// of guest memory), and reclaims its oldest pieces when it runs out.
pub const WINDOW_SIZE: u64 = 64 << 20;
/// The unit of a mapping: Linux's virtio-fs maps 2 MiB pieces
/// (`FUSE_DAX_SZ`) at 2 MiB-aligned window and file offsets.
pub const MAP_ALIGN: u64 = crate::devices::huge::HUGE_PAGE as u64;
/// How many pieces one window (one VM's share) may have collapsed into
/// huge pages (`huge::collapse`): 64 MiB of file data. Each collapse is a
/// 2 MiB copy the first time (later ones find the folio made) and may make
/// the host compact memory for a free huge page, so what a guest can make
/// the host do is bounded whatever it maps and unmaps. The huge pages a
/// collapse makes are charged to this VMM's cgroup, which allows for them
/// (`jail::COLLAPSE_ALLOWANCE_MIB`): never at the cost of the guest's own
/// memory. One budget serves all of a VM's windows (the builder shares
/// it); past it pieces stay in 4 KiB pages.
pub const COLLAPSE_BUDGET: u32 = 32;
/// Most pieces of a file collapsed in one call (64 MiB): the first piece
/// the guest maps and those after it, so a file read in order costs one
/// call per 64 MiB.
pub const COLLAPSE_AHEAD: u64 = 32;
/// Runs a window remembers as collapsed (the oldest forgotten first: a
/// forgotten run is only asked for again, at the budget's cost).
const REMEMBERED_RUNS: usize = 64;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// A reserved window (see the module docs).
#[derive(Debug)]
pub struct DaxWindow {
    addr: *mut libc::c_void,
    len: u64,
    /// Which pieces hold a file mapping now.
    mapped: Mutex<Vec<bool>>,
    /// Pieces this window (and the VM's other windows: it is shared) may
    /// still ask the host kernel to hold in a huge page
    /// ([`COLLAPSE_BUDGET`]).
    collapses_left: Arc<AtomicU32>,
    /// Runs of pieces collapsed so far (at most [`REMEMBERED_RUNS`]).
    collapsed: Mutex<std::collections::VecDeque<Collapsed>>,
}

// SAFETY: the window is a range of this process's address space that only
// `place` changes (under `mapped`'s lock) and only KVM reads; the pointer
// is never dereferenced by Rust code outside the tests.
unsafe impl Send for DaxWindow {}
// SAFETY: as above.
unsafe impl Sync for DaxWindow {}

impl DaxWindow {
    /// Reserve a window of `len` bytes (a non-zero multiple of
    /// [`MAP_ALIGN`]), nothing mapped, with a collapse budget of its own.
    ///
    /// # Errors
    /// A bad length, or the reservation fails.
    pub fn new(len: u64) -> io::Result<Arc<Self>> {
        Self::sharing(len, Self::budget())
    }

    /// A fresh collapse budget ([`COLLAPSE_BUDGET`] pieces), for all the
    /// windows of one VM.
    pub fn budget() -> Arc<AtomicU32> {
        Arc::new(AtomicU32::new(COLLAPSE_BUDGET))
    }

    /// [`Self::new`], spending `budget` (shared with the VM's other
    /// windows) on collapses.
    ///
    /// # Errors
    /// A bad length, or the reservation fails.
    pub fn sharing(len: u64, budget: Arc<AtomicU32>) -> io::Result<Arc<Self>> {
        if len == 0 || !len.is_multiple_of(MAP_ALIGN) {
            return Err(einval());
        }
        let size = usize::try_from(len).map_err(|_| einval())?;
        // 2 MiB-aligned in the host's address space too, so a file whose
        // page cache holds huge pages (tmpfs `huge=`, large folios, or
        // made so by `collapse`) is mapped by the host — and so by KVM
        // for the guest — 2 MiB at a time instead of 4 KiB.
        let addr = crate::devices::huge::reserve(size)?;
        Ok(Arc::new(Self {
            addr,
            len,
            mapped: Mutex::new(vec![false; (len / MAP_ALIGN) as usize]),
            collapses_left: budget,
            collapsed: Mutex::new(std::collections::VecDeque::new()),
        }))
    }

    /// Host address of the window (for its memory slot).
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never empty (a window has at least one piece).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Pieces holding a file mapping now.
    pub fn pieces_mapped(&self) -> usize {
        self.pieces().iter().filter(|m| **m).count()
    }

    fn pieces(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.mapped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pieces `[moffset, moffset + len)` covers, if that range is
    /// aligned and inside the window.
    fn range(&self, moffset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = moffset.checked_add(len).ok_or_else(einval)?;
        if len == 0
            || !moffset.is_multiple_of(MAP_ALIGN)
            || !len.is_multiple_of(MAP_ALIGN)
            || end > self.len
        {
            return Err(einval());
        }
        Ok((moffset / MAP_ALIGN) as usize..(end / MAP_ALIGN) as usize)
    }

    /// Map `len` bytes of `fd` from `foffset` at `moffset`, read-only.
    fn map_file(&self, foffset: u64, moffset: u64, len: u64, fd: RawFd) -> io::Result<()> {
        if !foffset.is_multiple_of(MAP_ALIGN) {
            return Err(einval());
        }
        let start = libc::off_t::try_from(foffset).map_err(|_| einval())?;
        // A request refused costs nothing; one taken is collapsed before
        // it is mapped, so the guest's first touch finds huge pages.
        self.range(moffset, len)?;
        self.collapse_ahead(fd, foffset);
        self.place(moffset, len, Some((fd, start)))
    }

    /// Put the reservation back over `[moffset, moffset + len)`.
    fn unmap_range(&self, moffset: u64, len: u64) -> io::Result<()> {
        self.place(moffset, len, None)
    }

    /// Replace `[moffset, moffset + len)` (checked by [`Self::range`])
    /// with `file` (a descriptor and offset: read-only, shared) or, with
    /// `None`, with the no-access reservation; note which pieces hold a
    /// file.
    fn place(&self, moffset: u64, len: u64, file: Option<(RawFd, libc::off_t)>) -> io::Result<()> {
        let pieces = self.range(moffset, len)?;
        let (prot, flags, fd, offset) = match file {
            Some((fd, offset)) => (libc::PROT_READ, libc::MAP_SHARED, fd, offset),
            None => (
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ),
        };
        let mut mapped = self.pieces();
        // SAFETY: the target range lies inside this window's reservation
        // (`range` checked it) and MAP_FIXED replaces only that range, with
        // a read-only file mapping or a no-access reservation; the result
        // is checked.
        let r = unsafe {
            libc::mmap(
                self.addr.cast::<u8>().add(moffset as usize).cast(),
                len as usize,
                prot,
                flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                offset,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        mapped[pieces].fill(file.is_some());
        Ok(())
    }

    /// Have the host hold the file's pieces from the one at `foffset` in
    /// huge pages: up to [`COLLAPSE_AHEAD`] whole pieces in one call (each
    /// call has a fixed cost — the kernel drains its page lists — so one
    /// per run of pieces, not one per piece; see `huge::collapse_file`),
    /// only for a file without holes, while the budget lasts; a run
    /// collapsed in this window's life is not asked for again.
    fn collapse_ahead(&self, fd: RawFd, foffset: u64) {
        let Some(st) = fstat(fd) else { return };
        let (size, allocated) = (st.st_size as u64, (st.st_blocks as u64).saturating_mul(512));
        let (first, whole) = (foffset / MAP_ALIGN, size / MAP_ALIGN);
        if allocated < size || first >= whole {
            return;
        }
        let (dev, ino) = (st.st_dev, st.st_ino);
        let mut done = self.collapsed.lock().unwrap_or_else(|p| p.into_inner());
        if done
            .iter()
            .any(|c| (c.dev, c.ino) == (dev, ino) && c.pieces.contains(&first))
        {
            return;
        }
        let want = u32::try_from((whole - first).min(COLLAPSE_AHEAD)).unwrap_or(0);
        let Ok(left) =
            self.collapses_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    (left > 0).then(|| left - left.min(want))
                })
        else {
            return;
        };
        let n = u64::from(left.min(want));
        if let Err(e) = crate::devices::huge::collapse_file(fd, foffset, (n * MAP_ALIGN) as usize) {
            tracing::debug!(error = %e, pieces = n, "collapse answered an error (some pieces may stay in 4 KiB pages)");
        }
        if done.len() == REMEMBERED_RUNS {
            done.pop_front();
        }
        done.push_back(Collapsed {
            dev,
            ino,
            pieces: first..first + n,
        });
    }

    /// Pieces this window may still have collapsed.
    pub fn collapses_left(&self) -> u32 {
        self.collapses_left.load(Ordering::Relaxed)
    }

    /// Set what is left of the budget, for tests.
    #[cfg(test)]
    pub fn set_collapses_left(&self, n: u32) {
        self.collapses_left.store(n, Ordering::Relaxed);
    }

    /// The window's bytes at `[offset, offset + n)`, for tests.
    ///
    /// # Safety
    /// That range must be mapped to a file at least that long.
    #[cfg(test)]
    pub unsafe fn read(&self, offset: u64, n: usize) -> Vec<u8> {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts(self.addr.cast::<u8>().add(offset as usize), n) }
            .to_vec()
    }
}

impl Drop for DaxWindow {
    fn drop(&mut self) {
        // SAFETY: the whole reservation (with whatever is mapped in it),
        // owned by this value alone; KVM's slot over it is gone first
        // (the VM fd is dropped before the devices' windows).
        unsafe { libc::munmap(self.addr, self.len as usize) };
    }
}

/// `fstat` of `fd`, if it answers.
fn fstat(fd: RawFd) -> Option<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer on success; it is read
    // only then.
    (unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0).then(|| {
        // SAFETY: fstat succeeded.
        unsafe { st.assume_init() }
    })
}

/// A run of a file's pieces collapsed in a window's life.
#[derive(Debug)]
struct Collapsed {
    dev: u64,
    ino: u64,
    pieces: std::ops::Range<u64>,
}

/// The file server's handle on a window (what `fuse-backend-rs` calls for
/// SETUPMAPPING and REMOVEMAPPING).
#[derive(Debug, Clone)]
pub struct WindowRequests(pub Arc<DaxWindow>);

impl FsCacheReqHandler for WindowRequests {
    fn map(
        &mut self,
        foffset: u64,
        moffset: u64,
        len: u64,
        flags: u64,
        fd: RawFd,
    ) -> io::Result<()> {
        if flags & SetupmappingFlags::WRITE.bits() != 0 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.0.map_file(foffset, moffset, len, fd)
    }

    fn unmap(&mut self, requests: Vec<RemovemappingOne>) -> io::Result<()> {
        for r in requests {
            // All ones: from `moffset` to the window's end (the protocol's
            // "everything" spelling).
            let len = if r.len == u64::MAX {
                self.0.len.saturating_sub(r.moffset)
            } else {
                r.len
            };
            self.0.unmap_range(r.moffset, len)?;
        }
        Ok(())
    }
}
