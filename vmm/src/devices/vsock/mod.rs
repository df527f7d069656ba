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
//!
//! Rooms: [`device`] (the virtio side: config, activation, shutdown),
//! [`muxer`] (the epoll loop and the protocol), [`connection`] (one bridged
//! stream and its credit), [`packet`] (the wire format on the queues).

mod connection;
mod device;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod muxer;
mod packet;

pub use device::Vsock;
pub use packet::HOST_CID;

#[cfg(test)]
mod tests;
