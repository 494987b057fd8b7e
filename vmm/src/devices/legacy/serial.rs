//! 8250 UART (COM1) for the guest console, on vm-superio's register model.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

/// Raises the UART's interrupt through an irqfd bound to its GSI.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The console: output goes to any writer (stdout, a file, an fd, or a sink).
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

/// vm-superio's receive FIFO size: a state with more input is refused.
const UART_FIFO_SIZE: usize = 64;

/// The UART's registers, as a template saves them (vm-superio's own
/// state type does not serialize).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A 16550 UART that raises `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// The same UART with the registers of a template's (`state`). Input
    /// beyond the FIFO's size (only a corrupt template has it) is dropped.
    pub fn from_state(state: &SerialState, irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        let raw = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: if state.in_buffer.len() <= UART_FIFO_SIZE {
                state.in_buffer.clone()
            } else {
                Vec::new()
            },
        };
        let serial =
            Serial::from_state(&raw, EventFdTrigger(irq), vm_superio::serial::NoEvents, out)
                .expect("vm-superio refuses a state only for an input buffer past its FIFO");
        Self { serial }
    }

    /// The registers, for a template.
    pub fn state(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // A console that cannot be written (closed pipe, full disk) must
            // not stop the guest; the bytes are dropped.
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                log::debug!("Serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let out = Shared::default();
        let mut dev = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        // Wrong-sized accesses are ignored, not fatal.
        dev.write(0, b"xy");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit set");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }
}
