//! The contract between the virtio-mmio transport and each virtio device.
//!
//! The transport (`mmio.rs`) owns the registers the guest programs: feature
//! negotiation, queue addresses, status. Once the driver sets DRIVER_OK it
//! calls [`VirtioDevice::activate`] with the configured queues, one eventfd
//! per queue (registered with KVM as an ioeventfd on QUEUE_NOTIFY, so a
//! notify never exits to user space) and an [`Interrupt`]. The device then
//! runs its own worker thread (`worker.rs`, as Cloud Hypervisor does), which
//! it stops and joins on reset and on drop, so no thread outlives the VM.
//! A worker that finds its rings corrupt or a descriptor chain malformed
//! asks for a reset through [`Interrupt::signal_needs_reset`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
/// The device's configuration space changed (or it needs a reset).
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
    /// Set by a worker that stopped on a corrupt ring or a malformed chain;
    /// the transport shows it as DEVICE_NEEDS_RESET until the driver resets
    /// the device.
    needs_reset: AtomicBool,
}

impl Interrupt {
    /// An interrupt that sets bits of `status`, the transport's
    /// InterruptStatus, and signals `irqfd`.
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self {
            status,
            irqfd,
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The ConfigGeneration register's value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Tells the driver that a used ring has new entries.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(INT_USED_RING)
    }

    /// Tells the driver that the configuration space changed, after bumping the
    /// ConfigGeneration.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INT_CONFIG_CHANGE)
    }

    /// Marks the device DEVICE_NEEDS_RESET and tells the driver with a
    /// config-change interrupt.
    pub fn signal_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    /// Whether a worker asked for a reset since the last one.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Takes up the InterruptStatus and ConfigGeneration of a template's
    /// device (the guest's interrupt controller state comes with the VM's).
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// Driver reset: no interrupt pending, no reset asked for.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
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

/// Why a device could not start at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured another number of queues than the device has.
    #[error("Expected {expected} queues, the driver configured {got}")]
    QueueCount {
        /// The device's number of queues.
        expected: usize,
        /// The number the driver configured.
        got: usize,
    },
    /// The worker thread could not be spawned.
    #[error("Cannot start the device worker thread")]
    Thread(#[source] io::Error),
    /// The device's host side (tap, sockets, epoll) could not be set up.
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
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Becomes readable when the guest notifies the queue.
    pub notify: EventFd,
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
    /// The seccomp filter the device's worker threads install when they
    /// start (on top of the event thread's, which they inherit).
    fn set_seccomp_filter(&mut self, filter: seccompiler::BpfProgram);
    /// Starts serving the queues: starts the device's worker thread. Called
    /// on the VMM's event thread.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops serving (driver reset): the worker is stopped and joined.
    /// Returns the device to its pre-activation state.
    fn reset(&mut self);
    /// The next activation resumes a template's device in a new VM, whose
    /// guest driver believes it has been running all along: a device whose
    /// host side cannot go on as it was (open connections, a disk of
    /// another size) tells the driver once it runs.
    fn restoring(&mut self) {}
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
