//! Test doubles: a fake VM whose agent is an in-process ttrpc server that
//! speaks the real protocol, and can be told to be slow, silent or to lie.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use moat_protocol::agent::*;
use moat_protocol::agent_ttrpc;
use moat_protocol::ttrpc::{self, Code, TtrpcContext};
use moat_protocol::{AgentClient, PROTOCOL_VERSION};

use super::vm::{BootSpec, PodVm, VmLauncher};
use crate::annotations::VmSize;
use crate::rootfs::Disk;
use crate::sandbox::SandboxError;

/// How the fake agent behaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    /// CreateContainer fails.
    pub create_fails: bool,
    /// Every call but Version hangs (until the test ends).
    pub silent: bool,
    /// GetEvent answers at once, every time, with an OOM of one of these ids.
    pub oom_flood: Vec<String>,
    /// ListProcesses answers with more than a ttrpc frame can hold.
    pub oversized: bool,
}

/// The fake agent's state, shared with its VM.
#[derive(Default)]
pub struct AgentState {
    pub behaviour: Behaviour,
    /// Exit status per (container, exec), once signalled.
    exits: Mutex<HashMap<(String, String), i32>>,
    cv: Condvar,
    pub crashed: AtomicBool,
    /// Every call but Version and WaitProcess hangs while set.
    pub silent: AtomicBool,
    pub get_events: AtomicUsize,
    /// RemoveContainer calls answered.
    pub removes: AtomicUsize,
    /// How long CreateContainer takes.
    pub create_delay_ms: AtomicU64,
}

impl AgentState {
    fn hang_if_silent(&self) {
        while (self.behaviour.silent || self.silent.load(Ordering::SeqCst))
            && !self.crashed.load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        let _guard = self.exits.lock().unwrap();
        self.cv.notify_all();
    }
}

struct FakeAgent(Arc<AgentState>);

fn gone() -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(Code::UNAVAILABLE, "connection reset"))
}

type Res<T> = ttrpc::Result<T>;

impl agent_ttrpc::Agent for FakeAgent {
    fn version(&self, _: &TtrpcContext, _: VersionRequest) -> Res<VersionResponse> {
        Ok(VersionResponse {
            protocol_version: PROTOCOL_VERSION,
            min_client_version: PROTOCOL_VERSION,
            ..Default::default()
        })
    }

