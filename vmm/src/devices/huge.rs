//! Host mappings that KVM can hand a guest 2 MiB at a time.
//!
//! KVM maps a guest page with a 2 MiB entry only when the host maps the
//! same memory with one: the host address must sit at the same offset in
//! a 2 MiB page as the guest address (so both are 2 MiB-aligned here) and
//! the page cache must hold the file's data as a 2 MiB folio. A file
//! written on an ordinary tmpfs is cached in 4 KiB pages, and then every
//! 4 KiB a guest touches in a file mapping (a DAX piece, the weights
//! image) costs a fault in the host's KVM — the cost that dominated
//! virtio-fs reads in the nested harness. [`collapse`] asks the host
//! kernel to rebuild such a range of the page cache as 2 MiB folios
//! (`MADV_COLLAPSE`, Linux 6.1): the file's bytes do not change, the copy
//! is made once per host (every later mapping of the file, by any VM or
//! process, finds the folios made), and the host memory it costs is the
//! same file's pages.
//!
//! **Invariants:** a reservation is `PROT_NONE` and 2 MiB-aligned; a
//! collapse never changes what a mapping reads and its failure (an older
//! kernel, a file open for writing elsewhere, no free 2 MiB page) only
//! leaves the 4 KiB pages in place.

use std::io;

/// The unit of a huge mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// Linux's `MADV_COLLAPSE` (uapi `mman-common.h`; the libc crate names it
/// only for glibc).
const MADV_COLLAPSE: libc::c_int = 25;

/// Reserve `len` bytes (a multiple of [`HUGE_PAGE`]) of address space at
/// a 2 MiB-aligned address: no access, no memory behind it, for the
/// caller to map over with `MAP_FIXED` and unmap when done.
///
/// # Errors
/// A bad length, or the kernel refuses the reservation.
pub fn reserve(len: usize) -> io::Result<*mut libc::c_void> {
    reserve_aligned(len, HUGE_PAGE)
}

/// What one page table of 2 MiB entries maps on x86-64 (a page-directory
/// table: 512 × 2 MiB).
const TABLE_SPAN: usize = 1 << 30;

/// [`reserve`] at a multiple of `align` (a power of two, at least
/// [`HUGE_PAGE`]).
fn reserve_aligned(len: usize, align: usize) -> io::Result<*mut libc::c_void> {
    if len == 0 || !len.is_multiple_of(HUGE_PAGE) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let padded = len
        .checked_add(align)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // Reserve `align` more than asked, then give back what lies outside
    // the first aligned `len`.
    // SAFETY: a fresh anonymous reservation (addr NULL, no access, no swap
    // reserved); the result is checked.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let head = (align - raw as usize % align) % align;
    // SAFETY: both ranges lie inside the reservation just made and nothing
    // else refers to them; an empty range is not unmapped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        let addr = raw.cast::<u8>().add(head);
        let tail = align - head;
        if tail > 0 {
            libc::munmap(addr.add(len).cast(), tail);
        }
        Ok(addr.cast())
    }
}

/// Ask the host kernel to hold `[addr, addr + len)` (a shared, read-only
/// file mapping this process made, 2 MiB-aligned with its file offset) in
/// 2 MiB page-cache folios. Best effort: the error says why it did not.
///
/// # Errors
/// The kernel's: `EINVAL` (no `MADV_COLLAPSE`, or the file cannot be
/// collapsed), `EAGAIN`/`ENOMEM` (no huge page to be had now).
pub fn collapse(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_COLLAPSE changes how the range's pages are held, never
    // their content or the mapping's protection (so the address is taken
    // as a number: any is sound); on one not mapped the kernel answers
    // ENOMEM.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_COLLAPSE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`collapse`] `len` bytes of the file `fd` from `offset` (both
/// multiples of [`HUGE_PAGE`], inside the file) in one call, through a
/// mapping of this call's own (gone when it returns), before any of them
/// is mapped where a guest reads.
///
/// The mapping sits alone in a reservation of whole page tables' spans
/// ([`TABLE_SPAN`]), where no page table is ever made: Linux 6.1 ends a
/// collapse after the first piece it rebuilt whenever the page table over
/// the mapping exists but is empty there (its `SCAN_PMD_NONE`, not among
/// the results it goes on after; later kernels go on), and in a VMM's
/// busy address space it nearly always did — a 64 MiB run became one huge
/// page per VM. Without a table each piece ends `SCAN_PMD_NULL`, which
/// every kernel goes on after. 6.1 then answers `EINVAL` although every
/// piece was rebuilt, so the answer says little.
///
/// # Errors
/// The reservation or mapping fails, or [`collapse`]'s.
pub fn collapse_file(fd: std::os::fd::RawFd, offset: u64, len: usize) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let span = len
        .checked_next_multiple_of(TABLE_SPAN)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    if !len.is_multiple_of(HUGE_PAGE) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let at = reserve_aligned(span, TABLE_SPAN)?;
    // SAFETY: `at` is the reservation just made, `span` ≥ `len` bytes,
    // owned here.
    let result = unsafe { map_over(at, len, fd, offset) }.and_then(|()| collapse(at as usize, len));
    // SAFETY: the reservation (and the mapping in it) made above, used by
    // nothing else.
    unsafe { libc::munmap(at, span) };
    result
}

