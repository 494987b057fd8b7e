//! The exit/OOM event queue behind GetEvent.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use moat_protocol::agent::GetEventResponse;

/// Oldest events are dropped beyond this (a host that stopped listening).
const MAX_QUEUED: usize = 4096;

/// A bounded FIFO of events for the host, which takes them one by one
/// with blocking GetEvent calls.
#[derive(Default)]
pub struct EventQueue {
    q: Mutex<VecDeque<GetEventResponse>>,
    cv: Condvar,
}

impl EventQueue {
    /// Queues an event and wakes one waiting [`pop`](EventQueue::pop); when
    /// the queue is full the oldest event is dropped.
    pub fn push(&self, ev: GetEventResponse) {
        let mut q = self.q.lock().unwrap();
        if q.len() >= MAX_QUEUED {
            q.pop_front();
        }
        q.push_back(ev);
        self.cv.notify_one();
    }

    /// The next event, or None after `timeout` (None: wait forever).
    pub fn pop(&self, timeout: Option<Duration>) -> Option<GetEventResponse> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut q = self.q.lock().unwrap();
        loop {
            if let Some(ev) = q.pop_front() {
                return Some(ev);
            }
            match deadline {
                None => q = self.cv.wait(q).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    q = self.cv.wait_timeout(q, d - now).unwrap().0;
                }
            }
        }
    }
}
