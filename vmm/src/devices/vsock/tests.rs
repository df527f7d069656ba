//! The device against a simulated guest driver: queues in real guest
//! memory (virtio-queue's mock rings), packets written and read the way
//! Linux's virtio_transport does, and a real host client on the socket.

use super::Vsock;
use super::packet::{
    BUF_ALLOC, HOST_CID, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, TYPE_STREAM,
};
use crate::devices::virtio_mmio::{Activation, Interrupt, RegisterPage, VirtioDevice};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const RXQ: u64 = 0x1_0000;
const TXQ: u64 = 0x2_0000;
const EVQ: u64 = 0x3_0000;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;
const LEN: u16 = 16;

#[derive(Debug, Default, Clone, PartialEq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn write_hdr(mem: &GuestMemoryMmap, at: u64, h: &Hdr) {
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&h.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&h.fwd_cnt.to_le_bytes());
    mem.write_slice(&b, GuestAddress(at)).unwrap();
}

fn read_hdr(mem: &GuestMemoryMmap, at: u64) -> Hdr {
    let mut b = [0u8; 44];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    Hdr {
        src_cid: u64::from_le_bytes(b[0..8].try_into().unwrap()),
        dst_cid: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        op: u16::from_le_bytes([b[30], b[31]]),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// The guest side: rings in memory, eventfds to notify.
struct Guest {
    mem: GuestMemoryMmap,
    rx_evt: EventFd,
    tx_evt: EventFd,
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
}

fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
    mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
}

fn used_elem(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let at = q.used_addr().unchecked_add(4 + 8 * u64::from(i % LEN));
    (
        mem.read_obj::<u32>(at).unwrap(),
        mem.read_obj::<u32>(at.unchecked_add(4)).unwrap(),
    )
}

/// Put a descriptor chain at `slot` and make it available. (The mock's
/// own `add_desc_chains` does not wrap the avail ring, so it only lasts
/// for `LEN` chains; the flood test needs hundreds.)
fn add_chain(
    mem: &GuestMemoryMmap,
    q: &MockSplitQueue<'_, GuestMemoryMmap>,
    descs: &[RawDescriptor],
    slot: u16,
) {
    for (i, d) in descs.iter().enumerate() {
        q.desc_table().store(slot + i as u16, *d).unwrap();
    }
    let idx_at = q.avail_addr().unchecked_add(2);
    let idx: u16 = mem.read_obj(idx_at).unwrap();
    mem.write_obj(
        slot,
        q.avail_addr().unchecked_add(4 + 2 * u64::from(idx % LEN)),
    )
    .unwrap();
    mem.write_obj(idx.wrapping_add(1), idx_at).unwrap();
}

impl Guest {
    fn post_rx(&mut self, rx: &MockSplitQueue<'_, GuestMemoryMmap>) {
        let slot = (self.rx_posted * 2) % LEN;
        let buf = RX_BUF + u64::from(slot) * 0x2000;
        let flags = VRING_DESC_F_WRITE as u16;
        add_chain(
            &self.mem,
            rx,
            &[
                RawDescriptor::from(Descriptor::new(
                    buf,
                    44,
                    flags | VRING_DESC_F_NEXT as u16,
                    slot + 1,
                )),
                RawDescriptor::from(Descriptor::new(buf + 0x100, 4096, flags, 0)),
            ],
            slot,
        );
        self.rx_posted += 1;
        self.rx_evt.write(1).unwrap();
    }

    /// Wait for the device's next packet to the guest.
    fn recv(&mut self, rx: &MockSplitQueue<'_, GuestMemoryMmap>) -> (Hdr, Vec<u8>) {
        let start = Instant::now();
        while used_idx(&self.mem, rx) <= self.rx_seen {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no packet from the device"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let (head, len) = used_elem(&self.mem, rx, self.rx_seen);
        self.rx_seen += 1;
        let buf = RX_BUF + u64::from(head) * 0x2000;
        let h = read_hdr(&self.mem, buf);
        assert_eq!(len, 44 + h.len);
        let mut data = vec![0u8; h.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(buf + 0x100))
            .unwrap();
        (h, data)
    }

    fn send(&mut self, tx: &MockSplitQueue<'_, GuestMemoryMmap>, h: Hdr, data: &[u8]) {
        let slot = (self.tx_sent * 2) % LEN;
        let buf = TX_BUF + u64::from(slot) * 0x2000;
        write_hdr(
            &self.mem,
            buf,
            &Hdr {
                len: data.len() as u32,
                ..h
            },
        );
        let chain = if data.is_empty() {
            vec![RawDescriptor::from(Descriptor::new(buf, 44, 0, 0))]
        } else {
            self.mem
                .write_slice(data, GuestAddress(buf + 0x100))
                .unwrap();
            vec![
                RawDescriptor::from(Descriptor::new(buf, 44, VRING_DESC_F_NEXT as u16, slot + 1)),
                RawDescriptor::from(Descriptor::new(buf + 0x100, data.len() as u32, 0, 0)),
            ]
        };
        add_chain(&self.mem, tx, &chain, slot);
        self.tx_sent += 1;
        self.tx_evt.write(1).unwrap();
        let start = Instant::now();
        while used_idx(&self.mem, tx) < self.tx_sent {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "the device did not take the packet"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A device on `uds` with the queues `[rx, tx, ev]` activated, the
/// simulated guest driver, and the device's interrupt eventfd.
fn start(
    mem: &GuestMemoryMmap,
    queues: [&MockSplitQueue<'_, GuestMemoryMmap>; 3],
    uds: &std::path::Path,
) -> (Vsock, Guest, Arc<EventFd>) {
    // The device thread runs under the real device filter, enforced: a
    // syscall the filter lacks ends this test process (status 159, a line
    // naming it on stderr).
    crate::seccomp::install_trap_handler().unwrap();
    let filters = crate::seccomp::Filters::load(crate::seccomp::Mode::Enforce).unwrap();
    let mut dev = Vsock::new(3, uds.to_path_buf(), Some(filters.device)).unwrap();
    let evts: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let guest = Guest {
        mem: mem.clone(),
        rx_evt: evts[0].try_clone().unwrap(),
        tx_evt: evts[1].try_clone().unwrap(),
        rx_posted: 0,
        rx_seen: 0,
        tx_sent: 0,
    };
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.activate(Activation {
        mem: mem.clone(),
        queues: queues
            .iter()
            .map(|q| q.create_queue::<Queue>().unwrap())
            .collect(),
        queue_evts: evts,
        interrupt: Interrupt::new(RegisterPage::new().unwrap(), irq.clone()),
    })
    .unwrap();
    (dev, guest, irq)
}

#[test]
fn host_connect_data_both_ways_credit_and_reset() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), LEN);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), LEN);
    let ev = MockSplitQueue::create(&mem, GuestAddress(EVQ), LEN);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let (mut dev, mut guest, irq) = start(&mem, [&rx, &tx, &ev], &uds);
    for _ in 0..4 {
        guest.post_rx(&rx);
    }

    // Nobody listens on guest port 999: the guest resets, the client sees EOF.
    let mut c = UnixStream::connect(&uds).unwrap();
    c.write_all(b"CONNECT 999\n").unwrap();
    let (req, _) = guest.recv(&rx);
    assert_eq!(
        (req.op, req.dst_port, req.src_cid, req.dst_cid),
        (OP_REQUEST, 999, HOST_CID, 3)
    );
    guest.send(
        &tx,
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 999,
            dst_port: req.src_port,
            op: OP_RST,
            ..Hdr::default()
        },
        b"",
    );
    let mut buf = [0u8; 16];
    assert_eq!(
        c.read(&mut buf).unwrap(),
        0,
        "a refused connection is closed"
    );
    assert!(irq.read().unwrap() > 0, "the guest was interrupted");

    // Port 1024 accepts.
    let mut c = UnixStream::connect(&uds).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = guest.recv(&rx);
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let host_port = req.src_port;
    let g2h = |op, fwd_cnt| Hdr {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1024,
        dst_port: host_port,
        op,
        buf_alloc: 16,
        fwd_cnt,
        ..Hdr::default()
    };
    guest.send(&tx, g2h(OP_RESPONSE, 0), b"");
    let mut line = [0u8; 32];
    let n = c.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {host_port}\n")
    );
    // The new connection learns our buffer space at once.
    guest.post_rx(&rx);
    let (cu, _) = guest.recv(&rx);
    assert_eq!((cu.op, cu.buf_alloc), (OP_CREDIT_UPDATE, BUF_ALLOC));

    // Host → guest, limited by the guest's 16-byte credit.
    c.write_all(b"0123456789abcdefXYZ").unwrap();
    guest.post_rx(&rx);
    let (rw, data) = guest.recv(&rx);
    assert_eq!(rw.op, OP_RW);
    assert_eq!(data, b"0123456789abcdef", "no more than the credit");
    // The guest consumed 16 bytes: the rest follows its credit update.
    guest.send(&tx, g2h(OP_CREDIT_UPDATE, 16), b"");
    guest.post_rx(&rx);
    let (rw, data) = guest.recv(&rx);
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"XYZ"[..]));

    // Guest → host.
    guest.send(&tx, g2h(OP_RW, 16), b"hello host");
    let mut got = [0u8; 10];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");

    // The guest resets: the host client sees EOF.
    guest.send(&tx, g2h(OP_RST, 16), b"");
    assert_eq!(c.read(&mut got).unwrap(), 0);

    // A shutdown (also a guest's reset, on a vCPU thread: no unlink
    // there) stops the worker; the socket file goes with the device.
    dev.shutdown();
    assert!(uds.exists(), "the socket stays until the device is dropped");
    drop(dev);
    assert!(!uds.exists(), "the socket is removed when the device goes");
}

