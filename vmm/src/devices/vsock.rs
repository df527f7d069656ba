//! virtio-vsock in userspace, with a host-side Unix socket ("hybrid vsock").
//!
//! * Host → guest: connect to the Unix socket at `uds_path`, write
//!   `CONNECT <port>\n`; when the guest accepts, the device answers
//!   `OK <host port>\n` and the stream carries the connection. When nothing
//!   listens on that guest port (the guest RSTs) the Unix stream is closed,
//!   so a client retries until the guest is ready.
//! * Guest → host: a guest connection to host port `P` (CID 2) is bridged to
//!   the Unix socket `<uds_path>_<P>` if something listens there; otherwise
//!   the guest gets a reset.
//!
//! One thread per device runs an epoll loop over the queue eventfds, the
//! listener and every stream. Flow control follows the virtio-vsock credit
//! scheme: we never send more than the guest's advertised buffer space, and
//! we advertise `BUF_ALLOC` and our forwarded count on every packet.
//!
//! **Invariants:** the thread owns the queues once activated; shutting the
//! device down stops and joins it and closes every stream and the listener.

use super::virtio_mmio::{Activation, DeviceWorker, Interrupt, VirtioDevice, VirtioError};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The host's CID.
pub const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// Our receive buffer per connection, as advertised to the guest.
const BUF_ALLOC: u32 = 256 * 1024;
/// Packets waiting for the guest's receive buffers, at most (see `send`).
const MAX_RX_PENDING: usize = 4096;
/// Largest payload we accept from or put into one packet.
const MAX_PKT_DATA: u32 = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

const T_STOP: u64 = 0;
const T_RX: u64 = 1;
const T_TX: u64 = 2;
const T_EVQ: u64 = 3;
const T_LISTENER: u64 = 4;
const T_STREAM0: u64 = 1 << 32;