/// Map `len` bytes of `fd` from `offset` over `[at, at + len)`, read-only
/// and shared (`MAP_FIXED`).
///
/// # Safety
/// `[at, at + len)` must be address space the caller owns (a
/// [`reserve`]d range), with nothing in it anyone still uses.
pub unsafe fn map_over(
    at: *mut libc::c_void,
    len: usize,
    fd: std::os::fd::RawFd,
    offset: libc::off_t,
) -> io::Result<()> {
    // SAFETY: the caller owns the range; the result is checked.
    let m = unsafe {
        libc::mmap(
            at,
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd,
            offset,
        )
    };
    if m == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn reservations_are_aligned_and_refuse_odd_sizes() {
        for pieces in [1, 3, 8] {
            let len = pieces * HUGE_PAGE;
            let addr = reserve(len).unwrap();
            assert_eq!(addr as usize % HUGE_PAGE, 0);
            // SAFETY: the reservation just made.
            unsafe { libc::munmap(addr, len) };
        }
        for len in [0, 4096, HUGE_PAGE + 4096, usize::MAX - 4095] {
            assert!(reserve(len).is_err(), "{len}");
        }
    }

    /// Whether the kernel collapses or not (it depends on the host), a
    /// collapsed mapping reads the file's bytes.
    #[test]
    fn a_collapse_keeps_what_the_mapping_reads() {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..2 * HUGE_PAGE).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        let len = 2 * HUGE_PAGE;
        let addr = reserve(len).unwrap();
        // SAFETY: over the reservation just made.
        unsafe { map_over(addr, len, f.as_raw_fd(), 0) }.unwrap();
        let outcome = collapse(addr as usize, len);
        // SAFETY: the mapping above, `len` bytes of a file that long.
        let seen = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len) };
        assert!(
            seen == bytes.as_slice(),
            "collapse ({outcome:?}) changed the bytes"
        );
        // SAFETY: the mapping above, unmapped once.
        unsafe { libc::munmap(addr, len) };
        // Through a mapping of its own: the file's bytes are still its own.
        let outcome = collapse_file(f.as_raw_fd(), HUGE_PAGE as u64, HUGE_PAGE);
        let mut back = vec![0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, HUGE_PAGE as u64).unwrap();
        assert_eq!(back, bytes[HUGE_PAGE..][..16], "{outcome:?}");
        assert!(
            collapse_file(f.as_raw_fd(), 4096, HUGE_PAGE).is_err(),
            "unaligned"
        );
    }

    /// `ShmemPmdMapped` of this process's mapping at `addr`, KiB.
    fn pmd_mapped_kib(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((lo, hi)) = range.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && let Some(v) = line.strip_prefix("ShmemPmdMapped:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
        0
    }

    /// Every piece of a run is collapsed, not only the first: Linux 6.1
    /// stopped a collapse after its first piece whenever the page table
    /// around the mapping existed (as it does in a busy process; here,
    /// other mappings are faulted all around first). Where
    /// the host kernel collapses nothing (no `MADV_COLLAPSE`), nothing is
    /// asserted but the bytes.
    #[test]
    fn a_collapse_makes_every_piece_of_a_run_huge() {
        const PIECES: usize = 4;
        let len = PIECES * HUGE_PAGE;
        // SAFETY: a fresh memfd (shmem, as a tmpfs share is); checked.
        let fd = unsafe { libc::memfd_create(c"airlock-huge-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: the descriptor just made, owned by this value alone.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let bytes: Vec<u8> = (0..len).map(|i| (i * 13 % 241) as u8).collect();
        f.write_all(&bytes).unwrap();
        // Busy neighbours: faulted mappings all around, so page tables
        // exist near wherever the collapse maps the file.
        let neighbours: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 3 * HUGE_PAGE]).collect();
        let outcome = collapse_file(f.as_raw_fd(), 0, len);
        let addr = reserve(len).unwrap();
        // SAFETY: over the reservation just made.
        unsafe { map_over(addr, len, f.as_raw_fd(), 0) }.unwrap();
        // SAFETY: the mapping above, `len` bytes of a file that long.
        let seen = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len) };
        assert!(seen == bytes.as_slice(), "{outcome:?}");
        let kib = pmd_mapped_kib(addr as usize);
        // SAFETY: the mapping above, unmapped once.
        unsafe { libc::munmap(addr, len) };
        drop(neighbours);
        if kib == 0 {
            eprintln!("this kernel made no huge page ({outcome:?}): only the bytes were checked");
            return;
        }
        assert_eq!(kib, (len / 1024) as u64, "{outcome:?}");
    }
}
