//! The virtio side of the device: feature bits, config space (the guest's
//! CID), activation (which hands the queues to the [`Muxer`] thread) and
//! shutdown.

use super::muxer::Muxer;
use super::packet::QUEUE_SIZE;
use crate::devices::virtio_mmio::{Activation, DeviceWorker, VirtioDevice, VirtioError};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use vmm_sys_util::eventfd::EventFd;

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    worker: Option<DeviceWorker>,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening on `uds_path` (created now,
    /// so host clients can connect before the guest is up).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VirtioError> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path).map_err(|e| {
            VirtioError::Activate(format!("vsock socket {}: {e}", uds_path.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VirtioError::Activate(e.to_string()))?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener: Some(listener),
            worker: None,
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
        let listener = self
            .listener
            .take()
            .ok_or_else(|| VirtioError::Activate("activated twice".into()))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let stop2 = stop.try_clone().map_err(VirtioError::EventFd)?;
        let mut queues = a.queues.into_iter();
        let mut evts = a.queue_evts.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(VirtioError::Activate("vsock needs three queues".into()));
        };
        let (Some(rx_evt), Some(tx_evt), Some(ev_evt)) = (evts.next(), evts.next(), evts.next())
        else {
            return Err(VirtioError::Activate(
                "vsock needs three queue eventfds".into(),
            ));
        };
        let mut muxer = Muxer::new(
            a.mem,
            (rxq, txq),
            a.interrupt,
            (rx_evt, tx_evt, ev_evt),
            listener,
            stop2,
            self.guest_cid,
            self.uds_path.clone(),
        )?;
        let t = std::thread::Builder::new()
            .name("airlock-vsock".into())
            .stack_size(super::super::THREAD_STACK)
            .spawn(move || muxer.run())
            .map_err(|e| VirtioError::Activate(format!("thread: {e}")))?;
        self.worker = Some(DeviceWorker::new(stop, t));
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.listener = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}
