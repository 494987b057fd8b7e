//! Helpers shared by device workers: a thread that waits on a set of fds and
//! exits when told to, and the guest notification that follows used buffers.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use log::error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{GuestMemory, Interrupt};

/// A device worker thread: calls its handler each time one of its fds is
/// readable, until [`WorkerThread::stop`] (or drop) kills and joins it.
pub struct WorkerThread {
    name: String,
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts thread `name`, which calls `handler(i)` whenever `fds[i]` is
    /// readable. Polling is level-triggered, so the handler must drain the fd
    /// it is called for (read the eventfd), and it must keep the fds open
    /// (own them) for as long as it lives.
    pub fn spawn<F>(name: String, fds: &[RawFd], mut handler: F) -> io::Result<Self>
    where
        F: FnMut(usize) + Send + 'static,
    {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let kill_token = fds.len() as u64;
        // Set up polling here so that a failure reaches the caller.
        let watched: Vec<(RawFd, u64)> = fds
            .iter()
            .copied()
            .zip(0u64..)
            .chain([(thread_kill.as_raw_fd(), kill_token)])
            .collect();
        let epoll = epoll_on(&watched)?;
        Self::spawn_loop(name, kill, move |thread_name| {
            // Keeps the kill eventfd open while it is polled.
            let _kill = thread_kill;
            let mut events = vec![EpollEvent::default(); kill_token as usize + 1];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        error!("{thread_name}: epoll failed, stopping: {err}");
                        return;
                    }
                };
                for event in &events[..n] {
                    match event.data() {
                        t if t == kill_token => return,
                        t => handler(t as usize),
                    }
                }
            }
        })
    }

    /// Starts thread `name` running `run`, a worker with its own event loop
    /// that must return once `kill` (or a clone of it it watches) becomes
    /// readable. `run` gets the thread's name, for its logs.
    pub fn spawn_loop<F>(name: String, kill: EventFd, run: F) -> io::Result<Self>
    where
        F: FnOnce(&str) + Send + 'static,
    {
        // Names come from the VM configuration; std refuses a NUL in them.
        let name = name.replace('\0', "");
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&thread_name))?;
        Ok(Self {
            name,
            kill,
            thread: Some(thread),
        })
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

/// A descriptor chain as a worker pops it.
pub type Chain<'a> = DescriptorChain<&'a GuestMemory>;

/// What [`drain_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Chains went to the used ring: the guest may need an interrupt.
    pub used: bool,
    /// `serve` left a chain for later; notifications are still off.
    pub paused: bool,
}

/// Hands every chain the driver made available on `queue` to `serve` and
/// returns it to the used ring with the byte count `serve` wrote into it.
/// `serve` may instead return `None` to leave the chain on the queue and
/// stop. Kicks are off while chains are served, and a last look after
/// turning them back on catches the chains that raced with that.
pub fn drain_queue<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    what: impl std::fmt::Display,
    mut serve: F,
) -> Drained
where
    F: FnMut(Chain<'m>) -> Option<u32>,
{
    let mut used = false;
    loop {
        let _ = queue.disable_notification(mem);
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.go_to_previous_position();
                return Drained { used, paused: true };
            };
            if let Err(err) = queue.add_used(mem, head, len) {
                error!("{what}: cannot return a chain: {err}");
            }
            used = true;
        }
        if !matches!(queue.enable_notification(mem), Ok(true)) {
            return Drained {
                used,
                paused: false,
            };
        }
    }
}

/// An epoll instance that reports each `(fd, token)` pair's fd, when
/// readable, with its token.
pub fn epoll_on(fds: &[(RawFd, u64)]) -> io::Result<Epoll> {
    let epoll = Epoll::new()?;
    for &(fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd,
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

    #[test]
    fn handler_sees_its_fd_and_stop_joins() {
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let b = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, rx) = mpsc::channel();
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let worker = WorkerThread::spawn(
            "worker\0test".into(),
            &[a.as_raw_fd(), b.as_raw_fd()],
            move |i| {
                let fd = if i == 0 { &a2 } else { &b2 };
                let _ = fd.read();
                tx.send(i).unwrap();
            },
        )
        .unwrap();
        b.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(1));
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(0));
        worker.stop();
        // The handler (and its sender) went away with the thread.
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
