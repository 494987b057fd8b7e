//! virtio-rng (device type 4): entropy from the host's `getrandom`.

pub mod device;

pub use device::Rng;

/// Virtio device ID of an entropy source.
pub const TYPE_RNG: u32 = 4;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request, so one greedy buffer cannot keep the
/// worker (and the host's entropy pool) busy for long.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;
