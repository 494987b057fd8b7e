//! The pod layer: one VM, the containers in it, and their processes.
//!
//! Locks are held only to read or update the pod's tables, never across
//! rootfs preparation, disk attachment or an agent call, so that a slow
//! create leaves the pod's other containers answering. Only boots and
//! teardowns of the VM are serialized (`lifecycle`).

mod container;
mod error;
mod guest;
mod ops;
pub mod vm;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

pub use container::{Container, CreateRequest};
pub use error::{PodError, PodResult};
pub use ops::ExecRequest;

use crate::config::Config;
use crate::events::Publisher;
use container::{CreatePlan, Resources};
use guest::Deadline;
use vm::{BootSpec, PodVm, VmLauncher};

/// The pod's containers, and the ids of those being created.
#[derive(Default)]
struct Members {
    containers: HashMap<String, Arc<Container>>,
    creating: HashSet<String>,
}

impl Members {
    fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.creating.is_empty()
    }
}

/// One pod: its VM and its containers.
pub struct Pod {
    cfg: Config,
    namespace: String,
    events: Arc<Publisher>,
    launcher: Box<dyn VmLauncher>,
    /// Serializes VM boots and teardowns (and nothing else).
    lifecycle: Mutex<()>,
    vm: Mutex<Option<Arc<dyn PodVm>>>,
    members: Mutex<Members>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An id reserved while its container is created. Dropped without
/// `commit`, it frees the id and retires a VM that no one uses any more.
struct Reservation<'a> {
    pod: &'a Arc<Pod>,
    id: String,
    /// The pod's directories, removed when no VM was left behind.
    dirs: [PathBuf; 2],
    committed: bool,
}

impl Reservation<'_> {
    fn commit(mut self, c: Arc<Container>) {
        let mut m = lock(&self.pod.members);
        m.creating.remove(&self.id);
        m.containers.insert(self.id.clone(), c);
        self.committed = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.committed {
            lock(&self.pod.members).creating.remove(&self.id);
            self.pod.retire_if_unused(&self.dirs);
        }
    }
}

impl Pod {
    /// A pod with no VM yet: a create that finds none boots one through `launcher`.
    pub fn new(
        cfg: Config,
        namespace: &str,
        events: Arc<Publisher>,
        launcher: Box<dyn VmLauncher>,
    ) -> Arc<Pod> {
        Arc::new(Pod {
            cfg,
            namespace: namespace.to_owned(),
            events,
            launcher,
            lifecycle: Mutex::new(()),
            vm: Mutex::new(None),
            members: Mutex::new(Members::default()),
        })
    }

    pub(crate) fn events(&self) -> &Publisher {
        &self.events
    }

