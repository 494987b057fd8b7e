//! The exit/OOM event queue behind GetEvent.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use moat_protocol::agent::{get_event_response, GetEventResponse, OomEvent};

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

    /// Queues an OOM kill in container `id`.
    pub fn push_oom(&self, id: &str) {
        let mut ev = GetEventResponse::new();
        ev.event = Some(get_event_response::Event::Oom(OomEvent {
            container_id: id.to_owned(),
            ..Default::default()
        }));
        self.push(ev);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_event_names_the_container() {
        let q = EventQueue::default();
        q.push_oom("c1");
        let ev = q.pop(Some(Duration::ZERO)).unwrap();
        match ev.event {
            Some(get_event_response::Event::Oom(oom)) => assert_eq!(oom.container_id, "c1"),
            other => panic!("expected an OOM event, got {other:?}"),
        }
        assert!(q.pop(Some(Duration::ZERO)).is_none());
    }
}
