//! Guest-visible devices: legacy PC devices on port I/O and virtio-mmio.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
