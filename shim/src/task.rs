//! The task layer: containerd's Task API as typed calls on the pod, and
//! the one map from pod errors to ttrpc codes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use containerd_shim::api::{
    self, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim::CheckpointTaskRequest;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::{DeleteResponse, ExitSignal, TtrpcContext, TtrpcResult};
use moat_protocol::agent;

use crate::events::{timestamp, Event};
use crate::pod::{CreateRequest, ExecRequest, Pod, PodError};
use crate::process::{Process, Status};
use crate::rootfs::MountSpec;
use crate::stdio::StdioSpec;

/// The ttrpc status of a pod error: the only place codes are chosen.
pub fn status(e: PodError) -> ttrpc::Error {
    let code = match &e {
        PodError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        PodError::NotFound(_) => Code::NOT_FOUND,
        PodError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        PodError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        PodError::Unimplemented(_) => Code::UNIMPLEMENTED,
        PodError::ResourceExhausted(_) => Code::RESOURCE_EXHAUSTED,
        PodError::Internal(_) => Code::INTERNAL,
        // containerd maps NotFound and friends: the agent's code is kept.
        PodError::Agent { code, .. } => *code,
        PodError::AgentGone { .. } => Code::UNAVAILABLE,
        PodError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

/// The Task service of one shim (one pod).
pub struct TaskService {
    /// The pod, or why the shim's configuration is unusable.
    pod: Result<Arc<Pod>, String>,
    exit: Arc<ExitSignal>,
}

fn stdio(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioSpec {
    StdioSpec {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

fn ts(t: Option<SystemTime>) -> MessageField<Timestamp> {
    t.map(timestamp).into()
}

fn status_of(p: &Process, paused: bool) -> TaskStatus {
    match p.state().status {
        Status::Created => TaskStatus::CREATED,
        Status::Running if paused => TaskStatus::PAUSED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

impl TaskService {
    /// Serves `pod`, or answers every call with its configuration error;
    /// `exit` is signalled when the shim should exit.
    pub fn new(pod: Result<Arc<Pod>, String>, exit: Arc<ExitSignal>) -> TaskService {
        TaskService { pod, exit }
    }

    fn pod(&self) -> TtrpcResult<&Arc<Pod>> {
        self.pod
            .as_ref()
            .map_err(|e| status(PodError::FailedPrecondition(e.clone())))
    }

    fn create_event(req: &CreateTaskRequest) -> Event {
        Event::Create(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: 0,
            ..Default::default()
        })
    }
}

impl containerd_shim::Task for TaskService {
    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> TtrpcResult<CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        let pod = self.pod()?;
        let typed = CreateRequest {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            mounts: req
                .rootfs
                .iter()
                .map(|m| MountSpec {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            checkpoint: !req.checkpoint.is_empty(),
        };
        pod.create(typed)
            .inspect_err(|e| log::error!("create {}: {e}", req.id))
            .map_err(status)?;
        pod.events().publish(Self::create_event(&req));
        Ok(CreateTaskResponse::default())
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let pid = self.pod()?.start(&req.id, &req.exec_id).map_err(status)?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let pod = self.pod()?;
        if !req.exec_id.is_empty() {
            let s = pod.delete_exec(&req.id, &req.exec_id).map_err(status)?;
            return Ok(DeleteResponse {
                pid: s.pid,
                exit_status: s.exit_status,
                exited_at: ts(s.exited_at),
                ..Default::default()
            });
        }
        let e = pod.delete(&req.id).map_err(status)?;
        Ok(DeleteResponse {
            pid: e.pid,
            exit_status: e.exit_status,
            exited_at: MessageField::some(timestamp(e.exited_at)),
            ..Default::default()
        })
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let typed = ExecRequest {
            spec: req.spec.as_ref().map(|a| a.value.clone()),
            stdio: stdio(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            id: req.id,
            exec_id: req.exec_id,
        };
        self.pod()?.exec(typed).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn state(&self, _: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let c = self.pod()?.container(&req.id).map_err(status)?;
        let p = c.process(&req.exec_id).map_err(status)?;
        let s = p.state();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: s.pid,
            status: status_of(&p, c.paused()).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: s.exit_status,
            exited_at: ts(s.exited_at),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pids = self.pod()?.pids(&req.id).map_err(status)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> TtrpcResult<api::Empty> {
        self.pod()?.set_paused(&req.id, true).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<api::Empty> {
        self.pod()?.set_paused(&req.id, false).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn checkpoint(&self, _: &TtrpcContext, _: CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(status(PodError::Unimplemented("checkpoint")))
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> TtrpcResult<api::Empty> {
        let pod = self.pod()?;
        pod.kill(&req.id, &req.exec_id, req.signal, req.all)
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let pod = self.pod()?;
        pod.resize_pty(&req.id, &req.exec_id, req.height, req.width)
            .map_err(status)?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.pod()?
                .close_stdin(&req.id, &req.exec_id)
                .map_err(status)?;
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| status(PodError::InvalidArgument("update without resources".into())))?;
        self.pod()?.update(&req.id, resources).map_err(status)?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let s = self.pod()?.wait(&req.id, &req.exec_id).map_err(status)?;
        Ok(WaitResponse {
            exit_status: s.exit_status,
            exited_at: ts(s.exited_at),
            ..Default::default()
        })
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let s = self.pod()?.stats(&req.id).map_err(status)?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics(&s)))
            .map_err(|e| status(PodError::Internal(e.to_string())))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(&self, _: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .pod()
            .ok()
            .and_then(|p| p.container(&req.id).ok())
            .map(|c| c.init.state().pid)
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> TtrpcResult<api::Empty> {
        if let Ok(pod) = &self.pod {
            if !pod.is_empty() {
                return Ok(api::Empty::new());
            }
            pod.retire_if_unused(&[]);
            pod.events().close(Duration::from_secs(5));
        }
        self.exit.signal();
        Ok(api::Empty::new())
    }
}

/// The agent's cgroup v2 statistics as containerd's v2 metrics.
pub fn metrics(s: &agent::StatsResponse) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(v2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(v2::MemoryStat {
            usage: mem.usage,
            usage_limit: mem.limit,
            swap_usage: mem.swap_usage,
            anon: mem.anon,
            file: mem.file,
            ..Default::default()
        });
        m.memory_events = MessageField::some(v2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            max: mem.max_events,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(v2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if !s.io.is_empty() {
        m.io = MessageField::some(v2::IOStat {
            usage: s.io.iter().map(io_entry).collect(),
            ..Default::default()
        });
    }
    m
}

fn io_entry(e: &agent::IoEntry) -> v2::IOEntry {
    v2::IOEntry {
        major: e.major,
        minor: e.minor,
        rbytes: e.rbytes,
        wbytes: e.wbytes,
        rios: e.rios,
        wios: e.wios,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_guest_numbers_under_containerds_type() {
        let s = agent::StatsResponse {
            cpu: MessageField::some(agent::CpuStats {
                usage_usec: 42,
                ..Default::default()
            }),
            memory: MessageField::some(agent::MemoryStats {
                usage: 1 << 20,
                limit: 1 << 30,
                oom_kill_events: 1,
                ..Default::default()
            }),
            pids: MessageField::some(agent::PidsStats {
                current: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = metrics(&s);
        assert_eq!(m.cpu.usage_usec, 42);
        assert_eq!((m.memory.usage, m.memory.usage_limit), (1 << 20, 1 << 30));
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.pids.current, 3);
        let any = containerd_shim::util::convert_to_any(Box::new(m)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
    }

    use crate::pod::fake::FakeLauncher;
    use crate::pod::tests::harness;
    use containerd_shim::protos::shim::shim_ttrpc::{create_task, TaskClient};
    use containerd_shim::protos::types::mount::Mount;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    /// The task layer served over ttrpc, as containerd reaches it.
    fn serve(pod: Arc<Pod>, sock: &std::path::Path) -> (ttrpc::Server, TaskClient) {
        let task = Arc::new(TaskService::new(Ok(pod), Arc::new(ExitSignal::default())));
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(create_task(task));
        server.start().unwrap();
        let client = ttrpc::Client::connect(&format!("unix://{}", sock.display())).unwrap();
        (server, TaskClient::new(client))
    }

    fn code(r: TtrpcResult<impl std::fmt::Debug>) -> (Code, String) {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
            other => panic!("{other:?}"),
        }
    }

    /// containerd's calls through the real task and pod layers, against a
    /// fake VM whose agent then hangs: clear codes, bounded times.
    #[test]
    fn containerd_calls_get_typed_answers_and_clear_codes() {
        let h = harness(FakeLauncher::default());
        let (server, client) = serve(h.pod.clone(), &h.tmp.path().join("task.sock"));
        let ctx = || containerd_shim::protos::ttrpc::context::with_timeout(5_000_000_000);
        let r = h.request("c1");
        let create = CreateTaskRequest {
            id: r.id.clone(),
            bundle: r.bundle.clone(),
            rootfs: vec![Mount {
                type_: "ext4".into(),
                source: "/dev/fake".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        client.create(ctx(), &create).unwrap();
        let (c, m) = code(client.create(ctx(), &create));
        assert_eq!(
            (c, m.as_str()),
            (Code::ALREADY_EXISTS, "container c1 already exists")
        );
        let start = StartRequest {
            id: "c1".into(),
            ..Default::default()
        };
        assert_eq!(client.start(ctx(), &start).unwrap().pid, 100);
        let kill = |id: &str, signal| KillRequest {
            id: id.into(),
            signal,
            ..Default::default()
        };
        let (c, _) = code(client.kill(ctx(), &kill("nope", 9)));
        assert_eq!(c, Code::NOT_FOUND);
        let (c, _) = code(client.kill(ctx(), &kill("c1", 1000)));
        assert_eq!(c, Code::INVALID_ARGUMENT);
        // The agent hangs: a kill fails after control_timeout_secs.
        h.vm().state.silent.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let (c, m) = code(client.kill(ctx(), &kill("c1", 9)));
        assert_eq!(c, Code::DEADLINE_EXCEEDED, "{m}");
        assert!(m.contains("control_timeout_secs"), "{m}");
        assert!(t.elapsed() < Duration::from_secs(3));
        h.vm().state.silent.store(false, Ordering::SeqCst);
        client.kill(ctx(), &kill("c1", 9)).unwrap();
        let wait = WaitRequest {
            id: "c1".into(),
            ..Default::default()
        };
        assert_eq!(client.wait(ctx(), &wait).unwrap().exit_status, 137);
        let delete = DeleteRequest {
            id: "c1".into(),
            ..Default::default()
        };
        assert_eq!(client.delete(ctx(), &delete).unwrap().exit_status, 137);
        server.shutdown();
    }

    #[test]
    fn agent_errors_keep_their_code() {
        let e = status(PodError::Agent {
            what: "kill",
            code: Code::NOT_FOUND,
            message: "no such process".into(),
        });
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message().contains("kill") && s.message().contains("no such process"));
            }
            other => panic!("{other:?}"),
        }
    }
}