/// Review item 9: a guest kernel that ignores the credit we advertise
/// (the host client reads nothing) is reset, not buffered without end.
#[test]
fn a_guest_sending_past_its_credit_is_reset() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), LEN);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), LEN);
    let ev = MockSplitQueue::create(&mem, GuestAddress(EVQ), LEN);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let (mut dev, mut guest, _irq) = start(&mem, [&rx, &tx, &ev], &uds);
    guest.post_rx(&rx);
    let mut c = UnixStream::connect(&uds).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = guest.recv(&rx);
    let host_port = req.src_port;
    let g2h = |op| Hdr {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1024,
        dst_port: host_port,
        op,
        buf_alloc: 1 << 20,
        ..Hdr::default()
    };
    guest.send(&tx, g2h(OP_RESPONSE), b"");
    // 1 MiB at a client that reads nothing: the socket takes a few
    // hundred KiB, our buffer BUF_ALLOC more, then the guest is over.
    let chunk = [0x5au8; 4096];
    for _ in 0..256 {
        guest.send(&tx, g2h(OP_RW), &chunk);
    }
    let mut reset = false;
    let mut seen = Vec::new();
    for _ in 0..64 {
        guest.post_rx(&rx);
        let (h, _) = guest.recv(&rx);
        seen.push(h.op);
        if h.op == OP_RST {
            reset = true;
            break;
        }
    }
    assert!(reset, "the device never reset the connection: {seen:?}");
    // The client sees the stream end after what was forwarded.
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("the stream did not end: {e} after {total} bytes"),
        }
    }
    assert!(total < 1 << 20, "everything was buffered: {total} bytes");
    dev.shutdown();
}

