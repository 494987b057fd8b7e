//! Talking to the guest: agent calls with their configured deadlines, the
//! agent's event loop, process waiters and volume syncs.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageField;
use moat_protocol::agent::{self, get_event_response};
use moat_protocol::ttrpc;
use moat_protocol::{AgentClient, StreamKind};

use super::error::{PodError, PodResult};
use super::vm::PodVm;
use super::{Container, Pod};
use crate::events::{timestamp, Event};
use crate::process::Process;
use crate::stdio::Streams;
use crate::volumes;

/// How long an exit waits for the process's output to reach containerd.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one GetEvent waits in the guest, and its call deadline.
const EVENT_WAIT_MS: u32 = 5000;
const EVENT_CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// At most one OOM event per container in this interval reaches containerd.
const OOM_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many agent events are read per second; a flooding agent
/// is slowed down, not followed.
const EVENTS_PER_SECOND: u32 = 100;
/// The exit status of a process whose VM or agent is gone.
pub const LOST_EXIT_STATUS: u32 = 255;

/// Which configured deadline an agent call gets.
#[derive(Debug, Clone, Copy)]
pub enum Deadline {
    /// Create, start, exec: they may mount filesystems in a slow guest.
    Lifecycle,
    /// Everything else: kill, delete, pids, stats, pause, update, resize.
    Control,
}

/// Calls the agent with the deadline `d` from the pod's config.
pub fn call<T>(
    pod: &Pod,
    vm: &dyn PodVm,
    what: &'static str,
    d: Deadline,
    f: impl FnOnce(&AgentClient, ttrpc::context::Context) -> ttrpc::Result<T>,
) -> PodResult<T> {
    let (timeout, setting) = match d {
        Deadline::Lifecycle => (pod.cfg.agent_timeout(), "agent_timeout_secs"),
        Deadline::Control => (pod.cfg.control_timeout(), "control_timeout_secs"),
    };
    let a = vm.agent();
    let start = Instant::now();
    f(a, a.ctx_timeout(timeout))
        .map_err(|e| PodError::agent(what, e, start.elapsed(), timeout, setting))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        log::error!("cannot start a {name} thread: {e}");
    }
}

/// Which agent events reach containerd: OOMs of known containers, at most
/// one per container per [`OOM_INTERVAL`].
#[derive(Default)]
pub struct EventFilter {
    last_oom: HashMap<String, Instant>,
    window: Option<(Instant, u32)>,
}

impl EventFilter {
    /// Whether an OOM of `id` is forwarded (`known`: the pod has it).
    pub fn pass_oom(&mut self, id: &str, known: bool, now: Instant) -> bool {
        if !known {
            log::warn!("agent reported an OOM of unknown container {id:?}; dropped");
            return false;
        }
        match self.last_oom.get(id) {
            Some(t) if now.duration_since(*t) < OOM_INTERVAL => false,
            _ => {
                self.last_oom.insert(id.to_owned(), now);
                true
            }
        }
    }

    /// How long to pause before reading the next event, so that at most
    /// [`EVENTS_PER_SECOND`] are read.
    pub fn throttle(&mut self, now: Instant) -> Option<Duration> {
        let (start, n) = self.window.get_or_insert((now, 0));
        let elapsed = now.duration_since(*start);
        if elapsed >= Duration::from_secs(1) {
            self.window = Some((now, 1));
            return None;
        }
        *n += 1;
        (*n > EVENTS_PER_SECOND).then(|| Duration::from_secs(1) - elapsed)
    }
}

