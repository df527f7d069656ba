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

/// Stack size of every thread the VMM starts (vCPUs, device workers).
///
/// Rust's default is 2 MiB. A 2 MiB stack mapping placed right below the
/// (2 MiB-aligned) guest RAM contains a whole aligned 2 MiB range, so with
/// transparent huge pages set to `always` its first touch faulted in a full
/// huge page: +2 MiB of VMM overhead per thread. A mapping smaller than
/// 2 MiB can never hold one. The code these threads run keeps its buffers
/// on the heap; 256 KiB is ample.
pub const THREAD_STACK: usize = 256 << 10;
