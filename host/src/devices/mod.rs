//! Devices the VMM gives a guest: the 8250 serial console, the virtio-mmio
//! transport, virtio-vsock (hybrid, over a host Unix socket) and virtio-pmem
//! (read-only shared weights), the boot-stage marker port and a read-only
//! CMOS clock.

pub mod marker;
pub mod pmem;
pub mod rtc;
pub mod serial;
pub mod virtio_mmio;
pub mod vsock;
