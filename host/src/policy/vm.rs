//! The grant set a microVM gets. A model (`[models]`) must lie inside the
//! weights directory and is read from the image; a read-only grant inside the weights
//! directory is served from the weights image (virtio-pmem, mounted at
//! [`GUEST_MOUNT`]); every other directory grant becomes a virtio-fs share
//! of its own, which the guest mounts at [`share_mount`]`(i)` (read-only
//! for a read-only grant). The grants the guest's runner gets point into
//! those mounts and keep the host path as their [`DirGrant::origin`], so
//! errors and audit events name the same directory in both walls.
//!
//! **Invariant:** a share names the policy's grant as it is (root and path
//! checked by the policy); the host opens it beneath its root at call time
//! ([`VmShare::open`]) and hands the VMM that descriptor, never the path,
//! so nothing swapped in between the check and the boot is shared.

use crate::weights::GUEST_MOUNT;
use airlock_guest::{DirGrant, GrantSet};
use std::path::{Path, PathBuf};

/// Shares one microVM can have (the VMM's virtio-fs slots).
pub const MAX_SHARES: usize = 4;

/// Where the guest mounts share `i`.
pub fn share_mount(i: usize) -> PathBuf {
    PathBuf::from(format!("/grants/{i}"))
}

/// The virtio-fs tag of share `i`.
pub fn share_tag(i: usize) -> String {
    format!("grant{i}")
}

/// Why a grant set cannot be given to a microVM.
#[derive(Debug, thiserror::Error)]
pub enum VmGrantError {
    /// More directory grants than a microVM has shares.
    #[error(
        "filesystem[{index}]: a microVM takes at most {MAX_SHARES} directory grants outside the weights image; this policy has more."
    )]
    TooManyShares {
        /// Index of the first grant past the limit.
        index: usize,
    },
    /// A model outside the weights image: a microVM reads models only from
    /// the image (mapped with DAX, never copied into guest memory).
    #[error(
        "models.{name}: in a microVM a model is read from the weights image, and {dir} is not inside the weights directory{hint}."
    )]
    ModelOutsideWeights {
        /// The model's name.
        name: String,
        /// Its host directory.
        dir: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
}

/// One host directory a call's microVM gets over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShare {
    /// The grant as the policy made it (host paths).
    pub grant: DirGrant,
    /// Its virtio-fs tag.
    pub tag: String,
    /// Where the guest mounts it.
    pub mount: PathBuf,
}

impl VmShare {
    /// Open the granted directory on the host, beneath its root, as the
    /// process wall opens it: the error is the call's `grant` failure,
    /// worded the same.
    ///
    /// # Errors
    /// The directory is gone, not a directory, or not beneath its root.
    pub fn open(&self) -> Result<std::os::fd::OwnedFd, String> {
        self.grant.open()
    }
}

/// What a call gets at its call site: the grants its runner enforces and,
/// in a microVM, the directories to share with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteGrants {
    /// The grants the runner gets (pointed into the guest's mounts in a VM).
    pub grants: GrantSet,
    /// The shares the VM boots with (none in process isolation).
    pub shares: Vec<VmShare>,
}