    fn create_container(&self, _: &TtrpcContext, _: CreateContainerRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        let delay = self.0.create_delay_ms.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(delay));
        if self.0.behaviour.create_fails {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INVALID_ARGUMENT,
                "bad spec",
            )));
        }
        Ok(Empty::new())
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        _: StartContainerRequest,
    ) -> Res<StartContainerResponse> {
        self.0.hang_if_silent();
        Ok(StartContainerResponse {
            pid: 100,
            ..Default::default()
        })
    }

    fn exec_process(&self, _: &TtrpcContext, _: ExecProcessRequest) -> Res<ExecProcessResponse> {
        self.0.hang_if_silent();
        Ok(ExecProcessResponse {
            pid: 200,
            ..Default::default()
        })
    }

    fn signal_process(&self, _: &TtrpcContext, r: SignalProcessRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        let mut exits = self.0.exits.lock().unwrap();
        exits.insert((r.container_id, r.exec_id), 128 + r.signal as i32);
        self.0.cv.notify_all();
        Ok(Empty::new())
    }

    fn wait_process(&self, _: &TtrpcContext, r: ProcessRequest) -> Res<WaitProcessResponse> {
        let key = (r.container_id, r.exec_id);
        let mut exits = self.0.exits.lock().unwrap();
        loop {
            if self.0.crashed.load(Ordering::SeqCst) {
                return Err(gone());
            }
            if let Some(status) = exits.get(&key) {
                return Ok(WaitProcessResponse {
                    exit_status: *status,
                    ..Default::default()
                });
            }
            exits = self.0.cv.wait(exits).unwrap();
        }
    }

    fn remove_container(&self, _: &TtrpcContext, _: RemoveContainerRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        self.0.removes.fetch_add(1, Ordering::SeqCst);
        Ok(Empty::new())
    }

    fn list_processes(&self, _: &TtrpcContext, _: ContainerRequest) -> Res<ListProcessesResponse> {
        self.0.hang_if_silent();
        let n = if self.0.behaviour.oversized {
            2_000_000
        } else {
            1
        };
        Ok(ListProcessesResponse {
            processes: (0..n)
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause_container(&self, _: &TtrpcContext, _: ContainerRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        Ok(Empty::new())
    }

    fn resume_container(&self, _: &TtrpcContext, _: ContainerRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        Ok(Empty::new())
    }

    fn update_container(&self, _: &TtrpcContext, _: UpdateContainerRequest) -> Res<Empty> {
        self.0.hang_if_silent();
        Ok(Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, _: ContainerRequest) -> Res<StatsResponse> {
        self.0.hang_if_silent();
        Ok(StatsResponse::default())
    }

    fn get_event(&self, _: &TtrpcContext, _: GetEventRequest) -> Res<GetEventResponse> {
        let n = self.0.get_events.fetch_add(1, Ordering::SeqCst);
        let flood = &self.0.behaviour.oom_flood;
        if flood.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
            return Ok(GetEventResponse {
                timed_out: true,
                ..Default::default()
            });
        }
        let oom = OomEvent {
            container_id: flood[n % flood.len()].clone(),
            ..Default::default()
        };
        Ok(GetEventResponse {
            event: Some(get_event_response::Event::Oom(oom)),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: Empty) -> Res<Empty> {
        Ok(Empty::new())
    }
}

/// A fake VM: block slots in memory, and the fake agent.
pub struct FakeVm {
    agent: AgentClient,
    pub state: Arc<AgentState>,
    /// Users of each of the 16 slots.
    pub slots: Mutex<Vec<usize>>,
    /// How long an attach takes.
    pub attach_delay_ms: AtomicU64,
    pub stopped: AtomicBool,
    size: VmSize,
    _server: ttrpc::Server,
}

impl FakeVm {
    /// The guest panicked: the VM is gone, and its agent with it.
    pub fn crash(&self) {
        self.state.crash();
    }

    pub fn slots_in_use(&self) -> usize {
        self.slots
            .lock()
            .unwrap()
            .iter()
            .filter(|u| **u > 0)
            .count()
    }
}

impl PodVm for FakeVm {
    fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn attach(&self, disks: &[Disk]) -> Result<Vec<String>, SandboxError> {
        std::thread::sleep(Duration::from_millis(
            self.attach_delay_ms.load(Ordering::SeqCst),
        ));
        let mut slots = self.slots.lock().unwrap();
        let mut serials: Vec<String> = Vec::new();
        for _ in disks {
            let Some(i) = slots.iter().position(|u| *u == 0) else {
                for s in &serials {
                    release(&mut slots, s);
                }
                return Err(SandboxError::NoBlockSlot(slots.len()));
            };
            slots[i] = 1;
            serials.push(format!("b{i}"));
        }
        Ok(serials)
    }

    fn serials_of(&self, disks: &[Disk]) -> Vec<String> {
        (0..disks.len()).map(|i| format!("b{i}")).collect()
    }

    fn release(&self, serials: &[String]) {
        let mut slots = self.slots.lock().unwrap();
        for s in serials {
            release(&mut slots, s);
        }
    }

    fn exited(&self) -> bool {
        self.state.crashed.load(Ordering::SeqCst)
    }

    fn size(&self) -> VmSize {
        self.size
    }

    fn host_cgroup_procs(&self) -> Vec<RawFd> {
        Vec::new()
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.state.crash();
    }
}

fn release(slots: &mut [usize], serial: &str) {
    if let Some(i) = serial
        .strip_prefix('b')
        .and_then(|i| i.parse::<usize>().ok())
    {
        slots[i] = slots[i].saturating_sub(1);
    }
}

/// Boots fake VMs and keeps them for the test to inspect.
#[derive(Default)]
pub struct FakeLauncher {
    pub behaviour: Behaviour,
    pub fail_boot: bool,
    pub vms: Mutex<Vec<Arc<FakeVm>>>,
    pub sock_dir: PathBuf,
}

impl FakeLauncher {
    pub fn last(&self) -> Arc<FakeVm> {
        self.vms.lock().unwrap().last().unwrap().clone()
    }
}

impl VmLauncher for Arc<FakeLauncher> {
    fn boot(&self, spec: &BootSpec) -> Result<Arc<dyn PodVm>, String> {
        if self.fail_boot {
            let _ = std::fs::remove_dir_all(spec.dir);
            let _ = std::fs::remove_dir_all(spec.upper_dir);
            return Err("no KVM here".into());
        }
        let n = self.vms.lock().unwrap().len();
        let path = self.sock_dir.join(format!("agent{n}.sock"));
        let state = Arc::new(AgentState {
            behaviour: self.behaviour.clone(),
            ..Default::default()
        });
        // Blocked waits hold server threads: keep plenty ready.
        let mut server = ttrpc::Server::new()
            .set_thread_count_default(16)
            .set_thread_count_min(8)
            .set_thread_count_max(64)
            .bind(&format!("unix://{}", path.display()))
            .map_err(|e| e.to_string())?
            .register_service(agent_ttrpc::create_agent(Arc::new(FakeAgent(
                state.clone(),
            ))));
        server.start().map_err(|e| e.to_string())?;
        let stream = UnixStream::connect(&path).map_err(|e| e.to_string())?;
        let agent = AgentClient::from_stream(stream).map_err(|e| e.to_string())?;
        let mut slots = vec![0; 16];
        for u in slots.iter_mut().take(spec.disks.len()) {
            *u = 1;
        }
        let vm = Arc::new(FakeVm {
            agent,
            state,
            slots: Mutex::new(slots),
            attach_delay_ms: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            size: spec.size,
            _server: server,
        });
        self.vms.lock().unwrap().push(vm.clone());
        Ok(vm)
    }
}
