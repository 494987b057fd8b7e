//! Boot timer: the guest writes [`BOOT_TIMER_MAGIC`] to
//! [`BOOT_TIMER_PORT`](crate::layout::BOOT_TIMER_PORT) once it is up (the
//! agent does, before serving), and the VMM logs the time since its own
//! start, as Firecracker does.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::BusDevice;
use crate::layout::BOOT_TIMER_MAGIC;

/// The boot timer device, one port wide.
pub struct BootTimer {
    start: Instant,
    /// Microseconds from VMM start to the first magic write.
    elapsed_us: Arc<Mutex<Option<u64>>>,
}

impl BootTimer {
    /// A timer that measures from `start`, the VMM's own start.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            elapsed_us: Arc::new(Mutex::new(None)),
        }
    }

    /// Shared view of the boot time, for the API.
    pub fn elapsed_handle(&self) -> Arc<Mutex<Option<u64>>> {
        self.elapsed_us.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&BOOT_TIMER_MAGIC) {
            let us = self.start.elapsed().as_micros() as u64;
            let mut slot = self.elapsed_us.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(us);
                log::info!("Guest boot completed after {us} us ({} ms)", us / 1000);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_magic_write_only() {
        let mut t = BootTimer::new(Instant::now());
        let h = t.elapsed_handle();
        t.write(0, &[1]);
        assert_eq!(*h.lock().unwrap(), None);
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = h.lock().unwrap().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(h.lock().unwrap().unwrap(), first);
    }
}
