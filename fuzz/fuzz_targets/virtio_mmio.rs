//! The virtio-mmio transport under any sequence of guest register reads
//! and writes (feature negotiation, queue setup with any addresses and
//! sizes, status changes in any order); once the driver says it is ready,
//! the device drains every queue it was handed, as the vsock device does
//! when kicked.
#![no_main]

use airlock_vmm::devices::virtio_mmio::{Activation, MmioTransport, VirtioDevice, VirtioError};
use airlock_vmm::devices::vsock::fuzzing::{MEM_SIZE, drain};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Arbitrary)]
struct Op {
    write: bool,
    offset: u16,
    width: u8,
    value: u32,
}

#[derive(Debug, Arbitrary)]
struct Input {
    ops: Vec<Op>,
    memory: Vec<u8>,
}

/// A device with vsock's shape (three queues of 256) that drains what it
/// is given on activation.
struct Draining;

impl VirtioDevice for Draining {
    fn device_type(&self) -> u32 {
        19
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = offset.wrapping_add(i as u64) as u8);
    }
    fn activate(&mut self, mut a: Activation) -> Result<(), VirtioError> {
        for q in &mut a.queues {
            drain(&a.mem, q);
        }
        Ok(())
    }
    fn shutdown(&mut self) {}
}

fuzz_target!(|input: Input| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
    else {
        return;
    };
    let n = input.memory.len().min(MEM_SIZE as usize);
    mem.write_slice(&input.memory[..n], GuestAddress(0))
        .expect("in range");
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let evts: Vec<EventFd> = (0..3)
        .filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok())
        .collect();
    let Ok(mut t) = MmioTransport::new(Box::new(Draining), mem, Arc::new(irq), evts) else {
        return;
    };
    for op in input.ops.iter().take(256) {
        let width = [1usize, 2, 4, 8][usize::from(op.width % 4)];
        let offset = u64::from(op.offset % 0x200);
        if op.write {
            let bytes = u64::from(op.value).to_le_bytes();
            t.write(offset, &bytes[..width]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
    }
    t.shutdown();
});
