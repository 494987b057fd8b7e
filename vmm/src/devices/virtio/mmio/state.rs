//! A transport's registers, saved for a template and written back into a
//! new VM's transport, which then serves the queues from where they were.
//!
//! The device is stopped (its worker joined) before the save, so no chain
//! is in flight: every chain it took from the available ring is in the
//! used ring, and the used ring's index in guest memory is where both of
//! the device's positions stand.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{ActivationError, MmioTransport, QueueRegs, STATUS_DRIVER_OK};

/// One queue's registers and position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueState {
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
    /// The used ring's index when the device stopped.
    next: u16,
}

/// What a transport holds that the guest's driver set up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    /// The virtio device type, checked against the new VM's device.
    pub device_type: u32,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<QueueState>,
}

/// Why a saved transport cannot be written back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The new VM's device at this place is of another type.
    #[error("The template has device type {saved} here, the VM has {found}")]
    DeviceType {
        /// The type in the template.
        saved: u32,
        /// The type of the new VM's device.
        found: u32,
    },
    /// The number of queues differs.
    #[error("The template's device has {saved} queues, the VM's has {found}")]
    QueueCount {
        /// Queues in the template.
        saved: usize,
        /// Queues of the new VM's device.
        found: usize,
    },
    /// The saved driver features are not all offered by the new device.
    #[error("The template's driver features {0:#x} are not all offered here")]
    Features(u64),
    /// The device could not start on the saved queues.
    #[error("Cannot start the device on the template's queues")]
    Activate(#[source] ActivationError),
}

/// The used ring's index: 2 bytes after the ring's flags.
fn used_index(transport: &MmioTransport, regs: &QueueRegs) -> u16 {
    transport
        .mem
        .read_obj::<u16>(GuestAddress(regs.device.wrapping_add(2)))
        .map(u16::from_le)
        .unwrap_or(0)
}

impl MmioTransport {
    /// Stops the device (its worker is joined; the VM's vCPUs must be
    /// paused) and returns the transport's state. The device serves nothing
    /// after this: the VM is only good for being saved.
    pub fn save(&mut self) -> TransportState {
        self.device.reset();
        self.activated = false;
        let queues = self
            .queues
            .iter()
            .map(|q| QueueState {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                next: if q.ready { used_index(self, q) } else { 0 },
            })
            .collect();
        TransportState {
            device_type: self.device.device_type(),
            status: self.device_status(),
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status().load(Ordering::SeqCst),
            config_generation: self.interrupt.config_generation(),
            queues,
        }
    }

    /// Writes `state` back into this (new) transport. A device the driver
    /// had started is started again at once, its queues going on from the
    /// saved positions; it is told first that it resumes a template
    /// ([`super::VirtioDevice::restoring`]).
    pub fn restore(&mut self, state: &TransportState) -> Result<(), RestoreError> {
        let found = self.device.device_type();
        if state.device_type != found {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                found,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::QueueCount {
                saved: state.queues.len(),
                found: self.queues.len(),
            });
        }
        if state.driver_features & !self.device.avail_features() != 0 {
            return Err(RestoreError::Features(state.driver_features));
        }
        for (regs, saved) in self.queues.iter_mut().zip(&state.queues) {
            regs.size = saved.size;
            regs.ready = saved.ready;
            regs.desc = saved.desc;
            regs.driver = saved.driver;
            regs.device = saved.device;
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        if state.status & super::STATUS_FEATURES_OK != 0 {
            self.device.set_acked_features(state.driver_features);
        }
        if state.status & STATUS_DRIVER_OK == 0 {
            return Ok(());
        }
        self.device.restoring();
        let positions: Vec<u16> = state.queues.iter().map(|q| q.next).collect();
        self.activate_at(&positions).map_err(RestoreError::Activate)
    }

    /// Activates the device with each queue's next available and next used
    /// index at `positions` (by queue).
    fn activate_at(&mut self, positions: &[u16]) -> Result<(), ActivationError> {
        self.activate_with(|index, queue| {
            let next = positions.get(index).copied().unwrap_or(0);
            queue.set_next_avail(next);
            queue.set_next_used(next);
        })
    }
}
