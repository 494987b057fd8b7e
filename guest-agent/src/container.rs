//! Containers and their processes: create (rootfs, cgroup, gated init),
//! start, exec, signal, wait, stats, update, pause, remove.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_protocol::agent::{
    get_event_response, ExitEvent, ExtraMount, GetEventResponse, ProcessInfo, Rootfs, Stdio,
};
use moat_protocol::ids::{is_valid_exec_id, is_valid_id};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use seccompiler::BpfProgram;

use crate::cgroup::Cgroup;
use crate::config::Config;
use crate::error::{AgentError, IoContext, Result};
use crate::events::EventQueue;
use crate::mount::{self, RootfsMounts};
use crate::oci;
use crate::process::{self, ChildPlan, Kind, Spawned};
use crate::reaper::{ExitSlot, Reaper};
use crate::stdio::{ProcessIo, StreamRegistry};
use crate::syscall::Syscall;

/// How a process ended, as reported to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code; 128 + the signal number when a signal killed it.
    pub status: i32,
    /// The signal that killed it, or 0 if it exited.
    pub signal: i32,
    /// Whether the signal was the cgroup OOM killer's SIGKILL.
    pub oom_killed: bool,
    /// When the agent saw the exit, in nanoseconds since the Unix epoch.
    pub at_ns: u64,
}

/// A container's process: its init (exec id "") or an exec.
pub struct Process {
    /// Empty for the init.
    pub exec_id: String,
    /// Its pid in the agent's (the guest's root) pid namespace.
    pub pid: i32,
    io: ProcessIo,
    raw_exit: Arc<ExitSlot>,
    exit: Mutex<Option<ExitInfo>>,
    cv: Condvar,
    /// The exec gate of a created, not yet started init.
    gate: Mutex<Option<Spawned>>,
}

impl Process {
    /// How it ended; `None` while it runs.
    pub fn exit(&self) -> Option<ExitInfo> {
        *self.exit.lock().unwrap()
    }

    /// Whether the kernel already reported this process gone.
    fn has_exited(&self) -> bool {
        self.raw_exit.get().is_some()
    }

    /// Blocks until it has exited and its output is drained.
    pub fn wait(&self) -> ExitInfo {
        let mut g = self.exit.lock().unwrap();
        loop {
            if let Some(e) = *g {
                return e;
            }
            g = self.cv.wait(g).unwrap();
        }
    }
}

/// A created container: its mounts, cgroup and processes.
pub struct Container {
    /// The container id the host gave.
    pub id: String,
    mounts: Mutex<RootfsMounts>,
    /// The container's own cgroup.
    pub cgroup: Cgroup,
    seccomp: Arc<Vec<BpfProgram>>,
    processes: Mutex<HashMap<String, Arc<Process>>>,
    dir: PathBuf,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        self.processes
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| AgentError::ProcessNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn init(&self) -> Result<Arc<Process>> {
        self.process("")
    }
}

/// All containers of this guest.
pub struct Containers {
    config: Arc<Config>,
    sys: Arc<dyn Syscall>,
    reaper: Arc<Reaper>,
    /// The stdio-stream port's registry of each process's streams.
    pub streams: Arc<StreamRegistry>,
    /// Exit and OOM events, taken by the host with GetEvent.
    pub events: Arc<EventQueue>,
    map: Mutex<HashMap<String, Arc<Container>>>,
    oom: crate::oom::OomWatcher,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn check_ids(cid: &str, eid: &str) -> Result<()> {
    if !is_valid_id(cid) || !is_valid_exec_id(eid) {
        return Err(AgentError::InvalidArgument(format!(
            "invalid container or exec id {cid:?}/{eid:?}"
        )));
    }
    Ok(())
}

/// Parameters of CreateContainer, decoded.
pub struct CreateRequest<'a> {
    /// Container id.
    pub id: &'a str,
    /// The OCI runtime spec (config.json), as JSON bytes.
    pub spec_json: &'a [u8],
    /// Where the rootfs comes from.
    pub rootfs: &'a Rootfs,
    /// Volumes to mount into the rootfs.
    pub extra_mounts: &'a [ExtraMount],
    /// Which stdio streams the init gets.
    pub stdio: &'a Stdio,
}

