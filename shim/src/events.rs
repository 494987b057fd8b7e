//! Task events, forwarded to containerd in the order they were published.
//!
//! containerd requires TaskCreate < TaskStart < TaskExit < TaskDelete per task
//! (and TaskExecAdded < TaskExecStarted < TaskExit per exec). One background
//! thread forwards a FIFO queue, so the order of `publish` calls is the order
//! containerd sees; the service publishes each event only after the one that
//! must precede it.

use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;

/// A task event of the shim API.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A container (its init process) was created.
    Create(TaskCreate),
    /// A container's init process was started.
    Start(TaskStart),
    /// An exec process was added to a container.
    ExecAdded(TaskExecAdded),
    /// An exec process was started.
    ExecStarted(TaskExecStarted),
    /// A process exited.
    Exit(TaskExit),
    /// A container or exec was deleted.
    Delete(TaskDelete),
    /// A container hit its memory limit in the guest.
    Oom(TaskOOM),
    /// A container was paused.
    Paused(TaskPaused),
    /// A container was resumed.
    Resumed(TaskResumed),
}

impl Event {
    pub(crate) fn topic(&self) -> &'static str {
        match self {
            Event::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start(_) => topics::TASK_START_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            Event::Oom(_) => topics::TASK_OOM_EVENT_TOPIC,
            Event::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            Event::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
        }
    }

    pub(crate) fn into_message(self) -> Box<dyn MessageDyn> {
        match self {
            Event::Create(e) => Box::new(e),
            Event::Start(e) => Box::new(e),
            Event::ExecAdded(e) => Box::new(e),
            Event::ExecStarted(e) => Box::new(e),
            Event::Exit(e) => Box::new(e),
            Event::Delete(e) => Box::new(e),
            Event::Oom(e) => Box::new(e),
            Event::Paused(e) => Box::new(e),
            Event::Resumed(e) => Box::new(e),
        }
    }
}

/// Where events go: containerd's event service in the shim, a recorder in tests.
pub trait Sink: Send + 'static {
    /// Delivers one event of `namespace`; the error says why it was lost.
    fn forward(&mut self, namespace: &str, event: Event) -> Result<(), String>;
}

impl Sink for containerd_shim::publisher::RemotePublisher {
    fn forward(&mut self, namespace: &str, event: Event) -> Result<(), String> {
        let topic = event.topic();
        self.publish(
            containerd_shim::Context::default(),
            topic,
            namespace,
            event.into_message(),
        )
        .map_err(|e| e.to_string())
    }
}

enum Item {
    Event(Event),
    Flush(Sender<()>),
}

/// How many events may wait for the sink. Lifecycle events wait for room;
/// events the guest causes ([`Publisher::try_publish`]) are dropped.
pub const QUEUE_LEN: usize = 1024;

