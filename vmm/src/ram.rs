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

use crate::devices::huge::HUGE_PAGE as HUGE;

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
    /// Only the 2 MiB chunks that hold data are the file's: a chunk that is
    /// all hole (memory the guest had not used when the snapshot was made)
    /// stays fresh anonymous memory, as in a booted VM — the same zeros,
    /// but where the guest puts new data KVM maps it 2 MiB at a time on a
    /// transparent huge page, instead of faulting in and copying each
    /// 4 KiB page of a file mapping.
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
        for run in data_chunks(file.as_raw_fd(), len)? {
            // SAFETY: `run` lies inside `ram.addr..ram.addr + len`, a
            // mapping this value owns and nothing references yet; MAP_FIXED
            // replaces exactly that range with a private mapping of the
            // file at the same offset, which `Drop` unmaps with the rest.
            let at = unsafe {
                libc::mmap(
                    ram.addr.add(run.start).cast(),
                    run.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    run.start as libc::off_t,
                )
            };
            if at == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
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

/// The runs of whole 2 MiB chunks of `fd`'s first `len` bytes that hold
/// any data (`SEEK_DATA`/`SEEK_HOLE`), in order and apart. A file system
/// that does not tell holes reports all of it as data.
fn data_chunks(fd: std::os::fd::RawFd, len: usize) -> io::Result<Vec<std::ops::Range<usize>>> {
    let seek = |from: usize, whence| -> io::Result<Option<usize>> {
        let from = libc::off_t::try_from(from).map_err(io::Error::other)?;
        // SAFETY: lseek on a descriptor the caller holds; it moves only
        // the file offset, which nothing else here uses.
        let at = unsafe { libc::lseek(fd, from, whence) };
        match at {
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Ok(None),
            -1 => Err(io::Error::last_os_error()),
            at => Ok(Some(usize::try_from(at).map_err(io::Error::other)?)),
        }
    };
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut from = 0;
    while from < len {
        let Some(data) = seek(from, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let (start, end) = (data / HUGE * HUGE, hole.next_multiple_of(HUGE).min(len));
        match runs.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => runs.push(start..end),
        }
        from = hole.max(data + 1);
    }
    Ok(runs)
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

    /// A sparse image: its data reads back wherever it is, its holes read
    /// as zeros whether they are the file's (in a chunk with data) or fresh
    /// memory (a chunk that is all hole), and writes anywhere stay private.
    #[test]
    fn only_chunks_with_data_are_the_files_and_all_reads_the_same() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mem");
        let f = std::fs::File::create(&p).unwrap();
        let len = 16 << 20;
        f.set_len(len as u64).unwrap();
        // Data in chunk 1 (one page), chunks 3 and 4 (a run across their
        // border) and the image's last page; chunks 0, 2 and 5..7 are holes.
        let marks = [
            (HUGE + 4096, 11u8),
            (4 * HUGE - 4096, 22),
            (4 * HUGE + 8192, 33),
            (len - 1, 44),
        ];
        for (at, v) in marks {
            f.write_all_at(&[v], at as u64).unwrap();
        }
        f.write_all_at(
            &vec![5u8; 4 * HUGE + 4096 - (4 * HUGE - 4096)],
            (4 * HUGE - 4096) as u64,
        )
        .unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let runs = data_chunks(fd, len).unwrap();
        // A file system that reports no holes maps it all; tmpfs and ext4 do.
        if runs.len() != 1 || runs[0] != (0..len) {
            assert_eq!(runs, [HUGE..2 * HUGE, 3 * HUGE..5 * HUGE, 7 * HUGE..len]);
        }
        let ram = GuestRam::from_file(&std::fs::File::open(&p).unwrap(), len).unwrap();
        let image = std::fs::read(&p).unwrap();
        // SAFETY: the live mapping, `len` bytes.
        let seen = unsafe { std::slice::from_raw_parts_mut(ram.as_ptr(), len) };
        assert!(seen == image.as_slice(), "the guest sees the image");
        for at in [0, HUGE + 4096, 2 * HUGE + 7, 4 * HUGE, 6 * HUGE] {
            seen[at] = 99;
        }
        drop(ram);
        assert_eq!(std::fs::read(&p).unwrap(), image, "the image never changes");
    }
}
