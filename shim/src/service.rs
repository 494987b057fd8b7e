//! The containerd Task service: translates task API calls into sandbox,
//! rootfs, stdio and agent operations, and publishes events in order.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::api::{
    self, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim::shim::CheckpointTaskRequest;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status as TaskStatus};
use containerd_shim::{DeleteResponse, ExitSignal, TtrpcContext, TtrpcResult};
use moat_protocol::agent;
use moat_protocol::StreamKind;

use crate::annotations;
use crate::config::{Config, UpperKind};
use crate::events::{timestamp, Event, Publisher};
use crate::network::{self, PodNetwork};
use crate::process::{Process, Status};
use crate::rootfs::{self, LayerCache, MountSpec, Prepared, UpperSpec};
use crate::sandbox::{sandbox_dir, upper_dir, upper_image, Sandbox};
use crate::stdio::{ProcessIo, StdioSpec, Streams};
use crate::volumes;

/// How long an exit waits for the process's output to reach containerd.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// The message of an error, without the status wrapping.
fn message(e: &ttrpc::Error) -> String {
    match e {
        ttrpc::Error::RpcStatus(s) => s.message().to_owned(),
        other => other.to_string(),
    }
}

/// An agent error keeps its status code (containerd maps NotFound and
/// friends), with its context in front.
fn agent_err(what: &str, e: ttrpc::Error) -> ttrpc::Error {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            err(s.code(), format!("{what}: guest agent: {}", s.message()))
        }
        other => err(Code::UNAVAILABLE, format!("{what}: guest agent: {other}")),
    }
}

struct Container {
    id: String,
    bundle: String,
    rootfs: Prepared,
    work_dir: PathBuf,
    serials: Vec<String>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    /// Set when the container is deleted: its volume sync stops.
    gone: Arc<AtomicBool>,
}

/// Copies what changes in a container's bind sources into the guest until
/// the container is deleted or the VM is gone.
fn spawn_volume_sync(
    id: &str,
    mut vols: volumes::Volumes,
    sb: Arc<Sandbox>,
    gone: Arc<AtomicBool>,
    cfg: &Config,
) {
    let (name, timeout) = (id.to_owned(), cfg.agent_timeout());
    let spawned = std::thread::Builder::new()
        .name("volume-sync".into())
        .spawn(move || loop {
            std::thread::sleep(volumes::SYNC_INTERVAL);
            if gone.load(Ordering::Relaxed) || sb.vmm_exited() {
                break;
            }
            let copied = vols
                .changes()
                .and_then(|items| volumes::copy(sb.agent(), &items, timeout));
            if let Err(e) = copied {
                log::warn!("volumes of {name}: {e}");
                vols.forget();
            }
        });
    if let Err(e) = spawned {
        log::warn!("no volume sync for {id}: {e}");
    }
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }
}

