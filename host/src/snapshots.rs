//! The snapshot cache: one snapshot per VM shape (VMM build, guest kernel
//! and initramfs, weights, memory, vCPUs, command line), made once by
//! booting a VM to the guest's `listening` stage, then restored by every VM
//! that shape starts (`airlock_vmm::snapshot` has the format).
//!
//! Layout under the cache's root: `<key>/state` and `<key>/memory`, where
//! `<key>` is the first 32 hex digits of the SHA-256 of the shape's
//! [`Identity`] (JSON); `<key>.lock` serialises making it across
//! processes; `.making-*` are snapshots being made.
//!
//! **Invariants:**
//! * A snapshot directory appears whole or not at all: it is made in a
//!   fresh `.making-*` directory by a VM that ended paused (`snapshot`),
//!   checked, then renamed into place.
//! * This process restores a snapshot only after it has checked the state
//!   file (magic, version, checksum, identity) and the memory image (length
//!   and digest) once; the VMM checks the state file again on every
//!   restore.
//! * One snapshot per shape is made at a time: a mutex in this process, an
//!   exclusive `flock` across processes; whoever waited finds it made.
//! * A snapshot carries nothing of a call or a tenant: it is taken at the
//!   `listening` stage, before any host has connected to its agent; what must
//!   differ between VMs (entropy, wall clock) is refreshed after every
//!   start (`Sandbox::send_refresh`).
//! * A snapshot whose restore failed is removed ([`SnapshotCache::forget`]),
//!   so the next start makes it again rather than failing the same way.

use airlock_vmm::snapshot::{self, Identity};
use airlock_vmm::{SnapshotPlan, VmConfig};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The guest boot stage snapshots are taken at: the agent listens, no
/// host has connected (a restored guest resumes waiting in `accept`).
pub const SNAPSHOT_STAGE: &str = "listening";

