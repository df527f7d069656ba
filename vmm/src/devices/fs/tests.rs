//! Raw FUSE requests, as a hostile guest kernel could write them, sent
//! through `fuse-backend-rs`'s server to a [`Share`] over descriptor chains
//! in guest memory — the path the device takes.

use super::raw::RawFuse;
use super::share::ShareLimits;
use super::window::{COLLAPSE_BUDGET, DaxWindow, MAP_ALIGN};
use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, ForgetIn, InHeader, InitIn, LinkIn, MkdirIn, MknodIn, Opcode, OpenIn,
    OpenOut, ReadIn, Rename2In, RenameIn, SetattrIn, WriteIn,
};
use fuse_backend_rs::abi::virtio_fs::{
    RemovemappingIn, RemovemappingOne, SetupmappingFlags, SetupmappingIn,
};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use vm_memory::ByteValued;

const ROOT: u64 = 1;
/// FUSE_INIT as Linux 5.x+ sends it (protocol 7.31).
const INIT: InitIn = InitIn {
    major: 7,
    minor: 31,
    max_readahead: 0x2_0000,
    flags: 0,
};

/// A FUSE client made of raw requests.
struct Fuse {
    raw: RawFuse,
    unique: u64,
}

impl Fuse {
    fn new(root: &Path, read_only: bool, limits: ShareLimits) -> Self {
        Self::serving(super::share::Share::new(root, read_only, limits).unwrap())
    }

    fn serving(share: super::share::Share) -> Self {
        let mut f = Self {
            raw: RawFuse::serving(share),
            unique: 0,
        };
        let (err, _) = f.call(Opcode::Init, 0, &[INIT.as_slice()]);
        assert_eq!(err, 0, "INIT");
        f
    }

    /// One request (`parts` after the header, concatenated); the reply's
    /// error (0 or -errno) and payload (`i32::MIN` when there is none).
    fn call(&mut self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        self.unique += 1;
        let body: Vec<u8> = parts.concat();
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: op as u32,
            unique: self.unique,
            nodeid,
            // A guest process's ids: the server must not switch to them.
            uid: 4321,
            gid: 4321,
            pid: 77,
            padding: 0,
        };
        match self.raw.send(&[header.as_slice(), &body].concat()) {
            None => (i32::MIN, Vec::new()),
            Some((out, payload)) => {
                assert_eq!(out.unique, self.unique);
                (out.error, payload)
            }
        }
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<EntryOut, i32> {
        let name = [name, b"\0"].concat();
        match self.call(Opcode::Lookup, parent, &[&name]) {
            (0, p) => Ok(*EntryOut::from_slice(&p[..std::mem::size_of::<EntryOut>()]).unwrap()),
            (e, _) => Err(e),
        }
    }

    fn open(&mut self, inode: u64, flags: i32) -> Result<u64, i32> {
        let o = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        match self.call(Opcode::Open, inode, &[o.as_slice()]) {
            (0, p) => Ok(OpenOut::from_slice(&p[..16]).unwrap().fh),
            (e, _) => Err(e),
        }
    }

    fn release(&mut self, inode: u64, fh: u64) {
        let r = fuse_backend_rs::abi::fuse_abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        assert_eq!(self.call(Opcode::Release, inode, &[r.as_slice()]).0, 0);
    }

    fn create(&mut self, parent: u64, name: &[u8]) -> Result<(u64, u64), i32> {
        let c = CreateIn {
            flags: (libc::O_RDWR | libc::O_CREAT) as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let name = [name, b"\0"].concat();
        match self.call(Opcode::Create, parent, &[c.as_slice(), &name]) {
            (0, p) => {
                let e = EntryOut::from_slice(&p[..std::mem::size_of::<EntryOut>()]).unwrap();
                let o = OpenOut::from_slice(&p[std::mem::size_of::<EntryOut>()..][..16]).unwrap();
                Ok((e.nodeid, o.fh))
            }
            (e, _) => Err(e),
        }
    }

    fn write(&mut self, inode: u64, fh: u64, data: &[u8]) -> i32 {
        let w = WriteIn {
            fh,
            offset: 0,
            size: data.len() as u32,
            ..Default::default()
        };
        self.call(Opcode::Write, inode, &[w.as_slice(), data]).0
    }

    fn read(&mut self, inode: u64, fh: u64, size: u32) -> Result<Vec<u8>, i32> {
        let r = ReadIn {
            fh,
            offset: 0,
            size,
            ..Default::default()
        };
        match self.call(Opcode::Read, inode, &[r.as_slice()]) {
            (0, p) => Ok(p),
            (e, _) => Err(e),
        }
    }
}

/// A share's directory: `a.txt` ("hello"), `sub/`, `out` → `/etc` (a
/// symlink made on the host pointing outside), a fifo, and when root, a
/// character device (`/dev/null`'s numbers).
fn tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a.txt"), "hello").unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", d.path().join("out")).unwrap();
    nix::unistd::mkfifo(
        &d.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    if nix::unistd::geteuid().is_root() {
        let null = std::fs::metadata("/dev/null").unwrap().rdev();
        nix::sys::stat::mknod(
            &d.path().join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            null,
        )
        .unwrap();
    }
    d
}

const EROFS: i32 = -libc::EROFS;

/// A SETUPMAPPING body: `pieces` of [`MAP_ALIGN`] of the file from
/// `foffset` into the window at `moffset`, for reading.
fn setup(foffset: u64, moffset: u64, pieces: u64) -> SetupmappingIn {
    SetupmappingIn {
        fh: u64::MAX, // Linux sends no handle: the mapping is by inode
        foffset,
        len: pieces * MAP_ALIGN,
        flags: SetupmappingFlags::READ.bits(),
        moffset,
    }
}

/// A REMOVEMAPPING body for `ranges` (window offset, length).
fn removal(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut body = RemovemappingIn {
        count: ranges.len() as u32,
    }
    .as_slice()
    .to_vec();
    for (moffset, len) in ranges {
        body.extend_from_slice(
            RemovemappingOne {
                moffset: *moffset,
                len: *len,
            }
            .as_slice(),
        );
    }
    body
}

/// A share with a 3-piece file whose every 8 bytes say their offset, and
/// a client whose server maps into a 4-piece window.
fn dax_share(read_only: bool) -> (tempfile::TempDir, Fuse, Arc<DaxWindow>, u64) {
    let d = tree();
    let bytes: Vec<u8> = (0..3 * MAP_ALIGN / 8)
        .flat_map(|i| (i * 8).to_le_bytes())
        .collect();
    std::fs::write(d.path().join("big"), bytes).unwrap();
    let window = DaxWindow::new(4 * MAP_ALIGN).unwrap();
    let share = super::share::Share::new(d.path(), read_only, ShareLimits::default()).unwrap();
    let mut f = Fuse {
        raw: RawFuse::serving(share).with_window(window.clone()),
        unique: 0,
    };
    let (err, _) = f.call(Opcode::Init, 0, &[INIT.as_slice()]);
    assert_eq!(err, 0, "INIT");
    let big = f.lookup(ROOT, b"big").unwrap().nodeid;
    (d, f, window, big)
}

