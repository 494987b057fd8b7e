//! The one shape of every device worker: a thread (started at activation,
//! stopped and joined on reset and drop) that runs a [`DeviceWorker`]'s
//! epoll loop, plus the queue helpers workers share.
//!
//! A worker that finds its rings corrupt or a descriptor chain malformed
//! (see [`RingError`]) ends its loop: the device is marked
//! DEVICE_NEEDS_RESET with a config-change interrupt and serves nothing
//! until the driver resets it. It never spins on a ring it cannot make
//! progress on, so a reset never waits on a busy thread. A well-formed
//! chain the device merely cannot serve (an unsupported request, a frame
//! too short) is answered on its own and does not stop the device.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::error;
use seccompiler::BpfProgram;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{
    take_queues, ActivateError, ActivatedQueue, GuestMemory, Interrupt, VIRTIO_F_RING_EVENT_IDX,
};
use crate::logger::RateLimit;

/// The epoll token of the kill eventfd; workers use smaller tokens.
const KILL_TOKEN: u64 = u64::MAX;

/// How a descriptor chain breaks the virtio rules. No answer to the chain
/// can repair that: like a corrupt ring, it puts the device in
/// DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain loops, runs past the queue size (an indirect table
    /// counts too), or leaves its descriptor table or guest memory; a
    /// head index past the queue size is one too.
    #[error("Descriptor chain {head} loops or does not end within the queue size")]
    Unterminated {
        /// Head index of the chain.
        head: u16,
    },
    /// A buffer lies outside guest memory.
    #[error("Descriptor chain {head} has a buffer outside guest memory: {len} bytes at {addr:#x}")]
    OutsideMemory {
        /// Head index of the chain.
        head: u16,
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The buffers hold more bytes than the device takes in one chain.
    #[error("Descriptor chain {head} is longer than the {max} bytes the queue takes")]
    TooLong {
        /// Head index of the chain.
        head: u16,
        /// The most bytes a chain of this queue may hold.
        max: u32,
    },
}

