//! The driver side of split virtqueues for device unit tests: descriptor
//! tables and rings laid out by hand in in-process guest memory, so tests can
//! also write the malformed chains a hostile guest would.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivatedQueue, GuestMemory, Interrupt};

/// `VRING_DESC_F_NEXT`: the chain goes on at the `next` descriptor.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;

/// Guest memory size for tests; buffers are bump-allocated from 1 MiB up.
pub const MEM_SIZE: usize = 32 << 20;
const BUF_START: u64 = 0x10_0000;

/// Fresh guest memory of [`MEM_SIZE`] bytes at address 0.
pub fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One descriptor of a chain to build: buffer address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device may write it (VRING_DESC_F_WRITE).
    pub write: bool,
}

/// A guest driver's view of one split queue.
pub struct TestQueue {
    mem: GuestMemory,
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    buf_end: u64,
    /// The queue's notify eventfd; tests write it to kick the device.
    pub notify: EventFd,
}

impl TestQueue {
    /// Queue `index` of a device: its rings at `0x10000 * (index + 1)`, its
    /// buffers from a private 2 MiB slice of memory above 1 MiB.
    pub fn new(mem: &GuestMemory, index: u64, size: u16) -> Self {
        let desc_table = 0x10000 * (index + 1);
        let avail = desc_table + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let next_buf = BUF_START + index * (2 << 20);
        Self {
            mem: mem.clone(),
            size,
            desc_table,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf,
            buf_end: next_buf + (2 << 20),
            notify: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// The device side of this queue, as the transport would configure it.
    pub fn activated(&self, event_idx: bool) -> ActivatedQueue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc_table as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail as u32), Some(0));
        queue.set_used_ring_address(Some(self.used as u32), Some(0));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        ActivatedQueue {
            queue,
            notify: self.notify.try_clone().unwrap(),
        }
    }

    /// Allocates a guest buffer of `len` bytes, recycling the slice when full
    /// (tests keep far less than 2 MiB in flight).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let len = (u64::from(len) + 15) & !15;
        if self.next_buf + len > self.buf_end {
            self.next_buf = self.buf_end - (2 << 20);
        }
        let addr = self.next_buf;
        self.next_buf += len;
        addr
    }

    /// A descriptor as it lies in a table.
    pub fn raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        raw
    }

    /// Writes `data` at guest address `addr` (an indirect table, say).
    pub fn write_raw(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Writes a raw descriptor at table index `idx`.
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.desc_table + 16 * u64::from(idx);
        self.write_raw(base, &Self::raw_desc(addr, len, flags, next));
    }

    /// Makes the chain starting at `head` available and notifies the device.
    pub fn publish(&mut self, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        self.mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .unwrap();
        self.notify.write(1).unwrap();
    }

    /// Writes the avail ring's index as a hostile driver would: `idx`
    /// chains published in all, whatever the ring holds. Notifies.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .store(idx.to_le(), GuestAddress(self.avail + 2), Ordering::Release)
            .unwrap();
        self.notify.write(1).unwrap();
    }

    /// Builds a well-formed chain from `descs` (indices taken round-robin)
    /// and publishes it; returns its head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(idx, d.addr, d.len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Copies `data` into a fresh buffer and returns its readable descriptor.
    pub fn readable(&mut self, data: &[u8]) -> Desc {
        let addr = self.alloc(data.len().max(1) as u32);
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        Desc {
            addr,
            len: data.len() as u32,
            write: false,
        }
    }

    /// A fresh, zeroed, device-writable buffer.
    pub fn writable(&mut self, len: u32) -> Desc {
        let addr = self.alloc(len.max(1));
        self.mem
            .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
            .unwrap();
        Desc {
            addr,
            len,
            write: true,
        }
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(self.used + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// The next used element (descriptor id, written length), if any.
    pub fn next_used(&mut self) -> Option<(u16, u32)> {
        if self.used_idx() == self.used_seen {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }

    /// Waits up to `timeout` for the next used element.
    pub fn wait_used(&mut self, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.next_used() {
                return Some(u);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// An interrupt whose irqfd the test can watch.
pub fn interrupt() -> (Arc<Interrupt>, EventFd) {
    let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
    let watch = irqfd.try_clone().unwrap();
    let irq = Interrupt::new(Arc::new(AtomicU32::new(0)), irqfd);
    (Arc::new(irq), watch)
}

/// Whether `fd` becomes readable within `timeout`.
pub fn readable_within(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    ret > 0
}

/// Waits until the device behind `irq` asked for a reset (DEVICE_NEEDS_RESET
/// and a config-change interrupt) and `worker_ended` says its worker thread
/// is gone; panics after `timeout`.
pub fn wait_needs_reset(irq: &Interrupt, timeout: Duration, worker_ended: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !irq.needs_reset() || !worker_ended() {
        assert!(Instant::now() < deadline, "the device still runs");
        std::thread::sleep(Duration::from_millis(2));
    }
    let status = irq.status().load(Ordering::SeqCst);
    assert_ne!(status & super::device::INT_CONFIG_CHANGE, 0);
}
