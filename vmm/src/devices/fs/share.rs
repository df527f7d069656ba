//! One granted host directory as the virtio-fs server serves it: a
//! `fuse-backend-rs` passthrough file system behind a wall of our own that
//! trusts nothing the guest kernel sends.
//!
//! **Invariants** (each has a test sending raw FUSE requests, `tests.rs`):
//! * A read-only share refuses every operation that would change the host
//!   (setattr, write, create, mkdir, mknod, unlink, rmdir, rename, link,
//!   symlink, fallocate, xattr changes, and opens for writing) with
//!   `EROFS`, whatever a modified guest kernel sends.
//! * A name from the guest (lookup, create, mkdir, symlink, link, unlink,
//!   rmdir, rename) is one path component: never empty, `.`, `..`, nor
//!   containing `/`; anything else is `EINVAL` before the host is touched.
//! * Nothing but regular files and directories is ever opened (a device
//!   node in a share stays closed: CVE-2020-35517); no device node is
//!   ever made. Symlinks are returned as symlinks (`readlink`), never
//!   followed on the host: the passthrough resolves each name with
//!   `O_PATH | O_NOFOLLOW` beneath the share's root.
//! * What the guest can make the host hold is capped: inodes it has
//!   looked up (or listed with READDIRPLUS) and not forgotten (each holds
//!   a host descriptor), and open handles (CVE-2020-10717); past the caps
//!   it gets `ENFILE`/`EMFILE`, never a silently short listing.
//! * A DAX mapping (`FUSE_SETUPMAPPING`) is of a regular file only and
//!   never writable (`EROFS` on a read-only share, `EPERM` on another);
//!   the device's [`super::window::DaxWindow`] bounds where it goes.
//! * Requests run with the server's own credentials: the guest's uid/gid
//!   in a request never switch the host thread's (`id_remap`).
//! * What the guest writes is capped when the share has a [`WriteCap`]
//!   (one for all shares of a VM: the call's write limit): each write and
//!   allocation takes its size first, each new entry (create, mkdir,
//!   symlink, link) [`airlock_abi::ENTRY_WRITE_BYTES`] (given back if it
//!   is not made); past the cap it fails with `ENOSPC`
//!   and nothing is written — the same count the guest's runner keeps, so
//!   an honest guest meets the runner's limit first and a lying one this.

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FsOptions, OpenOptions, SetattrValid, stat64, statvfs64,
};
use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// What one share may make the host hold, at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareLimits {
    /// Inodes looked up and not yet forgotten (each holds an `O_PATH` fd).
    pub max_inodes: usize,
    /// Open file and directory handles.
    pub max_handles: usize,
}

impl Default for ShareLimits {
    /// The most each share of a VM gets: enough for a guest to walk a
    /// directory of tens of thousands of files (the guest kernel holds an
    /// inode per entry it has looked up, and forgets them only under
    /// memory pressure). The VMM's descriptor limit grows by as much per
    /// share (`process::open_files_for`).
    fn default() -> Self {
        Self {
            max_inodes: 32_768,
            max_handles: 1024,
        }
    }
}

impl ShareLimits {
    /// What each of `shares` shares gets in a process that may hold
    /// `open_files` descriptors, `reserved` of them kept for the rest of
    /// the VMM: an even split, at most [`ShareLimits::default`] — so a
    /// process whose limit could not be raised as far still runs, with
    /// smaller shares, and its guest meets a share's cap before the
    /// process's.
    pub fn within(open_files: u64, reserved: u64, shares: usize) -> Self {
        let full = Self::default();
        let per = open_files.saturating_sub(reserved) / shares.max(1) as u64;
        // Each share also holds its root and /proc/self/fd.
        let per = per.saturating_sub(2) as usize;
        let max_handles = full.max_handles.min(per / 32).max(1);
        let max_inodes = full.max_inodes.min(per.saturating_sub(max_handles)).max(1);
        Self {
            max_inodes,
            max_handles,
        }
    }
}

/// Bytes a VM's guest may still write into its shares, shared by them.
#[derive(Debug)]
pub struct WriteCap {
    left: AtomicU64,
}

impl WriteCap {
    /// A cap of `bytes`.
    pub fn new(bytes: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            left: AtomicU64::new(bytes),
        })
    }

    /// Bytes still allowed.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::SeqCst)
    }

    /// Take `n` bytes, or fail with `ENOSPC` taking nothing.
    fn take(&self, n: u64) -> io::Result<()> {
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| l.checked_sub(n))
            .map(|_| ())
            .map_err(|_| errno(libc::ENOSPC))
    }

    /// Give back `n` bytes taken for something that did not happen.
    fn give(&self, n: u64) {
        self.left.fetch_add(n, Ordering::SeqCst);
    }
}

