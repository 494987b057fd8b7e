//! The contract between the virtio-mmio transport and each virtio device.
//!
//! The transport (`mmio.rs`) owns the registers the guest programs: feature
//! negotiation, queue addresses, status. Once the driver sets DRIVER_OK it
//! calls [`VirtioDevice::activate`] with the configured queues, one eventfd
//! per queue (registered with KVM as an ioeventfd on QUEUE_NOTIFY, so a
//! notify never exits to user space) and an [`Interrupt`]. The device then
//! runs its own worker thread (as Cloud Hypervisor does), which it stops
//! and joins on reset and on drop, so no thread outlives the VM.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::worker::WorkerThread;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// `VIRTIO_F_VERSION_1`: moat only speaks modern virtio.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_EVENT_IDX`
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Guest memory as the devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Raises the device's interrupt line: sets a bit of the InterruptStatus
/// register the transport exposes and pulses the irqfd bound to the GSI.
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
    /// ConfigGeneration: bumped before every config-change interrupt, so a
    /// driver that reads a multi-word field across a change sees it and retries.
    config_generation: AtomicU32,
}

impl Interrupt {
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self {
            status,
            irqfd,
            config_generation: AtomicU32::new(0),
        }
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_USED_RING)
    }

    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INT_CONFIG_CHANGE)
    }

    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The status word shared with the transport (tests read it).
    pub fn status(&self) -> &Arc<AtomicU32> {
        &self.status
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("Expected {expected} queues, the driver configured {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("Cannot start the device worker thread")]
    Thread(#[source] io::Error),
    #[error("Cannot set up the device backend")]
    Backend(#[source] io::Error),
}

/// Serves a read of `data.len()` bytes at `offset` from a device's
/// configuration space `config`; what lies past its end reads as zeroes.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|off| config.get(off..))
    {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The `N` queues a device of `N` queues expects at activation, or the
/// error that says how many the driver configured instead.
pub fn take_queues<const N: usize>(
    queues: Vec<ActivatedQueue>,
) -> Result<[ActivatedQueue; N], ActivateError> {
    let got = queues.len();
    queues
        .try_into()
        .map_err(|_| ActivateError::QueueCount { expected: N, got })
}

/// One queue handed over at activation, with the eventfd KVM signals when
/// the guest writes the queue's index to QUEUE_NOTIFY.
pub struct ActivatedQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What every device keeps across activations: the features its driver
/// accepted and the worker thread serving its queues while it is active.
#[derive(Default)]
pub struct DeviceState {
    acked_features: u64,
    worker: Option<WorkerThread>,
}

impl DeviceState {
    /// Keeps the `features` the driver accepted out of those `offered`.
    pub fn ack_features(&mut self, offered: u64, features: u64) {
        self.acked_features = features & offered;
    }

    /// The first steps of every activation: takes the device's `N` queues,
    /// stops the worker of an earlier activation, and switches the queues
    /// to event-index notification if the driver accepted it.
    pub fn begin_activation<const N: usize>(
        &mut self,
        queues: Vec<ActivatedQueue>,
    ) -> Result<[ActivatedQueue; N], ActivateError> {
        let mut queues = take_queues::<N>(queues)?;
        self.stop_worker();
        let event_idx = self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        Ok(queues)
    }

    /// Keeps the worker that now serves the queues, until the next
    /// activation, reset or drop.
    pub fn set_worker(&mut self, worker: WorkerThread) {
        self.worker = Some(worker);
    }

    /// Whether a worker serves the queues.
    pub fn has_worker(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker, if any, and waits for it.
    pub fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Driver reset: no worker, no features.
    pub fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }
}

/// A virtio device behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (1 net, 2 block, 4 rng, 19 vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver, `VIRTIO_F_VERSION_1` included.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads from the device-specific configuration space. Reads past its end
    /// return zeroes.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space; most devices ignore them.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops serving (driver reset): the worker is stopped and joined.
    /// Returns the device to its pre-activation state.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        let mut one = [0u8; 1];
        read_config_bytes(&config, 1, &mut one);
        assert_eq!(one, [2]);
    }
}