#[test]
fn dax_mappings_show_the_files_host_pages_and_go_away() {
    let (d, mut f, window, big) = dax_share(true);
    assert_eq!(
        window.host_addr() % MAP_ALIGN,
        0,
        "the window is 2 MiB-aligned"
    );
    // The file's second piece into the window's third, then its third
    // (1 MiB past its end: a partial piece) into the first.
    assert_eq!(
        f.call(
            Opcode::SetupMapping,
            big,
            &[setup(MAP_ALIGN, 2 * MAP_ALIGN, 1).as_slice()]
        )
        .0,
        0
    );
    assert_eq!(
        f.call(
            Opcode::SetupMapping,
            big,
            &[setup(2 * MAP_ALIGN, 0, 1).as_slice()]
        )
        .0,
        0
    );
    assert_eq!(window.pieces_mapped(), 2);
    let at = |w: &DaxWindow, offset: u64| {
        // SAFETY: the tests map these ranges to the file, within its size.
        u64::from_le_bytes(unsafe { w.read(offset, 8) }.try_into().unwrap())
    };
    assert_eq!(at(&window, 2 * MAP_ALIGN), MAP_ALIGN);
    assert_eq!(at(&window, 2 * MAP_ALIGN + 4096), MAP_ALIGN + 4096);
    assert_eq!(at(&window, 8), 2 * MAP_ALIGN + 8);
    // The host's pages, not a copy: a change on the host shows.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join("big"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &7u64.to_le_bytes(), MAP_ALIGN).unwrap();
    assert_eq!(at(&window, 2 * MAP_ALIGN), 7);
    // Mapping again over a mapped piece replaces it.
    assert_eq!(
        f.call(
            Opcode::SetupMapping,
            big,
            &[setup(0, 2 * MAP_ALIGN, 1).as_slice()]
        )
        .0,
        0
    );
    assert_eq!(at(&window, 2 * MAP_ALIGN + 16), 16);
    assert_eq!(window.pieces_mapped(), 2);
    // Removed one at a time, then all at once (length all ones).
    assert_eq!(
        f.call(Opcode::RemoveMapping, big, &[&removal(&[(0, MAP_ALIGN)])])
            .0,
        0
    );
    assert_eq!(window.pieces_mapped(), 1);
    assert_eq!(
        f.call(Opcode::SetupMapping, big, &[setup(0, 0, 2).as_slice()])
            .0,
        0
    );
    assert_eq!(window.pieces_mapped(), 3);
    assert_eq!(
        f.call(Opcode::RemoveMapping, big, &[&removal(&[(0, u64::MAX)])])
            .0,
        0
    );
    assert_eq!(window.pieces_mapped(), 0);
    // No descriptor is held for a mapping (nor after it).
    assert_eq!(f.raw.share.handles_open(), 0);
    // The collapse budget: the first mapping (file piece 1) collapsed
    // pieces 1 and 2 ahead, the second (piece 2) found them done, the
    // third (piece 0) collapsed 0..3, the rest found that run done. What
    // a collapse made still reads the file's bytes.
    assert_eq!(window.collapses_left(), COLLAPSE_BUDGET - 5);
    assert_eq!(
        f.call(Opcode::SetupMapping, big, &[setup(0, 0, 3).as_slice()])
            .0,
        0
    );
    assert_eq!(at(&window, 4 * 4096), 4 * 4096);
    assert_eq!(at(&window, MAP_ALIGN), 7);
    assert_eq!(at(&window, 2 * MAP_ALIGN + 64), 2 * MAP_ALIGN + 64);
}

/// A guest mapping and unmapping pieces forever cannot make the host
/// collapse more than the budget: past it, pieces map in 4 KiB pages.
#[test]
fn dax_collapses_stop_at_the_budget() {
    let (d, mut f, window, big) = dax_share(true);
    window.set_collapses_left(2);
    // File piece 1: pieces 1 and 2 collapsed ahead, the budget spent.
    // Then piece 0, again and again, and piece 2: nothing more.
    for foffset in [MAP_ALIGN, 0, 0, 2 * MAP_ALIGN] {
        assert_eq!(
            f.call(
                Opcode::SetupMapping,
                big,
                &[setup(foffset, 0, 1).as_slice()]
            )
            .0,
            0
        );
        assert_eq!(window.collapses_left(), 0, "{foffset}");
    }
    // A short file and a sparse one map, but are never collapsed (that
    // would fill their holes and tail with host memory).
    window.set_collapses_left(3);
    std::fs::write(d.path().join("short"), b"tiny").unwrap();
    let sparse = std::fs::File::create(d.path().join("sparse")).unwrap();
    sparse.set_len(3 * MAP_ALIGN).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"x", MAP_ALIGN).unwrap();
    for name in [b"short".as_slice(), b"sparse"] {
        let node = f.lookup(ROOT, name).unwrap().nodeid;
        assert_eq!(
            f.call(
                Opcode::SetupMapping,
                node,
                &[setup(0, 3 * MAP_ALIGN, 1).as_slice()]
            )
            .0,
            0
        );
        assert_eq!(
            window.collapses_left(),
            3,
            "{}",
            String::from_utf8_lossy(name)
        );
    }
    // Piece 0 of big was never collapsed: it and the two after it are,
    // in one call.
    assert_eq!(
        f.call(
            Opcode::SetupMapping,
            big,
            &[setup(0, MAP_ALIGN, 1).as_slice()]
        )
        .0,
        0
    );
    assert_eq!(window.collapses_left(), 0);
    // SAFETY: window piece 1 maps the file's first piece, 3 pieces long.
    let first = u64::from_le_bytes(unsafe { window.read(MAP_ALIGN + 8, 8) }.try_into().unwrap());
    assert_eq!(first, 8);
}

