//! The virtio-mmio transport, modern register layout (version 2) only.
//!
//! The guest driver negotiates features, programs the queues and sets
//! DRIVER_OK through these registers, on a vCPU thread. DRIVER_OK only
//! posts an activation request: the VMM's event thread then calls
//! [`MmioTransport::activate_pending`], which hands the queues to the device
//! ([`VirtioDevice::activate`]) and so starts its worker thread. vCPU
//! threads thus never create threads or device backends, and their seccomp
//! filter need not allow it. Queue notifications normally
//! reach the device through KVM ioeventfds on [`NOTIFY_REG_OFFSET`] and never
//! get here; a notify that does (no ioeventfd, or a test) is forwarded to the
//! same eventfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use log::{error, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{
    ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;
use crate::logger::RateLimit;

mod state;
pub use state::{RestoreError, TransportState};

/// "virt", little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// "MOAT", little-endian.
pub const VENDOR_ID: u32 = 0x4d4f_4154;
/// Offset of QueueNotify in the window: where the VMM registers one KVM
/// ioeventfd per queue, with the queue index as datamatch.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 0x01;
/// The guest found a driver for the device.
pub const STATUS_DRIVER: u32 = 0x02;
/// The driver is ready: the device starts.
pub const STATUS_DRIVER_OK: u32 = 0x04;
/// The driver accepted the features it wrote; they can no longer change.
pub const STATUS_FEATURES_OK: u32 = 0x08;
/// Set by the device: it hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
/// Set by the driver: it gave up on the device.
pub const STATUS_FAILED: u32 = 0x80;

// Register offsets.
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// What the driver does wrong is logged at most [`RateLimit::BURST`] times
/// per window: a guest can write bad registers in a loop.
static GUEST_ERRORS: RateLimit = RateLimit::new();

macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if GUEST_ERRORS.allow() {
            warn!($($arg)*);
        }
    };
}

