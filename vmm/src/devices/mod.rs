//! Devices the VMM gives a guest: the 8250 serial console, the virtio-mmio
//! transport, virtio-vsock (hybrid, over a host Unix socket) and virtio-pmem
//! (read-only shared weights), the boot-stage marker port and a read-only
//! CMOS clock.
//!
//! **Where each device sits is decided here, once:** the port-I/O table
//! ([`PIO_SLOTS`]) and the virtio-mmio table ([`MMIO_SLOTS`]: window, IRQ
//! and the kernel command-line entry that announces it). Adding a virtio
//! device is: write `devices/<dev>/` implementing [`VirtioDevice`], add one
//! [`MmioSlot`] row, attach it in the builder. A unit test keeps the rows
//! apart (no shared window, port or IRQ, every window in the MMIO hole).
//!
//! The vCPU threads dispatch every exit through a [`Bus`] built from these
//! rows, so no device address is written anywhere else.

pub mod fs;
pub mod huge;
pub mod marker;
pub mod pmem;
pub mod rtc;
pub mod serial;
pub mod virtio_mmio;
pub mod vsock;

pub use virtio_mmio::VirtioDevice;

use std::sync::{Arc, Mutex};

/// Stack size of every thread the VMM starts (vCPUs, device workers).
///
/// Rust's default is 2 MiB. A 2 MiB stack mapping placed right below the
/// (2 MiB-aligned) guest RAM contains a whole aligned 2 MiB range, so with
/// transparent huge pages set to `always` its first touch faulted in a full
/// huge page: +2 MiB of VMM overhead per thread. A mapping smaller than
/// 2 MiB can never hold one. The code these threads run keeps its buffers
/// on the heap; 256 KiB is ample.
pub const THREAD_STACK: usize = 256 << 10;

/// A port-I/O device's place: its first port and how many it decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PioSlot {
    /// Name for errors and logs.
    pub name: &'static str,
    /// First port.
    pub base: u16,
    /// Ports decoded from `base`.
    pub len: u16,
    /// Its interrupt line, if it raises one.
    pub irq: Option<u32>,
}

/// A virtio-mmio device's place: its 4 KiB window and its IRQ (an IOAPIC
/// pin, edge). The guest learns both from the command line
/// ([`MmioSlot::cmdline`]), so no firmware table is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Name for errors and logs.
    pub name: &'static str,
    /// Guest-physical base of the window.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command-line entry that tells the guest about the device.
    pub fn cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            virtio_mmio::MMIO_SIZE >> 10,
            self.base,
            self.irq
        )
    }
}

/// COM1: the guest console (8250 UART).
pub const COM1: PioSlot = PioSlot {
    name: "serial",
    base: 0x3f8,
    len: 8,
    irq: Some(4),
};
/// The CMOS clock: index and data ports.
pub const RTC: PioSlot = PioSlot {
    name: "rtc",
    base: rtc::RTC_INDEX,
    len: 2,
    irq: None,
};
/// The boot-stage marker port the guest's init writes to.
pub const MARKER: PioSlot = PioSlot {
    name: "boot marker",
    base: airlock_abi::BOOT_MARKER_PORT,
    len: 1,
    irq: None,
};
/// Every port-I/O device.
pub const PIO_SLOTS: [PioSlot; 3] = [COM1, RTC, MARKER];

/// virtio-vsock: the host ⇄ guest channel.
pub const VSOCK: MmioSlot = MmioSlot {
    name: "vsock",
    base: 0xd000_0000,
    irq: 5,
};
/// virtio-pmem: the read-only weights image.
pub const PMEM: MmioSlot = MmioSlot {
    name: "pmem",
    base: 0xd000_1000,
    irq: 6,
};
/// virtio-fs: one per shared host directory.
pub const FS_SLOTS: [MmioSlot; airlock_abi::MAX_SHARES] = [
    MmioSlot {
        name: "fs0",
        base: 0xd000_2000,
        irq: 7,
    },
    MmioSlot {
        name: "fs1",
        base: 0xd000_3000,
        irq: 9,
    },
    MmioSlot {
        name: "fs2",
        base: 0xd000_4000,
        irq: 10,
    },
    MmioSlot {
        name: "fs3",
        base: 0xd000_5000,
        irq: 11,
    },
];
/// Guest-physical base of the virtio-fs DAX windows (one per share,
/// [`FS_WINDOW_STRIDE`] apart), high above RAM, the MMIO hole and the
/// weights' pmem region (which must end below it).
pub const FS_WINDOWS_BASE: u64 = 64 << 30;
/// Distance between two shares' windows: each starts on its own 1 GiB
/// boundary (the guest hot-plugs each as device memory).
pub const FS_WINDOW_STRIDE: u64 = 1 << 30;
/// The KVM memory slot of the weights' pmem region (0 is RAM).
pub const PMEM_SLOT: u32 = 1;
/// The first KVM memory slot of the windows (after RAM and the weights).
pub const FS_WINDOW_FIRST_SLOT: u32 = PMEM_SLOT + 1;
/// The first KVM memory slot of the virtio devices' register pages (one
/// per row of [`MMIO_SLOTS`], in its order).
pub const REGISTER_PAGE_FIRST_SLOT: u32 = FS_WINDOW_FIRST_SLOT + airlock_abi::MAX_SHARES as u32;

