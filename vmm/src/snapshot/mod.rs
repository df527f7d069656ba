//! Snapshots of a running VM: its state file (vCPUs, in-kernel irqchip,
//! PIT and clock, devices) and its memory image, so a VM can start by
//! restoring one instead of booting.
//!
//! **The state file** is `MAGIC | version (u32 LE) | body length (u64 LE) |
//! SHA-256 of the body | body`, the body postcard-encoded
//! [`SnapshotState`]. It names what the snapshot was made from
//! ([`Identity`]: the VMM build, the kernel and initramfs digests, memory
//! size, vCPUs, command line) and the memory image's length and digest.
//!
//! **The memory image** is a separate file of exactly the guest's RAM size;
//! pages the guest never touched are holes (they read as zeros, as fresh
//! RAM does), so an image is as large on disk as the guest's working set.
//! Restore maps it `MAP_PRIVATE`: every VM restored from one image shares
//! its unchanged pages through the host page cache.
//!
//! **Invariants:**
//! * Nothing of a snapshot reaches KVM before its state file has passed
//!   every check ([`read_state`]): magic (a foreign file), version, length
//!   (a truncated file), checksum (an edited one), decoding, and the
//!   identity the caller expects (a snapshot of another VMM build, kernel,
//!   initramfs or VM shape); each failure is its own [`SnapshotError`].
//! * A state file is written whole or not at all (a temporary file, synced,
//!   then renamed into place); so is a memory image.
//! * The memory image is checked against the state file's length and
//!   digest ([`check_memory`]) before it backs a VM; a caller that restores
//!   many VMs from one image checks it once, when it takes the image in.

pub mod kvm_state;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"AIRLKSNP";
/// The state file format this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The largest state body read (vCPU and device state, not memory).
pub const MAX_STATE_BYTES: u64 = 16 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// What went wrong with a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("Snapshot file {path}: {source}.")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a snapshot state file at all.
    #[error("{path} is not an Airlock snapshot (its first bytes are not the snapshot magic).")]
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// A snapshot of another format version.
    #[error(
        "{path} is a version {found} snapshot; this VMM reads version {FORMAT_VERSION}: make the snapshot again."
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter (or longer) than its header says.
    #[error(
        "{path} is truncated or padded: its header says {expected} bytes of state, it holds {found}."
    )]
    Length {
        /// The file.
        path: PathBuf,
        /// What the header says.
        expected: u64,
        /// What is there.
        found: u64,
    },
    /// The body does not match its checksum.
    #[error("{path} fails its checksum: it was changed after it was written.")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// The body does not decode.
    #[error("{path} does not decode as snapshot state: {reason}.")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// Made from something other than what is being restored.
    #[error(
        "The snapshot was made with another {field} ({snapshot}) than this VM's ({expected}): make the snapshot again."
    )]
    Mismatch {
        /// Which part of the [`Identity`].
        field: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// The expected value.
        expected: String,
    },
    /// The memory image does not match the state file.
    #[error("The memory image {path} does not belong to this snapshot: {reason}.")]
    Memory {
        /// The image.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The state could not be encoded.
    #[error("The snapshot state cannot be encoded: {0}.")]
    Encode(String),
}

/// What a snapshot was made from; a restore must match every field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The VMM build (the SHA-256 of its binary, hex).
    pub vmm: String,
    /// The kernel's SHA-256, hex.
    pub kernel: String,
    /// The initramfs's SHA-256, hex.
    pub initrd: String,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The full kernel command line.
    pub cmdline: String,
    /// The weights image's SHA-256, hex, if the VM has one.
    pub weights: Option<String>,
    /// The virtio-fs devices' tags, in device order (the guest's driver
    /// reads them when it finds the devices, before the snapshot; the
    /// guest mounts none before it, a restored guest mounts them when its
    /// host tells it where).
    pub shares: Vec<String>,
}

impl Identity {
    /// The first field in which `self` (a snapshot's) differs from
    /// `expected`.
    ///
    /// # Errors
    /// [`SnapshotError::Mismatch`] naming it.
    pub fn check(&self, expected: &Identity) -> Result<(), SnapshotError> {
        let fields: [(&'static str, String, String); 8] = [
            ("VMM build", self.vmm.clone(), expected.vmm.clone()),
            ("kernel", self.kernel.clone(), expected.kernel.clone()),
            ("initramfs", self.initrd.clone(), expected.initrd.clone()),
            (
                "memory size (MiB)",
                self.memory_mib.to_string(),
                expected.memory_mib.to_string(),
            ),
            (
                "vCPU count",
                self.vcpus.to_string(),
                expected.vcpus.to_string(),
            ),
            (
                "kernel command line",
                self.cmdline.clone(),
                expected.cmdline.clone(),
            ),
            (
                "weights image",
                format!("{:?}", self.weights),
                format!("{:?}", expected.weights),
            ),
            (
                "shares",
                format!("{:?}", self.shares),
                format!("{:?}", expected.shares),
            ),
        ];
        match fields.into_iter().find(|(_, a, b)| a != b) {
            Some((field, snapshot, expected)) => Err(SnapshotError::Mismatch {
                field,
                snapshot,
                expected,
            }),
            None => Ok(()),
        }
    }
}

/// The memory image a state file goes with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryImage {
    /// Its length, bytes (the guest's RAM).
    pub len: u64,
    /// The SHA-256 of its contents (holes read as zeros).
    pub sha256: [u8; 32],
}