/// Why DRIVER_OK did not start the device.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A queue that is not ready comes before a ready one; holds its index.
    #[error("Queue {0} is not ready but a later one is")]
    QueueNotReady(usize),
    /// The driver's settings of a queue are invalid.
    #[error("Queue {index} is misconfigured")]
    QueueConfig {
        /// The queue's index.
        index: usize,
        /// What `virtio_queue` found wrong.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue's rings lie outside guest memory; holds its index.
    #[error("Queue {0} does not lie in guest memory")]
    QueueMemory(usize),
    /// A queue's notify eventfd could not be duplicated for the device; holds its index.
    #[error("Cannot duplicate the notify eventfd of queue {0}")]
    NotifyFd(usize, #[source] io::Error),
    /// The device's own activation failed.
    #[error("The device refused to start")]
    Device(#[source] ActivateError),
}

/// Queue registers as the driver wrote them; checked at activation.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    /// u32: a value too big for a queue size must fail activation, not wrap.
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// The virtio-queue state for the device, or why there is none.
    fn to_queue(self, index: usize, event_idx: bool) -> Result<Queue, ActivationError> {
        let config = |source| ActivationError::QueueConfig { index, source };
        let mut queue = Queue::new(self.max_size).map_err(config)?;
        let size =
            u16::try_from(self.size).map_err(|_| config(virtio_queue::Error::InvalidSize))?;
        queue.try_set_size(size).map_err(config)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(config)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(config)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(config)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        Ok(queue)
    }
}

/// Sets the low or high half of `reg`.
fn set_half(reg: &mut u64, high: bool, value: u32) {
    *reg = if high {
        (*reg & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*reg & !0xffff_ffff) | u64::from(value)
    };
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<QueueRegs>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    /// DRIVER_OK was written and the event thread has not activated yet.
    activation_pending: bool,
    /// Written on DRIVER_OK to wake the event thread.
    activate_evt: EventFd,
}

impl MmioTransport {
    /// Wraps `device`. `irqfd` is the eventfd the VMM registers with KVM for
    /// the device's GSI; one notify eventfd per queue is created here.
    /// `activate_evt` is written when the driver sets DRIVER_OK: the event
    /// thread watching it then calls [`MmioTransport::activate_pending`].
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: EventFd,
        activate_evt: EventFd,
    ) -> io::Result<MmioTransport> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueRegs::new(max))
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let interrupt = Arc::new(Interrupt::new(Arc::new(AtomicU32::new(0)), irqfd));
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            activation_pending: false,
            activate_evt,
        })
    }

    /// One eventfd per queue, in queue order: register each as a KVM
    /// ioeventfd at window base + [`NOTIFY_REG_OFFSET`] (4 bytes) with the
    /// queue index as datamatch.
    pub fn queue_notify_eventfds(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device behind this transport, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The interrupt the device raises (its InterruptStatus and irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device status register: DEVICE_NEEDS_RESET also when a worker
    /// stopped on a corrupt ring or a malformed chain.
    pub fn device_status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change between FEATURES_OK and DRIVER_OK only.
    fn queue_config_allowed(&self) -> bool {
        self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED) == STATUS_FEATURES_OK
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            guest_warn!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                self.status
            );
            return;
        }
        let Some(queue) = self.selected_queue() else {
            guest_warn!("virtio-mmio: queue register {offset:#x} written for a missing queue");
            return;
        };
        match offset {
            REG_QUEUE_NUM => queue.size = value,
            REG_QUEUE_READY => queue.ready = value == 1,
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                set_half(&mut queue.desc, offset == REG_QUEUE_DESC_HIGH, value)
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                set_half(&mut queue.driver, offset == REG_QUEUE_DRIVER_HIGH, value)
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                set_half(&mut queue.device, offset == REG_QUEUE_DEVICE_HIGH, value)
            }
            _ => unreachable!("not a queue register: {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            guest_warn!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, false, value),
            1 => set_half(&mut self.driver_features, true, value),
            // No features up there: the driver can only write zeroes.
            _ => {}
        }
    }

    /// Whether the driver's feature choice can be accepted.
    fn features_acceptable(&self) -> bool {
        let wanted = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        self.status & wanted == wanted
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
            && self.driver_features & !self.device.avail_features() == 0
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set.
        let value = value & !STATUS_DEVICE_NEEDS_RESET;
        let old = self.status & !STATUS_DEVICE_NEEDS_RESET;
        if value & old != old {
            guest_warn!("virtio-mmio: status {old:#x} -> {value:#x} clears bits without a reset");
            return;
        }
        let added = value & !old;
        let mut status = value;
        if added & STATUS_FEATURES_OK != 0 {
            if self.features_acceptable() {
                self.device.set_acked_features(self.driver_features);
            } else {
                // The driver reads the status back and gives up.
                guest_warn!(
                    "virtio-mmio: rejecting driver features {:#x}",
                    self.driver_features
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        if added & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            guest_warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
            status &= !STATUS_DRIVER_OK;
        }
        self.status = status | (self.status & STATUS_DEVICE_NEEDS_RESET);
        if added & status & STATUS_DRIVER_OK != 0 {
            self.activation_pending = true;
            if let Err(err) = self.activate_evt.write(1) {
                error!("virtio-mmio: cannot request the device's activation: {err}");
                self.fail_activation();
            }
        }
    }

    /// Activates the device if the driver set DRIVER_OK since the last
    /// call (and did not reset it since). Runs on the event thread.
    pub fn activate_pending(&mut self) {
        if !std::mem::take(&mut self.activation_pending) {
            return;
        }
        if let Err(err) = self.activate() {
            error!(
                "virtio-mmio: cannot activate device type {}: {}",
                self.device.device_type(),
                moat_crash::error_chain(&err)
            );
            self.fail_activation();
        }
    }

    fn fail_activation(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        if let Err(err) = self.interrupt.signal_config_change() {
            error!("virtio-mmio: cannot interrupt the guest: {err}");
        }
    }

    fn activate(&mut self) -> Result<(), ActivationError> {
        self.activate_with(|_, _| {})
    }

    /// Activates the device, letting `adjust` set each queue (by index)
    /// before the device gets it.
    fn activate_with(&mut self, adjust: impl Fn(usize, &mut Queue)) -> Result<(), ActivationError> {
        // The device gets every queue up to the last ready one: the driver
        // may leave trailing queues it does not use unset.
        let count = self
            .queues
            .iter()
            .rposition(|q| q.ready)
            .map_or(0, |i| i + 1);
        let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(count);
        for (index, regs) in self.queues[..count].iter().enumerate() {
            if !regs.ready {
                return Err(ActivationError::QueueNotReady(index));
            }
            let mut queue = regs.to_queue(index, event_idx)?;
            adjust(index, &mut queue);
            if !queue.is_valid(&self.mem) {
                return Err(ActivationError::QueueMemory(index));
            }
            let notify = self.queue_evts[index]
                .try_clone()
                .map_err(|e| ActivationError::NotifyFd(index, e))?;
            queues.push(ActivatedQueue { queue, notify });
        }
        self.device
            .activate(self.mem.clone(), self.interrupt.clone(), queues)
            .map_err(ActivationError::Device)?;
        self.activated = true;
        Ok(())
    }

    /// Driver reset: the device stops, every register returns to its
    /// initial value.
    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.activation_pending = false;
        for queue in &mut self.queues {
            *queue = QueueRegs::new(queue.max_size);
        }
        // Stale kicks would only cause a spurious pass over empty queues,
        // but there is no reason to keep them.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status().load(Ordering::SeqCst),
            REG_STATUS => self.device_status(),
            // No shared memory regions: a missing region has length and
            // base all ones.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            // The config space has no multi-register fields that change
            // under the driver without a config-change interrupt after.
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                guest_warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            REG_QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(err) = evt.write(1) {
                        error!("virtio-mmio: cannot notify queue {value}: {err}");
                    }
                }
                None => guest_warn!("virtio-mmio: notify for missing queue {value}"),
            },
            REG_INTERRUPT_ACK => {
                self.interrupt.status().fetch_and(!value, Ordering::SeqCst);
            }
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => guest_warn!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                data.fill(0);
            }
            return;
        }
        // Registers are 32 bits wide and accessed as such.
        let len = data.len();
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            guest_warn!("virtio-mmio: {len}-byte read at {offset:#x}");
            data.fill(0);
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: unaligned read at {offset:#x}");
            *bytes = [0; 4];
            return;
        }
        *bytes = self.read_reg(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            guest_warn!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            guest_warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::device::{INT_CONFIG_CHANGE, INT_USED_RING};
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_driver::{guest_memory, readable_within, TestQueue};

    /// A queue as the device got it: size, rings, EVENT_IDX.
    type SeenQueue = (u16, u64, u64, u64, bool);

    /// What the fake device saw.
    #[derive(Default)]
    struct Log {
        acked: Option<u64>,
        activations: Vec<Vec<SeenQueue>>,
        /// Each activation's next available index, by queue.
        positions: Vec<Vec<u16>>,
        restorings: usize,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        sizes: Vec<u16>,
        log: Arc<Mutex<Log>>,
        fail: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | 0b101
        }
        fn set_acked_features(&mut self, features: u64) {
            self.log.lock().unwrap().acked = Some(features);
        }
        fn set_seccomp_filter(&mut self, _filter: seccompiler::BpfProgram) {}
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8).wrapping_add(0x10);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<Interrupt>,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), ActivateError> {
            if self.fail {
                return Err(ActivateError::Backend(io::Error::other("test")));
            }
            let seen = queues
                .iter()
                .map(|q| {
                    let q = &q.queue;
                    (
                        q.size(),
                        q.desc_table(),
                        q.avail_ring(),
                        q.used_ring(),
                        q.event_idx_enabled(),
                    )
                })
                .collect();
            let positions = queues.iter().map(|q| q.queue.next_avail()).collect();
            let mut log = self.log.lock().unwrap();
            log.activations.push(seen);
            log.positions.push(positions);
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
        fn restoring(&mut self) {
            self.log.lock().unwrap().restorings += 1;
        }
    }

    struct Harness {
        t: MmioTransport,
        log: Arc<Mutex<Log>>,
        irqfd: EventFd,
        /// The transport's activation requests, as the event thread sees them.
        activate_evt: EventFd,
    }

    /// A transport around `device` and the eventfd its DRIVER_OK writes.
    fn transport(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irqfd: &EventFd,
    ) -> (MmioTransport, EventFd) {
        let activate_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            device,
            mem,
            irqfd.try_clone().unwrap(),
            activate_evt.try_clone().unwrap(),
        )
        .unwrap();
        (t, activate_evt)
    }

    fn harness(sizes: &[u16], fail: bool) -> Harness {
        let log = Arc::new(Mutex::new(Log::default()));
        let device = FakeDevice {
            sizes: sizes.to_vec(),
            log: log.clone(),
            fail,
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let (t, activate_evt) = transport(Box::new(device), guest_memory(), &irqfd);
        Harness {
            t,
            log,
            irqfd,
            activate_evt,
        }
    }

    impl Harness {
        fn r(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.t.read(offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w(&mut self, offset: u64, value: u32) {
            self.t.write(offset, &value.to_le_bytes());
        }
        /// ACKNOWLEDGE, DRIVER, driver features, FEATURES_OK.
        fn negotiate(&mut self, features: u64) {
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE);
            self.w(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
            self.w(REG_DRIVER_FEATURES_SEL, 0);
            self.w(REG_DRIVER_FEATURES, features as u32);
            self.w(REG_DRIVER_FEATURES_SEL, 1);
            self.w(REG_DRIVER_FEATURES, (features >> 32) as u32);
            self.w(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
            );
        }
        fn setup_queue(&mut self, index: u32, size: u32, desc: u64, driver: u64, device: u64) {
            self.w(REG_QUEUE_SEL, index);
            self.w(REG_QUEUE_NUM, size);
            self.w(REG_QUEUE_DESC_LOW, desc as u32);
            self.w(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.w(REG_QUEUE_DRIVER_LOW, driver as u32);
            self.w(REG_QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
            self.w(REG_QUEUE_DEVICE_LOW, device as u32);
            self.w(REG_QUEUE_DEVICE_HIGH, (device >> 32) as u32);
            self.w(REG_QUEUE_READY, 1);
        }
        /// Sets DRIVER_OK, then does what the event thread does.
        fn driver_ok(&mut self) {
            self.w(
                REG_STATUS,
                STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
            );
            self.event_thread();
        }
        /// The event thread's part: an activation request, if one came.
        fn event_thread(&mut self) {
            if self.activate_evt.read().is_ok() {
                self.t.activate_pending();
            }
        }
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn a_saved_transport_goes_on_in_a_new_one() {
        use vm_memory::Bytes;
        let mut h = harness(&[16, 16], false);
        let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX;
        h.negotiate(features);
        h.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
        h.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
        h.driver_ok();
        // The used rings' indexes, as the device left them in guest memory.
        h.t.mem
            .write_obj(7u16.to_le(), GuestAddress(0x3002))
            .unwrap();
        h.t.mem
            .write_obj(3u16.to_le(), GuestAddress(0x6002))
            .unwrap();
        h.t.interrupt().signal_used_queue().unwrap();
        let state = h.t.save();
        assert_eq!(h.log.lock().unwrap().resets, 1, "the device is stopped");
        assert!(!h.t.is_activated());

        let mut copy = harness(&[16, 16], false);
        copy.t.restore(&state).unwrap();
        assert!(copy.t.is_activated());
        assert_eq!(copy.r(REG_STATUS), ALL_OK);
        assert_eq!(copy.r(REG_INTERRUPT_STATUS), INT_USED_RING);
        let log = copy.log.lock().unwrap();
        assert_eq!(log.acked, Some(features));
        assert_eq!(log.restorings, 1);
        assert_eq!(log.positions, [vec![7, 3]]);
        assert_eq!(log.activations[0][1].0, 8);

        // Another device type is refused; a driver that never started its
        // device leaves it stopped in the copy too.
        let mut other = state.clone();
        other.device_type = 1;
        let mut copy = harness(&[16, 16], false);
        assert!(matches!(
            copy.t.restore(&other),
            Err(RestoreError::DeviceType {
                saved: 1,
                found: 42
            })
        ));
        let mut idle = harness(&[16, 16], false);
        let idle_state = idle.t.save();
        let mut copy = harness(&[16, 16], false);
        copy.t.restore(&idle_state).unwrap();
        assert!(!copy.t.is_activated());
        assert_eq!(copy.log.lock().unwrap().restorings, 0);
    }

    #[test]
    fn identification_registers() {
        let mut h = harness(&[16, 32], false);
        assert_eq!(h.r(REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.r(REG_VERSION), 2);
        assert_eq!(h.r(REG_DEVICE_ID), 42);
        assert_eq!(h.r(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(
            h.r(REG_DEVICE_FEATURES),
            VIRTIO_F_RING_EVENT_IDX as u32 | 0b101
        );
        h.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(h.r(REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        h.w(REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(h.r(REG_DEVICE_FEATURES), 0);
        h.w(REG_QUEUE_SEL, 1);
        assert_eq!(h.r(REG_QUEUE_NUM_MAX), 32);
        h.w(REG_QUEUE_SEL, 2);
        assert_eq!(h.r(REG_QUEUE_NUM_MAX), 0, "no such queue");
        for reg in [
            REG_SHM_LEN_LOW,
            REG_SHM_LEN_HIGH,
            REG_SHM_BASE_LOW,
            REG_SHM_BASE_HIGH,
        ] {
            assert_eq!(h.r(reg), u32::MAX);
        }
        assert_eq!(h.r(REG_CONFIG_GENERATION), 0);
        h.t.interrupt().signal_config_change().unwrap();
        assert_eq!(
            h.r(REG_CONFIG_GENERATION),
            1,
            "a config change bumps the generation"
        );
        assert_eq!(h.t.queue_notify_eventfds().len(), 2);
    }

    #[test]
    fn feature_negotiation() {
        let mut h = harness(&[16], false);
        // Features cannot be written before DRIVER.
        h.w(REG_DRIVER_FEATURES, 0b1);
        h.negotiate(VIRTIO_F_VERSION_1 | 0b100);
        assert_eq!(h.r(REG_STATUS) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
        assert_eq!(
            h.log.lock().unwrap().acked,
            Some(VIRTIO_F_VERSION_1 | 0b100)
        );
        // Locked after FEATURES_OK.
        h.w(REG_DRIVER_FEATURES_SEL, 0);
        h.w(REG_DRIVER_FEATURES, 0);
        assert_eq!(h.t.driver_features, VIRTIO_F_VERSION_1 | 0b100);

        // Without VERSION_1: FEATURES_OK does not stick.
        h.w(REG_STATUS, 0);
        h.negotiate(0b1);
        assert_eq!(h.r(REG_STATUS), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Features never offered: rejected as well.
        h.w(REG_STATUS, 0);
        h.negotiate(VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(h.r(REG_STATUS) & STATUS_FEATURES_OK, 0);
        assert_eq!(
            h.log.lock().unwrap().acked,
            Some(VIRTIO_F_VERSION_1 | 0b100)
        );
        // DRIVER_OK without FEATURES_OK does not activate.
        h.driver_ok();
        assert_eq!(h.r(REG_STATUS) & STATUS_DRIVER_OK, 0);
        assert!(h.log.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn queue_setup_and_activation() {
        let mut h = harness(&[256, 256], false);
        // Queue registers are ignored before FEATURES_OK.
        h.setup_queue(0, 64, 0x1000, 0x2000, 0x3000);
        assert_eq!(h.r(REG_QUEUE_READY), 0);
        h.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
        h.setup_queue(0, 64, 0x1_0000, 0x1_0400, 0x1_1000);
        h.setup_queue(1, 128, 0x2_0000, 0x2_0800, 0x2_1000);
        assert_eq!(h.r(REG_QUEUE_READY), 1);
        h.driver_ok();
        assert_eq!(h.r(REG_STATUS), ALL_OK);
        assert!(h.t.is_activated());
        let log = h.log.lock().unwrap();
        assert_eq!(
            log.activations,
            vec![vec![
                (64, 0x1_0000, 0x1_0400, 0x1_1000, true),
                (128, 0x2_0000, 0x2_0800, 0x2_1000, true)
            ]]
        );
        drop(log);
        // Queue registers are locked once running.
        h.w(REG_QUEUE_SEL, 0);
        h.w(REG_QUEUE_READY, 0);
        assert_eq!(h.r(REG_QUEUE_READY), 1);
    }

    #[test]
    fn trailing_unused_queues_are_left_out() {
        let mut h = harness(&[16, 16, 16], false);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.driver_ok();
        let log = h.log.lock().unwrap();
        assert_eq!(log.activations.len(), 1);
        assert_eq!(log.activations[0].len(), 1);
        assert!(!log.activations[0][0].4, "no EVENT_IDX negotiated");
    }

    fn assert_needs_reset(h: &mut Harness) {
        assert!(!h.t.is_activated());
        assert_eq!(
            h.r(REG_STATUS),
            ALL_OK | STATUS_DEVICE_NEEDS_RESET,
            "DEVICE_NEEDS_RESET set"
        );
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(readable_within(&h.irqfd, Duration::ZERO));
        h.irqfd.read().unwrap();
    }

    #[test]
    fn bad_queues_fail_activation() {
        let cases: [(u32, u64, u64, u64); 5] = [
            // Size not a power of two, too big, too big for 16 bits.
            (48, 0x1_0000, 0x1_1000, 0x1_2000),
            (512, 0x1_0000, 0x1_1000, 0x1_2000),
            (0x1_0010, 0x1_0000, 0x1_1000, 0x1_2000),
            // Misaligned descriptor table; used ring outside memory.
            (16, 0x1_0008, 0x1_1000, 0x1_2000),
            (16, 0x1_0000, 0x1_1000, 0x10_0000_0000),
        ];
        for (size, desc, driver, device) in cases {
            let mut h = harness(&[256], false);
            h.negotiate(VIRTIO_F_VERSION_1);
            h.setup_queue(0, size, desc, driver, device);
            h.driver_ok();
            assert_needs_reset(&mut h);
            assert!(h.log.lock().unwrap().activations.is_empty());
        }
        // A hole before a ready queue.
        let mut h = harness(&[16, 16], false);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(1, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.driver_ok();
        assert_needs_reset(&mut h);
        // The device refusing.
        let mut h = harness(&[16], true);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.driver_ok();
        assert_needs_reset(&mut h);
        // The driver cannot clear NEEDS_RESET but by resetting.
        h.w(REG_STATUS, ALL_OK);
        assert_eq!(
            h.r(REG_STATUS) & STATUS_DEVICE_NEEDS_RESET,
            STATUS_DEVICE_NEEDS_RESET
        );
        h.w(REG_STATUS, 0);
        assert_eq!(h.r(REG_STATUS), 0);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let mut h = harness(&[16], false);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 8, 0x1_0000, 0x1_1000, 0x1_2000);
        h.driver_ok();
        assert!(h.t.is_activated());
        h.t.interrupt().signal_used_queue().unwrap();
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_USED_RING);
        h.w(REG_STATUS, 0);
        assert_eq!(h.log.lock().unwrap().resets, 1);
        assert!(!h.t.is_activated());
        assert_eq!(h.r(REG_STATUS), 0);
        assert_eq!(h.r(REG_INTERRUPT_STATUS), 0);
        assert_eq!(h.r(REG_QUEUE_READY), 0);
        assert_eq!(h.t.queues[0].size, 16);
        assert_eq!(h.t.driver_features, 0);
        // The driver can start over.
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x2_0000, 0x2_1000, 0x2_2000);
        h.driver_ok();
        assert_eq!(h.log.lock().unwrap().activations.len(), 2);
        // Clearing bits without a reset is ignored.
        h.w(REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(h.r(REG_STATUS), ALL_OK);
    }

    #[test]
    fn interrupt_ack_and_notify() {
        let mut h = harness(&[16, 16], false);
        h.t.interrupt().signal_used_queue().unwrap();
        h.t.interrupt().signal_config_change().unwrap();
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_USED_RING | INT_CONFIG_CHANGE);
        h.w(REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        h.w(REG_QUEUE_NOTIFY, 1);
        assert_eq!(h.t.queue_notify_eventfds()[1].read().unwrap(), 1);
        assert!(h.t.queue_notify_eventfds()[0].read().is_err(), "not kicked");
        // A notify for a missing queue is ignored.
        h.w(REG_QUEUE_NOTIFY, 7);
    }

    #[test]
    fn config_space_is_delegated() {
        let mut h = harness(&[16], false);
        let mut b = [0u8; 2];
        h.t.read(CONFIG_SPACE_OFFSET + 4, &mut b);
        assert_eq!(b, [0x14, 0x15]);
        let mut b = [0u8; 8];
        h.t.read(CONFIG_SPACE_OFFSET, &mut b);
        assert_eq!(b[7], 0x17);
        h.t.write(CONFIG_SPACE_OFFSET + 3, &[9]);
        assert_eq!(h.log.lock().unwrap().config_writes, vec![(3, vec![9])]);
        // Odd sizes are dropped.
        let mut b = [0xffu8; 3];
        h.t.read(CONFIG_SPACE_OFFSET, &mut b);
        assert_eq!(b, [0; 3]);
        h.t.write(CONFIG_SPACE_OFFSET, &[1, 2, 3]);
        assert_eq!(h.log.lock().unwrap().config_writes.len(), 1);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut h = harness(&[16], false);
        // Wrong sizes read as zeroes and write nothing.
        for len in [0usize, 1, 2, 3, 8] {
            let mut b = vec![0xffu8; len];
            h.t.read(REG_MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|&x| x == 0));
            h.t.write(REG_STATUS, &vec![1u8; len]);
        }
        assert_eq!(h.r(REG_STATUS), 0);
        // Unaligned and unknown offsets.
        assert_eq!(h.r(REG_MAGIC_VALUE + 2), 0);
        h.w(REG_STATUS + 1, 1);
        assert_eq!(h.r(REG_STATUS), 0);
        for offset in [0x018, 0x0c0, 0x0f8, 0x09c] {
            assert_eq!(h.r(offset), 0);
            h.w(offset, u32::MAX);
        }
        // Write-only registers read as zero, read-only ones ignore writes.
        assert_eq!(h.r(REG_QUEUE_NOTIFY), 0);
        h.w(REG_MAGIC_VALUE, 0);
        h.w(REG_INTERRUPT_STATUS, 0);
        assert_eq!(h.r(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        // A huge queue selector.
        h.negotiate(VIRTIO_F_VERSION_1);
        h.w(REG_QUEUE_SEL, u32::MAX);
        h.w(REG_QUEUE_NUM, 4);
        h.w(REG_QUEUE_READY, 1);
        assert_eq!(h.r(REG_QUEUE_READY), 0);
        assert_eq!(h.r(REG_QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 8];
        h.t.read(u64::MAX - 3, &mut b);
        h.t.write(u64::MAX, &[0; 4]);
        assert!(!h.t.is_activated());
    }

    #[test]
    fn rng_through_the_transport() {
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 0, 16);
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let (t, activate_evt) = transport(Box::new(Rng::new()), mem, &irqfd);
        let mut h = Harness {
            t,
            log: Arc::default(),
            irqfd,
            activate_evt,
        };
        assert_eq!(h.r(REG_DEVICE_ID), 4);
        h.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX);
        // TestQueue's layout for queue 0 with 16 entries.
        let (desc, avail) = (0x1_0000u64, 0x1_0000 + 16 * 16);
        let used = (avail + 6 + 2 * 16 + 3) & !3;
        h.setup_queue(0, 16, desc, avail, used);
        h.driver_ok();
        assert!(h.t.is_activated());
        // Without KVM the notify comes through the register; TestQueue's
        // own eventfd is not the transport's, so drain it.
        let w = q.writable(32);
        let head = q.add_chain(&[w]);
        assert_eq!(q.wait_used(Duration::from_millis(50)), None);
        h.w(REG_QUEUE_NOTIFY, 0);
        assert_eq!(q.wait_used(Duration::from_secs(5)), Some((head, 32)));
        assert!(readable_within(&h.irqfd, Duration::from_secs(5)));
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_USED_RING);
        h.w(REG_INTERRUPT_ACK, INT_USED_RING);
        // Reset stops the worker: later kicks go unanswered.
        h.w(REG_STATUS, 0);
        let w = q.writable(32);
        q.add_chain(&[w]);
        h.w(REG_QUEUE_NOTIFY, 0);
        assert_eq!(q.wait_used(Duration::from_millis(100)), None);
    }

    #[test]
    fn driver_ok_leaves_activation_to_the_event_thread() {
        let mut h = harness(&[16], false);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.w(REG_STATUS, ALL_OK);
        // On the vCPU thread: a request, no activation.
        assert!(!h.t.is_activated());
        assert!(h.log.lock().unwrap().activations.is_empty());
        assert!(readable_within(&h.activate_evt, Duration::ZERO));
        h.event_thread();
        assert!(h.t.is_activated());
        assert_eq!(h.log.lock().unwrap().activations.len(), 1);
        // A reset before the event thread gets there cancels the request.
        h.w(REG_STATUS, 0);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.w(REG_STATUS, ALL_OK);
        h.w(REG_STATUS, 0);
        h.event_thread();
        assert!(!h.t.is_activated());
        assert_eq!(h.log.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn a_worker_asking_for_a_reset_shows_in_the_status() {
        let mut h = harness(&[16], false);
        h.negotiate(VIRTIO_F_VERSION_1);
        h.setup_queue(0, 16, 0x1_0000, 0x1_1000, 0x1_2000);
        h.driver_ok();
        assert_eq!(h.r(REG_STATUS), ALL_OK);
        h.t.interrupt().signal_needs_reset().unwrap();
        assert_eq!(h.r(REG_STATUS), ALL_OK | STATUS_DEVICE_NEEDS_RESET);
        assert_eq!(h.r(REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        h.w(REG_STATUS, 0);
        assert_eq!(h.r(REG_STATUS), 0);
        assert_eq!(h.r(REG_INTERRUPT_STATUS), 0);
    }
}