/// The host changing a file under a guest that maps it — truncating it,
/// punching holes, writing it again — while the file server maps and
/// collapses its pieces: every request gets an answer, no collapse goes
/// past the budget, and once the file is whole again a mapping reads its
/// bytes. (What the guest reads from a piece whose file shrank is its
/// own VM's `KVM_RUN` failing, never a VMM thread's: no VMM thread reads
/// the window.)
#[test]
fn a_file_the_host_changes_while_it_is_mapped_and_collapsed() {
    let (d, mut f, window, big) = dax_share(true);
    let path = d.path().join("big");
    let bytes = std::fs::read(&path).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let changer = {
        let (path, bytes, stop) = (path.clone(), bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 3 {
                let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                file.set_len(MAP_ALIGN / 2).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
                // SAFETY: fallocate on a descriptor this thread owns; it
                // changes only the file's blocks.
                unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        MAP_ALIGN as i64,
                        (MAP_ALIGN / 2) as i64,
                    )
                };
                std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0).unwrap();
                rounds += 1;
            }
        })
    };
    let mut answered = 0;
    for i in 0..200u64 {
        window.set_collapses_left(COLLAPSE_BUDGET);
        let (foffset, moffset) = ((i % 3) * MAP_ALIGN, (i % 4) * MAP_ALIGN);
        let (err, _) = f.call(
            Opcode::SetupMapping,
            big,
            &[setup(foffset, moffset, 1).as_slice()],
        );
        assert!(err <= 0, "{err}");
        assert!(window.collapses_left() <= COLLAPSE_BUDGET);
        if i % 7 == 0 {
            let (err, _) = f.call(Opcode::RemoveMapping, big, &[&removal(&[(0, u64::MAX)])]);
            assert_eq!(err, 0);
        }
        answered += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    changer.join().unwrap();
    assert_eq!(answered, 200);
    assert!(window.pieces_mapped() <= 4);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the file is whole again"
    );
    assert_eq!(
        f.call(
            Opcode::SetupMapping,
            big,
            &[setup(MAP_ALIGN, 0, 1).as_slice()]
        )
        .0,
        0
    );
    // SAFETY: window piece 0 maps the file's second piece; the file is
    // three pieces long again and nothing changes it now.
    let v = u64::from_le_bytes(unsafe { window.read(8, 8) }.try_into().unwrap());
    assert_eq!(v, MAP_ALIGN + 8);
}

#[test]
fn dax_mappings_refuse_what_a_hostile_guest_asks() {
    let (_d, mut f, window, big) = dax_share(true);
    let einval = -libc::EINVAL;
    let mut asks: Vec<(&str, SetupmappingIn, i32)> = vec![
        (
            "writable",
            SetupmappingIn {
                flags: SetupmappingFlags::WRITE.bits() | SetupmappingFlags::READ.bits(),
                ..setup(0, 0, 1)
            },
            EROFS,
        ),
        ("unaligned window offset", setup(0, 4096, 1), einval),
        ("unaligned file offset", setup(4096, 0, 1), einval),
        (
            "unaligned length",
            SetupmappingIn {
                len: MAP_ALIGN + 4096,
                ..setup(0, 0, 1)
            },
            einval,
        ),
        ("empty", setup(0, 0, 0), einval),
        ("past the window's end", setup(0, 3 * MAP_ALIGN, 2), einval),
        ("outside the window", setup(0, 4 * MAP_ALIGN, 1), einval),
        (
            "wrapping around",
            SetupmappingIn {
                len: u64::MAX - MAP_ALIGN + 1,
                ..setup(0, 2 * MAP_ALIGN, 0)
            },
            einval,
        ),
        ("file offset past any off_t", setup(1 << 63, 0, 1), einval),
    ];
    for name in ["sub", "fifo", "out"] {
        let node = f.lookup(ROOT, name.as_bytes()).unwrap().nodeid;
        asks.push((
            name,
            SetupmappingIn {
                fh: node,
                ..setup(0, 0, 1)
            },
            -libc::EACCES,
        ));
    }
    if nix::unistd::geteuid().is_root() {
        let null = f.lookup(ROOT, b"null").unwrap().nodeid;
        asks.push((
            "a device node",
            SetupmappingIn {
                fh: null,
                ..setup(0, 0, 1)
            },
            -libc::EACCES,
        ));
    }
    for (what, body, want) in asks {
        // The special files' asks carry their node in `fh` (see above).
        let node = if body.fh == u64::MAX { big } else { body.fh };
        let body = SetupmappingIn {
            fh: u64::MAX,
            ..body
        };
        assert_eq!(
            f.call(Opcode::SetupMapping, node, &[body.as_slice()]).0,
            want,
            "{what}"
        );
        assert_eq!(window.pieces_mapped(), 0, "{what}");
        assert_eq!(window.collapses_left(), COLLAPSE_BUDGET, "{what}");
    }
    // An inode the guest never looked up.
    assert_ne!(
        f.call(Opcode::SetupMapping, 9_999, &[setup(0, 0, 1).as_slice()])
            .0,
        0
    );
    // Removals outside the window or unaligned change nothing.
    assert_eq!(
        f.call(Opcode::SetupMapping, big, &[setup(0, 0, 1).as_slice()])
            .0,
        0
    );
    for r in [
        (4096, MAP_ALIGN),
        (0, 4096),
        (3 * MAP_ALIGN, 2 * MAP_ALIGN),
        (u64::MAX - 4095, MAP_ALIGN),
    ] {
        assert_eq!(
            f.call(Opcode::RemoveMapping, big, &[&removal(&[r])]).0,
            einval,
            "{r:?}"
        );
    }
    assert_eq!(window.pieces_mapped(), 1);
    // A count larger than the request holds is an error, not a read past it.
    let mut body = removal(&[(0, MAP_ALIGN)]);
    body[..4].copy_from_slice(&1000u32.to_le_bytes());
    assert_ne!(f.call(Opcode::RemoveMapping, big, &[&body]).0, 0);
    // On a read-write share a writable mapping is refused too.
    let (_d, mut rw, rw_window, big) = dax_share(false);
    let writable = SetupmappingIn {
        flags: SetupmappingFlags::WRITE.bits(),
        ..setup(0, 0, 1)
    };
    assert_eq!(
        rw.call(Opcode::SetupMapping, big, &[writable.as_slice()]).0,
        -libc::EPERM
    );
    assert_eq!(rw_window.pieces_mapped(), 0);
    // A device without a window maps nothing.
    let d = tree();
    let mut plain = Fuse::new(d.path(), true, ShareLimits::default());
    let a = plain.lookup(ROOT, b"a.txt").unwrap().nodeid;
    assert_eq!(
        plain
            .call(Opcode::SetupMapping, a, &[setup(0, 0, 1).as_slice()])
            .0,
        einval
    );
}