/// Everything in a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// What it was made from.
    pub identity: Identity,
    /// Its memory image.
    pub memory: MemoryImage,
    /// KVM's state of the VM and its vCPUs.
    pub vm: kvm_state::VmState,
    /// The devices' state (each device's own serde form, by table name).
    pub devices: Vec<(String, Vec<u8>)>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `bytes` to `path` whole or not at all: a temporary file beside
/// it, synced, renamed into place.
fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Write a state file.
///
/// # Errors
/// [`SnapshotError::Encode`] or [`SnapshotError::Io`].
pub fn write_state(path: &Path, state: &SnapshotState) -> Result<(), SnapshotError> {
    let body = postcard::to_allocvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    write_atomically(path, |f| f.write_all(&out))
}

/// Read and check a state file against the `expected` identity (see the
/// module invariants).
///
/// # Errors
/// Every check has its [`SnapshotError`] variant.
pub fn read_state(path: &Path, expected: &Identity) -> Result<SnapshotState, SnapshotError> {
    // In a jail, the file its root opened before the uid dropped.
    let file = crate::jail::open_image(path).map_err(io_err(path))?;
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut reader = file.take(HEADER_LEN as u64 + MAX_STATE_BYTES + 1);
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]).map_err(io_err(path))? {
            0 => break,
            n => got += n,
        }
    }
    let p = || path.to_path_buf();
    if got < MAGIC.len() || header[..8] != MAGIC {
        return Err(SnapshotError::Foreign { path: p() });
    }
    if got < 12 {
        return Err(SnapshotError::Length {
            path: p(),
            expected: HEADER_LEN as u64,
            found: got as u64,
        });
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: p(),
            found: version,
        });
    }
    if got < HEADER_LEN {
        return Err(SnapshotError::Length {
            path: p(),
            expected: HEADER_LEN as u64,
            found: got as u64,
        });
    }
    let len = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    if len > MAX_STATE_BYTES {
        return Err(SnapshotError::Decode {
            path: p(),
            reason: format!("its state claims {len} bytes, more than {MAX_STATE_BYTES}"),
        });
    }
    let mut body = Vec::with_capacity(len as usize);
    reader.read_to_end(&mut body).map_err(io_err(path))?;
    if body.len() as u64 != len {
        return Err(SnapshotError::Length {
            path: p(),
            expected: len,
            found: body.len() as u64,
        });
    }
    if Sha256::digest(&body).as_slice() != &header[20..52] {
        return Err(SnapshotError::Checksum { path: p() });
    }
    let state: SnapshotState = postcard::from_bytes(&body).map_err(|e| SnapshotError::Decode {
        path: p(),
        reason: e.to_string(),
    })?;
    state.identity.check(expected)?;
    Ok(state)
}

/// Write a memory image of `ram` (`len` bytes at `host`): pages `resident`
/// says the guest touched are written, the rest left as holes. Returns its
/// [`MemoryImage`].
///
/// # Errors
/// [`SnapshotError::Io`].
pub fn write_memory(
    path: &Path,
    ram: &[u8],
    resident: impl Fn(usize) -> bool,
) -> Result<MemoryImage, SnapshotError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let mut hash = Sha256::new();
    write_atomically(path, |f| {
        f.set_len(ram.len() as u64)?;
        let zero = [0u8; PAGE];
        for (i, page) in ram.chunks(PAGE).enumerate() {
            if resident(i) && page.iter().any(|b| *b != 0) {
                f.write_all_at(page, (i * PAGE) as u64)?;
                hash.update(page);
            } else {
                hash.update(&zero[..page.len()]);
            }
        }
        Ok(())
    })?;
    Ok(MemoryImage {
        len: ram.len() as u64,
        sha256: hash.finalize().into(),
    })
}

/// The SHA-256 of the file at `path` (an image or binary an [`Identity`]
/// names, or a memory image).
///
/// # Errors
/// The file cannot be read.
pub fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    sha256_of(&mut std::fs::File::open(path)?)
}

/// [`file_sha256`] in lower-case hex, as an [`Identity`] holds digests.
///
/// # Errors
/// The file cannot be read.
pub fn file_sha256_hex(path: &Path) -> std::io::Result<String> {
    Ok(file_sha256(path)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn sha256_of(f: &mut std::fs::File) -> std::io::Result<[u8; 32]> {
    let mut hash = Sha256::new();
    std::io::copy(f, &mut hash)?;
    Ok(hash.finalize().into())
}

/// Check the memory image at `path` against `image` (length and digest).
///
/// # Errors
/// [`SnapshotError::Memory`] or [`SnapshotError::Io`].
pub fn check_memory(path: &Path, image: &MemoryImage) -> Result<(), SnapshotError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    let bad = |reason: String| SnapshotError::Memory {
        path: path.to_path_buf(),
        reason,
    };
    if len != image.len {
        return Err(bad(format!(
            "it is {len} bytes, the snapshot's RAM is {}",
            image.len
        )));
    }
    if sha256_of(&mut f).map_err(io_err(path))? != image.sha256 {
        return Err(bad("its contents fail the snapshot's checksum".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