/// The vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Option<UnixListener>,
    worker: Option<DeviceWorker>,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening on `uds_path` (created now,
    /// so host clients can connect before the guest is up).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VirtioError> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path).map_err(|e| {
            VirtioError::Activate(format!("vsock socket {}: {e}", uds_path.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VirtioError::Activate(e.to_string()))?;
        Ok(Self {
            guest_cid,
            uds_path,
            listener: Some(listener),
            worker: None,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK
    }
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, a: Activation) -> Result<(), VirtioError> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| VirtioError::Activate("activated twice".into()))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventFd)?;
        let stop2 = stop.try_clone().map_err(VirtioError::EventFd)?;
        let mut queues = a.queues.into_iter();
        let mut evts = a.queue_evts.into_iter();
        let (Some(rxq), Some(txq), Some(_evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(VirtioError::Activate("vsock needs three queues".into()));
        };
        let (Some(rx_evt), Some(tx_evt), Some(ev_evt)) = (evts.next(), evts.next(), evts.next())
        else {
            return Err(VirtioError::Activate(
                "vsock needs three queue eventfds".into(),
            ));
        };
        let epoll = Epoll::new().map_err(|e| VirtioError::Activate(format!("epoll: {e}")))?;
        for (fd, token) in [
            (stop2.as_raw_fd(), T_STOP),
            (rx_evt.as_raw_fd(), T_RX),
            (tx_evt.as_raw_fd(), T_TX),
            (ev_evt.as_raw_fd(), T_EVQ),
            (listener.as_raw_fd(), T_LISTENER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| VirtioError::Activate(format!("epoll add: {e}")))?;
        }
        let mut worker = Worker {
            mem: a.mem,
            rxq,
            txq,
            interrupt: a.interrupt,
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            epoll,
            listener,
            rx_evt,
            tx_evt,
            ev_evt,
            _stop: stop2,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_token: HashMap::new(),
            rx_pending: VecDeque::new(),
            next_token: T_STREAM0,
            next_host_port: 1 << 30,
        };
        let t = std::thread::Builder::new()
            .name("airlock-vsock".into())
            .stack_size(crate::devices::THREAD_STACK)
            .spawn(move || worker.run())
            .map_err(|e| VirtioError::Activate(format!("thread: {e}")))?;
        self.worker = Some(DeviceWorker::new(stop, t));
        Ok(())
    }

    fn shutdown(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.listener = None;
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A packet to put on the guest's rx queue.
struct OutPkt {
    src_port: u32,
    dst_port: u32,
    op: u16,
    flags: u32,
    data: Vec<u8>,
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum State {
    /// We sent REQUEST (host-initiated) and wait for RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    /// Guest's buffer space and forwarded count (its credit to us).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    tx_cnt: u32,
    /// Bytes from the guest written to the stream.
    fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    fwd_cnt_sent: u32,
    /// Data from the guest not yet written to the stream (while
    /// connecting: bytes the host client sent after its CONNECT line).
    to_stream: Vec<u8>,
    /// Whether the stream is registered with epoll.
    reading: bool,
    /// Bytes at the front of `to_stream` that are ours (the `OK` line), not
    /// the guest's: they do not count as forwarded.
    local_bytes: usize,
    /// A CREDIT_UPDATE waits in `rx_pending`: another would say nothing new
    /// (the credit fields are filled in when a packet is delivered).
    credit_queued: bool,
}

impl Conn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// (host port, guest port).
type Key = (u32, u32);

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Interrupt,
    guest_cid: u64,
    uds_path: PathBuf,
    epoll: Epoll,
    listener: UnixListener,
    rx_evt: EventFd,
    tx_evt: EventFd,
    ev_evt: EventFd,
    /// Kept open while registered with epoll.
    _stop: EventFd,
    pending: HashMap<u64, Pending>,
    conns: HashMap<Key, Conn>,
    by_token: HashMap<u64, Key>,
    rx_pending: VecDeque<(Key, OutPkt)>,
    next_token: u64,
    next_host_port: u32,
}

impl Worker {
    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(100, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock epoll failed; the device stops");
                    return;
                }
            };
            if n == 0 {
                // No event for 100 ms: look at the tx queue anyway, so a
                // missed notification costs latency, never a stall.
                self.process_tx();
            }
            for ev in &events[..n] {
                tracing::trace!(token = ev.data(), events = ev.events(), "vsock event");
                match ev.data() {
                    T_STOP => return,
                    T_RX => {
                        let _ = self.rx_evt.read();
                    }
                    T_TX => {
                        let _ = self.tx_evt.read();
                        self.process_tx();
                    }
                    T_EVQ => {
                        let _ = self.ev_evt.read();
                    }
                    T_LISTENER => self.accept(),
                    token => {
                        let set = ev.event_set();
                        if self.pending.contains_key(&token) {
                            self.read_connect_line(token);
                        } else if let Some(&key) = self.by_token.get(&token) {
                            if set.contains(EventSet::OUT) {
                                self.flush_to_stream(key);
                            }
                            if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                                self.read_stream(key);
                            }
                        }
                    }
                }
            }
            self.flush_rx();
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn watch(&self, fd: i32, token: u64, set: EventSet, op: ControlOperation) {
        if let Err(e) = self.epoll.ctl(op, fd, EpollEvent::new(set, token)) {
            tracing::warn!(error = %e, "vsock epoll update failed");
        }
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.token();
            self.watch(
                stream.as_raw_fd(),
                token,
                EventSet::IN,
                ControlOperation::Add,
            );
            self.pending.insert(
                token,
                Pending {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Read `CONNECT <port>\n` from a new host client.
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; 64];
        let done = loop {
            match p.stream.read(&mut buf) {
                Ok(0) => break Err(()),
                Ok(n) => {
                    p.line.extend_from_slice(&buf[..n]);
                    if p.line.contains(&b'\n') {
                        break Ok(());
                    }
                    if p.line.len() > 64 {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break Err(()),
            }
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        self.watch(
            p.stream.as_raw_fd(),
            token,
            EventSet::empty(),
            ControlOperation::Delete,
        );
        if done.is_err() {
            return;
        }
        let text = String::from_utf8_lossy(&p.line);
        let (line, rest) = text.split_once('\n').unwrap_or((&text, ""));
        let port = line
            .strip_prefix("CONNECT ")
            .and_then(|n| n.trim().parse::<u32>().ok());
        let Some(guest_port) = port else {
            let mut s = p.stream;
            let _ = s.write_all(b"ERROR expected CONNECT <port>\n");
            return;
        };
        self.next_host_port = self.next_host_port.wrapping_add(1).max(1 << 30);
        let key = (self.next_host_port, guest_port);
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                stream: p.stream,
                token,
                state: State::Connecting,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_cnt_sent: 0,
                to_stream: rest.as_bytes().to_vec(),
                reading: false,
                local_bytes: 0,
                credit_queued: false,
            },
        );
        self.send(key, OP_REQUEST, 0, Vec::new());
    }

    fn send(&mut self, key: Key, op: u16, flags: u32, data: Vec<u8>) {
        // A guest that posts no receive buffers while provoking control
        // packets (credit requests, say) must not grow this queue without
        // end: past the cap, control packets are dropped (data is bounded
        // by the guest's own credit).
        if op == OP_CREDIT_UPDATE
            && let Some(c) = self.conns.get_mut(&key)
        {
            if c.credit_queued {
                return;
            }
            c.credit_queued = true;
        }
        if data.is_empty() && self.rx_pending.len() >= MAX_RX_PENDING {
            tracing::warn!(
                op,
                "vsock: the guest takes no packets; control packet dropped"
            );
            return;
        }
        tracing::debug!(
            host_port = key.0,
            guest_port = key.1,
            op,
            flags,
            len = data.len(),
            "vsock to guest"
        );
        self.rx_pending.push_back((
            key,
            OutPkt {
                src_port: key.0,
                dst_port: key.1,
                op,
                flags,
                data,
            },
        ));
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.by_token.remove(&c.token);
            if c.reading {
                self.watch(
                    c.stream.as_raw_fd(),
                    c.token,
                    EventSet::empty(),
                    ControlOperation::Delete,
                );
            }
        }
    }

    /// Keep the stream's epoll interest in line with what we can do: read
    /// when the guest has credit for us, write when data is waiting.
    fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let mut set = EventSet::empty();
        if c.state == State::Established && c.credit() > 0 {
            set |= EventSet::IN;
        }
        if !c.to_stream.is_empty() {
            set |= EventSet::OUT;
        }
        let registered = c.reading;
        let (fd, token) = (c.stream.as_raw_fd(), c.token);
        if set.is_empty() {
            if registered {
                self.watch(fd, token, set, ControlOperation::Delete);
            }
        } else {
            let op = if registered {
                ControlOperation::Modify
            } else {
                ControlOperation::Add
            };
            self.watch(fd, token, set, op);
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.reading = !set.is_empty();
        }
    }

    fn read_stream(&mut self, key: Key) {
        let mut packets = Vec::new();
        let mut eof = false;
        if let Some(c) = self.conns.get_mut(&key) {
            while c.state == State::Established && c.credit() > 0 {
                let want = c.credit().min(MAX_PKT_DATA) as usize;
                let mut buf = vec![0u8; want];
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                        packets.push(buf);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        eof = true;
                        break;
                    }
                }
            }
            tracing::debug!(
                credit = c.credit(),
                tx_cnt = c.tx_cnt,
                eof,
                "vsock stream read"
            );
        }
        for p in packets {
            self.send(key, OP_RW, 0, p);
        }
        if eof {
            // The host side closed: tell the guest we will neither send nor receive.
            self.send(key, OP_SHUTDOWN, 3, Vec::new());
            if let Some(c) = self.conns.get(&key) {
                let (fd, token, reg) = (c.stream.as_raw_fd(), c.token, c.reading);
                if reg {
                    self.watch(fd, token, EventSet::empty(), ControlOperation::Delete);
                }
            }
            if let Some(c) = self.conns.get_mut(&key) {
                c.reading = false;
                c.peer_buf_alloc = 0; // no more reads
            }
        } else {
            self.update_interest(key);
        }
    }

    fn flush_to_stream(&mut self, key: Key) {
        let mut credit_update = false;
        let mut broken = false;
        if let Some(c) = self.conns.get_mut(&key) {
            while !c.to_stream.is_empty() {
                match c.stream.write(&c.to_stream) {
                    Ok(n) => {
                        c.to_stream.drain(..n);
                        let ours = n.min(c.local_bytes);
                        c.local_bytes -= ours;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add((n - ours) as u32);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if c.fwd_cnt.wrapping_sub(c.fwd_cnt_sent) >= BUF_ALLOC / 2 {
                credit_update = true;
            }
        }
        if broken {
            self.send(key, OP_RST, 0, Vec::new());
            self.close(key);
            return;
        }
        if credit_update {
            self.send(key, OP_CREDIT_UPDATE, 0, Vec::new());
        }
        self.update_interest(key);
    }

    fn process_tx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        while let Some(mut chain) = self.txq.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            tracing::trace!(head, "vsock tx chain");
            let parsed =
                VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA).map(|p| {
                    let mut data = vec![0u8; p.len() as usize];
                    if let Some(s) = p.data_slice() {
                        let _ = s.copy_to(&mut data);
                    }
                    (
                        p.dst_cid(),
                        p.src_port(),
                        p.dst_port(),
                        p.op(),
                        p.flags(),
                        p.buf_alloc(),
                        p.fwd_cnt(),
                        p.type_(),
                        data,
                    )
                });
            if let Err(e) = self.txq.add_used(&mem, head, 0) {
                tracing::warn!(error = %e, "vsock tx queue");
            }
            used = true;
            match parsed {
                Ok((dst_cid, src_port, dst_port, op, flags, buf_alloc, fwd_cnt, ty, data)) => {
                    if dst_cid != HOST_CID || ty != TYPE_STREAM {
                        continue;
                    }
                    self.handle_guest_packet(
                        (dst_port, src_port),
                        op,
                        flags,
                        buf_alloc,
                        fwd_cnt,
                        data,
                    );
                }
                Err(e) => tracing::warn!(error = ?e, "malformed vsock packet from the guest"),
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_guest_packet(
        &mut self,
        key: Key,
        op: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        data: Vec<u8>,
    ) {
        tracing::debug!(
            host_port = key.0,
            guest_port = key.1,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
            len = data.len(),
            "vsock from guest"
        );
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = buf_alloc;
            c.peer_fwd_cnt = fwd_cnt;
        }
        match op {
            OP_REQUEST => self.guest_connect(key, buf_alloc, fwd_cnt),
            OP_RESPONSE => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.send(key, OP_RST, 0, Vec::new());
                    return;
                };
                if c.state == State::Connecting {
                    c.state = State::Established;
                    // Linux applies the credit fields of our REQUEST to its
                    // listening socket, not to the new connection: tell the
                    // connection our buffer space, or it can never send.
                    self.send(key, OP_CREDIT_UPDATE, 0, Vec::new());
                    let Some(c) = self.conns.get_mut(&key) else {
                        return;
                    };
                    // Bytes the client wrote right after its CONNECT line are for the guest.
                    let early =
                        std::mem::replace(&mut c.to_stream, format!("OK {}\n", key.0).into_bytes());
                    c.local_bytes = c.to_stream.len();
                    if !early.is_empty() {
                        c.tx_cnt = c.tx_cnt.wrapping_add(early.len() as u32);
                        self.send(key, OP_RW, 0, early);
                    }
                    self.flush_to_stream(key);
                    self.read_stream(key);
                }
            }
            OP_RW => {
                if let Some(c) = self.conns.get_mut(&key) {
                    // The guest may have at most the BUF_ALLOC we advertise
                    // in flight (received, not yet forwarded). More is a
                    // guest ignoring its credit to grow our buffer: reset.
                    let unforwarded = c.to_stream.len() - c.local_bytes;
                    if unforwarded + data.len() > BUF_ALLOC as usize {
                        tracing::warn!(
                            host_port = key.0,
                            guest_port = key.1,
                            unforwarded,
                            len = data.len(),
                            "vsock: the guest sent past its credit; connection reset"
                        );
                        self.send(key, OP_RST, 0, Vec::new());
                        self.close(key);
                        return;
                    }
                    c.to_stream.extend_from_slice(&data);
                    self.flush_to_stream(key);
                } else {
                    self.send(key, OP_RST, 0, Vec::new());
                }
            }
            OP_CREDIT_UPDATE => self.read_stream(key),
            OP_CREDIT_REQUEST if self.conns.contains_key(&key) => {
                self.send(key, OP_CREDIT_UPDATE, 0, Vec::new());
            }
            OP_CREDIT_REQUEST => {}
            OP_SHUTDOWN => {
                let _ = flags;
                if let Some(c) = self.conns.get_mut(&key) {
                    // Deliver what is buffered, then close both ways.
                    let _ = c.stream.set_nonblocking(false);
                    let _ = c.stream.write_all(&c.to_stream);
                    c.to_stream.clear();
                }
                self.send(key, OP_RST, 0, Vec::new());
                self.close(key);
            }
            OP_RST => self.close(key),
            _ => {}
        }
    }

    /// The guest connects to host port `key.0`: bridge to `<uds>_<port>`.
    fn guest_connect(&mut self, key: Key, buf_alloc: u32, fwd_cnt: u32) {
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let stream = match UnixStream::connect(&path) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.send(key, OP_RST, 0, Vec::new());
                return;
            }
        };
        let token = self.token();
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Conn {
                stream,
                token,
                state: State::Established,
                peer_buf_alloc: buf_alloc,
                peer_fwd_cnt: fwd_cnt,
                tx_cnt: 0,
                fwd_cnt: 0,
                fwd_cnt_sent: 0,
                to_stream: Vec::new(),
                reading: false,
                local_bytes: 0,
                credit_queued: false,
            },
        );
        self.send(key, OP_RESPONSE, 0, Vec::new());
        self.update_interest(key);
    }

    /// Move queued packets into the guest's rx buffers.
    fn flush_rx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        while let Some((key, mut pkt)) = self.rx_pending.pop_front() {
            let Some(mut chain) = self.rxq.pop_descriptor_chain(&mem) else {
                self.rx_pending.push_front((key, pkt));
                break;
            };
            let head = chain.head_index();
            let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
                Some(c) => {
                    c.fwd_cnt_sent = c.fwd_cnt;
                    if pkt.op == OP_CREDIT_UPDATE {
                        c.credit_queued = false;
                    }
                    (BUF_ALLOC, c.fwd_cnt)
                }
                None => (BUF_ALLOC, 0),
            };
            let written = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_PKT_DATA) {
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
                        .set_dst_cid(self.guest_cid)
                        .set_src_port(pkt.src_port)
                        .set_dst_port(pkt.dst_port)
                        .set_type(TYPE_STREAM)
                        .set_op(pkt.op)
                        .set_flags(pkt.flags)
                        .set_buf_alloc(buf_alloc)
                        .set_fwd_cnt(fwd_cnt)
                        .set_len(pkt.data.len() as u32);
                    let n = p.header_slice().len() + pkt.data.len();
                    if let Some(rest) = rest {
                        pkt.data = rest;
                        self.rx_pending.push_front((key, pkt));
                    }
                    n as u32
                }
                Err(e) => {
                    tracing::warn!(error = ?e, "unusable vsock rx buffer from the guest");
                    0
                }
            };
            if let Err(e) = self.rxq.add_used(&mem, head, written) {
                tracing::warn!(error = %e, "vsock rx queue");
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The device against a simulated guest driver: queues in real guest
    //! memory (virtio-queue's mock rings), packets written and read the way
    //! Linux's virtio_transport does, and a real host client on the socket.

    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

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

    fn used_elem(
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<'_, GuestMemoryMmap>,
        i: u16,
    ) -> (u32, u32) {
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
                    RawDescriptor::from(Descriptor::new(
                        buf,
                        44,
                        VRING_DESC_F_NEXT as u16,
                        slot + 1,
                    )),
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
        let mut dev = Vsock::new(3, uds.to_path_buf()).unwrap();
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
            interrupt: Interrupt::new(irq.clone()),
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

        dev.shutdown();
        assert!(!uds.exists(), "the socket is removed at shutdown");
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
}
