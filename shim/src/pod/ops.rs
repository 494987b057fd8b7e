//! The pod's operations on containers and processes, as typed calls.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use moat_protocol::agent;

use super::error::{PodError, PodResult};
use super::guest::{self, Deadline};
use super::vm::PodVm;
use super::{lock, Container, Pod};
use crate::annotations::VmSize;
use crate::events::{timestamp, Event};
use crate::process::{ProcState, Process, Status};
use crate::stdio::{ProcessIo, StdioSpec};

/// The highest signal number Linux has.
const MAX_SIGNAL: u32 = 64;

/// A typed exec call.
pub struct ExecRequest {
    pub(crate) id: String,
    pub(crate) exec_id: String,
    /// The OCI process JSON.
    pub(crate) spec: Option<Vec<u8>>,
    pub(crate) stdio: StdioSpec,
}

/// How a process ended, as delete reports it.
pub struct Exited {
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: SystemTime,
}

fn container_request(c: &Container) -> agent::ContainerRequest {
    agent::ContainerRequest {
        container_id: c.id.clone(),
        ..Default::default()
    }
}

impl Pod {
    /// Starts the init process or an exec; returns its guest pid.
    pub fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> PodResult<u32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.state().status != Status::Created {
            return Err(PodError::FailedPrecondition(format!(
                "{} was already started",
                p.event_id()
            )));
        }
        let vm = self.vm()?;
        let streams = guest::open_streams(vm.as_ref(), &p)?;
        let io = ProcessIo::start(&p.stdio, streams, &c.id, &self.namespace)
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        p.set_io(Arc::new(io));
        let pid = self.start_in_guest(vm.as_ref(), &c, &p)?;
        p.set_running(pid);
        // The start event goes out before the waiter exists, so it precedes TaskExit.
        self.events.publish(if exec_id.is_empty() {
            Event::Start(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            })
        } else {
            Event::ExecStarted(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: exec_id.to_owned(),
                pid,
                ..Default::default()
            })
        });
        guest::spawn_waiter(self, vm, p);
        Ok(pid)
    }

    fn start_in_guest(&self, vm: &dyn PodVm, c: &Container, p: &Process) -> PodResult<u32> {
        if p.exec_id.is_empty() {
            let r = agent::StartContainerRequest {
                container_id: c.id.clone(),
                ..Default::default()
            };
            guest::call(
                self,
                vm,
                "start container",
                Deadline::Lifecycle,
                |a, ctx| a.start_container(ctx, &r),
            )
            .map(|r| r.pid)
        } else {
            let r = agent::ExecProcessRequest {
                container_id: c.id.clone(),
                exec_id: p.exec_id.clone(),
                oci_process_json: p.spec_json.clone(),
                stdio: MessageField::some(p.stdio.agent_stdio()),
                ..Default::default()
            };
            guest::call(self, vm, "exec", Deadline::Lifecycle, |a, ctx| {
                a.exec_process(ctx, &r)
            })
            .map(|r| r.pid)
        }
    }

    /// Registers an exec (started later by `start`).
    pub fn exec(&self, req: ExecRequest) -> PodResult<()> {
        let c = self.container(&req.id)?;
        if !moat_protocol::ids::is_valid_id(&req.exec_id) {
            return Err(PodError::InvalidArgument(format!(
                "invalid exec id {:?}",
                req.exec_id
            )));
        }
        if c.init.state().status != Status::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {} is not running",
                c.id
            )));
        }
        let spec = req
            .spec
            .ok_or_else(|| PodError::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| PodError::InvalidArgument(format!("invalid exec process spec: {e}")))?;
        req.stdio
            .validate()
            .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        c.add_exec(Process::new(&c.id, &req.exec_id, req.stdio, spec))?;
        self.events.publish(Event::ExecAdded(TaskExecAdded {
            container_id: c.id.clone(),
            exec_id: req.exec_id,
            ..Default::default()
        }));
        Ok(())
    }

    /// Sends `signal` to a process (`all`: to every process of the container).
    pub fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> PodResult<()> {
        if signal > MAX_SIGNAL {
            return Err(PodError::InvalidArgument(format!(
                "invalid signal {signal} (at most {MAX_SIGNAL})"
            )));
        }
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        match p.state().status {
            Status::Stopped => {
                return Err(PodError::NotFound(format!(
                    "process {} (it already finished)",
                    p.event_id()
                )))
            }
            Status::Created if exec_id.is_empty() => {
                // Nothing runs yet in the guest: the task simply ends.
                self.report_exit(&p, 128 + signal, SystemTime::now());
                return Ok(());
            }
            _ => {}
        }
        let vm = self.vm()?;
        let r = agent::SignalProcessRequest {
            container_id: c.id.clone(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        guest::call(self, vm.as_ref(), "kill", Deadline::Control, |a, ctx| {
            a.signal_process(ctx, &r)
        })?;
        Ok(())
    }

    /// Deletes a finished exec.
    pub fn delete_exec(&self, id: &str, exec_id: &str) -> PodResult<ProcState> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let s = p.state();
        if s.status == Status::Running {
            return Err(PodError::FailedPrecondition(format!(
                "exec {exec_id} is running"
            )));
        }
        c.remove_exec(exec_id);
        Ok(s)
    }

    /// Deletes a stopped (or never started) container; the VM goes with
    /// the last one, whose removal in the guest is skipped (see
    /// [`Pod::stop_vm_if_last`]). A hung agent delays it by at most the
    /// control timeout.
    pub fn delete(&self, id: &str) -> PodResult<Exited> {
        let c = self.container(id)?;
        let s = c.init.state();
        if s.status == Status::Running {
            return Err(PodError::FailedPrecondition(format!(
                "container {} is running",
                c.id
            )));
        }
        let vm = lock(&self.vm).clone();
        if let Some(vm) = vm.filter(|vm| !vm.exited()) {
            if !self.stop_vm_if_last(&c) {
                self.remove_in_guest(vm.as_ref(), &c);
            }
        }
        if let Some(io) = c.init.io() {
            io.finish();
        }
        c.release();
        lock(&self.members).containers.remove(&c.id);
        let exited_at = s.exited_at.unwrap_or_else(SystemTime::now);
        self.events.publish(Event::Delete(TaskDelete {
            container_id: c.id.clone(),
            pid: s.pid,
            exit_status: s.exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            id: c.id.clone(),
            ..Default::default()
        }));
        self.retire_if_unused(&[]);
        log::info!("deleted {}", c.id);
        Ok(Exited {
            pid: s.pid,
            exit_status: s.exit_status,
            exited_at,
        })
    }

    fn remove_in_guest(&self, vm: &dyn PodVm, c: &Container) {
        let r = agent::RemoveContainerRequest {
            container_id: c.id.clone(),
            force: true,
            ..Default::default()
        };
        let removed = guest::call(self, vm, "remove container", Deadline::Control, |a, ctx| {
            a.remove_container(ctx, &r)
        });
        if let Err(e) = removed {
            log::warn!("{}: {e}; removing it on the host all the same", c.id);
        }
    }

    /// The guest pids of a container's processes.
    pub fn pids(&self, id: &str) -> PodResult<Vec<u32>> {
        let c = self.container(id)?;
        let vm = self.vm()?;
        let r = container_request(&c);
        let list = guest::call(
            self,
            vm.as_ref(),
            "list processes",
            Deadline::Control,
            |a, ctx| a.list_processes(ctx, &r),
        )?;
        Ok(list.processes.iter().map(|p| p.pid).collect())
    }

    /// Freezes (`pause`) or thaws a container.
    pub fn set_paused(&self, id: &str, pause: bool) -> PodResult<()> {
        let c = self.container(id)?;
        let vm = self.vm()?;
        let r = container_request(&c);
        let what = if pause { "pause" } else { "resume" };
        guest::call(self, vm.as_ref(), what, Deadline::Control, |a, ctx| {
            if pause {
                a.pause_container(ctx, &r)
            } else {
                a.resume_container(ctx, &r)
            }
        })?;
        c.set_paused(pause);
        self.events.publish(if pause {
            Event::Paused(TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            })
        } else {
            Event::Resumed(TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            })
        });
        Ok(())
    }

    /// The container's cgroup statistics in the guest.
    pub fn stats(&self, id: &str) -> PodResult<agent::StatsResponse> {
        let c = self.container(id)?;
        let vm = self.vm()?;
        let r = container_request(&c);
        guest::call(self, vm.as_ref(), "stats", Deadline::Control, |a, ctx| {
            a.stats(ctx, &r)
        })
    }

    /// Applies new OCI resources (JSON) to a container.
    pub fn update(&self, id: &str, resources: Vec<u8>) -> PodResult<()> {
        let c = self.container(id)?;
        let parsed = serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources)
            .map_err(|e| PodError::InvalidArgument(format!("invalid resources: {e}")))?;
        let vm = self.vm()?;
        fits_vm(vm.size(), &parsed)?;
        let r = agent::UpdateContainerRequest {
            container_id: c.id.clone(),
            oci_resources_json: resources,
            ..Default::default()
        };
        guest::call(self, vm.as_ref(), "update", Deadline::Control, |a, ctx| {
            a.update_container(ctx, &r)
        })?;
        Ok(())
    }

    /// Resizes a process's terminal.
    pub fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> PodResult<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if !p.stdio.terminal {
            return Err(PodError::FailedPrecondition(format!(
                "{} has no terminal",
                p.event_id()
            )));
        }
        let vm = self.vm()?;
        let r = agent::ResizePtyRequest {
            container_id: c.id.clone(),
            exec_id: exec_id.to_owned(),
            rows,
            cols,
            ..Default::default()
        };
        guest::call(
            self,
            vm.as_ref(),
            "resize pty",
            Deadline::Control,
            |a, ctx| a.resize_pty(ctx, &r),
        )?;
        Ok(())
    }

    /// Closes a process's stdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> PodResult<()> {
        let p = self.container(id)?.process(exec_id)?;
        if let Some(io) = p.io() {
            io.close_stdin();
        }
        Ok(())
    }

    /// Blocks until the process has stopped.
    pub fn wait(&self, id: &str, exec_id: &str) -> PodResult<ProcState> {
        Ok(self.container(id)?.process(exec_id)?.wait())
    }
}

/// A VM cannot grow (no memory or vCPU hotplug): a limit beyond its size
/// would look applied but could never be reached, so it is refused.
fn fits_vm(size: VmSize, r: &oci_spec::runtime::LinuxResources) -> PodResult<()> {
    let vm_bytes = i64::from(size.memory_mib) << 20;
    if let Some(limit) = r.memory().as_ref().and_then(|m| m.limit()) {
        if limit > vm_bytes {
            return Err(PodError::FailedPrecondition(format!(
                "a memory limit of {} MiB does not fit the pod's VM of {} MiB, \
                 which cannot grow",
                (limit as u64).div_ceil(1 << 20),
                size.memory_mib
            )));
        }
    }
    let cpu = r.cpu().as_ref();
    if let Some(quota) = cpu.and_then(|c| c.quota()).filter(|q| *q > 0) {
        let period = cpu.and_then(|c| c.period()).unwrap_or(100_000).max(1);
        if quota as u64 > u64::from(size.vcpus) * period {
            return Err(PodError::FailedPrecondition(format!(
                "a CPU quota of {:.2} CPUs does not fit the pod's VM of {} vCPUs, \
                 which cannot grow",
                quota as f64 / period as f64,
                size.vcpus
            )));
        }
    }
    Ok(())
}
