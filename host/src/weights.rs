//! Model weights for microVMs: a host directory packed into a read-only
//! erofs image that every VM maps over virtio-pmem (see
//! [`airlock_vmm::devices::pmem`]) and mounts with DAX at [`GUEST_MOUNT`].
//!
//! Policies do not change: a read-only filesystem grant of the weights
//! directory (or a directory inside it) is served, in a microVM, from the
//! image instead of the host directory — the same policy works with
//! `--isolation process` and `--isolation vm`. That decision is the
//! policy's ([`crate::policy::vm`]); this module packs images and parses
//! the `DIR:IMAGE` pairing.
//!
//! **Invariant:** the image is whatever `pack` made from the directory:
//! keeping it current when the directory changes is the operator's job.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the guest mounts the weights image.
pub const GUEST_MOUNT: &str = "/weights";

/// Weights errors.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A `DIR:IMAGE` pairing that cannot be used.
    #[error("{spec:?}: {message}.")]
    Spec {
        /// The text given.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// `mkfs.erofs` failed or is missing.
    #[error("Packing {dir} failed: {message}.")]
    Pack {
        /// The source directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// A weights directory and the erofs image packed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// The host directory policies grant.
    pub dir: PathBuf,
    /// Its image, served to microVMs over virtio-pmem.
    pub image: PathBuf,
}

impl Weights {
    /// Parse `DIR:IMAGE` (the `--weights` flag and `isolation.weights`),
    /// checking that the directory and the image exist.
    ///
    /// # Errors
    /// [`WeightsError::Spec`] saying what is wrong.
    pub fn parse(spec: &str) -> Result<Self, WeightsError> {
        let bad = |message: String| WeightsError::Spec {
            spec: spec.to_string(),
            message,
        };
        let (dir, image) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected DIR:IMAGE".into()))?;
        let (dir, image) = (PathBuf::from(dir), PathBuf::from(image));
        if !dir.is_dir() {
            return Err(bad(format!("{} is not a directory", dir.display())));
        }
        if !image.is_file() {
            return Err(bad(format!("{} is not a file", image.display())));
        }
        Ok(Self { dir, image })
    }
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
    // `noinline_data`: every file's data in whole blocks (FLAT_PLAIN). A
    // file whose tail is packed into its inode (mkfs's default) cannot be
    // mapped with DAX: the guest would read it through its own page cache,
    // a copy per VM.
    let status = Command::new("mkfs.erofs")
        .arg("-T0")
        .arg("-Enoinline_data")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_packed_is_plain_blocks_a_guest_can_map_with_dax() {
        // A model's size is rarely a multiple of the block size; with its
        // tail inlined (FLAT_INLINE, layout 2) the guest kernel reads it
        // through its own page cache instead of DAX.
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("model")).unwrap();
        std::fs::write(src.join("model/model.safetensors"), vec![7u8; 10_000]).unwrap();
        std::fs::write(src.join("config.json"), b"{}").unwrap();
        let img = dir.path().join("w.erofs");
        pack(&src, &img).unwrap();
        for path in ["/model/model.safetensors", "/config.json"] {
            let out = Command::new("dump.erofs")
                .arg(format!("--path={path}"))
                .arg(&img)
                .output()
                .expect("dump.erofs (erofs-utils)");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("Layout: 0"),
                "{path} is not FLAT_PLAIN: {text}"
            );
        }
    }

    #[test]
    fn a_weights_pairing_names_an_existing_directory_and_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("w.erofs");
        std::fs::write(&image, b"").unwrap();
        let spec = format!("{}:{}", dir.path().display(), image.display());
        let w = Weights::parse(&spec).unwrap();
        assert_eq!(
            (w.dir.as_path(), w.image.as_path()),
            (dir.path(), image.as_path())
        );
        for (bad, says) in [
            ("no-colon".to_string(), "DIR:IMAGE"),
            (
                format!("{}/nope:{}", dir.path().display(), image.display()),
                "not a directory",
            ),
            (
                format!("{}:{}/nope", dir.path().display(), dir.path().display()),
                "not a file",
            ),
        ] {
            let e = Weights::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
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
