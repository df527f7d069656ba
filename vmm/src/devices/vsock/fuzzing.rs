//! Entry points for the fuzz targets (`fuzz/`, feature `fuzzing`): the
//! vsock device's packet paths over a guest memory and a split queue whose
//! every byte the fuzzer chooses — descriptor table, rings, headers and
//! payloads — as a hostile guest would.

use super::packet::{Credit, MAX_PKT_DATA, OP_RW, OutPkt, deliver, drain_tx};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size of a fuzz run.
pub const MEM_SIZE: u64 = 2 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;

/// A queue of `2^(bytes[0] % 9)` entries (1..=256) whose table and rings,
/// and the memory after them, are `bytes[1..]` laid out from `DESC`
/// onwards. Descriptor addresses the fuzzer writes land anywhere in (or
/// past) the memory.
fn guest(bytes: &[u8]) -> Option<(GuestMemoryMmap, Queue)> {
    let (&size, rest) = bytes.split_first()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).ok()?;
    let room = (MEM_SIZE - DESC) as usize;
    mem.write_slice(&rest[..rest.len().min(room)], GuestAddress(DESC))
        .ok()?;
    let mut q = Queue::new(256).ok()?;
    q.set_size(1 << (size % 9));
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q.is_valid(&mem).then_some((mem, q))
}

/// Drain the tx queue `bytes` describe, as the device does when the guest
/// kicks it. Returns how many packets parsed; every chain is bounded by
/// the queue and by `MAX_PKT_DATA`.
pub fn tx(bytes: &[u8]) -> usize {
    let Some((mem, mut q)) = guest(bytes) else {
        return 0;
    };
    let (packets, _) = drain_tx(&mem, &mut q);
    for p in &packets {
        assert!(
            p.data.len() <= MAX_PKT_DATA as usize,
            "a packet past the cap"
        );
    }
    packets.len()
}

/// Deliver packets of `len` bytes (at most `MAX_PKT_DATA`) into the rx
/// buffers `bytes` describe, as the device does, until the guest has no
/// buffer left. Returns how many buffers were used.
pub fn rx(bytes: &[u8], len: usize) -> usize {
    let Some((mem, mut q)) = guest(bytes) else {
        return 0;
    };
    let credit = Credit {
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    let mut pkt = OutPkt {
        src_port: 1,
        dst_port: 2,
        op: OP_RW,
        flags: 0,
        data: vec![0xa5; len.min(MAX_PKT_DATA as usize)],
    };
    // Each delivery takes one buffer off the queue; a queue holds at most
    // 256, so more rounds than that mean the device loops on a lying guest.
    for used in 0..=256 {
        match deliver(&mem, &mut q, 3, pkt, credit) {
            Err(_) => return used,
            Ok(None) => {
                pkt = OutPkt {
                    src_port: 1,
                    dst_port: 2,
                    op: OP_RW,
                    flags: 0,
                    data: Vec::new(),
                };
            }
            Ok(Some(rest)) => pkt = rest,
        }
    }
    panic!("more rx buffers used than a queue holds");
}

/// Drain `q` as the tx path does (for queues a fuzzer configured through
/// the virtio-mmio registers). Returns how many packets parsed.
pub fn drain(mem: &GuestMemoryMmap, q: &mut Queue) -> usize {
    drain_tx(mem, q).0.len()
}
