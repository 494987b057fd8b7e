//! Address-space dispatch for guest port I/O and MMIO exits.
//!
//! A vCPU that exits on an I/O port or an MMIO address asks the matching
//! [`Bus`] for the device whose range holds the address and hands it the
//! access with the offset relative to the range's base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that lives in a range of guest port I/O or MMIO space.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` within the device range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset` within the device range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be put on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already on the bus.
    #[error("Range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// First address of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range is empty, or runs past the end of the address space.
    #[error("Range {base:#x}+{len:#x} is empty or wraps the address space")]
    InvalidRange {
        /// First address of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Ordered, non-overlapping ranges of devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`; accesses there reach it with the
    /// offset from `base`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let below = self.ranges.range(..end).next_back();
        if let Some((b, e)) = below {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, &entry.device))
    }

    /// Dispatches a read; returns false when no device holds `addr`
    /// (the caller then answers with all-ones, as unclaimed hardware does).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device mutex poisoned by a panicking thread still holds consistent
/// register state for our devices, so keep serving rather than cascade.
fn lock<'a>(
    dev: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    match dev.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u64>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, _data: &[u8]) {
            self.0.push(offset);
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x108, 0x10),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b[0], 5);
        assert!(!bus.read(0x120, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x11f, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![0xf]);
    }
}