    pub(crate) fn container(&self, id: &str) -> PodResult<Arc<Container>> {
        lock(&self.members)
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| PodError::NotFound(format!("container {id}")))
    }

    fn vm(&self) -> PodResult<Arc<dyn PodVm>> {
        lock(&self.vm)
            .clone()
            .ok_or_else(|| PodError::FailedPrecondition("the sandbox VM is not running".into()))
    }

    /// Whether no container is left or being created.
    pub fn is_empty(&self) -> bool {
        lock(&self.members).is_empty()
    }

    fn reserve<'a>(self: &'a Arc<Self>, plan: &CreatePlan) -> PodResult<Reservation<'a>> {
        let mut m = lock(&self.members);
        if m.containers.contains_key(&plan.id) || !m.creating.insert(plan.id.clone()) {
            return Err(PodError::AlreadyExists(format!("container {}", plan.id)));
        }
        Ok(Reservation {
            pod: self,
            id: plan.id.clone(),
            dirs: [plan.sandbox_dir.clone(), plan.upper_dir.clone()],
            committed: false,
        })
    }

    /// Stops the VM and removes its state once no container is left or
    /// being created; `dirs` are removed even when no VM was booted.
    pub fn retire_if_unused(&self, dirs: &[PathBuf]) {
        let _lifecycle = lock(&self.lifecycle);
        if !lock(&self.members).is_empty() {
            return;
        }
        let vm = lock(&self.vm).take();
        match vm {
            Some(vm) => vm.stop(),
            None => {
                for dir in dirs {
                    let _ = fs::remove_dir_all(dir);
                }
            }
        }
    }

    /// When `c` is the pod's only container and nothing is being created,
    /// releases it and powers the VM off at once: removing it in the guest
    /// first (its processes, mounts and cgroup) is guest-kernel work for a
    /// VM about to die, seconds of it on a PVM host. Under `lifecycle`, so
    /// a create that comes meanwhile boots a VM of its own. Whether it did.
    pub(crate) fn stop_vm_if_last(&self, c: &Container) -> bool {
        let _lifecycle = lock(&self.lifecycle);
        {
            let m = lock(&self.members);
            let only_c = m.containers.len() == 1 && m.containers.contains_key(&c.id);
            if !only_c || !m.creating.is_empty() {
                return false;
            }
        }
        let Some(vm) = lock(&self.vm).take() else {
            return false;
        };
        // Its share servers end before the VM's host cgroup is removed.
        c.release();
        vm.stop();
        true
    }

    /// Creates a container: its rootfs, its disks in the VM (booting the
    /// VM for the first one), and the container in the guest.
    pub fn create(self: &Arc<Self>, req: CreateRequest) -> PodResult<Arc<Container>> {
        let plan = CreatePlan::new(&self.cfg, req)?;
        // Dropped last: a failed create has released its resources first.
        let reservation = self.reserve(&plan)?;
        let mut res = Resources::new(plan.work_dir.clone());
        let vm = self.vm_with(&plan, &mut res)?;
        volumes_then_create(self, &vm, &plan, &mut res)?;
        let c = Arc::new(Container::new(&plan, res));
        if !plan.volumes.is_empty() {
            guest::spawn_volume_sync(self, &c, plan.volumes, vm);
        }
        reservation.commit(c.clone());
        Ok(c)
    }

    /// Prepares the rootfs and gives it to the VM, booting the VM with it
    /// when there is none yet. Only a boot holds `lifecycle` throughout.
    fn vm_with(
        self: &Arc<Self>,
        plan: &CreatePlan,
        res: &mut Resources,
    ) -> PodResult<Arc<dyn PodVm>> {
        let lifecycle = lock(&self.lifecycle);
        // Bound first: a guard in the `if let` would live through the block.
        let running = lock(&self.vm).clone();
        if let Some(vm) = running {
            drop(lifecycle);
            res.prepare(&self.cfg, plan)?;
            res.attach(&vm)?;
            return Ok(vm);
        }
        res.prepare(&self.cfg, plan)?;
        let disks = res.disks();
        let spec = BootSpec {
            cfg: &self.cfg,
            grouping: &plan.grouping,
            dir: &plan.sandbox_dir,
            upper_dir: &plan.upper_dir,
            size: plan.size,
            disks: &disks,
            spare_slots: plan.spare_slots,
            netns: plan.netns.as_deref(),
            host_cgroup: &plan.host_cgroup,
        };
        let vm = self
            .launcher
            .boot(&spec)
            .map_err(|e| PodError::FailedPrecondition(format!("cannot start the VM: {e}")))?;
        res.adopt(&vm);
        *lock(&self.vm) = Some(vm.clone());
        guest::spawn_event_loop(self, vm.clone());
        Ok(vm)
    }
}

/// Shares and copies the container's volumes into the guest, then
/// creates it there.
fn volumes_then_create(
    pod: &Pod,
    vm: &Arc<dyn PodVm>,
    plan: &CreatePlan,
    res: &mut Resources,
) -> PodResult<()> {
    res.start_shares(vm, &plan.volumes.shares)?;
    let timeout = pod.cfg.agent_timeout();
    crate::volumes::copy(vm.agent(), &plan.copies, timeout)
        .map_err(|e| PodError::Internal(e.to_string()))?;
    let req = moat_protocol::agent::CreateContainerRequest {
        container_id: plan.id.clone(),
        oci_spec_json: plan.spec_json.clone(),
        rootfs: Some(res.agent_rootfs()).into(),
        stdio: Some(plan.stdio.agent_stdio()).into(),
        ..Default::default()
    };
    guest::call(
        pod,
        vm.as_ref(),
        "create container",
        Deadline::Lifecycle,
        |a, ctx| a.create_container(ctx, &req),
    )?;
    Ok(())
}