/// How a ring or one of its chains breaks the virtio rules in a way no
/// chain-level answer can repair: the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The driver's avail index is more than a queue size ahead of the
    /// device, or the avail ring cannot be read.
    #[error("Corrupt avail ring")]
    Avail(#[source] virtio_queue::Error),
    /// The event index or flags cannot be written.
    #[error("Cannot update the used ring's notification state")]
    Notification(#[source] virtio_queue::Error),
    /// A chain cannot be put in the used ring.
    #[error("Cannot return descriptor chain {head} to the used ring")]
    Used {
        /// Head index of the chain.
        head: u16,
        /// What `virtio_queue` reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// A chain the driver made available is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
}

/// What a device does on its worker thread. [`WorkerThread::spawn`] polls
/// [`DeviceWorker::epoll`] (level-triggered) and calls the worker for each
/// event and after each batch.
pub trait DeviceWorker: Send + 'static {
    /// The epoll set of the worker's fds; it may add and remove fds as it
    /// goes. The loop keeps the largest token for its kill eventfd.
    fn epoll(&self) -> &Epoll;
    /// Handles one event of an fd registered under `token`. It must drain
    /// the fd (read the eventfd) or take it out of the set.
    fn handle_event(&mut self, token: u64, events: EventSet) -> Result<(), RingError>;
    /// Serves whatever the events made possible; called after each batch
    /// of events and after a poll timeout. Kicks that came before the
    /// worker started are still pending on their eventfds, so they wake it.
    fn process(&mut self) -> Result<(), RingError>;
    /// How long the next wait may last, in ms (-1: no limit).
    fn poll_timeout_ms(&self) -> i32 {
        -1
    }
}

/// A running device worker; [`WorkerThread::stop`] (or drop) kills and
/// joins it.
pub struct WorkerThread {
    name: String,
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts thread `name` serving `worker`, under seccomp `filter` if
    /// any. A corrupt ring or malformed chain marks the device
    /// DEVICE_NEEDS_RESET through `interrupt` and ends the thread.
    pub fn spawn<W: DeviceWorker>(
        name: String,
        interrupt: Arc<Interrupt>,
        filter: Option<BpfProgram>,
        mut worker: W,
    ) -> io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        // Set up polling here so that a failure reaches the caller.
        worker.epoll().ctl(
            ControlOperation::Add,
            thread_kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        // Names come from the VM configuration; std refuses a NUL in them.
        let name = name.replace('\0', "");
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                // Keeps the kill eventfd open while it is polled.
                let _kill = thread_kill;
                if let Some(filter) = filter {
                    if let Err(err) = seccompiler::apply_filter(&filter) {
                        error!("{thread_name}: cannot install its seccomp filter: {err}");
                        return;
                    }
                }
                if let Err(err) = run(&mut worker) {
                    ring_failed(&thread_name, &interrupt, &err);
                }
            })?;
        Ok(Self {
            name,
            kill,
            thread: Some(thread),
        })
    }

    /// Whether the thread has ended (killed, or stopped on a [`RingError`]).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Tells the thread to exit and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(err) = self.kill.write(1) {
            // Joining would hang forever.
            error!("{}: cannot stop the worker: {err}", self.name);
            return;
        }
        if thread.join().is_err() {
            error!("{}: the worker thread panicked", self.name);
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The loop of every worker thread: returns when killed (or epoll fails),
/// or with the error of a corrupt ring or malformed chain.
fn run<W: DeviceWorker>(worker: &mut W) -> Result<(), RingError> {
    let mut events = [EpollEvent::default(); 32];
    loop {
        let n = match worker.epoll().wait(worker.poll_timeout_ms(), &mut events) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                error!("Device worker epoll failed, stopping: {err}");
                return Ok(());
            }
        };
        for event in &events[..n] {
            match event.data() {
                KILL_TOKEN => return Ok(()),
                token => worker.handle_event(token, event.event_set())?,
            }
        }
        worker.process()?;
    }
}

/// Ring and chain errors are the guest's doing: a guest that resets and
/// breaks its rings in a loop must not flood the log.
static RING_ERRORS: RateLimit = RateLimit::new();

fn ring_failed(name: &str, interrupt: &Interrupt, err: &RingError) {
    if RING_ERRORS.allow() {
        error!(
            "{name}: {}; stopped until the driver resets the device",
            moat_crash::error_chain(err)
        );
    }
    if let Err(err) = interrupt.signal_needs_reset() {
        error!("{name}: cannot interrupt the guest: {err}");
    }
}

/// What every device keeps across activations: the features its driver
/// accepted, its worker's seccomp filter and the worker thread serving its
/// queues while it is active.
#[derive(Default)]
pub struct DeviceState {
    acked_features: u64,
    filter: Option<BpfProgram>,
    worker: Option<WorkerThread>,
}

impl DeviceState {
    /// Keeps the `features` the driver accepted out of those `offered`.
    pub fn ack_features(&mut self, offered: u64, features: u64) {
        self.acked_features = features & offered;
    }

    /// The seccomp filter the device's worker threads install.
    pub fn set_seccomp_filter(&mut self, filter: BpfProgram) {
        self.filter = Some(filter);
    }

    /// The first steps of every activation: takes the device's `N` queues,
    /// stops the worker of an earlier activation, and switches the queues
    /// to event-index notification if the driver accepted it.
    pub fn begin_activation<const N: usize>(
        &mut self,
        queues: Vec<ActivatedQueue>,
    ) -> Result<[ActivatedQueue; N], ActivateError> {
        let mut queues = take_queues::<N>(queues)?;
        self.stop_worker();
        let event_idx = self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        Ok(queues)
    }

