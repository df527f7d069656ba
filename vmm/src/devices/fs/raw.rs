//! Raw FUSE requests into a [`Share`] through `fuse-backend-rs`'s server,
//! over a descriptor chain in guest memory (the path the device takes):
//! for the unit tests and the fuzzer.

use super::share::{Share, ShareLimits};
use super::window::{DaxWindow, WindowRequests};
use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use std::path::Path;
use std::sync::Arc;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x30_0000;
const REPLY_LEN: u32 = 0x10_0000;
/// The largest request [`RawFuse::send`] takes.
pub const MAX_REQUEST: usize = 0x20_0000;

/// A server on one share, and guest memory for its requests.
pub struct RawFuse {
    server: Server<Arc<Share>>,
    /// The share served.
    pub share: Arc<Share>,
    mem: GuestMemoryMmap,
    window: Option<WindowRequests>,
}

impl RawFuse {
    /// Serve `root`.
    ///
    /// # Panics
    /// The share or the memory cannot be made (test setup).
    pub fn new(root: &Path, read_only: bool, limits: ShareLimits) -> Self {
        Self::serving(Share::new(root, read_only, limits).expect("share"))
    }

    /// Serve `share`.
    ///
    /// # Panics
    /// The memory cannot be made (test setup).
    pub fn serving(share: Share) -> Self {
        let share = Arc::new(share);
        Self {
            server: Server::new(share.clone()),
            share,
            mem: GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)])
                .expect("guest memory"),
            window: None,
        }
    }

    /// Serve SETUPMAPPING and REMOVEMAPPING into `window`, as a device
    /// with a DAX window does.
    #[must_use]
    pub fn with_window(mut self, window: Arc<DaxWindow>) -> Self {
        self.window = Some(WindowRequests(window));
        self
    }

    /// Send `request` (header included, at most [`MAX_REQUEST`] bytes) in a
    /// readable descriptor followed by a 1 MiB writable one; the reply's
    /// header and payload, or `None` when the server wrote none.
    ///
    /// # Panics
    /// `request` is larger than [`MAX_REQUEST`].
    pub fn send(&mut self, request: &[u8]) -> Option<(OutHeader, Vec<u8>)> {
        assert!(
            request.len() <= MAX_REQUEST,
            "request too large for the test memory"
        );
        self.mem.write_slice(request, GuestAddress(REQ)).ok()?;
        self.mem.write_slice(&[0u8; 16], GuestAddress(REPLY)).ok()?;
        let q = MockSplitQueue::create(&self.mem, GuestAddress(0x1000), 16);
        q.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(
                    REQ,
                    request.len() as u32,
                    VRING_DESC_F_NEXT as u16,
                    1,
                )),
                RawDescriptor::from(Descriptor::new(
                    REPLY,
                    REPLY_LEN,
                    VRING_DESC_F_WRITE as u16,
                    0,
                )),
            ],
            0,
        )
        .ok()?;
        let mut queue: Queue = q.create_queue().ok()?;
        let chain = queue.iter(&self.mem).ok()?.next()?;
        let reader = Reader::from_descriptor_chain(&self.mem, chain.clone()).ok()?;
        let writer = VirtioFsWriter::new(&self.mem, chain).ok()?;
        let written = self
            .server
            .handle_message(
                reader,
                writer.into(),
                self.window
                    .as_mut()
                    .map(|w| w as &mut dyn fuse_backend_rs::transport::FsCacheReqHandler),
                None,
            )
            .unwrap_or(0);
        if written < std::mem::size_of::<OutHeader>() {
            return None;
        }
        let out: OutHeader = self.mem.read_obj(GuestAddress(REPLY)).ok()?;
        let n = (out.len as usize)
            .saturating_sub(std::mem::size_of::<OutHeader>())
            .min(REPLY_LEN as usize);
        let mut payload = vec![0u8; n];
        self.mem
            .read_slice(&mut payload, GuestAddress(REPLY + 16))
            .ok()?;
        Some((out, payload))
    }
}

/// Entry point of the `fuse` fuzz target: `data` as one FUSE request to a
/// read-write share of a small tree under the temp directory (made once
/// per process) with an 8 MiB DAX window, after INIT.
#[cfg(feature = "fuzzing")]
pub fn fuzz_one(data: &[u8]) {
    use std::sync::{Mutex, OnceLock};
    static TARGET: OnceLock<Mutex<RawFuse>> = OnceLock::new();
    let target = TARGET.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("airlock-fuzz-fuse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sub")).expect("fuzz tree");
        std::fs::write(root.join("a.txt"), "hello").expect("fuzz tree");
        std::os::unix::fs::symlink("/etc", root.join("out")).expect("fuzz tree");
        let mut raw = RawFuse::new(
            &root,
            false,
            ShareLimits {
                max_inodes: 64,
                max_handles: 16,
            },
        )
        .with_window(DaxWindow::new(4 * super::window::MAP_ALIGN).expect("DAX window"));
        // INIT (FUSE 7.31), so the fuzzer reaches every opcode.
        let mut init = Vec::new();
        init.extend_from_slice(&(40u32 + 16).to_le_bytes()); // len
        init.extend_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
        init.extend_from_slice(&1u64.to_le_bytes()); // unique
        init.extend_from_slice(&0u64.to_le_bytes()); // nodeid
        init.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
        for v in [7u32, 31, 0x2_0000, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        raw.send(&init);
        Mutex::new(raw)
    });
    if data.len() <= MAX_REQUEST {
        let mut t = target.lock().unwrap_or_else(|p| p.into_inner());
        let _ = t.send(data);
    }
}