/// One share (see the module docs).
pub struct Share {
    inner: PassthroughFs,
    read_only: bool,
    limits: ShareLimits,
    cap: Option<std::sync::Arc<WriteCap>>,
    /// Lookup counts as the guest kernel holds them (inode → count).
    lookups: Mutex<HashMap<u64, u64>>,
    handles: AtomicUsize,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Share")
            .field("read_only", &self.read_only)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `name` is one path component.
fn check_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

/// Open flags that could change the file.
fn writes(flags: u32) -> bool {
    let f = flags as i32;
    (f & libc::O_ACCMODE) != libc::O_RDONLY
        || f & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0
}

impl Share {
    /// Serve the directory `root` (read-only when `read_only`).
    ///
    /// # Errors
    /// The directory (or `/proc/self/fd`, which the passthrough reopens
    /// files through) cannot be opened.
    pub fn new(root: &Path, read_only: bool, limits: ShareLimits) -> io::Result<Self> {
        let cfg = Config {
            root_dir: root.to_string_lossy().into_owned(),
            // Files may change on the host (another VM's rw share of the
            // same volume): no long caching, no writeback.
            cache_policy: CachePolicy::Auto,
            writeback: false,
            xattr: false,
            do_import: true,
            ..Config::default()
        };
        let inner = PassthroughFs::new(cfg)?;
        inner.import()?;
        Ok(Self {
            inner,
            read_only,
            limits,
            cap: None,
            lookups: Mutex::new(HashMap::new()),
            handles: AtomicUsize::new(0),
        })
    }

    /// Hold what the guest writes here to `cap` (see the module docs).
    #[must_use]
    pub fn capped(mut self, cap: std::sync::Arc<WriteCap>) -> Self {
        self.cap = Some(cap);
        self
    }

    /// Take `n` bytes of the write cap, if there is one.
    fn charge(&self, n: u64) -> io::Result<()> {
        self.cap.as_ref().map_or(Ok(()), |c| c.take(n))
    }

    /// Make a new entry with `make`, charging the write cap
    /// [`airlock_abi::ENTRY_WRITE_BYTES`] for it first (given back when
    /// `make` fails), so a capped guest cannot fill the share with empty
    /// files or directories.
    fn new_entry<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.charge(airlock_abi::ENTRY_WRITE_BYTES)?;
        let made = make();
        if made.is_err()
            && let Some(c) = &self.cap
        {
            c.give(airlock_abi::ENTRY_WRITE_BYTES);
        }
        made
    }

