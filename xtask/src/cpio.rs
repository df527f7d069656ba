//! The one initramfs writer (the guest image and the outer VM's image):
//! a gzip'd cpio newc archive with the same bytes for the same inputs.
//!
//! **Invariants:** directories (the given ones and every parent of a file)
//! come first, parents before children; then `/dev/console`; then the
//! files sorted by path. Inode numbers count up in that order; owners are
//! root, times are zero, the gzip header carries no time.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

/// One file in the archive: path inside it, contents, mode (with type bits).
pub type Entry<'a> = (&'a str, &'a [u8], u32);

/// The archive of `dirs` and `files`, compressed at `level`.
///
/// # Errors
/// A file over 4 GiB (cpio newc's limit) or a write failure.
pub fn initramfs(
    dirs: &[&str],
    files: &[Entry<'_>],
    level: flate2::Compression,
) -> anyhow::Result<Vec<u8>> {
    use cpio::newc::Builder;
    let mut all_dirs: BTreeSet<String> = dirs.iter().map(|d| d.to_string()).collect();
    for (name, _, _) in files {
        let mut p = Path::new(name).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            all_dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut cpio: Vec<u8> = Vec::new();
    let mut ino = 1u32;
    let mut next = || {
        ino += 1;
        ino
    };
    // BTreeSet order puts every parent before its children.
    for d in &all_dirs {
        Builder::new(d)
            .ino(next())
            .mode(0o040_755)
            .nlink(2)
            .mtime(0)
            .uid(0)
            .gid(0)
            .write(&mut cpio, 0)
            .finish()?;
    }
    Builder::new("dev/console")
        .ino(next())
        .mode(0o020_600)
        .nlink(1)
        .rdev_major(5)
        .rdev_minor(1)
        .write(&mut cpio, 0)
        .finish()?;
    let mut sorted: Vec<&Entry<'_>> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, bytes, mode) in sorted {
        let size = u32::try_from(bytes.len())
            .map_err(|_| anyhow::anyhow!("{name} is too large for cpio"))?;
        let mut w = Builder::new(name)
            .ino(next())
            .mode(*mode)
            .nlink(1)
            .mtime(0)
            .write(&mut cpio, size);
        w.write_all(bytes)?;
        w.finish()?;
    }
    cpio::newc::trailer(&mut cpio)?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), level);
    gz.write_all(&cpio)?;
    Ok(gz.finish()?)
}
