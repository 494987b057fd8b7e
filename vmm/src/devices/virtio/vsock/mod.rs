//! virtio-vsock (device type 19) implemented in user space, bridged to host
//! unix sockets the way Firecracker's "hybrid vsock" is.
//!
//! Three queues (rx, tx, event); the config space is the guest's CID. Only
//! stream sockets are served; the event queue is never used, as moat never
//! migrates a VM.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockError};

/// Virtio device ID of a socket device.
pub const TYPE_VSOCK: u32 = 19;
/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_INDEX: usize = 1;
/// Index of the event queue (never used).
pub const EVT_INDEX: usize = 2;
