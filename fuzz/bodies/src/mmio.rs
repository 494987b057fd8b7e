//! The virtio-mmio transport's registers, driven in any order, around a
//! device that checks what the transport hands it.

use std::sync::Arc;

use moat_vmm::devices::virtio::{
    ActivateError, ActivatedQueue, GuestMemory, Interrupt, MmioTransport, VirtioDevice,
};
use moat_vmm::devices::BusDevice;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// Guest memory the transport checks queues against.
const MEM_SIZE: usize = 1 << 20;
/// Most register accesses one input makes.
const MAX_ACCESSES: usize = 4096;

/// A driver's register accesses. The first byte picks the device's queue
/// sizes and whether it refuses to start; each access is then six bytes:
/// direction, width, offset within the register and whether pending
/// activations run first; register index; the value written.
pub fn transport(data: &[u8]) {
    let mut input = Input::new(data);
    let shape = input.u8();
    let sizes: Vec<u16> = [256, 128, 1, 32768][..usize::from(shape % 4) + 1].to_vec();
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let device = CheckingDevice {
        sizes,
        refuse: shape & 0x80 != 0,
    };
    let (Ok(irqfd), Ok(activate_evt)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK))
    else {
        return;
    };
    let Ok(mut t) = MmioTransport::new(Box::new(device), mem, irqfd, activate_evt) else {
        return;
    };
    for _ in 0..MAX_ACCESSES {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        // The event thread activates a device whenever it gets to it: the
        // input says when, between two accesses.
        if op & 0x80 != 0 {
            t.activate_pending();
        }
        let offset = u64::from(input.u8()) * 4 + u64::from(op >> 5 & 3);
        let width = [4, 1, 2, 8][usize::from(op >> 1 & 3)];
        let value = u64::from(input.u32()).to_le_bytes();
        if op & 1 != 0 {
            t.write(offset, &value[..width]);
        } else {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
        }
    }
}

/// A device that asserts each queue it is given is one the guest memory
/// holds, as every real device assumes.
struct CheckingDevice {
    sizes: Vec<u16>,
    refuse: bool,
}

impl VirtioDevice for CheckingDevice {
    fn device_type(&self) -> u32 {
        4
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn avail_features(&self) -> u64 {
        moat_vmm::devices::virtio::device::VIRTIO_F_VERSION_1
            | moat_vmm::devices::virtio::device::VIRTIO_F_RING_EVENT_IDX
    }

    // Real devices keep only the offered ones.
    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        moat_vmm::devices::virtio::device::read_config_bytes(&[1, 2, 3, 4], offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        assert!(queues.len() <= self.sizes.len(), "more queues than offered");
        for (q, &max) in queues.iter().zip(&self.sizes) {
            assert!(q.queue.is_valid(&mem), "an invalid queue was activated");
            assert!(q.queue.size() <= max, "a queue above its maximum size");
        }
        if self.refuse {
            return Err(ActivateError::Backend(std::io::Error::other("refused")));
        }
        Ok(())
    }

    fn set_seccomp_filter(&mut self, _filter: seccompiler::BpfProgram) {}

    fn reset(&mut self) {}
}
