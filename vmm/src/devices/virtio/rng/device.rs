//! The virtio-rng device and its worker thread.

use std::io::{self, Write};
use std::sync::Arc;

use log::error;
use seccompiler::BpfProgram;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{MAX_BYTES_PER_REQUEST, QUEUE_SIZE, TYPE_RNG};
use crate::devices::virtio::device::{
    ActivateError, ActivatedQueue, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
};
use crate::devices::virtio::worker::{
    drain_queue, epoll_on, notify_used, Chain, DeviceState, DeviceWorker, RingError, ANY_CHAIN_LEN,
};

/// virtio-rng: fills every device-writable buffer the guest queues with
/// random bytes, up to [`MAX_BYTES_PER_REQUEST`] per chain.
#[derive(Default)]
pub struct Rng {
    state: DeviceState,
}

impl Rng {
    /// A device not yet activated.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.state.ack_features(self.avail_features(), features);
    }

    fn set_seccomp_filter(&mut self, filter: BpfProgram) {
        self.state.set_seccomp_filter(filter);
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let [queue] = self.state.begin_activation(queues)?;
        let worker = Worker {
            epoll: epoll_on(&[(&queue.notify, 0)]).map_err(ActivateError::Backend)?,
            mem,
            interrupt: interrupt.clone(),
            queue: queue.queue,
            notify: queue.notify,
            buf: vec![0u8; MAX_BYTES_PER_REQUEST],
        };
        self.state.start_worker("rng".into(), interrupt, worker)
    }

    fn reset(&mut self) {
        self.state.reset();
    }
}

/// Fills `buf` from the kernel's random pool.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            done += ret as usize;
        }
    }
    Ok(())
}

struct Worker {
    /// Watches `notify` (token 0).
    epoll: Epoll,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: Queue,
    notify: EventFd,
    buf: Vec<u8>,
}

impl DeviceWorker for Worker {
    fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    fn handle_event(&mut self, _token: u64, _events: EventSet) -> Result<(), RingError> {
        let _ = self.notify.read();
        Ok(())
    }

    fn process(&mut self) -> Result<(), RingError> {
        let mem = self.mem.clone();
        // Buffers of any size are fine: only MAX_BYTES_PER_REQUEST of them
        // are filled.
        let drained = drain_queue(&mut self.queue, &mem, ANY_CHAIN_LEN, |chain| {
            Some(fill_chain(&mut self.buf, &mem, chain))
        })?;
        if drained.used {
            notify_used(&mut self.queue, &mem, &self.interrupt, "rng");
        }
        Ok(())
    }
}

/// Fills the chain's writable buffers through `buf` (of
/// [`MAX_BYTES_PER_REQUEST`] bytes). Returns how many random bytes went in;
/// 0 if the guest rewrote the checked chain into one outside guest memory.
pub fn fill_chain(buf: &mut [u8], mem: &GuestMemory, chain: Chain<'_>) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    let buf = &mut buf[..len];
    if let Err(err) = fill_random(buf) {
        error!("rng: getrandom failed: {err}");
        return 0;
    }
    if writer.write_all(buf).is_err() {
        return 0;
    }
    // At most MAX_BYTES_PER_REQUEST.
    len as u32
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::test_driver::{
        guest_memory, interrupt, readable_within, wait_needs_reset, Desc, TestQueue, MEM_SIZE,
        VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    const WAIT: Duration = Duration::from_secs(5);

    /// Activates `rng` on fresh rings, as a driver does after a reset.
    fn activate(rng: &mut Rng) -> (TestQueue, Arc<Interrupt>, EventFd) {
        let mem = guest_memory();
        let queue = TestQueue::new(&mem, 0, QUEUE_SIZE);
        let (irq, irqfd) = interrupt();
        rng.set_acked_features(rng.avail_features());
        rng.activate(mem, irq.clone(), vec![queue.activated(true)])
            .unwrap();
        (queue, irq, irqfd)
    }

    fn start() -> (Rng, TestQueue, EventFd) {
        let mut rng = Rng::new();
        let (queue, _, irqfd) = activate(&mut rng);
        (rng, queue, irqfd)
    }

    #[test]
    fn fills_writable_buffers() {
        let (rng, mut q, irqfd) = start();
        assert_eq!(rng.device_type(), TYPE_RNG);
        let a = q.writable(64);
        let b = q.writable(200);
        let head = q.add_chain(&[a, b]);
        assert_eq!(q.wait_used(WAIT), Some((head, 264)));
        let mut data = q.read(a.addr, 64);
        data.extend(q.read(b.addr, 200));
        // 264 zero bytes from getrandom would be a 2^-2112 event.
        assert!(data.iter().any(|&x| x != 0));
        assert!(readable_within(&irqfd, WAIT));

        // Readable descriptors are left alone and not counted.
        let r = q.readable(&[7; 32]);
        let w = q.writable(16);
        let head = q.add_chain(&[r, w]);
        assert_eq!(q.wait_used(WAIT), Some((head, 16)));
        assert_eq!(q.read(r.addr, 32), [7; 32]);
    }

    #[test]
    fn caps_bytes_per_request() {
        let (_rng, mut q, _irqfd) = start();
        let big = q.writable(MAX_BYTES_PER_REQUEST as u32 + 4096);
        let head = q.add_chain(&[big]);
        assert_eq!(
            q.wait_used(WAIT),
            Some((head, MAX_BYTES_PER_REQUEST as u32))
        );
        let tail = q.read(big.addr + MAX_BYTES_PER_REQUEST as u64, 4096);
        assert!(tail.iter().all(|&x| x == 0), "nothing past the cap");
    }

    // The issue changed the spec: a malformed chain used to be returned
    // empty; it now needs a device reset.
    #[test]
    fn malformed_chains_need_a_reset_and_stop_the_device() {
        let mut rng = Rng::new();
        let (mut q, mut irq, _irqfd) = activate(&mut rng);
        type Build = fn(&mut TestQueue);
        let cases: [(&str, Build); 3] = [
            ("outside memory", |q| {
                let outside = Desc {
                    addr: MEM_SIZE as u64 - 8,
                    len: 64,
                    write: true,
                };
                q.add_chain(&[outside]);
            }),
            ("a loop", |q| {
                let w = q.writable(8);
                q.write_desc(5, w.addr, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 6);
                q.write_desc(6, w.addr, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 5);
                q.publish(5);
            }),
            ("a head past the queue", |q| q.publish(QUEUE_SIZE + 1)),
        ];
        for (what, build) in cases {
            build(&mut q);
            wait_needs_reset(&irq, WAIT, || !rng.state.has_worker());
            assert_eq!(q.next_used(), None, "{what}: chain returned");
            rng.reset();
            (q, irq, _) = activate(&mut rng);
            let w = q.writable(8);
            let head = q.add_chain(&[w]);
            assert_eq!(q.wait_used(WAIT), Some((head, 8)), "{what}");
            assert!(!irq.needs_reset());
        }

        rng.reset();
        let w = q.writable(8);
        q.add_chain(&[w]);
        assert_eq!(q.wait_used(Duration::from_millis(100)), None, "stopped");
        assert!(matches!(
            rng.activate(guest_memory(), interrupt().0, vec![]),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
    }
}
