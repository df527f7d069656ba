//! The vsock wire format as this device speaks it: header constants, the
//! packets we queue for the guest, and reading/writing packets on the
//! guest's descriptor chains (through `virtio-vsock`'s `VsockPacket`, which
//! checks every descriptor against guest memory and `MAX_PKT_DATA`).

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;

/// The host's CID.
pub const HOST_CID: u64 = 2;
pub(super) const TYPE_STREAM: u16 = 1;
pub(super) const OP_REQUEST: u16 = 1;
pub(super) const OP_RESPONSE: u16 = 2;
pub(super) const OP_RST: u16 = 3;
pub(super) const OP_SHUTDOWN: u16 = 4;
pub(super) const OP_RW: u16 = 5;
pub(super) const OP_CREDIT_UPDATE: u16 = 6;
pub(super) const OP_CREDIT_REQUEST: u16 = 7;
/// Our receive buffer per connection, as advertised to the guest.
pub(super) const BUF_ALLOC: u32 = 256 * 1024;
/// Connections (guest- and host-initiated) open at once, at most: each
/// holds a host descriptor and up to `BUF_ALLOC` bytes of buffer, so a
/// guest opening connections without end is refused (reset) past this
/// instead of spending the VMM's descriptors and memory.
pub(super) const MAX_CONNS: usize = 64;
/// Packets waiting for the guest's receive buffers, at most (see `send`).
pub(super) const MAX_RX_PENDING: usize = 4096;
/// Largest payload we accept from or put into one packet.
pub(super) const MAX_PKT_DATA: u32 = 64 * 1024;
pub(super) const QUEUE_SIZE: u16 = 256;

/// A packet to put on the guest's rx queue.
pub(super) struct OutPkt {
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub data: Vec<u8>,
}

/// A packet the guest sent, copied out of guest memory.
#[derive(Debug)]
pub(super) struct GuestPacket {
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub ty: u16,
    pub data: Vec<u8>,
}

/// Take every packet the guest put on its tx queue (each chain is marked
/// used, parsed or not); `true` in the second value when any chain was
/// used, so the caller interrupts the guest.
pub(super) fn drain_tx(mem: &GuestMemoryMmap, txq: &mut Queue) -> (Vec<GuestPacket>, bool) {
    let mut packets = Vec::new();
    let mut used = false;
    while let Some(mut chain) = txq.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        tracing::trace!(head, "vsock tx chain");
        let parsed = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA).map(|p| {
            let mut data = vec![0u8; p.len() as usize];
            if let Some(s) = p.data_slice() {
                let _ = s.copy_to(&mut data);
            }
            GuestPacket {
                dst_cid: p.dst_cid(),
                src_port: p.src_port(),
                dst_port: p.dst_port(),
                op: p.op(),
                flags: p.flags(),
                buf_alloc: p.buf_alloc(),
                fwd_cnt: p.fwd_cnt(),
                ty: p.type_(),
                data,
            }
        });
        if let Err(e) = txq.add_used(mem, head, 0) {
            tracing::warn!(error = %e, "vsock tx queue");
        }
        used = true;
        match parsed {
            Ok(p) => packets.push(p),
            Err(e) => tracing::warn!(error = ?e, "malformed vsock packet from the guest"),
        }
    }
    (packets, used)
}

/// Credit fields stamped on a packet as it is delivered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Credit {
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Write `pkt` into the guest's next rx buffer and mark it used. Gives the
/// packet back as `Err` when the guest has posted no buffer; otherwise,
/// when the buffer was too small for the data, the rest of the packet to
/// send next.
pub(super) fn deliver(
    mem: &GuestMemoryMmap,
    rxq: &mut Queue,
    guest_cid: u64,
    mut pkt: OutPkt,
    credit: Credit,
) -> Result<Option<OutPkt>, OutPkt> {
    let Some(mut chain) = rxq.pop_descriptor_chain(mem) else {
        return Err(pkt);
    };
    let head = chain.head_index();
    let mut rest_pkt = None;
    let written = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
        Ok(mut p) => {
            let room = p.data_slice().map_or(0, |s| s.len());
            let rest = if pkt.data.len() > room {
                Some(pkt.data.split_off(room))
            } else {
                None
            };
            if let Some(s) = p.data_slice() {
                s.copy_from(&pkt.data[..]);
            }
            p.set_src_cid(HOST_CID)
                .set_dst_cid(guest_cid)
                .set_src_port(pkt.src_port)
                .set_dst_port(pkt.dst_port)
                .set_type(TYPE_STREAM)
                .set_op(pkt.op)
                .set_flags(pkt.flags)
                .set_buf_alloc(credit.buf_alloc)
                .set_fwd_cnt(credit.fwd_cnt)
                .set_len(pkt.data.len() as u32);
            let n = p.header_slice().len() + pkt.data.len();
            if let Some(rest) = rest {
                pkt.data = rest;
                rest_pkt = Some(pkt);
            }
            n as u32
        }
        Err(e) => {
            tracing::warn!(error = ?e, "unusable vsock rx buffer from the guest");
            0
        }
    };
    if let Err(e) = rxq.add_used(mem, head, written) {
        tracing::warn!(error = %e, "vsock rx queue");
    }
    Ok(rest_pkt)
}
