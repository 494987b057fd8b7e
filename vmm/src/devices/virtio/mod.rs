//! virtio-mmio transport and virtio devices (virtio 1.x, modern only).

pub mod block;
pub mod device;
pub mod mmio;

pub use device::{ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice};
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod test_driver;
pub mod vsock;
pub mod worker;

pub use block::{Block, BlockError, BlockHandle};
pub use mmio::MmioTransport;
pub use rng::Rng;