#[test]
fn a_read_only_share_refuses_every_change_whatever_the_guest_sends() {
    let d = tree();
    let mut f = Fuse::new(d.path(), true, ShareLimits::default());
    let a = f.lookup(ROOT, b"a.txt").unwrap().nodeid;
    // Reading works.
    let fh = f.open(a, libc::O_RDONLY).unwrap();
    assert_eq!(f.read(a, fh, 100).unwrap(), b"hello");
    // Writing through a read-only handle, and every opening for writing.
    assert_eq!(f.write(a, fh, b"HACKED"), EROFS);
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_RDONLY | libc::O_APPEND,
    ] {
        assert_eq!(f.open(a, flags), Err(EROFS), "flags {flags:#o}");
    }
    assert_eq!(f.create(ROOT, b"new"), Err(EROFS));
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        f.call(Opcode::Mkdir, ROOT, &[mkdir.as_slice(), b"d\0"]).0,
        EROFS
    );
    let mknod = MknodIn {
        mode: libc::S_IFREG | 0o644,
        ..Default::default()
    };
    assert_eq!(
        f.call(Opcode::Mknod, ROOT, &[mknod.as_slice(), b"n\0"]).0,
        EROFS
    );
    assert_eq!(f.call(Opcode::Unlink, ROOT, &[b"a.txt\0"]).0, EROFS);
    assert_eq!(f.call(Opcode::Rmdir, ROOT, &[b"sub\0"]).0, EROFS);
    let rename = RenameIn { newdir: ROOT };
    assert_eq!(
        f.call(
            Opcode::Rename,
            ROOT,
            &[rename.as_slice(), b"a.txt\0b.txt\0"]
        )
        .0,
        EROFS
    );
    let rename2 = Rename2In {
        newdir: ROOT,
        ..Default::default()
    };
    assert_eq!(
        f.call(
            Opcode::Rename2,
            ROOT,
            &[rename2.as_slice(), b"a.txt\0b.txt\0"]
        )
        .0,
        EROFS
    );
    let link = LinkIn { oldnodeid: a };
    assert_eq!(
        f.call(Opcode::Link, ROOT, &[link.as_slice(), b"hard\0"]).0,
        EROFS
    );
    assert_eq!(
        f.call(Opcode::Symlink, ROOT, &[b"soft\0", b"/etc\0"]).0,
        EROFS
    );
    let setattr = SetattrIn {
        valid: 1 << 3, // FATTR_SIZE
        size: 0,
        ..Default::default()
    };
    assert_eq!(f.call(Opcode::Setattr, a, &[setattr.as_slice()]).0, EROFS);
    let (err, _) = f.call(Opcode::Setxattr, a, &[&[0u8; 8], b"user.x\0", b"v"]);
    assert!(err < 0, "setxattr: {err}");
    // The host saw none of it.
    assert_eq!(std::fs::read(d.path().join("a.txt")).unwrap(), b"hello");
    let mut names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want = vec!["a.txt", "fifo", "out", "sub"];
    if nix::unistd::geteuid().is_root() {
        want.insert(2, "null");
    }
    assert_eq!(names, want);
}

#[test]
fn names_are_single_components_and_lookups_never_leave_the_share() {
    let d = tree();
    let mut f = Fuse::new(d.path(), false, ShareLimits::default());
    for bad in [&b".."[..], b".", b"", b"sub/../../etc", b"/etc", b"a.txt/"] {
        assert_eq!(
            f.lookup(ROOT, bad).map(|e| e.nodeid),
            Err(-libc::EINVAL),
            "{bad:?}"
        );
    }
    let (e, _) = f
        .create(ROOT, b"../escape")
        .map(|_| ())
        .map_or_else(|e| (e, ()), |_| (0, ()));
    assert_eq!(e, -libc::EINVAL);
    assert!(!d.path().parent().unwrap().join("escape").exists());
    // A name with a NUL inside is cut at it by the parser or refused:
    // never a name the host sees with the bytes after it.
    match f.lookup(ROOT, b"a.txt\0/../../etc/passwd") {
        Ok(e) => assert_eq!(e.nodeid, f.lookup(ROOT, b"a.txt").unwrap().nodeid),
        Err(e) => assert!(e < 0),
    }
    // A symlink on the host that points outside is a symlink to the
    // guest: its target is text, nothing beneath it resolves on the host.
    let out = f.lookup(ROOT, b"out").unwrap();
    assert_eq!(out.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        f.call(Opcode::Readlink, out.nodeid, &[]),
        (0, b"/etc".to_vec())
    );
    assert!(f.lookup(out.nodeid, b"passwd").is_err());
    assert_eq!(f.open(out.nodeid, libc::O_RDONLY), Err(-libc::EACCES));
    // Walking up from the root by any spelling stays at the root.
    let sub = f.lookup(ROOT, b"sub").unwrap().nodeid;
    assert!(f.lookup(sub, b"..").is_err());
}

#[test]
fn special_files_are_never_opened_and_never_made() {
    let d = tree();
    let mut f = Fuse::new(d.path(), false, ShareLimits::default());
    // A fifo opened by the server would block it or hand the guest a
    // host pipe; a device node would be a host device (CVE-2020-35517).
    let fifo = f.lookup(ROOT, b"fifo").unwrap().nodeid;
    assert_eq!(
        f.open(fifo, libc::O_RDONLY | libc::O_NONBLOCK),
        Err(-libc::EACCES)
    );
    if nix::unistd::geteuid().is_root() {
        let null = f.lookup(ROOT, b"null").unwrap().nodeid;
        assert_eq!(f.open(null, libc::O_RDWR), Err(-libc::EACCES));
    }
    for mode in [
        libc::S_IFCHR,
        libc::S_IFBLK,
        libc::S_IFIFO,
        libc::S_IFSOCK,
        libc::S_IFREG,
    ] {
        let m = MknodIn {
            mode: mode | 0o666,
            rdev: 0x103,
            ..Default::default()
        };
        assert_eq!(
            f.call(Opcode::Mknod, ROOT, &[m.as_slice(), b"dev\0"]).0,
            -libc::EPERM,
            "mode {mode:#o}"
        );
    }
    // RENAME_WHITEOUT would make a character device.
    let r = Rename2In {
        newdir: ROOT,
        flags: libc::RENAME_WHITEOUT,
        padding: 0,
    };
    assert_eq!(
        f.call(Opcode::Rename2, ROOT, &[r.as_slice(), b"a.txt\0b.txt\0"])
            .0,
        -libc::EPERM
    );
    assert!(!d.path().join("dev").exists());
    assert!(d.path().join("a.txt").exists());
}

