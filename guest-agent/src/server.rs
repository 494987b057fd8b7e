//! The ttrpc service: decodes requests, calls into [`Containers`], maps
//! errors to ttrpc statuses. Also starts the listeners.

use std::sync::Arc;
use std::time::Duration;

use moat_protocol::agent::*;
use moat_protocol::agent_ttrpc::{self, Agent};
use ttrpc::TtrpcContext;

use crate::config::Config;
use crate::container::{Containers, CreateRequest};
use crate::error::{AgentError, IoContext, Result};
use crate::reaper::Reaper;
use crate::syscall::{LinuxSyscall, Syscall};
use crate::transport::{HostOnly, Listener};

/// The ttrpc Agent service: the host's calls on the guest's containers.
pub struct AgentService {
    config: Arc<Config>,
    containers: Arc<Containers>,
}

fn reply<T>(what: &str, r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        log::debug!("{what} failed: {e}");
        e.into()
    })
}

impl Agent for AgentService {
    fn version(&self, _: &TtrpcContext, req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        if !moat_protocol::client::client_is_compatible(&req) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "client protocol {} (needs agent >= {}) is not served by agent protocol {} \
                     (serves clients >= {})",
                    req.protocol_version,
                    req.min_agent_version,
                    moat_protocol::PROTOCOL_VERSION,
                    moat_protocol::MIN_COMPATIBLE_VERSION
                ),
            )));
        }
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(VersionResponse {
            protocol_version: moat_protocol::PROTOCOL_VERSION,
            min_client_version: moat_protocol::MIN_COMPATIBLE_VERSION,
            agent_version: format!("moat-agent {}", env!("CARGO_PKG_VERSION")),
            kernel,
            ..Default::default()
        })
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = self.containers.create(CreateRequest {
            id: &req.container_id,
            spec_json: &req.oci_spec_json,
            rootfs: req.rootfs.as_ref().unwrap_or_default(),
            extra_mounts: &req.extra_mounts,
            stdio: req.stdio.as_ref().unwrap_or_default(),
        });
        reply("CreateContainer", r.map(|_| Empty::new()))
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<StartContainerResponse> {
        let r = self
            .containers
            .start(&req.container_id)
            .map(|pid| StartContainerResponse {
                pid,
                ..Default::default()
            });
        reply("StartContainer", r)
    }

    fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = self.containers.update(
            &req.container_id,
            req.resources.as_ref(),
            &req.oci_resources_json,
        );
        reply("UpdateContainer", r.map(|_| Empty::new()))
    }

    fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(
            "Pause",
            self.containers
                .freeze(&req.container_id, true)
                .map(|_| Empty::new()),
        )
    }

    fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        reply(
            "Resume",
            self.containers
                .freeze(&req.container_id, false)
                .map(|_| Empty::new()),
        )
    }

    fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "RemoveContainer",
            self.containers
                .remove(&req.container_id, req.force)
                .map(|_| Empty::new()),
        )
    }

    fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsResponse> {
        reply("Stats", self.containers.stats(&req.container_id))
    }

    fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let r = self
            .containers
            .list(&req.container_id)
            .map(|processes| ListProcessesResponse {
                processes,
                ..Default::default()
            });
        reply("ListProcesses", r)
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let r = self
            .containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                req.stdio.as_ref().unwrap_or_default(),
            )
            .map(|pid| ExecProcessResponse {
                pid,
                ..Default::default()
            });
        reply("ExecProcess", r)
    }

    fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        let r = self
            .containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all);
        reply("SignalProcess", r.map(|_| Empty::new()))
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let r = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .map(|(pid, e)| WaitProcessResponse {
                exit_status: e.status,
                signal: e.signal,
                oom_killed: e.oom_killed,
                exited_at_ns: e.at_ns,
                pid: pid as u32,
                ..Default::default()
            });
        reply("WaitProcess", r)
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let r = self
            .containers
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols);
        reply("ResizePty", r.map(|_| Empty::new()))
    }

    fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let r = self.containers.close_stdin(&req.container_id, &req.exec_id);
        reply("CloseStdin", r.map(|_| Empty::new()))
    }

    fn set_network(&self, _: &TtrpcContext, req: SetNetworkRequest) -> ttrpc::Result<Empty> {
        let r = crate::network::set_network(
            &req,
            &self.config.sys_class_net,
            &self.config.network_dir(),
            self.config.init,
        );
        reply("SetNetwork", r.map(|_| Empty::new()))
    }

    fn copy_file(&self, _: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        let r = crate::files::copy_file(&self.config.shared_dir(), &req);
        reply("CopyFile", r.map(|_| Empty::new()))
    }

    fn get_event(&self, _: &TtrpcContext, req: GetEventRequest) -> ttrpc::Result<GetEventResponse> {
        let timeout = (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms.into()));
        Ok(self
            .containers
            .events
            .pop(timeout)
            .unwrap_or_else(|| GetEventResponse {
                timed_out: true,
                ..Default::default()
            }))
    }

    fn restored(&self, _: &TtrpcContext, req: RestoredRequest) -> ttrpc::Result<Empty> {
        let r = crate::restored::check_entropy(&req.entropy).and_then(|()| {
            // Outside a VM (the host tests) the host's RNG and clock are
            // not the agent's to change.
            if !self.config.init {
                return Ok(());
            }
            crate::restored::reseed(&req.entropy)?;
            crate::restored::set_clock(req.realtime_ns)
        });
        if r.is_ok() {
            log::info!("restored from a template: RNG reseeded, clock set");
        }
        reply("Restored", r.map(|()| Empty::new()))
    }

    fn shutdown(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        log::warn!("shutdown requested");
        let containers = self.containers.clone();
        let init = self.config.init;
        // Reply first; the VM (or test process) goes away right after.
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                containers.kill_all();
                if init {
                    crate::init::power_off();
                }
                std::process::exit(0);
            });
        // A guest out of threads says so; the host then stops the VM.
        let r = spawned
            .map(drop)
            .map_err(|e| AgentError::Spawn(format!("shutdown thread: {e}")));
        reply("Shutdown", r.map(|()| Empty::new()))
    }
}

