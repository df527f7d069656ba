//! One bridged connection (a host Unix stream ⇄ a guest vsock port) and
//! its credit accounting, and a host client still sending its `CONNECT`
//! line.

use std::os::unix::net::UnixStream;

#[derive(PartialEq, Eq, Clone, Copy)]
pub(super) enum State {
    /// We sent REQUEST (host-initiated) and wait for RESPONSE.
    Connecting,
    Established,
}

pub(super) struct Conn {
    pub stream: UnixStream,
    pub token: u64,
    pub state: State,
    /// Guest's buffer space and forwarded count (its credit to us).
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we sent to the guest.
    pub tx_cnt: u32,
    /// Bytes from the guest written to the stream.
    pub fwd_cnt: u32,
    /// fwd_cnt last told to the guest.
    pub fwd_cnt_sent: u32,
    /// Data from the guest not yet written to the stream (while
    /// connecting: bytes the host client sent after its CONNECT line).
    pub to_stream: Vec<u8>,
    /// Whether the stream is registered with epoll.
    pub reading: bool,
    /// Bytes at the front of `to_stream` that are ours (the `OK` line), not
    /// the guest's: they do not count as forwarded.
    pub local_bytes: usize,
    /// A CREDIT_UPDATE waits in `rx_pending`: another would say nothing new
    /// (the credit fields are filled in when a packet is delivered).
    pub credit_queued: bool,
}

impl Conn {
    /// A connection on `stream` (epoll token `token`) in `state`, with the
    /// guest's credit so far and bytes already waiting for the stream.
    pub fn new(
        stream: UnixStream,
        token: u64,
        state: State,
        peer: (u32, u32),
        to_stream: Vec<u8>,
    ) -> Self {
        Self {
            stream,
            token,
            state,
            peer_buf_alloc: peer.0,
            peer_fwd_cnt: peer.1,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            to_stream,
            reading: false,
            local_bytes: 0,
            credit_queued: false,
        }
    }

    /// How many bytes the guest can take from us now.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host client that has not finished its `CONNECT <port>\n` line.
pub(super) struct Pending {
    pub stream: UnixStream,
    pub line: Vec<u8>,
}

/// (host port, guest port).
pub(super) type Key = (u32, u32);