    /// Starts thread `name` serving `worker` until the next activation,
    /// reset or drop.
    pub fn start_worker<W: DeviceWorker>(
        &mut self,
        name: String,
        interrupt: Arc<Interrupt>,
        worker: W,
    ) -> Result<(), ActivateError> {
        let thread = WorkerThread::spawn(name, interrupt, self.filter.clone(), worker)
            .map_err(ActivateError::Thread)?;
        self.worker = Some(thread);
        Ok(())
    }

    /// Whether a worker serves the queues.
    pub fn has_worker(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Stops the worker, if any, and waits for it.
    pub fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    /// Driver reset: no worker, no features.
    pub fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }
}

/// A descriptor chain as a worker pops it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// The most bytes a chain may hold when the device sets no lower bound:
/// the used ring's length field is 32 bits.
pub const ANY_CHAIN_LEN: u32 = u32::MAX;

/// Checks that `chain` is well formed: it ends within `max_descs`
/// descriptors, every buffer lies in guest memory and the buffers hold at
/// most `max_len` bytes. What a chain says (directions, headers) is the
/// device's to judge; only a chain that passes this check reaches it.
fn check_chain(
    chain: &Chain<'_>,
    mem: &GuestMemory,
    max_descs: u16,
    max_len: u32,
) -> Result<(), ChainError> {
    let head = chain.head_index();
    let mut total = 0u64;
    // virtio-queue stops at the queue size (a loop), at a next index past
    // the table or at an unreadable descriptor: the last one it yields then
    // still has NEXT set. An indirect table may hold up to 64 Ki entries.
    for (count, desc) in chain.clone().enumerate() {
        if count >= usize::from(max_descs) {
            break;
        }
        let (addr, len) = (desc.addr(), desc.len());
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(ChainError::OutsideMemory {
                head,
                addr: addr.0,
                len,
            });
        }
        total += u64::from(len);
        if total > u64::from(max_len) {
            return Err(ChainError::TooLong { head, max: max_len });
        }
        if !desc.has_next() {
            return Ok(());
        }
    }
    Err(ChainError::Unterminated { head })
}

/// The next chain the driver made available on `queue`, if any, once
/// checked to be well formed and to hold at most `max_len` bytes; an error
/// if the avail ring is corrupt or the chain malformed.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    max_len: u32,
) -> Result<Option<Chain<'m>>, RingError> {
    let max_descs = queue.size();
    let Some(chain) = queue.iter(mem).map_err(RingError::Avail)?.next() else {
        return Ok(None);
    };
    check_chain(&chain, mem, max_descs, max_len)?;
    Ok(Some(chain))
}

/// Puts the chain at `head` in the used ring with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    head: u16,
    len: u32,
) -> Result<(), RingError> {
    queue
        .add_used(mem, head, len)
        .map_err(|source| RingError::Used { head, source })
}

/// Turns kicks back on; whether chains came in meanwhile (look again).
pub fn reenable_notification(queue: &mut Queue, mem: &GuestMemory) -> Result<bool, RingError> {
    queue
        .enable_notification(mem)
        .map_err(RingError::Notification)
}

/// What [`drain_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains went to the used ring: the guest may need an interrupt.
    pub used: bool,
    /// `serve` left a chain for later; notifications are still off.
    pub paused: bool,
}

/// Hands every chain the driver made available on `queue` (checked by
/// [`next_chain`] against `max_len`) to `serve` and returns it to the used
/// ring with the byte count `serve` wrote into it. `serve` may instead
/// return `None` to leave the chain on the queue and stop. Kicks are off
/// while chains are served, and a last look after turning them back on
/// catches the chains that raced with that.
pub fn drain_queue<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    max_len: u32,
    mut serve: F,
) -> Result<Drained, RingError>
where
    F: FnMut(Chain<'m>) -> Option<u32>,
{
    let mut used = false;
    loop {
        let _ = queue.disable_notification(mem);
        while let Some(chain) = next_chain(queue, mem, max_len)? {
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.go_to_previous_position();
                return Ok(Drained { used, paused: true });
            };
            add_used(queue, mem, head, len)?;
            used = true;
        }
        if !reenable_notification(queue, mem)? {
            return Ok(Drained {
                used,
                paused: false,
            });
        }
    }
}

