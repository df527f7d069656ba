//! Model weights for microVMs: a host directory packed into a read-only
//! erofs image that every VM maps over virtio-pmem (see
//! [`airlock_vmm::devices::pmem`]) and mounts with DAX at [`GUEST_MOUNT`].
//!
//! Policies do not change: a read-only filesystem grant of the weights
//! directory (or a directory inside it) is served, in a microVM, from the
//! image instead of the host directory — the same policy works with
//! `--isolation process` and `--isolation vm`.
//!
//! **Invariants:** only read-only grants inside the weights directory are
//! translated; any other directory grant is refused in a VM (it would need
//! virtio-fs). The image is whatever `pack` made from the directory: keeping
//! it current when the directory changes is the operator's job.

use airlock_guest::GrantSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the guest mounts the weights image.
pub const GUEST_MOUNT: &str = "/weights";

/// Weights errors.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// `mkfs.erofs` failed or is missing.
    #[error("Packing {dir} failed: {message}.")]
    Pack {
        /// The source directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A directory grant cannot be served inside a microVM.
    #[error(
        "filesystem[{index}]: {host} is not a read-only grant inside the weights directory {weights}; other directory grants reach a microVM over virtio-fs, which is not built yet."
    )]
    NotServable {
        /// Index of the grant in the policy.
        index: usize,
        /// Its host path.
        host: String,
        /// The weights directory.
        weights: String,
    },
}

/// Pack `dir` into an erofs image at `out`, padded to whole 2 MiB units
/// (what virtio-pmem maps). Uses `mkfs.erofs` (Debian: erofs-utils).
///
/// # Errors
/// [`WeightsError::Pack`].
pub fn pack(dir: &Path, out: &Path) -> Result<u64, WeightsError> {
    let fail = |message: String| WeightsError::Pack {
        dir: dir.to_path_buf(),
        message,
    };
    if !dir.is_dir() {
        return Err(fail("it is not a directory".into()));
    }
    let tmp = out.with_extension("tmp");
    let status = Command::new("mkfs.erofs")
        .arg("-T0")
        .arg(&tmp)
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| fail(format!("cannot run mkfs.erofs ({e}); install erofs-utils")))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(format!("mkfs.erofs exited with {status}")));
    }
    let pad = || -> std::io::Result<u64> {
        let f = std::fs::OpenOptions::new().write(true).open(&tmp)?;
        let unit = airlock_vmm::devices::pmem::PMEM_ALIGN;
        let len = f.metadata()?.len().div_ceil(unit) * unit;
        f.set_len(len)?;
        f.sync_all()?;
        std::fs::rename(&tmp, out)?;
        Ok(len)
    };
    pad().map_err(|e| fail(e.to_string()))
}

/// The grant set a microVM gets: read-only grants inside `weights_dir` point
/// into the guest's weights mount; anything else is refused.
///
/// # Errors
/// [`WeightsError::NotServable`] naming the grant.
pub fn for_vm(grants: &GrantSet, weights_dir: Option<&Path>) -> Result<GrantSet, WeightsError> {
    let base = weights_dir.map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()));
    let mut out = grants.clone();
    for (index, d) in out.dirs.iter_mut().enumerate() {
        // Grant paths are already real paths without `..` (policy): compare
        // them as they are; the image holds what the directory held when
        // it was packed, whatever the directory holds now.
        let inside = base
            .as_ref()
            .and_then(|b| d.host_path.strip_prefix(b).ok().map(Path::to_path_buf));
        match inside {
            Some(rel) if !d.writable => {
                d.root = PathBuf::from(GUEST_MOUNT);
                d.host_path = Path::new(GUEST_MOUNT).join(rel);
            }
            _ => {
                return Err(WeightsError::NotServable {
                    index,
                    host: d.host_path.display().to_string(),
                    weights: base
                        .as_ref()
                        .map_or("(none given)".into(), |b| b.display().to_string()),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_guest::DirGrant;

    fn grant(host: &Path, writable: bool) -> GrantSet {
        GrantSet {
            dirs: vec![DirGrant {
                root: PathBuf::from("/"),
                host_path: host.to_path_buf(),
                guest_path: "/models".into(),
                writable,
            }],
            ..GrantSet::default()
        }
    }

    #[test]
    fn read_only_grants_inside_the_weights_dir_point_into_the_guest_mount() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("llama");
        std::fs::create_dir(&sub).unwrap();
        let g = for_vm(&grant(&sub, false), Some(dir.path())).unwrap();
        assert_eq!(g.dirs[0].host_path, Path::new("/weights/llama"));
        assert_eq!(g.dirs[0].guest_path, "/models");
        let g = for_vm(&grant(dir.path(), false), Some(dir.path())).unwrap();
        assert_eq!(g.dirs[0].host_path, Path::new("/weights"));
        // No grants: nothing to translate, with or without weights.
        assert!(for_vm(&GrantSet::default(), None).unwrap().dirs.is_empty());
    }

    #[test]
    fn writable_or_outside_grants_are_refused_naming_the_grant() {
        let dir = tempfile::tempdir().unwrap();
        let e = for_vm(&grant(dir.path(), true), Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("filesystem[0]:"), "{e}");
        let other = tempfile::tempdir().unwrap();
        let e = for_vm(&grant(other.path(), false), Some(dir.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio-fs"), "{e}");
        let e = for_vm(&grant(other.path(), false), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(none given)"), "{e}");
    }

    #[test]
    fn pack_makes_an_aligned_erofs_image_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let e = pack(&dir.path().join("missing"), &dir.path().join("x.img"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("w.bin"), vec![7u8; 100_000]).unwrap();
        let out = dir.path().join("w.erofs");
        let len = pack(&src, &out).unwrap();
        assert_eq!(len % airlock_vmm::devices::pmem::PMEM_ALIGN, 0);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), len);
        // erofs superblock magic at 1024: 0xE0F5E1E2 little-endian.
        let head = std::fs::read(&out).unwrap();
        assert_eq!(&head[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    }
}
