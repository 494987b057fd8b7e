//! virtio-blk (device type 2) over a raw host file.
//!
//! One request queue served by a worker thread with positioned reads and
//! writes straight into guest memory. The backing file can be replaced (or a
//! spare, empty slot filled) while the guest runs, through a [`BlockHandle`].

pub mod device;
pub mod request;

pub use device::{Block, BlockError, BlockHandle, BlockSource};

/// Virtio device ID of a block device.
pub const TYPE_BLOCK: u32 = 2;

/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in the config space is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in the config space is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`: the device understands flush requests.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write to the disk.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`: make earlier writes durable.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`: read the device's id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status bytes.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`: unknown request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk protocol, whatever the host's.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`]: a sector number shifted left by this is a byte offset.
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the ID string GET_ID returns (zero-padded).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request: a chain of the whole queue, less the
/// header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
