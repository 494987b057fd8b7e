//! virtio-net (device type 1) backed by a host tap device.
//!
//! Two queues (rx, tx); the 12-byte `virtio_net_hdr_v1` goes through the
//! tap (`IFF_VNET_HDR`). No offload is offered to the guest and none is
//! enabled on the tap, so the kernel never hands us GSO frames, and a guest
//! tx header that asks for a checksum or segmentation offload is refused
//! before it reaches the host's GSO paths (the others are zeroed).

pub mod device;
pub mod tap;

pub use device::{Net, NetConfig, NetError, NetMetrics, TapSource};
pub use tap::{Tap, TapError};

/// Virtio device ID of a network card.
pub const TYPE_NET: u32 = 1;
/// `VIRTIO_NET_F_MAC`: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1` (`num_buffers` included, as VERSION_1 requires).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame the tap hands us without offloads (64 KiB MTU plus
/// the link header), header included: the size of our bounce buffers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65535 + 14;
/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (host to guest).
pub const RX_INDEX: usize = 0;
/// Index of the transmit queue (guest to host).
pub const TX_INDEX: usize = 1;

#[cfg(test)]
mod packet_socket;
#[cfg(test)]
pub(crate) mod test_utils;