struct Inner {
    namespace: String,
    cfg: Result<Config, String>,
    events: Publisher,
    exit: Arc<ExitSignal>,
    /// The pod's VM; the lock also serializes boots.
    sandbox: Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

/// The Task service of one shim (one pod).
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(
        namespace: &str,
        cfg: Result<Config, String>,
        events: Publisher,
        exit: Arc<ExitSignal>,
    ) -> Service {
        Service {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                cfg,
                events,
                exit,
                sandbox: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn cfg(&self) -> TtrpcResult<&Config> {
        self.inner
            .cfg
            .as_ref()
            .map_err(|e| err(Code::FAILED_PRECONDITION, e.clone()))
    }

    /// The deadline of one agent call.
    fn call_timeout(&self) -> Duration {
        self.inner
            .cfg
            .as_ref()
            .map(Config::agent_timeout)
            .unwrap_or(Duration::from_secs(300))
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn sandbox(&self) -> TtrpcResult<Arc<Sandbox>> {
        self.inner
            .sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the sandbox VM is not running"))
    }

    fn publish(&self, e: Event) {
        self.inner.events.publish(e);
    }

    /// Stops the VM and removes its state directory once no container is left.
    fn stop_sandbox_if_unused(&self) {
        let empty = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if !empty {
            return;
        }
        if let Some(sb) = self
            .inner
            .sandbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            sb.stop();
            let _ = fs::remove_dir_all(&sb.dir);
        }
    }

    fn do_create(&self, req: &CreateTaskRequest) -> TtrpcResult<Arc<Container>> {
        let cfg = self.cfg()?.clone();
        if !moat_protocol::ids::is_valid_id(&req.id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid container id {:?}", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported",
            ));
        }
        if self.container(&req.id).is_ok() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let bundle = Path::new(&req.bundle);
        let spec_path = bundle.join("config.json");
        let spec = oci_spec::runtime::Spec::load(&spec_path).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("invalid bundle {}: {e}", spec_path.display()),
            )
        })?;
        let mut spec_value: serde_json::Value = fs::read(&spec_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                err(
                    Code::INVALID_ARGUMENT,
                    format!("cannot read {}: {e}", spec_path.display()),
                )
            })?;
        let netns = network::netns_path(&spec_value);
        network::guest_spec(&mut spec_value);
        let (vols, copies) = volumes::plan(&mut spec_value, &req.id)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let spec_json = serde_json::to_vec(&spec_value)
            .map_err(|e| err(Code::INTERNAL, format!("encoding the guest spec: {e}")))?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        annotations::check_known(&annotations)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        // Sizing errors must surface even when the VM already runs.
        let size = annotations::vm_size(&cfg, &annotations)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .validate()
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;

        let mounts: Vec<MountSpec> = req
            .rootfs
            .iter()
            .map(|m| MountSpec {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let plan = rootfs::plan(&mounts, bundle)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("rootfs: {e}")))?;

        let grouping = annotations::grouping(&annotations, &req.id);
        let sb_dir = sandbox_dir(&cfg, &grouping);
        let work_dir = sb_dir.join("containers").join(&req.id);
        let upper = match cfg.upper {
            UpperKind::Ext4 => UpperSpec::Ext4 {
                size_mib: cfg.upper_size_mib,
                image: upper_image(&cfg, &grouping, &req.id),
                pod_limit_mib: cfg.pod_upper_limit_mib,
            },
            UpperKind::Tmpfs => UpperSpec::Tmpfs,
        };
        let mut sb_guard = self.inner.sandbox.lock().unwrap_or_else(|e| e.into_inner());
        let booting = sb_guard.is_none();
        let cleanup_dir = |booting: bool| {
            let _ = fs::remove_dir_all(&work_dir);
            if booting {
                let _ = fs::remove_dir_all(&sb_dir);
                let _ = fs::remove_dir_all(upper_dir(&cfg, &grouping));
            }
        };
        let prepared = rootfs::prepare(
            &plan,
            &LayerCache::new(&cfg.layer_cache_dir),
            &work_dir,
            &upper,
        )
        .map_err(|e| {
            cleanup_dir(booting);
            err(Code::INTERNAL, format!("rootfs: {e}"))
        })?;
        let mut disks = prepared.layers.clone();
        disks.extend(prepared.upper.clone());

        let (sandbox, serials) = match sb_guard.as_ref() {
            Some(sb) => {
                let serials = sb.attach(&disks).map_err(|e| {
                    prepared.remove_owned();
                    cleanup_dir(false);
                    err(Code::RESOURCE_EXHAUSTED, e.to_string())
                })?;
                (sb.clone(), serials)
            }
            None => {
                // Only a pod gets more containers later; they need empty slots.
                let spares = if annotations.contains_key(annotations::SANDBOX_ID) {
                    cfg.spare_block_slots as usize
                } else {
                    0
                };
                let fail = |e: String| {
                    prepared.remove_owned();
                    cleanup_dir(true);
                    err(
                        Code::FAILED_PRECONDITION,
                        format!("cannot start the VM: {e}"),
                    )
                };
                let net = netns
                    .as_deref()
                    .map(PodNetwork::join)
                    .transpose()
                    .map_err(|e| fail(format!("pod network: {e}")))?;
                let sb = Sandbox::boot(&cfg, &grouping, &sb_dir, size, &disks, spares, net)
                    .map_err(|e| fail(e.to_string()))?;
                let sb = Arc::new(sb);
                let serials = sb.serials_of(&disks);
                self.spawn_event_loop(sb.clone());
                *sb_guard = Some(sb.clone());
                (sb, serials)
            }
        };
        drop(sb_guard);

        let vol = |serial: &str, fs_type: &str| agent::Volume {
            source: MessageField::some(agent::Source {
                kind: Some(agent::source::Kind::Serial(serial.to_owned())),
                ..Default::default()
            }),
            fs_type: fs_type.to_owned(),
            options: rootfs::mount_options(fs_type),
            ..Default::default()
        };
        let n = prepared.layers.len();
        let areq = agent::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec_json: spec_json,
            rootfs: MessageField::some(agent::Rootfs {
                layers: prepared
                    .layers
                    .iter()
                    .zip(&serials)
                    .map(|(d, s)| vol(s, &d.fs_type))
                    .collect(),
                upper: match (&prepared.upper, serials.get(n)) {
                    (Some(u), Some(s)) => MessageField::some(vol(s, &u.fs_type)),
                    _ => MessageField::none(),
                },
                ..Default::default()
            }),
            stdio: MessageField::some(stdio.agent_stdio()),
            ..Default::default()
        };
        let agent = sandbox.agent();
        let created = volumes::copy(agent, &copies, cfg.agent_timeout())
            .map_err(|e| err(Code::INTERNAL, e.to_string()))
            .and_then(|()| {
                agent
                    .create_container(agent.ctx_timeout(cfg.agent_timeout()), &areq)
                    .map_err(|e| agent_err("create container", e))
            });
        if let Err(e) = created {
            sandbox.release(&serials);
            prepared.remove_owned();
            let _ = fs::remove_dir_all(&work_dir);
            self.stop_sandbox_if_unused();
            return Err(e);
        }
        let c = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: prepared,
            work_dir,
            serials,
            init: Arc::new(Process::new(&req.id, "", stdio, Vec::new())),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            gone: Arc::new(AtomicBool::new(false)),
        });
        if !vols.is_empty() {
            spawn_volume_sync(&c.id, vols, sandbox.clone(), c.gone.clone(), &cfg);
        }
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), c.clone());
        Ok(c)
    }

    /// Forwards the agent's OOM events while the VM runs.
    fn spawn_event_loop(&self, sb: Arc<Sandbox>) {
        let svc = self.clone();
        let _ = std::thread::Builder::new()
            .name("agent-events".into())
            .spawn(move || loop {
                let req = agent::GetEventRequest {
                    timeout_ms: 5000,
                    ..Default::default()
                };
                let agent = sb.agent();
                match agent.get_event(agent.ctx_timeout(Duration::from_secs(15)), &req) {
                    Ok(ev) => {
                        if let Some(agent::get_event_response::Event::Oom(oom)) = ev.event {
                            svc.publish(Event::Oom(TaskOOM {
                                container_id: oom.container_id,
                                ..Default::default()
                            }));
                        }
                    }
                    Err(e) => {
                        if sb.vmm_exited() {
                            break;
                        }
                        log::debug!("agent events: {e}");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                let still_current = svc
                    .inner
                    .sandbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|cur| Arc::ptr_eq(cur, &sb));
                if !still_current {
                    break;
                }
            });
    }

    /// Opens the agent streams of a process (before it starts).
    fn open_streams(&self, sb: &Sandbox, p: &Process) -> TtrpcResult<Streams> {
        let a = sb.agent();
        let flags = p.stdio.agent_stdio();
        let open = |kind| {
            a.open_stream(&p.container_id, &p.exec_id, kind)
                .map_err(|e| {
                    err(
                        Code::UNAVAILABLE,
                        format!("open {} stream: {e}", kind.as_str()),
                    )
                })
        };
        Ok(Streams {
            stdin: if flags.stdin && !flags.terminal {
                Some(open(StreamKind::Stdin)?)
            } else {
                None
            },
            stdout: if flags.stdout {
                Some(open(StreamKind::Stdout)?)
            } else {
                None
            },
            stderr: if flags.stderr {
                Some(open(StreamKind::Stderr)?)
            } else {
                None
            },
            pty: if flags.terminal {
                Some(open(StreamKind::Pty)?)
            } else {
                None
            },
        })
    }

    /// Waits for the process's exit in the guest, then for its output, then
    /// reports it: TaskExit is published only after everything was copied.
    fn spawn_waiter(&self, sb: Arc<Sandbox>, p: Arc<Process>) {
        let svc = self.clone();
        let _ = std::thread::Builder::new()
            .name("wait".into())
            .spawn(move || {
                let req = agent::ProcessRequest {
                    container_id: p.container_id.clone(),
                    exec_id: p.exec_id.clone(),
                    ..Default::default()
                };
                let a = sb.agent();
                let (status, at) = match a.wait_process(a.ctx(), &req) {
                    Ok(r) => {
                        let at = UNIX_EPOCH + Duration::from_nanos(r.exited_at_ns);
                        (
                            r.exit_status as u32,
                            if r.exited_at_ns == 0 {
                                SystemTime::now()
                            } else {
                                at
                            },
                        )
                    }
                    Err(e) => {
                        // The VM or the agent is gone: the process is too.
                        log::warn!("wait for {}/{}: {e}", p.container_id, p.exec_id);
                        (255, SystemTime::now())
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
                let pid = p.state().pid;
                if p.set_exited(status, at) {
                    svc.publish(Event::Exit(TaskExit {
                        container_id: p.container_id.clone(),
                        id: p.event_id().to_owned(),
                        pid,
                        exit_status: status,
                        exited_at: MessageField::some(timestamp(at)),
                        ..Default::default()
                    }));
                }
            });
    }
}

fn status_of(p: &Process, paused: bool) -> TaskStatus {
    match p.state().status {
        Status::Created => TaskStatus::CREATED,
        Status::Running if paused => TaskStatus::PAUSED,
        Status::Running => TaskStatus::RUNNING,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

fn ts(
    t: Option<SystemTime>,
) -> MessageField<containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp> {
    t.map(timestamp).into()
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        log::info!("create {} (bundle {})", req.id, req.bundle);
        let c = self
            .do_create(&req)
            .inspect_err(|e| log::error!("create {}: {}", req.id, message(e)))?;
        self.publish(Event::Create(TaskCreate {
            container_id: c.id.clone(),
            bundle: c.bundle.clone(),
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
        }));
        Ok(CreateTaskResponse {
            pid: 0,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if p.state().status != Status::Created {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} was already started", p.event_id()),
            ));
        }
        let sb = self.sandbox()?;
        let streams = self.open_streams(&sb, &p)?;
        let io = ProcessIo::start(&p.stdio, streams, &c.id, &self.inner.namespace)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        p.set_io(Arc::new(io));
        let a = sb.agent();
        let pid = if req.exec_id.is_empty() {
            let r = agent::StartContainerRequest {
                container_id: c.id.clone(),
                ..Default::default()
            };
            a.start_container(a.ctx_timeout(self.call_timeout()), &r)
                .map_err(|e| agent_err("start container", e))?
                .pid
        } else {
            let r = agent::ExecProcessRequest {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                oci_process_json: p.spec_json.clone(),
                stdio: MessageField::some(p.stdio.agent_stdio()),
                ..Default::default()
            };
            a.exec_process(a.ctx_timeout(self.call_timeout()), &r)
                .map_err(|e| agent_err("exec", e))?
                .pid
        };
        p.set_running(pid);
        // The start event goes out before the waiter exists, so it precedes TaskExit.
        if req.exec_id.is_empty() {
            self.publish(Event::Start(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            }));
        } else {
            self.publish(Event::ExecStarted(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                pid,
                ..Default::default()
            }));
        }
        self.spawn_waiter(sb, p);
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let c = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            let s = p.state();
            if s.status == Status::Running {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is running", req.exec_id),
                ));
            }
            c.execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.exec_id);
            return Ok(DeleteResponse {
                pid: s.pid,
                exit_status: s.exit_status,
                exited_at: ts(s.exited_at),
                ..Default::default()
            });
        }
        let s = c.init.state();
        if s.status == Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is running", c.id),
            ));
        }
        if let Ok(sb) = self.sandbox() {
            if !sb.vmm_exited() {
                let r = agent::RemoveContainerRequest {
                    container_id: c.id.clone(),
                    force: true,
                    ..Default::default()
                };
                let a = sb.agent();
                if let Err(e) = a.remove_container(a.ctx_timeout(self.call_timeout()), &r) {
                    log::warn!("remove {} in the guest: {e}", c.id);
                }
            }
            sb.release(&c.serials);
        }
        if let Some(io) = c.init.io() {
            io.finish();
        }
        c.gone.store(true, Ordering::Relaxed);
        c.rootfs.remove_owned();
        let _ = fs::remove_dir_all(&c.work_dir);
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&c.id);
        let exited_at = s.exited_at.unwrap_or_else(SystemTime::now);
        self.publish(Event::Delete(TaskDelete {
            container_id: c.id.clone(),
            pid: s.pid,
            exit_status: s.exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            id: c.id.clone(),
            ..Default::default()
        }));
        self.stop_sandbox_if_unused();
        log::info!("deleted {}", c.id);
        Ok(DeleteResponse {
            pid: s.pid,
            exit_status: s.exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        if !moat_protocol::ids::is_valid_id(&req.exec_id) {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        if c.init.state().status != Status::Running {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", c.id),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec process spec: {e}"),
            )
        })?;
        let stdio = StdioSpec {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        stdio
            .validate()
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        {
            let mut execs = c.execs.lock().unwrap_or_else(|e| e.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(err(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Arc::new(Process::new(&c.id, &req.exec_id, stdio, spec)),
            );
        }
        self.publish(Event::ExecAdded(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        }));
        Ok(api::Empty::new())
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = p.state();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: s.pid,
            status: status_of(&p, c.paused.load(Ordering::SeqCst)).into(),
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

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let c = self.container(&req.id)?;
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::ContainerRequest {
            container_id: c.id.clone(),
            ..Default::default()
        };
        let list = a
            .list_processes(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("list processes", e))?;
        Ok(PidsResponse {
            processes: list
                .processes
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::ContainerRequest {
            container_id: c.id.clone(),
            ..Default::default()
        };
        a.pause_container(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("pause", e))?;
        c.paused.store(true, Ordering::SeqCst);
        self.publish(Event::Paused(TaskPaused {
            container_id: c.id.clone(),
            ..Default::default()
        }));
        Ok(api::Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::ContainerRequest {
            container_id: c.id.clone(),
            ..Default::default()
        };
        a.resume_container(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("resume", e))?;
        c.paused.store(false, Ordering::SeqCst);
        self.publish(Event::Resumed(TaskResumed {
            container_id: c.id.clone(),
            ..Default::default()
        }));
        Ok(api::Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by moat",
        ))
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        match p.state().status {
            Status::Stopped => {
                return Err(err(
                    Code::NOT_FOUND,
                    format!("process {} already finished", p.event_id()),
                ))
            }
            Status::Created if req.exec_id.is_empty() => {
                // Nothing runs yet in the guest: the task simply ends.
                let status = 128 + req.signal;
                if p.set_exited(status, SystemTime::now()) {
                    self.publish(Event::Exit(TaskExit {
                        container_id: c.id.clone(),
                        id: c.id.clone(),
                        exit_status: status,
                        exited_at: MessageField::some(timestamp(SystemTime::now())),
                        ..Default::default()
                    }));
                }
                return Ok(api::Empty::new());
            }
            _ => {}
        }
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::SignalProcessRequest {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            signal: req.signal,
            all: req.all,
            ..Default::default()
        };
        a.signal_process(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("kill", e))?;
        Ok(api::Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if !p.stdio.terminal {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("{} has no terminal", p.event_id()),
            ));
        }
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::ResizePtyRequest {
            container_id: c.id.clone(),
            exec_id: req.exec_id.clone(),
            rows: req.height,
            cols: req.width,
            ..Default::default()
        };
        a.resize_pty(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("resize pty", e))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            if let Some(io) = p.io() {
                io.close_stdin();
            }
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| err(Code::INVALID_ARGUMENT, "update without resources"))?;
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("invalid resources: {e}")))?;
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::UpdateContainerRequest {
            container_id: c.id.clone(),
            oci_resources_json: resources,
            ..Default::default()
        };
        a.update_container(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("update", e))?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let c = self.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let s = p.wait();
        Ok(WaitResponse {
            exit_status: s.exit_status,
            exited_at: ts(s.exited_at),
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let c = self.container(&req.id)?;
        let sb = self.sandbox()?;
        let a = sb.agent();
        let r = agent::ContainerRequest {
            container_id: c.id.clone(),
            ..Default::default()
        };
        let s = a
            .stats(a.ctx_timeout(self.call_timeout()), &r)
            .map_err(|e| agent_err("stats", e))?;
        let any = containerd_shim::util::convert_to_any(Box::new(metrics(&s)))
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .container(&req.id)
            .map(|c| c.init.state().pid)
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<api::Empty> {
        let empty = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if !empty {
            return Ok(api::Empty::new());
        }
        self.stop_sandbox_if_unused();
        self.inner.events.close(Duration::from_secs(5));
        self.inner.exit.signal();
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
            usage: s
                .io
                .iter()
                .map(|e| v2::IOEntry {
                    major: e.major,
                    minor: e.minor,
                    rbytes: e.rbytes,
                    wbytes: e.wbytes,
                    rios: e.rios,
                    wios: e.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    m
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

    #[test]
    fn agent_errors_keep_their_code() {
        let e = agent_err("kill", err(Code::NOT_FOUND, "no such process"));
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::NOT_FOUND);
                assert!(s.message().contains("kill") && s.message().contains("no such process"));
            }
            other => panic!("{other:?}"),
        }
    }
}