#[test]
fn a_read_write_share_works_with_the_servers_own_ids() {
    let d = tree();
    let mut f = Fuse::new(d.path(), false, ShareLimits::default());
    let (inode, fh) = f.create(ROOT, b"notes.txt").unwrap();
    assert_eq!(f.write(inode, fh, b"remember"), 0);
    assert_eq!(f.read(inode, fh, 100).unwrap(), b"remember");
    f.release(inode, fh);
    let p = d.path().join("notes.txt");
    assert_eq!(std::fs::read(&p).unwrap(), b"remember");
    // Made with the server's ids, not the 4321 of the request.
    let meta = std::fs::metadata(&p).unwrap();
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    // Set-id bits asked for at creation are dropped.
    let c = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | libc::S_ISUID | 0o4755,
        umask: 0,
        fuse_flags: 0,
    };
    assert_eq!(
        f.call(Opcode::Create, ROOT, &[c.as_slice(), b"suid\0"]).0,
        0
    );
    let mode = std::fs::metadata(d.path().join("suid")).unwrap().mode();
    assert_eq!(mode & libc::S_ISUID, 0, "{mode:#o}");
    // A symlink the guest makes pointing outside is only text.
    assert_eq!(
        f.call(Opcode::Symlink, ROOT, &[b"link\0", b"/etc/passwd\0"])
            .0,
        0
    );
    let link = f.lookup(ROOT, b"link").unwrap().nodeid;
    assert_eq!(f.open(link, libc::O_RDONLY), Err(-libc::EACCES));
}

#[test]
fn what_a_guest_can_make_the_host_hold_is_capped() {
    let d = tree();
    for i in 0..12 {
        std::fs::write(d.path().join(format!("f{i}")), "x").unwrap();
    }
    let limits = ShareLimits {
        max_inodes: 8,
        max_handles: 3,
    };
    let mut f = Fuse::new(d.path(), false, limits);
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..12 {
        match f.lookup(ROOT, format!("f{i}").as_bytes()) {
            Ok(e) => held.push(e.nodeid),
            Err(e) => {
                assert_eq!(e, -libc::ENFILE);
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (8, 4));
    assert_eq!(f.raw.share.inodes_held(), 8);
    // Looking one up again holds no new inode.
    assert!(f.lookup(ROOT, b"f0").is_err() || f.raw.share.inodes_held() == 8);
    // The guest forgets one (both lookups of f0): room for one more.
    let forget = ForgetIn { nlookup: 2 };
    f.call(Opcode::Forget, held[0], &[forget.as_slice()]);
    assert!(f.raw.share.inodes_held() <= 7);
    assert!(f.lookup(ROOT, b"f11").is_ok());
    // Handles.
    let mut fhs = Vec::new();
    for &inode in &held[1..5] {
        match f.open(inode, libc::O_RDONLY) {
            Ok(fh) => fhs.push((inode, fh)),
            Err(e) => assert_eq!(e, -libc::EMFILE),
        }
    }
    assert_eq!(fhs.len(), 3);
    assert_eq!(f.raw.share.handles_open(), 3);
    let (inode, fh) = fhs.pop().unwrap();
    f.release(inode, fh);
    assert!(f.open(held[5], libc::O_RDONLY).is_ok());
}

/// `fuse_direntplus` entries in a READDIRPLUS reply: their names and the
/// offset to continue from.
fn direntplus_names(mut reply: &[u8]) -> (Vec<String>, u64) {
    // fuse_entry_out (128) then fuse_dirent: ino, off, namelen, type, name
    // padded to 8.
    let (mut names, mut next) = (Vec::new(), 0);
    while reply.len() >= 128 + 24 {
        let d = &reply[128..];
        next = u64::from_le_bytes(d[8..16].try_into().unwrap());
        let namelen = u32::from_le_bytes(d[16..20].try_into().unwrap()) as usize;
        names.push(String::from_utf8_lossy(&d[24..24 + namelen]).into_owned());
        let len = (128 + 24 + namelen).div_ceil(8) * 8;
        reply = &reply[len.min(reply.len())..];
    }
    (names, next)
}

#[test]
fn a_listing_with_attributes_counts_each_entry_and_stops_at_the_cap() {
    let d = tree();
    for i in 0..12 {
        std::fs::write(d.path().join(format!("f{i:02}")), "x").unwrap();
    }
    let limits = ShareLimits {
        max_inodes: 8,
        max_handles: 4,
    };
    let mut f = Fuse::new(d.path(), false, limits);
    let (err, p) = f.call(Opcode::Opendir, ROOT, &[OpenIn::default().as_slice()]);
    assert_eq!(err, 0);
    let fh = OpenOut::from_slice(&p[..16]).unwrap().fh;
    let mut seen = Vec::new();
    let mut offset = 0;
    let refused = loop {
        let r = ReadIn {
            fh,
            offset,
            size: 4096,
            ..Default::default()
        };
        match f.call(Opcode::Readdirplus, ROOT, &[r.as_slice()]) {
            (0, p) if p.is_empty() => break None,
            (0, p) => {
                let (names, next) = direntplus_names(&p);
                assert!(!names.is_empty());
                // Every entry is one inode held: never past the cap.
                assert!(f.raw.share.inodes_held() <= 8);
                offset = next;
                seen.extend(names);
            }
            (e, _) => break Some(e),
        }
    };
    // The cap is met before the directory's end: an error, not a short
    // listing the guest would take for the end.
    assert_eq!(refused, Some(-libc::ENFILE), "{seen:?}");
    assert_eq!(f.raw.share.inodes_held(), 8);
    assert!(!seen.iter().any(|n| n == "." || n == ".."), "{seen:?}");
}

#[test]
fn shares_split_what_the_process_may_hold() {
    let full = ShareLimits::default();
    // Room for everything: the defaults.
    assert_eq!(ShareLimits::within(u64::MAX / 2, 512, 4), full);
    // A hard limit of 4096 (not root), two shares: each gets an even part
    // of what is left after the VMM's own 512, handles a small part.
    let l = ShareLimits::within(4096, 512, 2);
    assert!(
        l.max_inodes + l.max_handles + 2 <= (4096 - 512) / 2,
        "{l:?}"
    );
    assert!(l.max_inodes > 1500 && l.max_handles >= 32, "{l:?}");
    // Nothing left: still a share, of one inode and one handle.
    assert_eq!(
        ShareLimits::within(100, 512, 1),
        ShareLimits {
            max_inodes: 1,
            max_handles: 1
        }
    );
}

#[test]
fn what_a_guest_writes_is_held_to_the_vms_write_cap_across_its_shares() {
    // Two shares of one VM, one cap of 10 bytes: a guest that ignores its
    // runner's write limit meets it on the host, whichever share it uses.
    let (a, b) = (tree(), tree());
    // Each of the two files costs an entry; 10 bytes are left to write.
    let cap = super::share::WriteCap::new(2 * airlock_abi::ENTRY_WRITE_BYTES + 10);
    let share = |d: &Path| {
        super::share::Share::new(d, false, ShareLimits::default())
            .unwrap()
            .capped(cap.clone())
    };
    let (mut fa, mut fb) = (
        Fuse::serving(share(a.path())),
        Fuse::serving(share(b.path())),
    );
    let (ia, ha) = fa.create(ROOT, b"one").unwrap();
    assert_eq!(fa.write(ia, ha, b"123456"), 0);
    let (ib, hb) = fb.create(ROOT, b"two").unwrap();
    // 6 taken, 4 left: 5 bytes are refused whole, nothing written.
    assert_eq!(fb.write(ib, hb, b"12345"), -libc::ENOSPC);
    assert_eq!(std::fs::read(b.path().join("two")).unwrap(), b"");
    assert_eq!(fb.write(ib, hb, b"1234"), 0);
    assert_eq!(cap.left(), 0);
    assert_eq!(fa.write(ia, ha, b"x"), -libc::ENOSPC);
    // Allocating is writing too.
    let fa_in = fuse_backend_rs::abi::fuse_abi::FallocateIn {
        fh: ha,
        offset: 0,
        length: 1 << 30,
        mode: 0,
        padding: 0,
    };
    assert_eq!(
        fa.call(Opcode::Fallocate, ia, &[fa_in.as_slice()]).0,
        -libc::ENOSPC
    );
    assert_eq!(std::fs::metadata(a.path().join("one")).unwrap().len(), 6);
}

#[test]
fn each_new_entry_costs_the_write_cap_and_a_failed_one_costs_nothing() {
    // A guest with a full volume (cap 0 beyond two entries) cannot fill
    // the host directory with empty files or directories.
    let d = tree();
    let cap = super::share::WriteCap::new(2 * airlock_abi::ENTRY_WRITE_BYTES);
    let share = super::share::Share::new(d.path(), false, ShareLimits::default())
        .unwrap()
        .capped(cap.clone());
    let mut f = Fuse::serving(share);
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    assert_eq!(
        f.call(Opcode::Mkdir, ROOT, &[mkdir.as_slice(), b"d\0"]).0,
        0
    );
    assert_eq!(cap.left(), airlock_abi::ENTRY_WRITE_BYTES);
    // A name that exists: refused by the file system, the charge given back.
    assert_eq!(
        f.call(Opcode::Mkdir, ROOT, &[mkdir.as_slice(), b"d\0"]).0,
        -libc::EEXIST
    );
    assert_eq!(cap.left(), airlock_abi::ENTRY_WRITE_BYTES);
    f.create(ROOT, b"empty").unwrap();
    assert_eq!(cap.left(), 0);
    // Nothing left: no file, directory or link is made.
    assert_eq!(f.create(ROOT, b"more"), Err(-libc::ENOSPC));
    assert_eq!(
        f.call(Opcode::Mkdir, ROOT, &[mkdir.as_slice(), b"e\0"]).0,
        -libc::ENOSPC
    );
    assert_eq!(
        f.call(Opcode::Symlink, ROOT, &[b"s\0", b"empty\0"]).0,
        -libc::ENOSPC
    );
    for name in ["more", "e", "s"] {
        assert!(!d.path().join(name).exists(), "{name} was made");
    }
}

/// 4 MiB of guest memory for a [`Rig`].
fn ram() -> vm_memory::GuestMemoryMmap {
    vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x40_0000)])
        .unwrap()
}