/// Runs the agent until Shutdown. SIGCHLD must already be blocked (see
/// [`crate::reaper::block_sigchld`]) before any thread was started.
pub fn serve(config: Config) -> Result<()> {
    let config = Arc::new(config);
    let sys: Arc<dyn Syscall> = Arc::new(LinuxSyscall);
    // SAFETY: prctl with integer arguments only. Orphans of containers must
    // be reaped here even when the agent is not PID 1 (host tests).
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let reaper = Arc::new(Reaper::default());
    {
        let reaper = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || reaper.run())
            .ctx(|| "spawning the reaper".into())?;
    }
    crate::cgroup::init_root(&config.cgroup_mount, &config.cgroup_root)?;
    std::fs::create_dir_all(config.state_dir.join("containers"))
        .ctx(|| format!("creating {}", config.state_dir.display()))?;

    let containers = Arc::new(Containers::new(config.clone(), sys, reaper)?);

    let stdio_listener = Listener::bind(
        &config.listen,
        config.port + moat_protocol::STDIO_PORT_OFFSET,
    )
    .ctx(|| "binding the stdio port".into())?;
    {
        let registry = containers.streams.clone();
        let c = containers.clone();
        std::thread::Builder::new()
            .name("stdio-accept".into())
            .spawn(move || {
                crate::stdio::serve(
                    stdio_listener,
                    registry,
                    Arc::new(move |id: &str| c.exists(id)),
                )
            })
            .ctx(|| "spawning the stdio listener".into())?;
    }

    let listener =
        Listener::bind(&config.listen, config.port).ctx(|| "binding the agent port".into())?;
    let service = AgentService {
        config: config.clone(),
        containers,
    };
    let host_only = listener.host_only();
    let mut server = ttrpc::Server::new()
        .add_listener(listener.into_raw_fd())
        .map_err(|e| AgentError::Spawn(format!("ttrpc listener: {e}")))?
        .register_service(agent_ttrpc::create_agent(Arc::new(service)));
    if host_only {
        server = server.set_accept_hook(HostOnly);
    }
    // Before the first answer, so the host finds the boot time recorded
    // once the agent has answered.
    if config.init {
        crate::init::report_booted();
    }
    server
        .start()
        .map_err(|e| AgentError::Spawn(format!("ttrpc server: {e}")))?;
    log::warn!("serving on {:?} port {}", config.listen, config.port);
    // Readiness marker for tests and the console.
    eprintln!("moat-agent: ready");
    loop {
        std::thread::park();
    }
}
