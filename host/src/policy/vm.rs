//! The grant set a microVM gets. Directories reach a guest only as the
//! read-only weights image today (virtio-pmem, mounted at
//! [`GUEST_MOUNT`]): a read-only grant inside the weights directory is
//! pointed into that mount; any other directory grant is refused, naming
//! the grant, so a policy never silently means less in a VM.

use crate::weights::GUEST_MOUNT;
use airlock_guest::GrantSet;
use std::path::{Path, PathBuf};

/// Why a grant set cannot be given to a microVM.
#[derive(Debug, thiserror::Error)]
pub enum VmGrantError {
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

/// The grant set a microVM gets: read-only grants inside `weights_dir` point
/// into the guest's weights mount; anything else is refused.
///
/// # Errors
/// [`VmGrantError::NotServable`] naming the grant.
pub fn for_vm(grants: &GrantSet, weights_dir: Option<&Path>) -> Result<GrantSet, VmGrantError> {
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
                return Err(VmGrantError::NotServable {
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
}