/// The device with its queues on mock rings in guest memory, its worker
/// under the real `fs` seccomp filter: a syscall the filter lacks ends the
/// test process (status 159) with a line naming it.
struct Rig<'m> {
    dev: super::device::VirtioFs,
    window: std::sync::Arc<super::window::DaxWindow>,
    mem: &'m vm_memory::GuestMemoryMmap,
    req: virtio_queue::mock::MockSplitQueue<'m, vm_memory::GuestMemoryMmap>,
    kick: vmm_sys_util::eventfd::EventFd,
    irq: std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
    sent: u16,
    unique: u64,
}

impl<'m> Rig<'m> {
    fn new(mem: &'m vm_memory::GuestMemoryMmap, root: &Path, read_only: bool) -> Self {
        use crate::devices::virtio_mmio::{Activation, Interrupt, RegisterPage, VirtioDevice};
        use virtio_queue::Queue;
        use vm_memory::GuestAddress;
        use vmm_sys_util::eventfd::EventFd;
        crate::seccomp::install_trap_handler().unwrap();
        let filters = crate::seccomp::Filters::load(crate::seccomp::Mode::Enforce).unwrap();
        let share = super::share::Share::new(root, read_only, ShareLimits::default()).unwrap();
        let window = super::window::DaxWindow::new(4 * super::window::MAP_ALIGN).unwrap();
        let mut dev = super::device::VirtioFs::new(
            "grant0",
            root,
            share,
            Some(filters.fs),
            (crate::devices::fs_window_base(0), window.clone()),
        )
        .unwrap();
        let hiprio = virtio_queue::mock::MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let req = virtio_queue::mock::MockSplitQueue::create(mem, GuestAddress(0x4000), 128);
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let kick = evts[1].try_clone().unwrap();
        let irq = std::sync::Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![
                hiprio.create_queue::<Queue>().unwrap(),
                req.create_queue::<Queue>().unwrap(),
            ],
            queue_evts: evts,
            interrupt: Interrupt::new(RegisterPage::new().unwrap(), irq.clone()),
        })
        .unwrap();
        Self {
            dev,
            window,
            mem,
            req,
            kick,
            irq,
            sent: 0,
            unique: 0,
        }
    }

    fn used_idx(&self) -> u16 {
        use vm_memory::{Address, Bytes};
        self.mem
            .read_obj::<u16>(self.req.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn used_len(&self, i: u16) -> u32 {
        use vm_memory::{Address, Bytes};
        self.mem
            .read_obj::<u32>(self.req.used_addr().unchecked_add(4 + 8 * u64::from(i) + 4))
            .unwrap()
    }

    /// Put `descs` (a chain at slot `2 * sent`) on the request queue, kick,
    /// wait for it to be used; its used length.
    fn chain(&mut self, descs: &[virtio_queue::desc::RawDescriptor]) -> u32 {
        self.put(descs, true)
    }

    /// [`Self::chain`], with or without the kick.
    fn put(&mut self, descs: &[virtio_queue::desc::RawDescriptor], kick: bool) -> u32 {
        let slot = self.sent * 2;
        self.req.add_desc_chains(descs, slot).unwrap();
        self.sent += 1;
        if kick {
            self.kick.write(1).unwrap();
        }
        let start = std::time::Instant::now();
        while self.used_idx() < self.sent {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "the device did not answer"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.used_len(self.sent - 1)
    }

    /// One FUSE request through the queue: its error and payload.
    fn call(&mut self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> (i32, Vec<u8>) {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::desc::split::Descriptor;
        use vm_memory::{Bytes, GuestAddress};
        self.unique += 1;
        let body: Vec<u8> = parts.concat();
        let h = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: op as u32,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let req = [h.as_slice(), &body].concat();
        let (at, reply) = (0x10_0000, 0x20_0000);
        self.mem.write_slice(&req, GuestAddress(at)).unwrap();
        let slot = self.sent * 2;
        let used = self.chain(&[
            RawDescriptor::from(Descriptor::new(
                at,
                req.len() as u32,
                VRING_DESC_F_NEXT as u16,
                slot + 1,
            )),
            RawDescriptor::from(Descriptor::new(
                reply,
                0x1_0000,
                VRING_DESC_F_WRITE as u16,
                0,
            )),
        ]);
        if used == 0 {
            return (i32::MIN, Vec::new());
        }
        let out: fuse_backend_rs::abi::fuse_abi::OutHeader =
            self.mem.read_obj(GuestAddress(reply)).unwrap();
        assert_eq!((out.unique, out.len), (self.unique, used));
        let mut payload = vec![0u8; out.len as usize - 16];
        self.mem
            .read_slice(&mut payload, GuestAddress(reply + 16))
            .unwrap();
        (out.error, payload)
    }

    /// A read-only handle on `inode`.
    fn open_ro(&mut self, inode: u64) -> u64 {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        OpenOut::from_slice(&self.ok(Opcode::Open, inode, &[open.as_slice()])[..16])
            .unwrap()
            .fh
    }

    fn entry(&mut self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> EntryOut {
        let (e, p) = self.call(op, nodeid, parts);
        assert_eq!(e, 0, "{op:?}");
        *EntryOut::from_slice(&p[..std::mem::size_of::<EntryOut>()]).unwrap()
    }

    fn ok(&mut self, op: Opcode, nodeid: u64, parts: &[&[u8]]) -> Vec<u8> {
        let (e, p) = self.call(op, nodeid, parts);
        assert_eq!(e, 0, "{op:?}");
        p
    }
}

/// The device end to end: config space, INIT and a LOOKUP answered on the
/// used ring with an interrupt, a chain that is not a request used with 0
/// bytes and the device going on.
#[test]
fn the_device_answers_requests_on_its_queue() {
    use crate::devices::virtio_mmio::VirtioDevice;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    let d = tree();
    let mem = ram();
    let mut rig = Rig::new(&mem, d.path(), true);
    let mut cfg = [0u8; 40];
    rig.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..7], b"grant0\0");
    assert_eq!(u32::from_le_bytes(cfg[36..].try_into().unwrap()), 1);
    // Found by the driver, nothing mounted: it may be snapshotted.
    assert_eq!(rig.dev.snapshot_refusal(), None);
    rig.ok(Opcode::Init, 0, &[INIT.as_slice()]);
    // A FUSE session has begun: a snapshot would carry it to a VMM whose
    // file server never saw it.
    let why = rig.dev.snapshot_refusal().expect("refused after a request");
    assert!(why.contains("before any share is mounted"), "{why}");
    assert!(rig.irq.read().unwrap() > 0, "the guest was interrupted");
    // A lone writable descriptor: no request at all.
    assert_eq!(
        rig.chain(&[RawDescriptor::from(Descriptor::new(
            0x30_0000,
            0x100,
            VRING_DESC_F_WRITE as u16,
            0
        ))]),
        0
    );
    let e = rig.entry(Opcode::Lookup, ROOT, &[b"a.txt\0"]);
    assert_eq!(e.attr.size, 5);
    // The report's counters: three chains, each announced by its kick.
    let stats = rig.dev.stats().to_json();
    assert_eq!(stats["requests"], 3, "{stats}");
    assert_eq!(stats["kicks"], 3, "{stats}");
    assert_eq!(stats["unannounced"], 0, "{stats}");
    // A chain put on the ring without a kick is found by the worker's
    // own look, and counted.
    rig.put(
        &[RawDescriptor::from(Descriptor::new(
            0x30_0000,
            0x100,
            VRING_DESC_F_WRITE as u16,
            0,
        ))],
        false,
    );
    let stats = rig.dev.stats().to_json();
    assert_eq!(
        (stats["requests"].as_u64(), stats["unannounced"].as_u64()),
        (Some(4), Some(1)),
        "{stats}"
    );
    rig.dev.shutdown();
}

/// Every operation a guest's file system uses, through the device whose
/// worker runs under its real filter: each syscall the passthrough makes
/// must be in the `fs` role of `vmm/seccomp/x86_64.json`.
#[test]
fn the_fs_worker_serves_every_operation_under_its_filter() {
    use crate::devices::virtio_mmio::VirtioDevice;
    let d = tree();
    let mem = ram();
    let mut rig = Rig::new(&mem, d.path(), false);
    rig.ok(Opcode::Init, 0, &[INIT.as_slice()]);
    rig.ok(Opcode::Statfs, ROOT, &[]);
    rig.ok(Opcode::Getattr, ROOT, &[&[0u8; 16]]);
    rig.ok(Opcode::Access, ROOT, &[&4u32.to_le_bytes(), &[0u8; 4]]);
    // Read a file.
    let a = rig.entry(Opcode::Lookup, ROOT, &[b"a.txt\0"]).nodeid;
    let fh = rig.open_ro(a);
    let read = ReadIn {
        fh,
        size: 100,
        ..Default::default()
    };
    assert_eq!(rig.ok(Opcode::Read, a, &[read.as_slice()]), b"hello");
    // Map it into the DAX window and take it out again.
    rig.ok(Opcode::SetupMapping, a, &[setup(0, 0, 1).as_slice()]);
    assert_eq!(rig.window.pieces_mapped(), 1);
    rig.ok(Opcode::RemoveMapping, a, &[&removal(&[(0, MAP_ALIGN)])]);
    assert_eq!(rig.window.pieces_mapped(), 0);
    let mut lseek = Vec::new();
    for v in [fh, 1, 0] {
        lseek.extend_from_slice(&v.to_le_bytes());
    }
    let (e, _) = rig.call(Opcode::Lseek, a, &[&lseek[..20], &[0u8; 4]]);
    assert!(e == 0 || e == -libc::ENOSYS, "lseek {e}");
    let flush = [fh.to_le_bytes(), [0u8; 8], [0u8; 8]].concat();
    rig.ok(Opcode::Flush, a, &[&flush]);
    let release = fuse_backend_rs::abi::fuse_abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    rig.ok(Opcode::Release, a, &[release.as_slice()]);
    // List the root.
    let open = OpenIn::default();
    let dh = OpenOut::from_slice(&rig.ok(Opcode::Opendir, ROOT, &[open.as_slice()])[..16])
        .unwrap()
        .fh;
    let readdir = ReadIn {
        fh: dh,
        size: 4096,
        ..Default::default()
    };
    let listing = rig.ok(Opcode::Readdir, ROOT, &[readdir.as_slice()]);
    assert!(listing.windows(5).any(|w| w == b"a.txt"));
    let plus = rig.ok(Opcode::Readdirplus, ROOT, &[readdir.as_slice()]);
    assert!(direntplus_names(&plus).0.iter().any(|n| n == "a.txt"));
    let release = fuse_backend_rs::abi::fuse_abi::ReleaseIn {
        fh: dh,
        ..Default::default()
    };
    rig.ok(Opcode::Releasedir, ROOT, &[release.as_slice()]);
    // Make, write, sync, resize, chmod, rename, link and remove.
    let create = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let p = rig.ok(Opcode::Create, ROOT, &[create.as_slice(), b"notes\0"]);
    let notes = EntryOut::from_slice(&p[..std::mem::size_of::<EntryOut>()])
        .unwrap()
        .nodeid;
    let fh = OpenOut::from_slice(&p[std::mem::size_of::<EntryOut>()..][..16])
        .unwrap()
        .fh;
    let write = WriteIn {
        fh,
        size: 8,
        ..Default::default()
    };
    rig.ok(Opcode::Write, notes, &[write.as_slice(), b"remember"]);
    let fsync = [fh.to_le_bytes(), [0u8; 8]].concat();
    rig.ok(Opcode::Fsync, notes, &[&fsync]);
    let mut fallocate = Vec::new();
    for v in [fh, 0, 4096] {
        fallocate.extend_from_slice(&v.to_le_bytes());
    }
    fallocate.extend_from_slice(&[0u8; 8]);
    rig.ok(Opcode::Fallocate, notes, &[&fallocate]);
    let setattr = SetattrIn {
        valid: 1 | (1 << 3) | (1 << 4) | (1 << 5), // mode, size, atime, mtime
        size: 4,
        mode: libc::S_IFREG | 0o600,
        atime: 1,
        mtime: 2,
        ..Default::default()
    };
    rig.ok(Opcode::Setattr, notes, &[setattr.as_slice()]);
    let release = fuse_backend_rs::abi::fuse_abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    rig.ok(Opcode::Release, notes, &[release.as_slice()]);
    let rename = Rename2In {
        newdir: ROOT,
        ..Default::default()
    };
    rig.ok(
        Opcode::Rename2,
        ROOT,
        &[rename.as_slice(), b"notes\0kept\0"],
    );
    let link = LinkIn { oldnodeid: notes };
    rig.entry(Opcode::Link, ROOT, &[link.as_slice(), b"hard\0"]);
    rig.entry(Opcode::Symlink, ROOT, &[b"soft\0", b"kept\0"]);
    let soft = rig.entry(Opcode::Lookup, ROOT, &[b"soft\0"]).nodeid;
    assert_eq!(rig.ok(Opcode::Readlink, soft, &[]), b"kept");
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    rig.entry(Opcode::Mkdir, ROOT, &[mkdir.as_slice(), b"dir\0"]);
    rig.ok(Opcode::Rmdir, ROOT, &[b"dir\0"]);
    rig.ok(Opcode::Unlink, ROOT, &[b"hard\0"]);
    let forget = ForgetIn { nlookup: 1 };
    assert_eq!(
        rig.call(Opcode::Forget, soft, &[forget.as_slice()]).0,
        i32::MIN
    );
    assert_eq!(std::fs::read(d.path().join("kept")).unwrap(), b"reme");
    rig.dev.shutdown();
}

/// A guest that points a request's buffers into its DAX window (at a
/// piece that is mapped, even) gives the device no address there: the
/// window is a KVM slot over the host's page cache, not guest memory the
/// device reads or writes, so such a chain is used with 0 bytes, the
/// host's file keeps its bytes and the device goes on.
#[test]
fn buffers_in_the_dax_window_are_no_address_for_the_device() {
    use crate::devices::virtio_mmio::VirtioDevice;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};
    let d = tree();
    let mem = ram();
    let mut rig = Rig::new(&mem, d.path(), true);
    rig.ok(Opcode::Init, 0, &[INIT.as_slice()]);
    let a = rig.entry(Opcode::Lookup, ROOT, &[b"a.txt\0"]).nodeid;
    rig.ok(Opcode::SetupMapping, a, &[setup(0, 0, 1).as_slice()]);
    let fh = rig.open_ro(a);
    let read = ReadIn {
        fh,
        size: 100,
        ..Default::default()
    };
    let h = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<ReadIn>()) as u32,
        opcode: Opcode::Read as u32,
        unique: 1000,
        nodeid: a,
        ..Default::default()
    };
    let req = [h.as_slice(), read.as_slice()].concat();
    let window = crate::devices::fs_window_base(0);
    let at = 0x10_0000;
    rig.mem.write_slice(&req, GuestAddress(at)).unwrap();
    // A good request whose reply should land in the window's mapped piece,
    // a request read from there, and one reply straddling the end of RAM.
    let chains: [[(u64, u32, bool); 2]; 3] = [
        [(at, req.len() as u32, false), (window, 0x1000, true)],
        [(window, req.len() as u32, false), (0x20_0000, 0x1000, true)],
        [
            (at, req.len() as u32, false),
            (0x40_0000 - 16, 0x1000, true),
        ],
    ];
    for (i, chain) in chains.iter().enumerate() {
        let slot = rig.sent * 2;
        let descs: Vec<RawDescriptor> = chain
            .iter()
            .enumerate()
            .map(|(k, &(addr, len, write))| {
                let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let (flags, next) = if k == 0 {
                    (flags | VRING_DESC_F_NEXT as u16, slot + 1)
                } else {
                    (flags, 0)
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        assert_eq!(rig.chain(&descs), 0, "chain {i} was served");
    }
    assert_eq!(rig.window.pieces_mapped(), 1);
    // SAFETY: piece 0 maps a.txt (5 bytes, within the file's page).
    assert_eq!(unsafe { rig.window.read(0, 5) }, b"hello");
    assert_eq!(std::fs::read(d.path().join("a.txt")).unwrap(), b"hello");
    assert_eq!(rig.ok(Opcode::Read, a, &[read.as_slice()]), b"hello");
    rig.dev.shutdown();
}

/// The windows of one VM spend one collapse budget: what its cgroup
/// allows for, however many shares it has.
#[test]
fn a_vms_windows_share_one_collapse_budget() {
    let budget = DaxWindow::budget();
    let a = DaxWindow::sharing(4 * MAP_ALIGN, budget.clone()).unwrap();
    let b = DaxWindow::sharing(4 * MAP_ALIGN, budget).unwrap();
    assert_eq!(a.collapses_left(), COLLAPSE_BUDGET);
    a.set_collapses_left(5);
    assert_eq!(b.collapses_left(), 5);
    // A window made alone has its own.
    assert_eq!(
        DaxWindow::new(4 * MAP_ALIGN).unwrap().collapses_left(),
        COLLAPSE_BUDGET
    );
}