/// An epoll instance that reports each `(fd, token)` pair's fd, when
/// readable, with its token.
pub fn epoll_on(fds: &[(&dyn AsRawFd, u64)]) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// Interrupts the guest after used buffers were added to `queue`, unless the
/// driver's event index says it does not want to hear about them yet.
pub fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    what: impl std::fmt::Display,
) {
    // An unreadable event index gets an interrupt anyway: a spurious one is
    // harmless, a missing one stalls the guest.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(err) = interrupt.signal_used_queue() {
            error!("{what}: cannot interrupt the guest: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::test_driver::{
        guest_memory, interrupt, readable_within, TestQueue,
    };

    /// Reports each event's token, and fails with a ring error on token 1.
    struct Probe {
        epoll: Epoll,
        fds: [EventFd; 2],
        tx: mpsc::Sender<u64>,
    }

    impl DeviceWorker for Probe {
        fn epoll(&self) -> &Epoll {
            &self.epoll
        }
        fn handle_event(&mut self, token: u64, _: EventSet) -> Result<(), RingError> {
            let _ = self.fds[token as usize].read();
            self.tx.send(token).unwrap();
            if token == 1 {
                return Err(RingError::Avail(virtio_queue::Error::InvalidAvailRingIndex));
            }
            Ok(())
        }
        fn process(&mut self) -> Result<(), RingError> {
            Ok(())
        }
    }

    fn probe() -> (Probe, [EventFd; 2], mpsc::Receiver<u64>) {
        let fds = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let epoll = epoll_on(&[(&fds[0], 0), (&fds[1], 1)]).unwrap();
        let ours = [fds[0].try_clone().unwrap(), fds[1].try_clone().unwrap()];
        let (tx, rx) = mpsc::channel();
        (Probe { epoll, fds, tx }, ours, rx)
    }

    #[test]
    fn worker_sees_its_fds_and_stop_joins() {
        let (worker, fds, rx) = probe();
        let (irq, _) = interrupt();
        let thread = WorkerThread::spawn("worker\0test".into(), irq, None, worker).unwrap();
        fds[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(0));
        thread.stop();
        // The worker (and its sender) went away with the thread.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn a_ring_error_ends_the_worker_and_asks_for_a_reset() {
        let (worker, fds, rx) = probe();
        let (irq, irqfd) = interrupt();
        let thread = WorkerThread::spawn("worker-bad".into(), irq.clone(), None, worker).unwrap();
        fds[1].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
        // The thread ends by itself: its sender goes away.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
        assert!(irq.needs_reset());
        assert!(readable_within(&irqfd, Duration::from_secs(5)));
        // Stopping a thread that already ended returns at once.
        thread.stop();
    }

    #[test]
    fn drain_queue_refuses_an_avail_index_past_the_queue_size() {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.activated(true).queue;
        tq.set_avail_idx(17);
        let mut served = 0;
        let res = drain_queue(&mut queue, &mem, ANY_CHAIN_LEN, |_| {
            served += 1;
            Some(0)
        });
        assert!(matches!(res, Err(RingError::Avail(_))), "{res:?}");
        assert_eq!(served, 0);
        // Within a queue size it is fine (the chains are zeroed descriptors).
        tq.set_avail_idx(16);
        let res = drain_queue(&mut queue, &mem, ANY_CHAIN_LEN, |_| Some(0)).unwrap();
        assert!(res.used);
    }

    /// next_chain on the first chain `build` publishes on a fresh queue of
    /// 16: its head, or the error.
    fn first_chain(build: impl FnOnce(&mut TestQueue), max_len: u32) -> Result<u16, RingError> {
        let mem = guest_memory();
        let mut tq = TestQueue::new(&mem, 0, 16);
        let mut queue = tq.activated(false).queue;
        build(&mut tq);
        let chain = next_chain(&mut queue, &mem, max_len)?;
        Ok(chain.expect("a chain").head_index())
    }

    #[test]
    fn next_chain_refuses_malformed_chains() {
        use crate::devices::virtio::test_driver::{MEM_SIZE, VRING_DESC_F_NEXT};
        const INDIRECT: u16 = 4;
        let unterminated = |build: &dyn Fn(&mut TestQueue)| {
            let res = first_chain(build, ANY_CHAIN_LEN);
            assert!(
                matches!(res, Err(RingError::Chain(ChainError::Unterminated { .. }))),
                "{res:?}"
            );
        };
        // Loops: 1 -> 2 -> 1, and 3 -> 3.
        unterminated(&|q| {
            q.write_desc(1, 0x10_0000, 8, VRING_DESC_F_NEXT, 2);
            q.write_desc(2, 0x10_0000, 8, VRING_DESC_F_NEXT, 1);
            q.publish(1);
        });
        unterminated(&|q| {
            q.write_desc(3, 0x10_0000, 8, VRING_DESC_F_NEXT, 3);
            q.publish(3);
        });
        // A next index, or a head, past the queue.
        unterminated(&|q| {
            q.write_desc(0, 0x10_0000, 8, VRING_DESC_F_NEXT, 999);
            q.publish(0);
        });
        unterminated(&|q| q.publish(200));
        // An indirect table longer than the queue, or outside memory.
        unterminated(&|q| {
            let table = q.alloc(17 * 16);
            for i in 0..17u16 {
                let flags = if i < 16 { VRING_DESC_F_NEXT } else { 0 };
                let desc = TestQueue::raw_desc(0x10_0000, 8, flags, i + 1);
                q.write_raw(table + 16 * u64::from(i), &desc);
            }
            q.write_desc(0, table, 17 * 16, INDIRECT, 0);
            q.publish(0);
        });
        unterminated(&|q| {
            q.write_desc(0, 1 << 40, 64, INDIRECT, 0);
            q.publish(0);
        });
        // Buffers outside guest memory: past it, across its end, wrapping.
        for addr in [1 << 40, MEM_SIZE as u64 - 8, u64::MAX - 100] {
            let res = first_chain(
                |q| {
                    let ok = q.readable(&[0; 8]);
                    q.write_desc(0, ok.addr, 8, VRING_DESC_F_NEXT, 1);
                    q.write_desc(1, addr, 512, 0, 0);
                    q.publish(0);
                },
                ANY_CHAIN_LEN,
            );
            assert!(
                matches!(res, Err(RingError::Chain(ChainError::OutsideMemory { addr: a, len: 512, .. })) if a == addr),
                "{res:?}"
            );
        }
        // Longer than the queue takes, in one buffer or in two.
        let two = |q: &mut TestQueue| {
            let a = q.readable(&[0; 60]);
            q.write_desc(0, a.addr, 60, VRING_DESC_F_NEXT, 1);
            q.write_desc(1, a.addr, 60, 0, 0);
            q.publish(0);
        };
        let res = first_chain(two, 100);
        assert!(
            matches!(
                res,
                Err(RingError::Chain(ChainError::TooLong { head: 0, max: 100 }))
            ),
            "{res:?}"
        );
        assert_eq!(first_chain(two, 120).unwrap(), 0);
    }

    #[test]
    fn next_chain_takes_a_chain_as_long_as_the_queue() {
        let res = first_chain(
            |q| {
                let buf = q.readable(&[1; 16]);
                q.add_chain(&[buf; 16]);
            },
            16 * 16,
        );
        assert_eq!(res.unwrap(), 0);
    }
}
