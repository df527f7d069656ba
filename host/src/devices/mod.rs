//! Devices the VMM gives a guest: the 8250 serial console, the virtio-mmio
//! transport, virtio-vsock (hybrid, over a host Unix socket) and virtio-pmem
//! (read-only shared weights), and the boot-stage marker port.

pub mod marker;
pub mod pmem;
pub mod serial;
pub mod virtio_mmio;
pub mod vsock;
