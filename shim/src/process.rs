//! A container process as the shim tracks it: created, running, stopped
//! (with its exit status), and the I/O whose end an exit waits for.

use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use crate::stdio::{ProcessIo, StdioSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy)]
pub struct ProcState {
    pub status: Status,
    /// Guest pid once started.
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: Option<SystemTime>,
}

pub struct Process {
    pub container_id: String,
    /// "" for the container's init process.
    pub exec_id: String,
    pub stdio: StdioSpec,
    /// OCI process JSON of an exec.
    pub spec_json: Vec<u8>,
    state: Mutex<ProcState>,
    cv: Condvar,
    io: Mutex<Option<Arc<ProcessIo>>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioSpec, spec_json: Vec<u8>) -> Process {
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            spec_json,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                exit_status: 0,
                exited_at: None,
            }),
            cv: Condvar::new(),
            io: Mutex::new(None),
        }
    }

    /// The id containerd uses for this process in events.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn state(&self) -> ProcState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_io(&self, io: Arc<ProcessIo>) {
        *self.io.lock().unwrap_or_else(|e| e.into_inner()) = Some(io);
    }

    pub fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_running(&self, pid: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.status = Status::Running;
        s.pid = pid;
    }

    /// Records the exit and wakes every Wait; returns false when it was
    /// already recorded (the first report wins). The first report calls
    /// `announce` before any Wait returns, so that the exit event precedes
    /// whatever a waiter does next (containerd deletes the task).
    pub fn set_exited(&self, exit_status: u32, at: SystemTime, announce: impl FnOnce()) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.status == Status::Stopped {
            return false;
        }
        s.status = Status::Stopped;
        s.exit_status = exit_status;
        s.exited_at = Some(at);
        announce();
        self.cv.notify_all();
        true
    }

    /// Blocks until the process has stopped.
    pub fn wait(&self) -> ProcState {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = self
            .cv
            .wait_while(s, |s| s.status != Status::Stopped)
            .unwrap_or_else(|e| e.into_inner());
        *s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_returns_the_first_exit() {
        let p = Arc::new(Process::new("c", "", StdioSpec::default(), Vec::new()));
        assert_eq!(p.event_id(), "c");
        p.set_running(7);
        let p2 = p.clone();
        let waiter = std::thread::spawn(move || p2.wait());
        std::thread::sleep(Duration::from_millis(50));
        let mut announced = 0;
        assert!(p.set_exited(137, SystemTime::now(), || announced += 1));
        assert!(!p.set_exited(0, SystemTime::now(), || announced += 1));
        assert_eq!(announced, 1);
        let s = waiter.join().unwrap();
        assert_eq!((s.status, s.pid, s.exit_status), (Status::Stopped, 7, 137));
        let e = Process::new("c", "e1", StdioSpec::default(), Vec::new());
        assert_eq!(e.event_id(), "e1");
    }
}
