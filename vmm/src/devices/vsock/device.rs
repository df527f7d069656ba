//! The virtio side of the device: feature bits, config space (the guest's
//! CID), activation (which hands the queues to the [`Muxer`] thread, started
//! with the device) and shutdown.

use super::muxer::Muxer;
use super::packet::QUEUE_SIZE;
use crate::devices::virtio_mmio::{Activation, DeviceWorker, VirtioDevice, VirtioError};
use crate::seccomp::BpfProgram;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    worker: DeviceWorker,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening on `uds_path` (bound now,
    /// so host clients can connect before the guest is up); its worker
    /// thread starts now (under `filter`, if given) and waits for the
    /// guest's driver.
    ///
    /// # Errors
    /// The socket cannot be bound or the worker cannot start.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        filter: Option<Arc<BpfProgram>>,
    ) -> Result<Self, VirtioError> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path).map_err(|e| {
            VirtioError::Activate(format!("vsock socket {}: {e}", uds_path.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VirtioError::Activate(e.to_string()))?;
        let path = uds_path.clone();
        let worker = DeviceWorker::spawn("airlock-vsock", filter, move |a, stop| {
            let mut queues = a.queues.into_iter();
            let mut evts = a.queue_evts.into_iter();
            // `activate` checked there are three of each.
            let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
            else {
                return;
            };
            let (Some(rx), Some(tx), Some(ev)) = (evts.next(), evts.next(), evts.next()) else {
                return;
            };
            match Muxer::new(
                a.mem,
                (rxq, txq),
                a.interrupt,
                (rx, tx, ev),
                listener,
                stop,
                guest_cid,
                path,
            ) {
                Ok(mut muxer) => muxer.run(),
                Err(e) => tracing::error!(error = %e, "vsock cannot start"),
            }
        })?;
        Ok(Self {
            guest_cid,
            uds_path,
            worker,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        if a.queues.len() != 3 || a.queue_evts.len() != 3 {
            return Err(VirtioError::Activate(
                "vsock needs three queues and three queue eventfds".into(),
            ));
        }
        self.worker.activate(a)
    }

    fn shutdown(&mut self) {
        // Also reached from a vCPU thread (the guest resets the device),
        // whose filter has no unlink: the socket file goes on drop.
        self.worker.stop();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
