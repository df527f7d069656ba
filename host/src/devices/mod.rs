//! Devices the VMM gives a guest: the 8250 serial console, the virtio-mmio
//! transport and virtio-vsock (hybrid, over a host Unix socket).

pub mod serial;
pub mod virtio_mmio;
pub mod vsock;
