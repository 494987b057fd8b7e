//! The legacy port-I/O devices (serial console, i8042, boot timer) on a bus
//! laid out as moat-vmm lays out its own.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use moat_vmm::devices::legacy::boot_timer::BootTimer;
use moat_vmm::devices::legacy::i8042::I8042;
use moat_vmm::devices::legacy::serial::SerialDevice;
use moat_vmm::devices::Bus;
use moat_vmm::layout::{BOOT_TIMER_PORT, I8042_PORT, SERIAL_PORT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Input;

/// Most port accesses one input makes.
const MAX_ACCESSES: usize = 4096;

/// A guest's port reads and writes. Each access is four bytes: which device,
/// the offset and direction, the access width, and the byte written.
pub fn devices(data: &[u8]) {
    let Some(bus) = bus() else { return };
    let mut input = Input::new(data);
    for _ in 0..MAX_ACCESSES {
        if input.is_empty() {
            break;
        }
        let base = match input.u8() % 3 {
            0 => SERIAL_PORT,
            1 => I8042_PORT,
            _ => BOOT_TIMER_PORT,
        };
        let op = input.u8();
        let addr = base + u64::from(op & 7);
        let mut buf = [0u8; 4];
        let width = [1, 2, 4][usize::from(input.u8() % 3)];
        buf[0] = input.u8();
        if op & 0x80 != 0 {
            bus.write(addr, &buf[..width]);
        } else {
            bus.read(addr, &mut buf[..width]);
        }
    }
}

fn bus() -> Option<Bus> {
    let event = || EventFd::new(EFD_NONBLOCK).ok();
    let serial = SerialDevice::new(event()?, Box::new(io::sink()));
    let i8042 = I8042::new(event()?, event()?);
    let timer = BootTimer::new(Instant::now());
    let mut bus = Bus::new();
    bus.insert(Arc::new(Mutex::new(serial)), SERIAL_PORT, 8)
        .ok()?;
    bus.insert(Arc::new(Mutex::new(i8042)), I8042_PORT, 5)
        .ok()?;
    bus.insert(Arc::new(Mutex::new(timer)), BOOT_TIMER_PORT, 1)
        .ok()?;
    Some(bus)
}