impl Containers {
    /// Starts the OOM watcher; no containers yet.
    pub fn new(
        config: Arc<Config>,
        sys: Arc<dyn Syscall>,
        reaper: Arc<Reaper>,
    ) -> Result<Containers> {
        let events = Arc::new(EventQueue::default());
        let oom = crate::oom::OomWatcher::start(events.clone())?;
        Ok(Containers {
            config,
            sys,
            reaper,
            streams: Arc::new(StreamRegistry::default()),
            events,
            map: Mutex::new(HashMap::new()),
            oom,
        })
    }

    /// Whether a container with this id exists.
    pub fn exists(&self, id: &str) -> bool {
        self.map.lock().unwrap().contains_key(id)
    }

    /// The container `id`; an error if the id is invalid or unknown.
    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        if !is_valid_id(id) {
            return Err(AgentError::InvalidArgument(format!(
                "invalid container id {id:?}"
            )));
        }
        self.map
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::ContainerNotFound(id.to_owned()))
    }

    fn extra_env(&self) -> Vec<(String, String)> {
        if self.config.emul_compat {
            vec![(
                "GLIBC_TUNABLES".into(),
                crate::config::GLIBC_TUNABLES.into(),
            )]
        } else {
            Vec::new()
        }
    }

    /// Creates a container and its gated init; returns the init's pid. The
    /// init execs at [`Containers::start`].
    pub fn create(&self, req: CreateRequest<'_>) -> Result<u32> {
        check_ids(req.id, "")?;
        if req.spec_json.len() > moat_protocol::MAX_SPEC_BYTES {
            return Err(AgentError::TooLarge(
                "OCI spec",
                moat_protocol::MAX_SPEC_BYTES,
            ));
        }
        let spec = oci::Spec::from_json(req.spec_json).map_err(AgentError::InvalidSpec)?;
        let process_spec = spec.process.clone().expect("validated");
        if process_spec.terminal != req.stdio.terminal {
            return Err(AgentError::InvalidArgument(
                "spec process.terminal and stdio.terminal disagree".into(),
            ));
        }
        let linux = spec.linux.clone().unwrap_or_default();
        // No profile, not even Unconfined, lets a workload open vsock.
        let mut seccomp = vec![crate::seccomp::workload_floor()?];
        if let Some(s) = &linux.seccomp {
            seccomp.extend(crate::seccomp::compile(s)?);
        }
        {
            // Reserve the id so a concurrent create of it fails early.
            let map = self.map.lock().unwrap();
            if map.contains_key(req.id) {
                return Err(AgentError::ContainerExists(req.id.to_owned()));
            }
        }
        let dir = self.config.state_dir.join("containers").join(req.id);
        if dir.exists() {
            return Err(AgentError::ContainerExists(req.id.to_owned()));
        }
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;

        let mut mounts =
            match mount::mount_rootfs(&*self.sys, &dir, req.rootfs, &self.config.sysfs_block) {
                Ok(m) => m,
                Err(e) => {
                    remove_empty_dirs(&dir);
                    return Err(e);
                }
            };
        let cleanup = |mounts: &mut RootfsMounts, cg: Option<&Cgroup>| {
            mounts.unmount(&*self.sys);
            if let Some(cg) = cg {
                let _ = cg.kill_all();
                let _ = cg.remove();
            }
            remove_empty_dirs(&dir);
        };
        if let Err(e) = self.extra_mounts(&mut mounts, req.extra_mounts) {
            cleanup(&mut mounts, None);
            return Err(e);
        }
        let cgroup = match Cgroup::create(&self.config.cgroup_root, req.id) {
            Ok(c) => c,
            Err(e) => {
                cleanup(&mut mounts, None);
                return Err(e);
            }
        };
        let spec = Arc::new(spec);
        let result = (|| {
            // The spec's own pids limit, if any, replaces the default.
            cgroup.default_pids_limit(self.config.pids_limit)?;
            if let Some(r) = &linux.resources {
                cgroup.apply_oci(r)?;
            }
            let size = process_spec
                .console_size
                .map(|s| (s.height as u16, s.width as u16));
            let (io, child) = ProcessIo::new(req.stdio, size)?;
            let plan = ChildPlan {
                kind: Kind::Init {
                    rootfs: mounts.rootfs.clone(),
                    spec: spec.clone(),
                },
                process: process_spec.clone(),
                seccomp: Arc::new(seccomp),
                cgroup_procs: cgroup.procs_path(),
                extra_env: self.extra_env(),
                gated: true,
            };
            let mut spawned = process::spawn(&plan, child)?;
            io.set_pty(spawned.pty_master.take());
            Ok((io, spawned, plan.seccomp))
        })();
        let (io, spawned, seccomp) = match result {
            Ok(v) => v,
            Err(e) => {
                cleanup(&mut mounts, Some(&cgroup));
                return Err(e);
            }
        };
        let pid = spawned.pid;
        let proc_ = Arc::new(Process {
            exec_id: String::new(),
            pid,
            io,
            raw_exit: self.reaper.register(pid),
            exit: Mutex::new(None),
            cv: Condvar::new(),
            gate: Mutex::new(Some(spawned)),
        });
        let c = Arc::new(Container {
            id: req.id.to_owned(),
            mounts: Mutex::new(mounts),
            cgroup,
            seccomp,
            processes: Mutex::new(HashMap::from([(String::new(), proc_.clone())])),
            dir,
        });
        self.oom.watch(&c.id, &c.cgroup);
        self.map.lock().unwrap().insert(c.id.clone(), c.clone());
        self.spawn_waiter(&c, proc_);
        log::info!("created container {} (pid {pid})", req.id);
        Ok(pid as u32)
    }

    fn extra_mounts(&self, mounts: &mut RootfsMounts, extra: &[ExtraMount]) -> Result<()> {
        if extra.is_empty() {
            return Ok(());
        }
        let root: std::os::fd::OwnedFd = std::fs::File::open(&mounts.rootfs)
            .ctx(|| "opening rootfs".into())?
            .into();
        for m in extra {
            let vol = m
                .volume
                .as_ref()
                .ok_or_else(|| AgentError::InvalidArgument("extra mount without volume".into()))?;
            let src = mount::resolve_source(vol.source.as_ref(), &self.config.sysfs_block)?;
            let target = mount::ensure_in_root(&root, &m.destination, true)?;
            let tpath = mount::fd_path(&target);
            let mut flags = nix::mount::MsFlags::empty();
            if m.readonly {
                flags |= nix::mount::MsFlags::MS_RDONLY;
            }
            match src {
                mount::Resolved::Device(dev) => {
                    let opts = mount::MountOptions::parse(&vol.options);
                    self.sys
                        .mount(
                            Some(&dev),
                            &tpath,
                            Some(&vol.fs_type),
                            flags | opts.flags,
                            opts.data_string().as_deref(),
                        )
                        .ctx(|| format!("mounting {} on {}", dev.display(), m.destination))?;
                }
                mount::Resolved::Directory(d) => {
                    self.sys
                        .mount(
                            Some(&d),
                            &tpath,
                            None,
                            nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                            None,
                        )
                        .ctx(|| format!("binding {} on {}", d.display(), m.destination))?;
                    if m.readonly {
                        let top = mount::ensure_in_root(&root, &m.destination, true)?;
                        self.sys
                            .mount(
                                None,
                                &mount::fd_path(&top),
                                None,
                                nix::mount::MsFlags::MS_BIND
                                    | nix::mount::MsFlags::MS_REMOUNT
                                    | flags,
                                None,
                            )
                            .ctx(|| format!("read-only {}", m.destination))?;
                    }
                }
            }
            // Recorded by path: unmounted (lazily) before the rootfs.
            mounts
                .mounted
                .push(mounts.rootfs.join(m.destination.trim_start_matches('/')));
        }
        Ok(())
    }

    /// Waits for a process's exit and its output, then reports it.
    fn spawn_waiter(&self, c: &Arc<Container>, p: Arc<Process>) {
        let c = c.clone();
        let events = self.events.clone();
        let oom_before = c.cgroup.oom_kills();
        let _ = std::thread::Builder::new()
            .name("waiter".into())
            .spawn(move || {
                let status = p.raw_exit.wait();
                p.io.drain(Duration::from_secs(2));
                p.io.finish();
                let (code, signal) = match status {
                    WaitStatus::Exited(_, code) => (code, 0),
                    WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, sig as i32),
                    _ => (255, 0),
                };
                let oom_killed =
                    signal == Signal::SIGKILL as i32 && c.cgroup.oom_kills() > oom_before;
                let info = ExitInfo {
                    status: code,
                    signal,
                    oom_killed,
                    at_ns: now_ns(),
                };
                *p.exit.lock().unwrap() = Some(info);
                p.cv.notify_all();
                log::info!("{}/{} (pid {}) exited: {info:?}", c.id, p.exec_id, p.pid);
                let mut ev = GetEventResponse::new();
                ev.event = Some(get_event_response::Event::Exit(ExitEvent {
                    container_id: c.id.clone(),
                    exec_id: p.exec_id.clone(),
                    pid: p.pid as u32,
                    exit_status: code,
                    signal,
                    oom_killed,
                    exited_at_ns: info.at_ns,
                    ..Default::default()
                }));
                events.push(ev);
            });
    }

    /// Lets the created init exec; returns its pid. Fails if already started.
    pub fn start(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        let init = c.init()?;
        let gate = init.gate.lock().unwrap().take();
        let Some(spawned) = gate else {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} was already started"
            )));
        };
        if let Err(e) = init
            .io
            .attach(&self.streams, id, "", moat_protocol::STREAM_ATTACH_TIMEOUT)
        {
            *init.gate.lock().unwrap() = Some(spawned);
            return Err(e);
        }
        spawned.start()?;
        log::info!("started container {id}");
        Ok(init.pid as u32)
    }

    /// Starts a process (OCI process JSON) in a running container; returns
    /// its pid.
    pub fn exec(&self, id: &str, exec_id: &str, process_json: &[u8], stdio: &Stdio) -> Result<u32> {
        check_ids(id, exec_id)?;
        if exec_id.is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec id must not be empty".into(),
            ));
        }
        let c = self.get(id)?;
        let init = c.init()?;
        if init.gate.lock().unwrap().is_some() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is not started"
            )));
        }
        if init.has_exited() {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        if process_json.len() > moat_protocol::MAX_SPEC_BYTES {
            return Err(AgentError::TooLarge(
                "OCI process",
                moat_protocol::MAX_SPEC_BYTES,
            ));
        }
        let spec = oci::Process::from_json(process_json).map_err(AgentError::InvalidSpec)?;
        if spec.terminal != stdio.terminal {
            return Err(AgentError::InvalidArgument(
                "process.terminal and stdio.terminal disagree".into(),
            ));
        }
        {
            let procs = c.processes.lock().unwrap();
            if procs.contains_key(exec_id) {
                return Err(AgentError::ProcessExists(exec_id.to_owned()));
            }
        }
        let size = spec.console_size.map(|s| (s.height as u16, s.width as u16));
        let (io, child) = ProcessIo::new(stdio, size)?;
        let plan = ChildPlan {
            kind: Kind::Exec { init_pid: init.pid },
            process: spec.clone(),
            seccomp: c.seccomp.clone(),
            cgroup_procs: c.cgroup.procs_path(),
            extra_env: self.extra_env(),
            // Held before exec until its streams are attached (a terminal
            // exists only once the child opened it in the container). A
            // child whose gate is dropped exits without exec.
            gated: true,
        };
        let mut spawned = process::spawn(&plan, child)?;
        io.set_pty(spawned.pty_master.take());
        io.attach(
            &self.streams,
            id,
            exec_id,
            moat_protocol::STREAM_ATTACH_TIMEOUT,
        )?;
        let pid = spawned.pid;
        spawned.start()?;
        let p = Arc::new(Process {
            exec_id: exec_id.to_owned(),
            pid,
            io,
            raw_exit: self.reaper.register(pid),
            exit: Mutex::new(None),
            cv: Condvar::new(),
            gate: Mutex::new(None),
        });
        {
            let mut procs = c.processes.lock().unwrap();
            if procs.contains_key(exec_id) {
                return Err(AgentError::ProcessExists(exec_id.to_owned()));
            }
            procs.insert(exec_id.to_owned(), p.clone());
        }
        self.spawn_waiter(&c, p);
        Ok(pid as u32)
    }

    /// Sends `sig` to a process, or with `all` to every process of the
    /// container (init only).
    pub fn signal(&self, id: &str, exec_id: &str, sig: u32, all: bool) -> Result<()> {
        check_ids(id, exec_id)?;
        let sig = Signal::try_from(sig as i32)
            .map_err(|_| AgentError::InvalidArgument(format!("invalid signal {sig}")))?;
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        if all && exec_id.is_empty() {
            for pid in c.cgroup.pids() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
            }
            return Ok(());
        }
        // Signalling what has already exited is a no-op, as with kill(1) on
        // a zombie: teardown (containerd's StopPodSandbox) kills every
        // process and must not fail on one that ended first.
        if p.has_exited() || p.exit().is_some() {
            log::debug!("signal {sig} to {id}/{exec_id}: already exited");
            return Ok(());
        }
        match nix::sys::signal::kill(Pid::from_raw(p.pid), sig) {
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            r => r.ctx(|| format!("signalling {id}/{exec_id}")),
        }
    }

    /// Blocks until the process exits; returns its pid and how it ended.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<(i32, ExitInfo)> {
        check_ids(id, exec_id)?;
        let p = self.get(id)?.process(exec_id)?;
        Ok((p.pid, p.wait()))
    }

    /// Resizes the process's terminal (values clamped to `u16`).
    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        check_ids(id, exec_id)?;
        let p = self.get(id)?.process(exec_id)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.io.resize(clamp(rows), clamp(cols))
    }

    /// Closes the process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        check_ids(id, exec_id)?;
        let p = self.get(id)?.process(exec_id)?;
        p.io.close_stdin();
        Ok(())
    }

    /// The processes in the container's cgroup, with exec id and command
    /// where known.
    pub fn list(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.get(id)?;
        let known: HashMap<i32, String> = c
            .processes
            .lock()
            .unwrap()
            .values()
            .map(|p| (p.pid, p.exec_id.clone()))
            .collect();
        Ok(c.cgroup
            .pids()
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                exec_id: known.get(&(pid as i32)).cloned().unwrap_or_default(),
                command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_default(),
                ..Default::default()
            })
            .collect())
    }

    /// The container's cgroup statistics.
    pub fn stats(&self, id: &str) -> Result<moat_protocol::agent::StatsResponse> {
        Ok(self.get(id)?.cgroup.stats())
    }

    /// Applies new resource limits, from moat's message and/or OCI JSON
    /// (either may be absent or empty).
    pub fn update(
        &self,
        id: &str,
        r: Option<&moat_protocol::agent::Resources>,
        oci_json: &[u8],
    ) -> Result<()> {
        let c = self.get(id)?;
        if let Some(r) = r {
            c.cgroup.apply(r)?;
        }
        if !oci_json.is_empty() {
            let r: oci::Resources = serde_json::from_slice(oci_json)
                .map_err(|e| AgentError::InvalidArgument(format!("OCI resources: {e}")))?;
            c.cgroup.apply_oci(&r)?;
        }
        Ok(())
    }

    /// Freezes (`true`) or thaws the container's cgroup.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        self.get(id)?.cgroup.freeze(frozen)
    }

    /// Kills and removes the container: its processes, mounts, cgroup and
    /// files. A running one needs `force`.
    pub fn remove(&self, id: &str, force: bool) -> Result<()> {
        let c = self.get(id)?;
        let init = c.init()?;
        let created_only = init.gate.lock().unwrap().take().is_some();
        let running = !created_only && !init.has_exited();
        if running && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "container {id:?} is running; stop it or remove with force"
            )));
        }
        c.cgroup.freeze(false).ok();
        c.cgroup.kill_all()?;
        // The init's waiter must finish before the mounts go away.
        let _ = init.wait();
        self.map.lock().unwrap().remove(id);
        self.streams.forget(id);
        self.oom.unwatch(id);
        c.mounts.lock().unwrap().unmount(&*self.sys);
        c.cgroup.remove()?;
        remove_empty_dirs(&c.dir);
        // Its copied-in volumes (CopyFile under shared/<id>), if any.
        let shared = self.config.shared_dir().join(id);
        if let Err(e) = std::fs::remove_dir_all(&shared) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing {}: {e}", shared.display());
            }
        }
        log::info!("removed container {id}");
        Ok(())
    }

    /// Pushes an OOM event (from the OOM watcher).
    /// Kills everything (Shutdown).
    pub fn kill_all(&self) {
        let all: Vec<_> = self.map.lock().unwrap().values().cloned().collect();
        for c in all {
            let _ = c.cgroup.kill_all();
        }
    }
}

/// Removes a container's state directory, whose subdirectories are (now
/// unmounted) mount points. Only empty directories are removed, so a mount
/// that failed to go away is never descended into and emptied.
fn remove_empty_dirs(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        log::warn!("removing {}: {e}", dir.display());
    }
}
