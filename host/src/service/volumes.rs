//! Per-tenant state volumes: directories the service makes under its data
//! directory (`volumes/<tenant>/<name>`, mode 0700), one per tenant and
//! `[[volumes]]` entry, that a policy grants by name (`volume = "notes"`)
//! so a tool keeps state across calls — never another tenant's.
//!
//! **Invariants:**
//! * A tenant's policies reach only that tenant's directory of a volume
//!   (the name is looked up under the caller's tenant; no path from the
//!   policy is used).
//! * The quota holds across calls: calls that grant a volume run one at a
//!   time per (tenant, volume) ([`Volumes::hold`], locks taken in name
//!   order), each measures the volume first and may write at most what is
//!   left — its write limit is lowered to it (to 0 when the volume is
//!   full: the call still runs, so it can read and remove), which both
//!   walls enforce (the runner; in a VM the host's file server too).
//!   Usage counts each entry at least 4 KiB (its blocks otherwise), so
//!   empty files and directories cost quota as well.

use airlock_guest::GrantSet;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What each entry of a volume counts for at least: what making one costs
/// a call.
pub const ENTRY_BYTES: u64 = airlock_abi::ENTRY_WRITE_BYTES;
/// Entries a volume may hold before measuring it is refused (it is full).
pub const MAX_ENTRIES: u64 = 100_000;

/// One `[[volumes]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The name policies grant it by.
    pub name: String,
    /// The most it may hold, bytes (per tenant).
    pub quota_bytes: u64,
}

/// Problems with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume directory could not be made or measured.
    #[error("Volume {volume:?} ({path}) is not usable: {reason}.")]
    Io {
        /// The volume.
        volume: String,
        /// Its directory.
        path: PathBuf,
        /// The OS error.
        reason: std::io::Error,
    },
}

/// One lock per (tenant, volume).
type Locks = HashMap<(String, String), Arc<tokio::sync::Mutex<()>>>;

/// The volumes of a service.
#[derive(Debug)]
pub struct Volumes {
    root: PathBuf,
    specs: Vec<VolumeSpec>,
    locks: Mutex<Locks>,
}

/// The locks a call holds on its volumes until it ends.
pub type Held = Vec<tokio::sync::OwnedMutexGuard<()>>;

impl Volumes {
    /// The volumes `specs` under `data_dir` (canonical) `/volumes`.
    pub fn new(data_dir: &Path, specs: Vec<VolumeSpec>) -> Self {
        Self {
            root: data_dir.join("volumes"),
            specs,
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, tenant: &str, name: &str) -> PathBuf {
        self.root.join(tenant).join(name)
    }

    /// `tenant`'s directory of every volume, made (0700) when missing.
    ///
    /// # Errors
    /// [`VolumeError::Io`] when one cannot be made.
    pub fn dirs(&self, tenant: &str) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut out = BTreeMap::new();
        for s in &self.specs {
            let path = self.dir(tenant, &s.name);
            if !path.is_dir() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
                    .map_err(|reason| VolumeError::Io {
                        volume: s.name.clone(),
                        path: path.clone(),
                        reason,
                    })?;
            }
            out.insert(s.name.clone(), path);
        }
        Ok(out)
    }

    /// For one call of `tenant` with `grants`: wait for each volume it
    /// grants (in name order), measure it, and lower the call's write
    /// limit to the room left in the fullest. The locks are held until
    /// the returned guards drop (when the call has ended).
    ///
    /// # Errors
    /// [`VolumeError::Io`]: a volume cannot be measured.
    pub async fn hold(&self, tenant: &str, grants: &mut GrantSet) -> Result<Held, VolumeError> {
        let granted: BTreeMap<&str, &VolumeSpec> = self
            .specs
            .iter()
            .filter(|s| {
                let dir = self.dir(tenant, &s.name);
                grants.dirs.iter().any(|d| d.root == dir)
            })
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut held = Vec::with_capacity(granted.len());
        for (name, spec) in granted {
            let lock = self
                .locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((tenant.to_string(), name.to_string()))
                .or_default()
                .clone();
            held.push(lock.lock_owned().await);
            let path = self.dir(tenant, name);
            let measured = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || usage(&path))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            };
            let used = measured.map_err(|reason| VolumeError::Io {
                volume: name.to_string(),
                path,
                reason,
            })?;
            let room = spec.quota_bytes.saturating_sub(used);
            grants.limits.max_write_bytes = grants.limits.max_write_bytes.min(room);
        }
        Ok(held)
    }
}

