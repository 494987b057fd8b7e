//! The VM under a pod, behind a trait so that the pod's logic runs against
//! a fake VM in tests: [`PodVm`] is one booted VM, [`VmLauncher`] boots one.

use std::fs;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use moat_protocol::AgentClient;

use crate::annotations::VmSize;
use crate::config::Config;
use crate::network::PodNetwork;
use crate::rootfs::Disk;
use crate::sandbox::cgroup::HostCgroupPlan;
use crate::sandbox::{HostPlacement, Sandbox, SandboxError};

/// One booted VM with a connected agent.
pub trait PodVm: Send + Sync {
    /// The guest agent.
    fn agent(&self) -> &AgentClient;
    /// Gives `disks` block slots and returns their serials, in order.
    fn attach(&self, disks: &[Disk]) -> Result<Vec<String>, SandboxError>;
    /// Serials of the slots that already hold `disks` (the boot disks).
    fn serials_of(&self, disks: &[Disk]) -> Vec<String>;
    /// Returns the slots of `serials`.
    fn release(&self, serials: &[String]);
    /// Whether the VM is gone (crashed, powered off, guest panic).
    fn exited(&self) -> bool;
    /// The vCPUs and memory it booted with (it cannot grow).
    fn size(&self) -> VmSize;
    /// The open `cgroup.procs` of the pod's host cgroup, where the pod's
    /// host helpers (share servers) join the VMM; empty without one.
    fn host_cgroup_procs(&self) -> Vec<RawFd>;
    /// Powers the VM off and removes its state directory.
    fn stop(&self);
}

/// What a boot needs besides the configuration.
pub struct BootSpec<'a> {
    /// The shim's configuration.
    pub cfg: &'a Config,
    /// The pod's id (CRI sandbox id, else the first container's).
    pub grouping: &'a str,
    /// The VM's state directory, removed again when the boot fails.
    pub dir: &'a Path,
    /// Where the pod's uppers live, removed again when the boot fails.
    pub upper_dir: &'a Path,
    /// The VM's vCPUs and memory, from the booting container's annotations.
    pub size: VmSize,
    /// The first container's disks.
    pub disks: &'a [Disk],
    /// Empty block slots for later containers.
    pub spare_slots: usize,
    /// The pod's network namespace, if any.
    pub netns: Option<&'a Path>,
    /// The host cgroup the VMM joins.
    pub host_cgroup: &'a HostCgroupPlan,
}

/// Boots VMs.
pub trait VmLauncher: Send + Sync {
    /// Boots a VM. On error nothing is left: no process, no network, no `dir`.
    fn boot(&self, spec: &BootSpec) -> Result<Arc<dyn PodVm>, String>;
}

/// The real VM: a moat-vmm process ([`Sandbox`]).
struct SandboxVm {
    sandbox: Sandbox,
    size: VmSize,
}

impl PodVm for SandboxVm {
    fn agent(&self) -> &AgentClient {
        self.sandbox.agent()
    }

    fn attach(&self, disks: &[Disk]) -> Result<Vec<String>, SandboxError> {
        self.sandbox.attach(disks)
    }

    fn serials_of(&self, disks: &[Disk]) -> Vec<String> {
        self.sandbox.serials_of(disks)
    }

    fn release(&self, serials: &[String]) {
        self.sandbox.release(serials)
    }

    fn exited(&self) -> bool {
        self.sandbox.vmm_exited()
    }

    fn size(&self) -> VmSize {
        self.size
    }

    fn host_cgroup_procs(&self) -> Vec<RawFd> {
        self.sandbox.host_cgroup_procs()
    }

    fn stop(&self) {
        self.sandbox.stop();
        let _ = fs::remove_dir_all(&self.sandbox.dir);
    }
}

/// Boots moat-vmm VMs.
pub struct SandboxLauncher;

impl VmLauncher for SandboxLauncher {
    fn boot(&self, spec: &BootSpec) -> Result<Arc<dyn PodVm>, String> {
        let booted = spec
            .netns
            .map(PodNetwork::join)
            .transpose()
            .map_err(|e| format!("pod network: {e}"))
            .and_then(|network| {
                let cgroup = match spec.host_cgroup {
                    HostCgroupPlan::At(path) => Some(path.clone()),
                    HostCgroupPlan::None => None,
                };
                let host = HostPlacement { network, cgroup };
                Sandbox::boot(
                    spec.cfg,
                    spec.grouping,
                    spec.dir,
                    spec.size,
                    spec.disks,
                    spec.spare_slots,
                    host,
                )
                .map_err(|e| e.to_string())
            });
        match booted {
            Ok(sandbox) => Ok(Arc::new(SandboxVm {
                sandbox,
                size: spec.size,
            })),
            Err(e) => {
                let _ = fs::remove_dir_all(spec.dir);
                let _ = fs::remove_dir_all(spec.upper_dir);
                Err(e)
            }
        }
    }
}