/// Where share `i`'s DAX window starts (guest-physical).
pub const fn fs_window_base(i: usize) -> u64 {
    FS_WINDOWS_BASE + i as u64 * FS_WINDOW_STRIDE
}

/// Every virtio-mmio device.
pub const MMIO_SLOTS: [MmioSlot; 6] = [
    VSOCK,
    PMEM,
    FS_SLOTS[0],
    FS_SLOTS[1],
    FS_SLOTS[2],
    FS_SLOTS[3],
];

/// The MMIO hole: guest-physical addresses between the most RAM a VM may
/// have and 4 GiB, where device windows live.
pub const MMIO_HOLE: std::ops::Range<u64> = 0xc000_0000..0x1_0000_0000;

/// A device on a bus: accesses come with the offset from its base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Devices by address range (port I/O or MMIO), for the vCPU threads.
#[derive(Default, Clone)]
pub struct Bus {
    /// (base, length, device), ranges disjoint.
    entries: Vec<(u64, u64, SharedDevice)>,
}

impl Bus {
    /// Place `device` at `base..base+len`.
    ///
    /// # Errors
    /// The range overlaps a device already there (the tables make this a
    /// programming error; the builder still reports it instead of
    /// dispatching to the wrong device).
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        if self
            .entries
            .iter()
            .any(|(b, l, _)| base < b + l && *b < base + len)
        {
            return Err(BusError::Overlap { name, base });
        }
        self.entries.push((base, len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        self.entries
            .iter()
            .find(|(b, l, _)| (*b..b + l).contains(&addr))
            .map(|(b, _, d)| (addr - b, d))
    }

    /// Dispatch a read; `false` when no device is at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((off, d)) = self.find(addr) else {
            return false;
        };
        d.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
        true
    }

    /// Dispatch a write; `false` when no device is at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((off, d)) = self.find(addr) else {
            return false;
        };
        d.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
        true
    }
}

/// Errors placing devices.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Two devices claim the same addresses.
    #[error("The {name} device at {base:#x} overlaps another device.")]
    Overlap {
        /// The device being placed.
        name: &'static str,
        /// Its base.
        base: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_tables_keep_every_device_apart() {
        for (i, a) in MMIO_SLOTS.iter().enumerate() {
            let end = a.base + virtio_mmio::MMIO_SIZE;
            assert!(
                MMIO_HOLE.contains(&a.base) && end <= MMIO_HOLE.end,
                "{} outside the MMIO hole",
                a.name
            );
            for b in &MMIO_SLOTS[i + 1..] {
                assert!(
                    end <= b.base || b.base + virtio_mmio::MMIO_SIZE <= a.base,
                    "{} and {} share addresses",
                    a.name,
                    b.name
                );
                assert_ne!(a.irq, b.irq, "{} and {} share an IRQ", a.name, b.name);
            }
            for p in &PIO_SLOTS {
                assert_ne!(Some(a.irq), p.irq, "{} and {} share an IRQ", a.name, p.name);
            }
        }
        let mut bus = Bus::default();
        struct Nothing;
        impl BusDevice for Nothing {
            fn read(&mut self, _: u64, _: &mut [u8]) {}
            fn write(&mut self, _: u64, _: &[u8]) {}
        }
        for p in &PIO_SLOTS {
            bus.insert(
                p.name,
                p.base.into(),
                p.len.into(),
                Arc::new(Mutex::new(Nothing)),
            )
            .unwrap();
        }
        assert!(
            bus.insert("late", 0x3fa, 1, Arc::new(Mutex::new(Nothing)))
                .is_err()
        );
        assert_eq!(
            VSOCK.cmdline(),
            "virtio_mmio.device=4K@0xd0000000:5",
            "the guest parses this form"
        );
    }

    #[test]
    fn dax_windows_are_apart_aligned_and_above_everything_else() {
        let window = fs::window::WINDOW_SIZE;
        assert!(window <= FS_WINDOW_STRIDE);
        for i in 0..FS_SLOTS.len() {
            let base = fs_window_base(i);
            assert_eq!(base % FS_WINDOW_STRIDE, 0);
            assert!(base >= crate::PMEM_BASE + crate::MAX_PMEM_BYTES);
            // Below 2^39: x86-64 CPUs address at least 39 physical bits
            // (Intel's client parts; AMD's and servers more).
            assert!(base + window <= 1 << 39);
        }
    }

    #[test]
    fn a_bus_dispatches_by_offset_and_reports_holes() {
        struct Echo(Vec<(u64, u8)>);
        impl BusDevice for Echo {
            fn read(&mut self, offset: u64, data: &mut [u8]) {
                data.fill(offset as u8);
            }
            fn write(&mut self, offset: u64, data: &[u8]) {
                self.0.push((offset, data[0]));
            }
        }
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::default();
        bus.insert("echo", 0x100, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(bus.write(0x10f, &[9]));
        assert!(!bus.write(0x110, &[9]));
        assert!(!bus.read(0xff, &mut b));
        assert_eq!(dev.lock().unwrap().0, [(0xf, 9)]);
    }
}
