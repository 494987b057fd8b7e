//! A minimal i8042 keyboard controller: the guest resets the machine by
//! writing 0xFE to the command port (`reboot=k`), and the VMM can ask a
//! guest with a keyboard driver to reboot by typing Ctrl-Alt-Del.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_CMD_DATA: u8 = 0x08;
const CTR_KBD_INT: u8 = 0x01;
/// Bytes the output queue holds at most: a guest that asks for bytes
/// without reading them (or a host that types faster than it reads) cannot
/// grow it. Enough for Ctrl-Alt-Del and a few answers.
const OUT_CAPACITY: usize = 16;
/// Set 2 scancodes: Ctrl, Alt, Del (extended) pressed, then released.
const CTRL_ALT_DEL: [u8; 12] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, 0x00,
];

/// The i8042 controller: data port at offset 0, command/status port at offset 4
/// (ports 0x60 and 0x64).
pub struct I8042 {
    reset: EventFd,
    irq: EventFd,
    status: u8,
    control: u8,
    expect_ctr: bool,
    out: VecDeque<u8>,
}

impl I8042 {
    /// `reset` is signalled when the guest resets the CPU; `irq` is the
    /// keyboard interrupt (IRQ 1).
    pub fn new(reset: EventFd, irq: EventFd) -> Self {
        Self {
            reset,
            irq,
            status: STATUS_SYSTEM_FLAG,
            control: CTR_KBD_INT,
            expect_ctr: false,
            out: VecDeque::with_capacity(OUT_CAPACITY),
        }
    }

    /// Queues Ctrl-Alt-Del key presses and raises the keyboard interrupt.
    /// Keys that do not fit the output queue are dropped, as by a keyboard
    /// whose buffer overflows.
    pub fn send_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        for &key in &CTRL_ALT_DEL[..CTRL_ALT_DEL.len() - 1] {
            self.push(key);
        }
        if self.control & CTR_KBD_INT != 0 {
            self.irq.write(1)?;
        }
        Ok(())
    }
}

impl I8042 {
    /// Queues one output byte, unless the queue is full.
    fn push(&mut self, byte: u8) {
        if self.out.len() < OUT_CAPACITY {
            self.out.push_back(byte);
        }
        self.status |= STATUS_OUT_FULL;
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA => {
                let v = self.out.pop_front().unwrap_or(0);
                if self.out.is_empty() {
                    self.status &= !STATUS_OUT_FULL;
                } else if self.control & CTR_KBD_INT != 0 {
                    let _ = self.irq.write(1);
                }
                v
            }
            COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            COMMAND => {
                self.status |= STATUS_CMD_DATA;
                match value {
                    CMD_RESET_CPU => {
                        if let Err(e) = self.reset.write(1) {
                            log::error!("Cannot signal the guest reset: {e}");
                        }
                    }
                    CMD_READ_CTR => self.push(self.control),
                    CMD_WRITE_CTR => self.expect_ctr = true,
                    _ => {}
                }
            }
            DATA => {
                self.status &= !STATUS_CMD_DATA;
                if std::mem::take(&mut self.expect_ctr) {
                    self.control = value;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_ctrl_alt_del_queues_keys() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        assert!(reset.read().is_err(), "not signalled before the command");
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);

        dev.send_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let mut status = [0u8];
        dev.read(COMMAND, &mut status);
        assert_ne!(status[0] & STATUS_OUT_FULL, 0);
        let mut keys = vec![];
        for _ in 0..11 {
            let mut b = [0u8];
            dev.read(DATA, &mut b);
            keys.push(b[0]);
        }
        assert_eq!(keys, CTRL_ALT_DEL[..11]);
        dev.read(COMMAND, &mut status);
        assert_eq!(status[0] & STATUS_OUT_FULL, 0);
        // An empty write is ignored.
        dev.write(COMMAND, &[]);
    }

    #[test]
    fn output_queue_is_bounded() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(reset, irq);
        for _ in 0..100_000 {
            dev.write(COMMAND, &[CMD_READ_CTR]);
            dev.send_ctrl_alt_del().unwrap();
        }
        assert_eq!(dev.out.len(), OUT_CAPACITY);
        assert!(dev.out.capacity() < 2 * OUT_CAPACITY);
        for _ in 0..OUT_CAPACITY {
            let mut b = [0u8];
            dev.read(DATA, &mut b);
        }
        let mut status = [0u8];
        dev.read(COMMAND, &mut status);
        assert_eq!(status[0] & STATUS_OUT_FULL, 0);
    }
}