/// What `dir` holds: each entry below it (not following links) counts its
/// allocated blocks, at least [`ENTRY_BYTES`].
///
/// # Errors
/// A directory cannot be read, or it holds more than [`MAX_ENTRIES`].
pub fn usage(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            entries += 1;
            if entries > MAX_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "it holds more than {MAX_ENTRIES} entries"
                )));
            }
            let m = std::fs::symlink_metadata(e.path())?;
            bytes = bytes.saturating_add((m.blocks() * 512).max(ENTRY_BYTES));
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_guest::DirGrant;

    fn grant(root: &Path) -> GrantSet {
        GrantSet {
            dirs: vec![DirGrant {
                root: root.to_path_buf(),
                host_path: root.to_path_buf(),
                guest_path: "/state".into(),
                writable: true,
                origin: None,
                refused: None,
            }],
            ..GrantSet::default()
        }
    }

    fn volumes(data: &Path, quota_bytes: u64) -> Volumes {
        Volumes::new(
            data,
            vec![VolumeSpec {
                name: "notes".into(),
                quota_bytes,
            }],
        )
    }

    #[test]
    fn each_tenant_has_its_own_directory_of_a_volume() {
        let data = tempfile::tempdir().unwrap();
        let v = volumes(data.path(), 1 << 20);
        let a = v.dirs("acme").unwrap();
        let b = v.dirs("globex").unwrap();
        assert_ne!(a["notes"], b["notes"]);
        assert!(a["notes"].is_dir() && b["notes"].is_dir());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&a["notes"]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn a_call_may_write_only_the_room_left_and_none_when_full() {
        let data = tempfile::tempdir().unwrap();
        let v = volumes(data.path(), 64 << 10);
        let dir = v.dirs("acme").unwrap()["notes"].clone();
        let mut g = grant(&dir);
        drop(v.hold("acme", &mut g).await.unwrap());
        assert_eq!(g.limits.max_write_bytes, 64 << 10);
        // Ten empty files cost 40 KiB of the 64.
        for i in 0..10 {
            std::fs::write(dir.join(format!("f{i}")), "").unwrap();
        }
        let mut g = grant(&dir);
        drop(v.hold("acme", &mut g).await.unwrap());
        assert_eq!(g.limits.max_write_bytes, 24 << 10);
        for i in 10..16 {
            std::fs::write(dir.join(format!("f{i}")), "").unwrap();
        }
        // Full: the call may write nothing (it may still read and remove).
        let mut g = grant(&dir);
        drop(v.hold("acme", &mut g).await.unwrap());
        assert_eq!(g.limits.max_write_bytes, 0);
        // Another tenant's volume is its own.
        let other = v.dirs("globex").unwrap()["notes"].clone();
        assert!(v.hold("globex", &mut grant(&other)).await.is_ok());
        // A grant of something else is not held or measured.
        let elsewhere = tempfile::tempdir().unwrap();
        let mut g = grant(elsewhere.path());
        assert!(v.hold("acme", &mut g).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn calls_on_one_volume_run_one_at_a_time() {
        let data = tempfile::tempdir().unwrap();
        let v = Arc::new(volumes(data.path(), 1 << 20));
        let dir = v.dirs("acme").unwrap()["notes"].clone();
        let first = v.hold("acme", &mut grant(&dir)).await.unwrap();
        let v2 = v.clone();
        let dir2 = dir.clone();
        let second =
            tokio::spawn(async move { v2.hold("acme", &mut grant(&dir2)).await.map(|h| h.len()) });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the second call waits for the first");
        drop(first);
        assert_eq!(second.await.unwrap().unwrap(), 1);
    }

    #[test]
    fn usage_counts_blocks_and_entries_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/big"), vec![1u8; 100 << 10]).unwrap();
        std::os::unix::fs::symlink("/", d.path().join("root")).unwrap();
        let u = usage(d.path()).unwrap();
        // sub (≥ 4 KiB), big (≥ 100 KiB), the link (4 KiB); never /.
        assert!((108 << 10..(1 << 20)).contains(&u), "{u}");
    }
}