/// The ordered, bounded queue in front of a [`Sink`].
pub struct Publisher {
    tx: Mutex<SyncSender<Item>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Publisher {
    /// Starts the thread that forwards events of `namespace` to `sink`, in order.
    pub fn new(namespace: String, sink: impl Sink) -> Publisher {
        let (tx, rx) = mpsc::sync_channel(QUEUE_LEN);
        let thread = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || forward_loop(namespace, sink, rx))
            .expect("spawn the event thread");
        Publisher {
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues a lifecycle event, waiting for room.
    pub fn publish(&self, event: Event) {
        log::debug!("event {}: {:?}", event.topic(), event);
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if tx.send(Item::Event(event)).is_err() {
            log::error!("event thread is gone; event dropped");
        }
    }

    /// Queues an event the guest caused, dropping it when the queue is full.
    pub fn try_publish(&self, event: Event) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match tx.try_send(Item::Event(event)) {
            Ok(()) => true,
            Err(TrySendError::Full(Item::Event(e))) => {
                log::warn!("event queue full; {} dropped", e.topic());
                false
            }
            Err(_) => false,
        }
    }

    /// Waits (bounded) until every event published so far was forwarded.
    pub fn flush(&self, timeout: Duration) {
        let (done_tx, done_rx) = mpsc::channel();
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sent = tx.send(Item::Flush(done_tx)).is_ok();
        if sent && done_rx.recv_timeout(timeout).is_err() {
            log::warn!("events not all forwarded within {timeout:?}");
        }
    }

    /// Flushes and stops the forwarding thread.
    pub fn close(&self, timeout: Duration) {
        self.flush(timeout);
        // Replacing the sender ends the thread's receive loop.
        let (dead, _) = mpsc::sync_channel(0);
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = dead;
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

fn forward_loop(namespace: String, mut sink: impl Sink, rx: Receiver<Item>) {
    for item in rx {
        match item {
            Item::Event(event) => {
                let topic = event.topic();
                // containerd may be restarting: retry a few times, in order.
                let mut tries = 0;
                loop {
                    match sink.forward(&namespace, event.clone()) {
                        Ok(()) => break,
                        Err(e) if tries < 5 => {
                            tries += 1;
                            log::warn!("publishing {topic} failed (try {tries}): {e}");
                            std::thread::sleep(Duration::from_millis(200 * tries));
                        }
                        Err(e) => {
                            log::error!("event {topic} dropped: {e}");
                            break;
                        }
                    }
                }
            }
            Item::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// A protobuf timestamp for `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod recorder {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records forwarded events, as containerd's event service would see them.
    #[derive(Clone, Default)]
    pub struct Recorder(pub Arc<Mutex<Vec<(String, String)>>>);

    impl Sink for Recorder {
        fn forward(&mut self, namespace: &str, event: Event) -> Result<(), String> {
            self.0
                .lock()
                .unwrap()
                .push((namespace.to_owned(), event.topic().to_owned()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::Recorder;
    use super::*;

    #[test]
    fn topics_match_containerd() {
        assert_eq!(Event::Exit(TaskExit::new()).topic(), "/tasks/exit");
        assert_eq!(
            Event::ExecAdded(TaskExecAdded::new()).topic(),
            "/tasks/exec-added"
        );
        assert_eq!(Event::Oom(TaskOOM::new()).topic(), "/tasks/oom");
    }

    #[test]
    fn events_are_forwarded_in_publish_order() {
        let rec = Recorder::default();
        let p = Publisher::new("ns".into(), rec.clone());
        let order = [
            Event::Create(TaskCreate::new()),
            Event::Start(TaskStart::new()),
            Event::ExecAdded(TaskExecAdded::new()),
            Event::ExecStarted(TaskExecStarted::new()),
            Event::Paused(TaskPaused::new()),
            Event::Resumed(TaskResumed::new()),
            Event::Oom(TaskOOM::new()),
            Event::Exit(TaskExit::new()),
            Event::Delete(TaskDelete::new()),
        ];
        let want: Vec<(String, String)> = order
            .iter()
            .map(|e| ("ns".to_string(), e.topic().to_string()))
            .collect();
        for e in order {
            p.publish(e);
        }
        p.close(Duration::from_secs(5));
        assert_eq!(*rec.0.lock().unwrap(), want);
    }

    /// A sink that fails twice, as a restarting containerd would.
    struct Flaky(u32, Recorder);
    impl Sink for Flaky {
        fn forward(&mut self, ns: &str, e: Event) -> Result<(), String> {
            if self.0 < 2 {
                self.0 += 1;
                return Err("connection refused".into());
            }
            self.1.forward(ns, e)
        }
    }

    #[test]
    fn transient_failures_are_retried_without_reordering() {
        let rec = Recorder::default();
        let p = Publisher::new("ns".into(), Flaky(0, rec.clone()));
        p.publish(Event::Exit(TaskExit::new()));
        p.publish(Event::Delete(TaskDelete::new()));
        p.flush(Duration::from_secs(10));
        let got: Vec<String> = rec.0.lock().unwrap().iter().map(|e| e.1.clone()).collect();
        assert_eq!(got, vec!["/tasks/exit", "/tasks/delete"]);
    }

    /// A sink that hangs, as a wedged containerd would.
    struct Stuck(std::sync::mpsc::Receiver<()>);
    impl Sink for Stuck {
        fn forward(&mut self, _: &str, _: Event) -> Result<(), String> {
            let _ = self.0.recv();
            Ok(())
        }
    }

    /// Issue 10 (4): events the guest causes cannot grow the queue
    /// without bound; they are dropped once it is full.
    #[test]
    fn guest_events_are_dropped_when_the_queue_is_full() {
        let (release, stuck) = mpsc::channel();
        let p = Publisher::new("ns".into(), Stuck(stuck));
        let sent = (0..QUEUE_LEN * 2)
            .filter(|_| p.try_publish(Event::Oom(TaskOOM::new())))
            .count();
        // One is in the sink, QUEUE_LEN wait.
        assert!(sent <= QUEUE_LEN + 1, "{sent} queued");
        assert!(sent >= QUEUE_LEN, "{sent} queued");
        drop(release);
        p.close(Duration::from_secs(5));
    }

    #[test]
    fn timestamps_convert() {
        let t = UNIX_EPOCH + Duration::new(5, 7);
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (5, 7));
    }
}
