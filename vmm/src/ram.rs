//! Guest RAM: one anonymous private mapping whose start is 2 MiB-aligned and
//! marked `MADV_HUGEPAGE`.
//!
//! Why: KVM maps guest memory with 2 MiB pages only where the guest-physical
//! and the host-virtual address agree modulo 2 MiB and the host page is a
//! huge page. A plain mmap starts anywhere on a 4 KiB boundary, so every
//! guest page then costs its own nested page fault — under the nested
//! harness each one is an emulated VM exit (QEMU aligns its RAM the same way).
//!
//! Invariant: the mapping lives until this value is dropped, and the owner
//! drops it only after every `GuestMemoryMmap` built on it (see `vmm::run`).

use std::io;

const HUGE: usize = 2 << 20;

/// The mapping (unmapped on drop).
#[derive(Debug)]
pub struct GuestRam {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving the owner
// to another thread changes nothing about it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Map `len` bytes (a multiple of 4 KiB), 2 MiB-aligned.
    ///
    /// # Errors
    /// The mmap failed.
    pub fn new(len: usize) -> io::Result<Self> {
        let span = len + HUGE;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE);
        // SAFETY: both ranges lie inside the mapping made above and outside
        // `start..start + len`, which is what we keep.
        unsafe {
            if start > base {
                libc::munmap(base as *mut libc::c_void, start - base);
            }
            let end = start + len;
            if base + span > end {
                libc::munmap(end as *mut libc::c_void, base + span - end);
            }
            // Advice only: without THP the guest still runs, on 4 KiB pages.
            libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Self {
            addr: start as *mut u8,
            len,
        })
    }

    /// Map the memory image `file` (`len` bytes) copy-on-write at a
    /// 2 MiB-aligned address: the guest reads the image's pages through
    /// the host page cache, shared with every other VM mapping it, and its
    /// writes go to private copies; the file never changes.
    ///
    /// # Errors
    /// The file is shorter than `len`, or the mmap failed.
    pub fn from_file(file: &std::fs::File, len: usize) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let have = file.metadata()?.len();
        if have < len as u64 {
            return Err(io::Error::other(format!(
                "the memory image is {have} bytes, the guest's RAM {len}"
            )));
        }
        let ram = Self::new(len)?;
        // SAFETY: `ram.addr..ram.addr + len` is a mapping this value owns
        // and nothing references yet; MAP_FIXED replaces exactly it with a
        // private mapping of the file, which `Drop` unmaps the same way.
        let at = unsafe {
            libc::mmap(
                ram.addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ram)
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `addr..addr + len` is the mapping this value owns; by the
        // module invariant nothing uses it any more.
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_is_aligned_zeroed_and_writable() {
        let ram = GuestRam::new(8 << 20).unwrap();
        assert_eq!(ram.as_ptr() as usize % HUGE, 0);
        assert_eq!(ram.len(), 8 << 20);
        // SAFETY: inside the live mapping.
        unsafe {
            assert_eq!(*ram.as_ptr().add(5 << 20), 0);
            *ram.as_ptr().add(5 << 20) = 7;
            assert_eq!(*ram.as_ptr().add(5 << 20), 7);
        }
    }

    #[test]
    fn an_image_is_mapped_copy_on_write_and_never_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mem");
        let mut image = vec![0u8; 4 << 20];
        image[3 << 20] = 42;
        std::fs::write(&p, &image).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let ram = GuestRam::from_file(&f, 4 << 20).unwrap();
        assert_eq!(ram.as_ptr() as usize % HUGE, 0);
        // SAFETY: inside the live mapping.
        unsafe {
            assert_eq!(*ram.as_ptr().add(3 << 20), 42);
            *ram.as_ptr().add(3 << 20) = 7;
            assert_eq!(*ram.as_ptr().add(3 << 20), 7);
        }
        drop(ram);
        assert_eq!(std::fs::read(&p).unwrap()[3 << 20], 42);
        // An image shorter than the RAM is refused.
        assert!(GuestRam::from_file(&f, 8 << 20).is_err());
    }
}
