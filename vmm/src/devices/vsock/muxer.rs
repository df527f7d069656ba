//! The connection multiplexer: the device thread's epoll loop. It accepts
//! host clients (`CONNECT <port>\n`), bridges guest connections to
//! `<uds>_<port>`, moves data both ways within the virtio-vsock credit
//! scheme, and bounds what a guest can make it queue.

use super::connection::{Conn, Key, Pending, State};
use super::packet::{
    self, BUF_ALLOC, Credit, HOST_CID, MAX_CONNS, MAX_PKT_DATA, MAX_RX_PENDING, OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, OutPkt, TYPE_STREAM,
};
use crate::devices::virtio_mmio::{Interrupt, VirtioError};
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const T_STOP: u64 = 0;
const T_RX: u64 = 1;
const T_TX: u64 = 2;
const T_EVQ: u64 = 3;
const T_LISTENER: u64 = 4;
const T_STREAM0: u64 = 1 << 32;

/// The device thread: one epoll loop over the queue eventfds, the
/// listener and every stream; it owns the queues once activated.
pub(super) struct Muxer {
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

impl Muxer {
    /// The muxer for activated queues; registers every fd with a fresh
    /// epoll.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemoryMmap,
        (rxq, txq): (Queue, Queue),
        interrupt: Interrupt,
        (rx_evt, tx_evt, ev_evt): (EventFd, EventFd, EventFd),
        listener: UnixListener,
        stop: EventFd,
        guest_cid: u64,
        uds_path: PathBuf,
    ) -> Result<Self, VirtioError> {
        let epoll = crate::devices::virtio_mmio::epoll_for(&[
            (stop.as_raw_fd(), T_STOP),
            (rx_evt.as_raw_fd(), T_RX),
            (tx_evt.as_raw_fd(), T_TX),
            (ev_evt.as_raw_fd(), T_EVQ),
            (listener.as_raw_fd(), T_LISTENER),
        ])?;
        Ok(Self {
            mem,
            rxq,
            txq,
            interrupt,
            guest_cid,
            uds_path,
            epoll,
            listener,
            rx_evt,
            tx_evt,
            ev_evt,
            _stop: stop,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_token: HashMap::new(),
            rx_pending: VecDeque::new(),
            next_token: T_STREAM0,
            next_host_port: 1 << 30,
        })
    }

    /// Serve until the stop eventfd fires.
    pub fn run(&mut self) {
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
        if self.conns.len() >= MAX_CONNS {
            let mut s = p.stream;
            let _ = s.write_all(b"ERROR too many connections\n");
            return;
        }
        self.next_host_port = self.next_host_port.wrapping_add(1).max(1 << 30);
        let key = (self.next_host_port, guest_port);
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Conn::new(
                p.stream,
                token,
                State::Connecting,
                (0, 0),
                rest.as_bytes().to_vec(),
            ),
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
        let (packets, used) = packet::drain_tx(&self.mem, &mut self.txq);
        for p in packets {
            if p.dst_cid != HOST_CID || p.ty != TYPE_STREAM {
                continue;
            }
            self.handle_guest_packet(
                (p.dst_port, p.src_port),
                p.op,
                p.flags,
                p.buf_alloc,
                p.fwd_cnt,
                p.data,
            );
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
    /// Refused (reset) past [`MAX_CONNS`] connections, or when the host
    /// side does not take it at once: the connect never blocks this
    /// thread, whatever the listener's backlog.
    fn guest_connect(&mut self, key: Key, buf_alloc: u32, fwd_cnt: u32) {
        // A second REQUEST on a live key replaces that connection.
        self.close(key);
        if self.conns.len() >= MAX_CONNS {
            tracing::warn!(
                host_port = key.0,
                guest_port = key.1,
                open = self.conns.len(),
                "vsock: the guest opened too many connections; refused"
            );
            self.send(key, OP_RST, 0, Vec::new());
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds_path.display(), key.0));
        let Ok(stream) = connect_nonblocking(&path) else {
            self.send(key, OP_RST, 0, Vec::new());
            return;
        };
        let token = self.token();
        self.by_token.insert(token, key);
        self.conns.insert(
            key,
            Conn::new(
                stream,
                token,
                State::Established,
                (buf_alloc, fwd_cnt),
                Vec::new(),
            ),
        );
        self.send(key, OP_RESPONSE, 0, Vec::new());
        self.update_interest(key);
    }

    /// Move queued packets into the guest's rx buffers.
    fn flush_rx(&mut self) {
        let mut used = false;
        while let Some((key, pkt)) = self.rx_pending.pop_front() {
            let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
            let is_credit_update = pkt.op == OP_CREDIT_UPDATE;
            let credit = Credit {
                buf_alloc: BUF_ALLOC,
                fwd_cnt,
            };
            match packet::deliver(&self.mem, &mut self.rxq, self.guest_cid, pkt, credit) {
                Err(pkt) => {
                    // No buffer posted: it waits at the front.
                    self.rx_pending.push_front((key, pkt));
                    break;
                }
                Ok(rest) => {
                    used = true;
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.fwd_cnt_sent = fwd_cnt;
                        if is_credit_update {
                            c.credit_queued = false;
                        }
                    }
                    if let Some(rest) = rest {
                        self.rx_pending.push_front((key, rest));
                    }
                }
            }
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

/// A non-blocking connection to the Unix socket at `path`: refused at once
/// (`EAGAIN`) when its listener's backlog is full, never waited for.
fn connect_nonblocking(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}