/// Forwards the agent's OOM events while `vm` is the pod's VM, and ends
/// every process when the VM is gone.
pub fn spawn_event_loop(pod: &Arc<Pod>, vm: Arc<dyn PodVm>) {
    let weak = Arc::downgrade(pod);
    spawn("agent-events", move || {
        let mut filter = EventFilter::default();
        while let Some(pod) = Weak::upgrade(&weak).filter(|p| p.is_current(&vm)) {
            if vm.exited() {
                pod.vm_lost();
                break;
            }
            if let Some(pause) = filter.throttle(Instant::now()) {
                std::thread::sleep(pause);
            }
            let req = agent::GetEventRequest {
                timeout_ms: EVENT_WAIT_MS,
                ..Default::default()
            };
            let a = vm.agent();
            match a.get_event(a.ctx_timeout(EVENT_CALL_TIMEOUT), &req) {
                Ok(ev) => pod.on_agent_event(ev.event, &mut filter),
                Err(e) => {
                    log::debug!("agent events: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    });
}

impl Pod {
    fn is_current(&self, vm: &Arc<dyn PodVm>) -> bool {
        super::lock(&self.vm)
            .as_ref()
            .is_some_and(|cur| Arc::ptr_eq(cur, vm))
    }

    fn on_agent_event(&self, ev: Option<get_event_response::Event>, f: &mut EventFilter) {
        match ev {
            Some(get_event_response::Event::Oom(oom)) => {
                let known = self.container(&oom.container_id).is_ok();
                if f.pass_oom(&oom.container_id, known, Instant::now()) {
                    self.events.try_publish(Event::Oom(TaskOOM {
                        container_id: oom.container_id,
                        ..Default::default()
                    }));
                }
            }
            // Exits are taken from WaitProcess, for processes the shim knows.
            Some(get_event_response::Event::Exit(e)) => {
                log::debug!("agent exit event for {:?}/{:?}", e.container_id, e.exec_id)
            }
            _ => {}
        }
    }

    /// The VM is gone (crash, guest panic): every process of the pod ends.
    fn vm_lost(&self) {
        log::warn!("the pod's VM is gone; its processes are reported as exited");
        let containers: Vec<Arc<Container>> = super::lock(&self.members)
            .containers
            .values()
            .cloned()
            .collect();
        for c in containers {
            for p in c.processes() {
                self.report_exit(&p, LOST_EXIT_STATUS, SystemTime::now());
            }
        }
    }

    /// Records an exit and, the first time, tells containerd.
    pub fn report_exit(&self, p: &Process, status: u32, at: SystemTime) {
        let pid = p.state().pid;
        p.set_exited(status, at, || {
            self.events.publish(Event::Exit(TaskExit {
                container_id: p.container_id.clone(),
                id: p.event_id().to_owned(),
                pid,
                exit_status: status,
                exited_at: MessageField::some(timestamp(at)),
                ..Default::default()
            }))
        });
    }
}

/// The exit status and time a WaitProcess answered, within bounds.
fn exit_of(r: &agent::WaitProcessResponse) -> (u32, SystemTime) {
    let status = u32::try_from(r.exit_status)
        .ok()
        .filter(|s| *s <= 255)
        .unwrap_or(LOST_EXIT_STATUS);
    let at = match r.exited_at_ns {
        0 => SystemTime::now(),
        ns => UNIX_EPOCH + Duration::from_nanos(ns),
    };
    (status, at)
}

/// Waits for the process's exit in the guest, then for its output, then
/// reports it: TaskExit is published only after everything was copied.
pub fn spawn_waiter(pod: &Arc<Pod>, vm: Arc<dyn PodVm>, p: Arc<Process>) {
    let pod = pod.clone();
    spawn("wait", move || {
        let req = agent::ProcessRequest {
            container_id: p.container_id.clone(),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        };
        let a = vm.agent();
        let (status, at) = match a.wait_process(a.ctx(), &req) {
            Ok(r) => exit_of(&r),
            Err(e) => {
                // The VM or the agent is gone: the process is too.
                log::warn!("wait for {}/{}: {e}", p.container_id, p.exec_id);
                (LOST_EXIT_STATUS, SystemTime::now())
            }
        };
        if let Some(io) = p.io() {
            if !io.wait_outputs(OUTPUT_DRAIN_TIMEOUT) {
                log::warn!(
                    "output of {}/{} did not end in time",
                    p.container_id,
                    p.exec_id
                );
            }
            io.finish();
        }
        pod.report_exit(&p, status, at);
    });
}

/// Opens the agent streams of a process (before it starts).
pub fn open_streams(vm: &dyn PodVm, p: &Process) -> PodResult<Streams> {
    let flags = p.stdio.agent_stdio();
    let open = |wanted: bool, kind: StreamKind| {
        if !wanted {
            return Ok(None);
        }
        vm.agent()
            .open_stream(&p.container_id, &p.exec_id, kind)
            .map(Some)
            .map_err(|e| PodError::AgentGone {
                what: "open stream",
                message: format!("{}: {e}", kind.as_str()),
            })
    };
    Ok(Streams {
        stdin: open(flags.stdin && !flags.terminal, StreamKind::Stdin)?,
        stdout: open(flags.stdout, StreamKind::Stdout)?,
        stderr: open(flags.stderr, StreamKind::Stderr)?,
        pty: open(flags.terminal, StreamKind::Pty)?,
    })
}

/// Copies what changes in a container's bind sources into the guest until
/// the container is deleted or the VM is gone.
pub fn spawn_volume_sync(pod: &Pod, c: &Container, mut vols: volumes::Volumes, vm: Arc<dyn PodVm>) {
    let (name, gone, timeout) = (c.id.clone(), c.gone.clone(), pod.cfg.agent_timeout());
    spawn("volume-sync", move || loop {
        std::thread::sleep(volumes::SYNC_INTERVAL);
        if gone.load(Ordering::Relaxed) || vm.exited() {
            break;
        }
        let copied = vols
            .changes()
            .and_then(|items| volumes::copy(vm.agent(), &items, timeout));
        if let Err(e) = copied {
            log::warn!("volumes of {name}: {e}");
            vols.forget();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lying agent's exit status cannot pass for another (finding 4).
    #[test]
    fn exit_statuses_out_of_range_read_as_lost() {
        for (given, want) in [(0, 0), (137, 137), (255, 255), (-5, 255), (1000, 255)] {
            let r = agent::WaitProcessResponse {
                exit_status: given,
                exited_at_ns: 5,
                ..Default::default()
            };
            let (status, at) = exit_of(&r);
            assert_eq!(status, want, "{given}");
            assert_eq!(at, UNIX_EPOCH + Duration::from_nanos(5));
        }
    }

    #[test]
    fn ooms_of_known_containers_pass_once_per_interval() {
        let mut f = EventFilter::default();
        let t = Instant::now();
        assert!(!f.pass_oom("ghost", false, t));
        assert!(f.pass_oom("c1", true, t));
        assert!(!f.pass_oom("c1", true, t + Duration::from_millis(500)));
        assert!(f.pass_oom("c2", true, t + Duration::from_millis(500)));
        assert!(f.pass_oom("c1", true, t + OOM_INTERVAL));
    }

    #[test]
    fn a_flood_of_events_is_paced_to_the_limit() {
        let mut f = EventFilter::default();
        let t = Instant::now();
        let paused = (0..EVENTS_PER_SECOND + 5)
            .filter(|_| f.throttle(t).is_some())
            .count();
        assert_eq!(paused, 5);
        assert_eq!(f.throttle(t + Duration::from_secs(1)), None);
    }
}
