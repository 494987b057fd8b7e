//! Reaping: the agent is PID 1 (or a child subreaper in tests), so every
//! orphan ends up here. One thread waits for SIGCHLD and hands exit statuses
//! to whoever registered the pid.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Where one process's exit status lands.
#[derive(Default)]
pub struct ExitSlot {
    status: Mutex<Option<WaitStatus>>,
    cv: Condvar,
}

impl ExitSlot {
    /// Blocks until the process has exited and returns how it ended.
    pub fn wait(&self) -> WaitStatus {
        let mut g = self.status.lock().unwrap();
        loop {
            if let Some(s) = *g {
                return s;
            }
            g = self.cv.wait(g).unwrap();
        }
    }

    /// How the process ended, or `None` while it runs.
    pub fn get(&self) -> Option<WaitStatus> {
        *self.status.lock().unwrap()
    }

    fn set(&self, s: WaitStatus) {
        *self.status.lock().unwrap() = Some(s);
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct State {
    watched: HashMap<i32, Arc<ExitSlot>>,
    /// Exits nobody registered yet (a child may die before its pid is known).
    unclaimed: HashMap<i32, (WaitStatus, Instant)>,
}

/// Reaps every child of the agent and routes each exit status to the
/// [`ExitSlot`] of whoever [`register`](Reaper::register)ed its pid. Exits
/// nobody claims are kept for 30 s, for a registration that comes late.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
}

/// Blocks SIGCHLD in the calling thread; call before any thread exists so
/// all threads inherit the mask and only the reaper receives it.
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()
}

impl Reaper {
    /// Watches `pid`; its exit may already have happened.
    pub fn register(&self, pid: i32) -> Arc<ExitSlot> {
        let slot = Arc::new(ExitSlot::default());
        let mut st = self.state.lock().unwrap();
        if let Some((status, _)) = st.unclaimed.remove(&pid) {
            // A live process with this pid means the entry is an older one.
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                slot.set(status);
                return slot;
            }
        }
        st.watched.insert(pid, slot.clone());
        slot
    }

    /// Runs forever: waits for SIGCHLD and reaps.
    pub fn run(&self) {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            self.reap_all();
            // A SIGCHLD arriving between reap_all and wait stays pending.
            let _ = set.wait();
        }
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) => {
                    self.dispatch(pid.as_raw(), s)
                }
                Ok(_) => {}
            }
        }
    }

    fn dispatch(&self, pid: i32, status: WaitStatus) {
        let mut st = self.state.lock().unwrap();
        if let Some(slot) = st.watched.remove(&pid) {
            slot.set(status);
            return;
        }
        let now = Instant::now();
        st.unclaimed
            .retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(30));
        st.unclaimed.insert(pid, (status, now));
    }
}
