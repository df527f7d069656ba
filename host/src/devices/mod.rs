//! Devices the VMM gives a guest. Today: the 8250 serial console.
//! (virtio-mmio vsock, virtio-fs and pmem are the next milestone.)

pub mod serial;