    fn lookups(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.lookups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inodes the guest holds now.
    pub fn inodes_held(&self) -> usize {
        self.lookups().len()
    }

    /// Handles open now.
    pub fn handles_open(&self) -> usize {
        self.handles.load(Ordering::SeqCst)
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only { Err(erofs()) } else { Ok(()) }
    }

    /// Run `f`, which returns an entry, only while there is room for one
    /// more inode; count the entry it returns.
    fn entry(&self, f: impl FnOnce() -> io::Result<Entry>) -> io::Result<Entry> {
        self.counted(f, |e| e.inode)
    }

    /// [`Self::entry`] for an answer holding an entry (`inode` finds it).
    fn counted<T>(
        &self,
        f: impl FnOnce() -> io::Result<T>,
        inode: impl Fn(&T) -> u64,
    ) -> io::Result<T> {
        if self.lookups().len() >= self.limits.max_inodes {
            return Err(errno(libc::ENFILE));
        }
        let r = f()?;
        *self.lookups().entry(inode(&r)).or_insert(0) += 1;
        Ok(r)
    }

    fn forgotten(&self, inode: u64, count: u64) {
        let mut l = self.lookups();
        if let Some(n) = l.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                l.remove(&inode);
            }
        }
    }

    /// Take a handle slot, run `f`; the slot is kept when `f` returns a
    /// handle.
    fn handle<T>(
        &self,
        f: impl FnOnce() -> io::Result<T>,
        has_handle: impl Fn(&T) -> bool,
    ) -> io::Result<T> {
        if self.handles.fetch_add(1, Ordering::SeqCst) >= self.limits.max_handles {
            self.handles.fetch_sub(1, Ordering::SeqCst);
            return Err(errno(libc::EMFILE));
        }
        match f() {
            Ok(v) if has_handle(&v) => Ok(v),
            other => {
                self.handles.fetch_sub(1, Ordering::SeqCst);
                other
            }
        }
    }

    fn released(&self) {
        let _ = self
            .handles
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Only regular files and directories are opened.
    fn openable(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        self.of_type(ctx, inode, &[libc::S_IFREG, libc::S_IFDIR])
    }

    /// `inode` is one of `types` (`S_IF*`), else `EACCES`.
    fn of_type(&self, ctx: &Context, inode: u64, types: &[u32]) -> io::Result<()> {
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        if types.contains(&(st.st_mode & libc::S_IFMT)) {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }
}

impl FileSystem for Share {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.lookups().clear();
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        ctx.uid = 0;
        ctx.gid = 0;
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        self.entry(|| self.inner.lookup(ctx, parent, name))
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.forgotten(inode, count);
        self.inner.forget(ctx, inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in &requests {
            self.forgotten(*inode, *count);
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        // Ownership stays the server's; set-id bits are never set.
        if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
            return Err(errno(libc::EPERM));
        }
        let mut attr = attr;
        attr.st_mode &= !(libc::S_ISUID | libc::S_ISGID);
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        self.new_entry(|| self.entry(|| self.inner.symlink(ctx, linkname, parent, name)))
    }

    fn mknod(
        &self,
        _ctx: &Context,
        _inode: u64,
        name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        // Files come through create; device nodes, fifos and sockets never.
        Err(errno(libc::EPERM))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let mode = mode & 0o777;
        self.new_entry(|| self.entry(|| self.inner.mkdir(ctx, parent, name, mode, umask)))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        // RENAME_WHITEOUT makes a device node.
        if flags & libc::RENAME_WHITEOUT != 0 {
            return Err(errno(libc::EPERM));
        }
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        check_name(newname)?;
        self.new_entry(|| self.entry(|| self.inner.link(ctx, inode, newparent, newname)))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if writes(flags) {
            self.writable()?;
        }
        self.openable(ctx, inode)?;
        self.handle(
            || self.inner.open(ctx, inode, flags, fuse_flags),
            |(h, _, _)| h.is_some(),
        )
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_name(name)?;
        let args = CreateIn {
            mode: args.mode & 0o777,
            ..args
        };
        self.new_entry(|| {
            self.counted(
                || {
                    self.handle(
                        || self.inner.create(ctx, parent, name, args),
                        |(_, h, _, _)| h.is_some(),
                    )
                },
                |(e, _, _, _)| e.inode,
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.charge(u64::from(size))?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        if mode & libc::FALLOC_FL_PUNCH_HOLE as u32 == 0 {
            self.charge(length)?;
        }
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let r = self
            .inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        self.released();
        r
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.openable(ctx, inode)?;
        self.handle(
            || self.inner.opendir(ctx, inode, flags),
            |(h, _)| h.is_some(),
        )
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    /// Entries with their attributes in one reply (a guest listing and
    /// stat-ing a large directory makes one request per batch, not two per
    /// entry). Each entry is an inode the guest now holds: counted like a
    /// lookup, and past the cap the listing stops with `ENFILE` — never a
    /// short listing the guest would take for the end of the directory.
    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut added = 0usize;
        let mut full = false;
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |d, e| {
                if self.lookups().len() >= self.limits.max_inodes {
                    full = true;
                    // 0: no room; the inner server forgets its lookup.
                    return Ok(0);
                }
                let ino = e.inode;
                let n = add_entry(d, e)?;
                if n > 0 {
                    *self.lookups().entry(ino).or_insert(0) += 1;
                    added += 1;
                }
                Ok(n)
            })?;
        if full && added == 0 {
            return Err(errno(libc::ENFILE));
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let r = self.inner.releasedir(ctx, inode, flags, handle);
        self.released();
        r
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only && mask & libc::W_OK as u32 != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    /// A piece of a regular file into the device's DAX window, read-only
    /// (the window checks the offsets and the length): never writable,
    /// never a directory, device node or link (the passthrough reopens
    /// the inode for the mapping, so this is an open like any other).
    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        if flags & SetupmappingFlags::WRITE.bits() != 0 {
            return Err(if self.read_only {
                erofs()
            } else {
                errno(libc::EPERM)
            });
        }
        self.of_type(ctx, inode, &[libc::S_IFREG])?;
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }
}