/// The grants and shares for a microVM (see the module docs).
///
/// # Errors
/// [`VmGrantError::TooManyShares`] naming the first grant past the limit.
pub fn for_vm(grants: &GrantSet, weights_dir: Option<&Path>) -> Result<SiteGrants, VmGrantError> {
    let base = weights_dir.map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()));
    let mut out = grants.clone();
    let mut shares = Vec::new();
    for (index, d) in out.dirs.iter_mut().enumerate() {
        // Grant paths are already real paths without `..` (policy): compare
        // them as they are; the image holds what the directory held when
        // it was packed, whatever the directory holds now.
        let in_image = base
            .as_ref()
            .and_then(|b| d.host_path.strip_prefix(b).ok().map(Path::to_path_buf))
            .filter(|_| !d.writable);
        let origin = Some(d.host_path.clone());
        match in_image {
            Some(rel) => {
                d.root = PathBuf::from(GUEST_MOUNT);
                d.host_path = Path::new(GUEST_MOUNT).join(rel);
            }
            None => {
                let i = shares.len();
                if i == MAX_SHARES {
                    return Err(VmGrantError::TooManyShares { index });
                }
                let mount = share_mount(i);
                shares.push(VmShare {
                    grant: d.clone(),
                    tag: share_tag(i),
                    mount: mount.clone(),
                });
                d.root = mount.clone();
                d.host_path = mount;
            }
        }
        d.origin = origin;
    }
    for (name, m) in &mut out.models {
        let rel = base
            .as_ref()
            .and_then(|b| m.dir.strip_prefix(b).ok().map(Path::to_path_buf));
        let Some(rel) = rel else {
            return Err(VmGrantError::ModelOutsideWeights {
                name: name.clone(),
                dir: m.dir.clone(),
                hint: if base.is_some() {
                    ""
                } else {
                    " (no weights image is configured: --weights DIR:IMAGE, or `weights` in the service config)"
                },
            });
        };
        m.origin = Some(m.dir.clone());
        m.root = PathBuf::from(GUEST_MOUNT);
        m.dir = Path::new(GUEST_MOUNT).join(rel);
    }
    Ok(SiteGrants {
        grants: out,
        shares,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(host: &Path, writable: bool) -> DirGrant {
        DirGrant {
            root: PathBuf::from("/"),
            host_path: host.to_path_buf(),
            guest_path: "/models".into(),
            writable,
            origin: None,
            refused: None,
        }
    }

    fn grant(host: &Path, writable: bool) -> GrantSet {
        GrantSet {
            dirs: vec![dir(host, writable)],
            ..GrantSet::default()
        }
    }

    #[test]
    fn read_only_grants_inside_the_weights_dir_point_into_the_guest_mount() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("llama");
        std::fs::create_dir(&sub).unwrap();
        let g = for_vm(&grant(&sub, false), Some(dir.path())).unwrap();
        assert!(g.shares.is_empty());
        assert_eq!(g.grants.dirs[0].host_path, Path::new("/weights/llama"));
        assert_eq!(g.grants.dirs[0].guest_path, "/models");
        assert_eq!(g.grants.dirs[0].origin.as_deref(), Some(sub.as_path()));
        assert_eq!(g.grants.dirs[0].named(), sub.as_path());
        let g = for_vm(&grant(dir.path(), false), Some(dir.path())).unwrap();
        assert_eq!(g.grants.dirs[0].host_path, Path::new("/weights"));
        // No grants: nothing to translate, with or without weights.
        let g = for_vm(&GrantSet::default(), None).unwrap();
        assert!(g.grants.dirs.is_empty() && g.shares.is_empty());
    }

    #[test]
    fn other_grants_become_shares_mounted_in_the_guest() {
        let weights = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        // Writable inside the weights dir (the image is read-only), and
        // outside it, read-only and read-write: three shares in order.
        let set = GrantSet {
            dirs: vec![
                dir(weights.path(), true),
                dir(other.path(), false),
                dir(weights.path(), false),
                dir(other.path(), true),
            ],
            ..GrantSet::default()
        };
        let g = for_vm(&set, Some(weights.path())).unwrap();
        let tags: Vec<_> = g.shares.iter().map(|s| s.tag.as_str()).collect();
        assert_eq!(tags, ["grant0", "grant1", "grant2"]);
        assert_eq!(g.shares[1].grant, set.dirs[1]);
        let d = &g.grants.dirs;
        assert_eq!(
            (d[0].root.as_path(), d[0].host_path.as_path()),
            (Path::new("/grants/0"), Path::new("/grants/0"))
        );
        assert_eq!(d[1].host_path, Path::new("/grants/1"));
        assert_eq!(d[2].host_path, Path::new("/weights"));
        assert_eq!(d[3].host_path, Path::new("/grants/2"));
        assert!(d[0].writable && !d[1].writable && d[3].writable);
        assert_eq!(d[3].named(), other.path());
        // Without weights every grant is a share.
        assert_eq!(for_vm(&set, None).unwrap().shares.len(), 4);
    }

    #[test]
    fn more_shares_than_a_vm_has_are_refused_naming_the_grant() {
        let d = tempfile::tempdir().unwrap();
        let set = GrantSet {
            dirs: (0..=MAX_SHARES).map(|_| dir(d.path(), false)).collect(),
            ..GrantSet::default()
        };
        let e = for_vm(&set, None).unwrap_err().to_string();
        assert!(e.starts_with(&format!("filesystem[{MAX_SHARES}]:")), "{e}");
    }

    #[test]
    fn a_share_opens_beneath_its_root_and_never_through_a_link() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("data");
        std::fs::create_dir(&inside).unwrap();
        let outside = tempfile::tempdir().unwrap();
        let share = |host: &Path| VmShare {
            grant: DirGrant {
                root: root.path().to_path_buf(),
                ..dir(host, true)
            },
            tag: share_tag(0),
            mount: share_mount(0),
        };
        assert!(share(&inside).open().is_ok());
        // Swapped for a link out of the root after the policy check.
        std::fs::remove_dir(&inside).unwrap();
        std::os::unix::fs::symlink(outside.path(), &inside).unwrap();
        let e = share(&inside).open().unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(
            e.starts_with(&format!("directory {}", inside.display())),
            "{e}"
        );
        // Gone.
        std::fs::remove_file(&inside).unwrap();
        let e = share(&inside).open().unwrap_err();
        assert!(e.contains("cannot be opened beneath"), "{e}");
    }

    #[test]
    fn a_model_in_a_vm_is_read_from_the_weights_image_and_only_there() {
        use airlock_guest::grants::ModelGrant;
        let weights = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(weights.path()).unwrap();
        let model = |dir: PathBuf| GrantSet {
            models: [(
                "minilm".to_string(),
                ModelGrant {
                    root: PathBuf::from("/"),
                    dir,
                    origin: None,
                },
            )]
            .into(),
            ..GrantSet::default()
        };
        let g = for_vm(&model(base.join("all-MiniLM-L6-v2")), Some(&base)).unwrap();
        let m = &g.grants.models["minilm"];
        assert_eq!(m.dir, Path::new("/weights/all-MiniLM-L6-v2"));
        assert_eq!(m.root, Path::new("/weights"));
        // Audit events name the host directory, as in process isolation.
        assert_eq!(m.named(), base.join("all-MiniLM-L6-v2"));
        assert!(g.shares.is_empty());
        // Outside the weights directory, or with no weights at all: refused
        // (a share would copy the weights into the guest's page cache).
        let e = for_vm(&model(PathBuf::from("/srv/other")), Some(&base)).unwrap_err();
        assert!(matches!(&e, VmGrantError::ModelOutsideWeights { name, .. } if name == "minilm"));
        let e = for_vm(&model(base.join("m")), None).unwrap_err();
        assert!(
            e.to_string().contains("no weights image is configured"),
            "{e}"
        );
    }
}