/// What went wrong with the snapshot cache.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotCacheError {
    /// A file or directory of the cache.
    #[error("Snapshot cache: {what}: {source}.")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The identity could not be worked out (a file cannot be read).
    #[error("Snapshot cache: {0}")]
    Identity(#[from] airlock_vmm::VmmError),
    /// A snapshot did not pass its checks.
    #[error("Snapshot cache: {0}")]
    Check(#[from] snapshot::SnapshotError),
    /// The VM that was to make the snapshot did not.
    #[error("Snapshot cache: the VM that makes the snapshot {0}")]
    Make(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotCacheError {
    let what = what.into();
    move |source| SnapshotCacheError::Io { what, source }
}

/// What identifies one version of a file without reading it: a changed
/// file has another mtime or ctime (ctime cannot be set back by hand).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The cache (see the module docs).
#[derive(Debug)]
pub struct SnapshotCache {
    root: PathBuf,
    digests: Mutex<HashMap<FileKey, String>>,
    checked: Mutex<HashSet<PathBuf>>,
    making: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SnapshotCache {
    /// A cache under `root` (made when first needed).
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            digests: Mutex::new(HashMap::new()),
            checked: Mutex::new(HashSet::new()),
            making: Mutex::new(()),
        }
    }

    /// Where the cache lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The hex SHA-256 of `path`, hashed once per version of the file.
    fn digest(&self, path: &Path) -> std::io::Result<String> {
        let m = std::fs::metadata(path)?;
        let key = FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        };
        if let Some(d) = lock(&self.digests).get(&key) {
            return Ok(d.clone());
        }
        let d = snapshot::file_sha256_hex(path)?;
        lock(&self.digests).insert(key, d.clone());
        Ok(d)
    }

    /// What a snapshot of `cfg`, run by the VMM binary `vmm`, is made from.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn identity(&self, vmm: &Path, cfg: &VmConfig) -> Result<Identity, SnapshotCacheError> {
        Ok(airlock_vmm::snapshot_identity_with(vmm, cfg, &mut |p| {
            self.digest(p)
        })?)
    }

    /// The directory of `identity`'s snapshot.
    pub fn dir_of(&self, identity: &Identity) -> PathBuf {
        let json = serde_json::to_vec(identity).unwrap_or_default();
        let key = hex::encode(Sha256::digest(json));
        self.root.join(&key[..32])
    }

    /// The restore plan for `cfg` (run by `vmm`): its snapshot, made now by
    /// `make` if there is none yet. `make` gets a configuration that
    /// snapshots `cfg` at [`SNAPSHOT_STAGE`] into a fresh directory and
    /// must run it to its end (`Ok` when it ended paused).
    ///
    /// # Errors
    /// The identity, making the snapshot, or its checks.
    pub fn plan(
        &self,
        vmm: &Path,
        cfg: &VmConfig,
        make: &dyn Fn(&VmConfig) -> Result<(), String>,
    ) -> Result<SnapshotPlan, SnapshotCacheError> {
        let identity = self.identity(vmm, cfg)?;
        let dir = self.dir_of(&identity);
        let made_now = !SnapshotPlan::state_path(&dir).exists();
        if made_now {
            self.make(cfg, &identity, &dir, make)?;
        }
        match self.check(&dir, &identity) {
            Ok(()) => {}
            Err(e) if !made_now => {
                // A damaged cache (an edited, truncated or foreign file)
                // is made again, not restored and not kept.
                tracing::warn!(error = %e, dir = %dir.display(), "the cached VM snapshot fails its checks; making it again");
                self.remove(&dir);
                self.make(cfg, &identity, &dir, make)?;
                self.check(&dir, &identity)?;
            }
            Err(e) => return Err(e),
        }
        Ok(SnapshotPlan::Restore {
            dir,
            identity: Some(identity),
        })
    }

    /// Check `dir`'s snapshot once in this process.
    fn check(&self, dir: &Path, identity: &Identity) -> Result<(), SnapshotCacheError> {
        if lock(&self.checked).contains(dir) {
            return Ok(());
        }
        let state = snapshot::read_state(&SnapshotPlan::state_path(dir), identity)?;
        snapshot::check_memory(&SnapshotPlan::memory_path(dir), &state.memory)?;
        lock(&self.checked).insert(dir.to_path_buf());
        Ok(())
    }

    fn make(
        &self,
        cfg: &VmConfig,
        identity: &Identity,
        dir: &Path,
        make: &dyn Fn(&VmConfig) -> Result<(), String>,
    ) -> Result<(), SnapshotCacheError> {
        let _one = lock(&self.making);
        // The cache is this daemon's alone: guest memory images are in it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io(format!("making {}", self.root.display())))?;
        let lock_path = dir.with_extension("lock");
        let file = std::fs::File::create(&lock_path)
            .map_err(io(format!("opening {}", lock_path.display())))?;
        let _locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(format!("locking {}", lock_path.display()))(e.into()))?;
        if SnapshotPlan::state_path(dir).exists() {
            // Another process made it while this one waited.
            return Ok(());
        }
        let tmp = airlock_vmm::jail::fresh_dir_in(&self.root, ".making")
            .map_err(io(format!("making a directory in {}", self.root.display())))?;
        let made = (|| {
            let mut making = cfg.clone();
            making.snapshot = Some(SnapshotPlan::Make {
                at: SNAPSHOT_STAGE.into(),
                dir: tmp.clone(),
                identity: Some(identity.clone()),
            });
            let started = std::time::Instant::now();
            make(&making).map_err(SnapshotCacheError::Make)?;
            // What the jail's uid made and wrote becomes this process's,
            // private: both files and their directory.
            let (me, my_group) = (nix::unistd::geteuid(), nix::unistd::getegid());
            for (f, mode) in [
                (SnapshotPlan::state_path(&tmp), 0o600),
                (SnapshotPlan::memory_path(&tmp), 0o600),
                (tmp.clone(), 0o700),
            ] {
                let _ = nix::unistd::chown(&f, Some(me), Some(my_group));
                std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .map_err(io(format!("restricting {}", f.display())))?;
            }
            let state = snapshot::read_state(&SnapshotPlan::state_path(&tmp), identity)?;
            snapshot::check_memory(&SnapshotPlan::memory_path(&tmp), &state.memory)?;
            std::fs::rename(&tmp, dir)
                .map_err(io(format!("moving the snapshot to {}", dir.display())))?;
            tracing::info!(
                dir = %dir.display(),
                made_ms = started.elapsed().as_millis() as u64,
                "made the VM snapshot every VM of this shape starts from"
            );
            Ok(())
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Remove the snapshot of `plan` (a restore from it failed): the next
    /// start makes it again.
    pub fn forget(&self, plan: &SnapshotPlan) {
        if let SnapshotPlan::Restore { dir, .. } = plan {
            self.remove(dir);
        }
    }

    fn remove(&self, dir: &Path) {
        lock(&self.checked).remove(dir);
        let _guard = lock(&self.making);
        if let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(dir: &Path) -> VmConfig {
        std::fs::write(dir.join("k"), b"kernel").unwrap();
        std::fs::write(dir.join("i"), b"initrd").unwrap();
        std::fs::write(dir.join("vmm"), b"vmm").unwrap();
        let mut c = VmConfig::new(dir.join("k"), dir.join("i"));
        c.cmdline_extra = "airlock.port=1024".into();
        c
    }

    #[test]
    fn each_shape_has_its_own_directory_and_a_changed_file_is_hashed_again() {
        let t = tempfile::tempdir().unwrap();
        let cfg = shape(t.path());
        let cache = SnapshotCache::new(t.path().join("snap"));
        let vmm = t.path().join("vmm");
        let a = cache.identity(&vmm, &cfg).unwrap();
        assert_eq!(a.kernel, hex::encode(Sha256::digest(b"kernel")));
        let mut bigger = cfg.clone();
        bigger.memory_mib += 256;
        let b = cache.identity(&vmm, &bigger).unwrap();
        assert_ne!(cache.dir_of(&a), cache.dir_of(&b));
        assert_eq!(cache.dir_of(&a), cache.dir_of(&a.clone()));
        // A new kernel (same length, so only its times tell) is a new shape.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(t.path().join("k"), b"KERNEL").unwrap();
        let c = cache.identity(&vmm, &cfg).unwrap();
        assert_eq!(c.kernel, hex::encode(Sha256::digest(b"KERNEL")));
        assert_ne!(cache.dir_of(&a), cache.dir_of(&c));
    }

    #[test]
    fn a_make_that_fails_leaves_nothing_and_says_why() {
        let t = tempfile::tempdir().unwrap();
        let cfg = shape(t.path());
        let cache = SnapshotCache::new(t.path().join("snap"));
        let e = cache
            .plan(&t.path().join("vmm"), &cfg, &|making| {
                assert!(matches!(
                    &making.snapshot,
                    Some(SnapshotPlan::Make { at, dir, .. }) if at == SNAPSHOT_STAGE && dir.is_dir()
                ));
                Err("ended as reset".into())
            })
            .unwrap_err();
        assert!(e.to_string().contains("ended as reset"), "{e}");
        let left: Vec<_> = std::fs::read_dir(cache.root())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_make_that_writes_a_bad_snapshot_is_not_taken_in() {
        let t = tempfile::tempdir().unwrap();
        let cfg = shape(t.path());
        let cache = SnapshotCache::new(t.path().join("snap"));
        let vmm = t.path().join("vmm");
        // A "VMM" that leaves a state file that is not a snapshot.
        let e = cache
            .plan(&vmm, &cfg, &|making| {
                let Some(SnapshotPlan::Make { dir, .. }) = &making.snapshot else {
                    unreachable!()
                };
                std::fs::write(SnapshotPlan::state_path(dir), b"not a snapshot").unwrap();
                std::fs::write(SnapshotPlan::memory_path(dir), b"").unwrap();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(e, SnapshotCacheError::Check(_)), "{e}");
        let id = cache.identity(&vmm, &cfg).unwrap();
        assert!(!cache.dir_of(&id).exists());
    }

    #[test]
    fn a_damaged_cached_snapshot_is_made_again_not_restored() {
        let t = tempfile::tempdir().unwrap();
        let cfg = shape(t.path());
        let cache = SnapshotCache::new(t.path().join("snap"));
        let vmm = t.path().join("vmm");
        let dir = cache.dir_of(&cache.identity(&vmm, &cfg).unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(SnapshotPlan::state_path(&dir), b"AIRLKSNP edited").unwrap();
        let makes = std::sync::atomic::AtomicU32::new(0);
        let e = cache
            .plan(&vmm, &cfg, &|_| {
                makes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Err("the VM could not be made".into())
            })
            .unwrap_err();
        // The damaged one is gone and a new one was attempted.
        assert_eq!(makes.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(e.to_string().contains("could not be made"), "{e}");
        assert!(!dir.exists());
    }
}