/// A guest that opens connection after connection to a host port: each
/// would hold a VMM descriptor and buffer, so past `MAX_CONNS` live ones
/// the device resets the rest; closing one makes room again.
#[test]
fn a_guest_opening_connections_without_end_is_refused_past_the_cap() {
    use super::packet::MAX_CONNS;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), LEN);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), LEN);
    let ev = MockSplitQueue::create(&mem, GuestAddress(EVQ), LEN);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // A host service on port 1025 that takes connections and keeps them.
    let listener =
        std::os::unix::net::UnixListener::bind(format!("{}_1025", uds.display())).unwrap();
    let (mut dev, mut guest, _irq) = start(&mem, [&rx, &tx, &ev], &uds);
    let request = |port: u32| Hdr {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: port,
        dst_port: 1025,
        op: OP_REQUEST,
        buf_alloc: 4096,
        ..Hdr::default()
    };
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for port in 0..(MAX_CONNS as u32 + 36) {
        guest.send(&tx, request(40_000 + port), b"");
        guest.post_rx(&rx);
        let (h, _) = guest.recv(&rx);
        assert_eq!(h.dst_port, 40_000 + port);
        answers.push(h.op);
        if h.op == OP_RESPONSE {
            held.push(listener.accept().unwrap());
        }
    }
    let accepted = answers.iter().filter(|&&op| op == OP_RESPONSE).count();
    assert_eq!(accepted, MAX_CONNS, "{answers:?}");
    assert!(
        answers[MAX_CONNS..].iter().all(|&op| op == OP_RST),
        "{answers:?}"
    );
    // The guest closes one: the next request is taken.
    guest.send(
        &tx,
        Hdr {
            op: OP_RST,
            ..request(40_000)
        },
        b"",
    );
    guest.send(&tx, request(50_000), b"");
    guest.post_rx(&rx);
    let (h, _) = guest.recv(&rx);
    assert_eq!((h.op, h.dst_port), (OP_RESPONSE, 50_000));
    dev.shutdown();
}

/// A host service that accepts nothing (its backlog full) must not stall
/// the device thread in `connect`: the guest's requests are answered, by
/// a reset, at once, and other traffic goes on.
#[test]
fn a_full_listener_backlog_never_blocks_the_device_thread() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), LEN);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), LEN);
    let ev = MockSplitQueue::create(&mem, GuestAddress(EVQ), LEN);
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(format!("{}_1026", uds.display()).as_str()).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(1).unwrap()).unwrap();
    let (mut dev, mut guest, _irq) = start(&mem, [&rx, &tx, &ev], &uds);
    let mut answers = Vec::new();
    for port in 0..8u32 {
        guest.send(
            &tx,
            Hdr {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: 41_000 + port,
                dst_port: 1026,
                op: OP_REQUEST,
                buf_alloc: 4096,
                ..Hdr::default()
            },
            b"",
        );
        guest.post_rx(&rx);
        // `recv` fails the test if the device does not answer in 5 s.
        answers.push(guest.recv(&rx).0.op);
    }
    assert!(answers.contains(&OP_RST), "{answers:?}");
    // The device still serves host clients.
    let mut c = UnixStream::connect(&uds).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    guest.post_rx(&rx);
    let (req, _) = guest.recv(&rx);
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 1024));
    drop(fd);
    dev.shutdown();
}
