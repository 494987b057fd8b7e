//! The container layer: a create request checked and planned before
//! anything is touched, the host resources of a container (rootfs files,
//! work directory, block slots, share servers) released by `Drop`, and the
//! container.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use moat_protocol::agent;
use moat_protocol::protobuf::MessageField;

use super::error::{PodError, PodResult};
use super::vm::PodVm;
use crate::annotations::{self, VmSize};
use crate::config::{Config, UpperKind};
use crate::network;
use crate::process::Process;
use crate::rootfs::{self, Disk, LayerCache, MountSpec, Prepared, RootfsPlan, UpperSpec};
use crate::sandbox::cgroup::{self, HostCgroupPlan};
use crate::sandbox::{sandbox_dir, upper_dir, upper_image};
use crate::share::{Share, ShareServer};
use crate::stdio::StdioSpec;
use crate::volumes;

/// A typed create call.
pub struct CreateRequest {
    pub(crate) id: String,
    pub(crate) bundle: String,
    pub(crate) mounts: Vec<MountSpec>,
    pub(crate) stdio: StdioSpec,
    /// Whether containerd asked to restore a checkpoint.
    pub checkpoint: bool,
}

/// Everything a create needs, checked before anything is built.
pub struct CreatePlan {
    pub id: String,
    pub bundle: String,
    pub stdio: StdioSpec,
    /// The OCI spec as the guest gets it.
    pub spec_json: Vec<u8>,
    pub volumes: volumes::Volumes,
    pub copies: Vec<volumes::Item>,
    pub rootfs: RootfsPlan,
    pub upper: UpperSpec,
    /// The VM's size, should this create boot it.
    pub size: VmSize,
    pub grouping: String,
    pub sandbox_dir: PathBuf,
    /// Where the pod's writable uppers live (on disk).
    pub upper_dir: PathBuf,
    pub work_dir: PathBuf,
    pub netns: Option<PathBuf>,
    /// The host cgroup of the VM's VMM, should this create boot it.
    pub host_cgroup: HostCgroupPlan,
    /// Empty block slots a VM booted by this create gets.
    pub spare_slots: usize,
}

fn invalid(e: impl ToString) -> PodError {
    PodError::InvalidArgument(e.to_string())
}

/// The bundle's spec, typed (for its annotations) and as JSON (for the guest).
fn read_spec(bundle: &Path) -> PodResult<(oci_spec::runtime::Spec, serde_json::Value)> {
    let path = bundle.join("config.json");
    let spec = oci_spec::runtime::Spec::load(&path)
        .map_err(|e| invalid(format!("invalid bundle {}: {e}", path.display())))?;
    let value = fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    Ok((spec, value))
}

impl CreatePlan {
    /// Checks `req` against `cfg` and plans the container.
    pub fn new(cfg: &Config, req: CreateRequest) -> PodResult<CreatePlan> {
        if !moat_protocol::ids::is_valid_id(&req.id) {
            return Err(invalid(format!("invalid container id {:?}", req.id)));
        }
        if req.checkpoint {
            return Err(PodError::Unimplemented("restoring from a checkpoint"));
        }
        let bundle = Path::new(&req.bundle);
        let (spec, mut value) = read_spec(bundle)?;
        refuse_host_namespaces(&value)?;
        let netns = network::netns_path(&value);
        let cgroups_path = value["linux"]["cgroupsPath"].as_str().unwrap_or_default();
        let host_cgroup =
            cgroup::plan(cgroups_path).map_err(|e| invalid(format!("linux.cgroupsPath: {e}")))?;
        network::guest_spec(&mut value);
        private_cgroup_namespace(&mut value);
        let (volumes, copies) = volumes::plan(&mut value, &req.id).map_err(invalid)?;
        let spec_json = serde_json::to_vec(&value)
            .map_err(|e| PodError::Internal(format!("encoding the guest spec: {e}")))?;
        let annotations = spec.annotations().clone().unwrap_or_default();
        annotations::check_known(&annotations).map_err(invalid)?;
        // Sizing errors surface even when the VM already runs.
        let size = annotations::vm_size(cfg, &annotations).map_err(invalid)?;
        req.stdio.validate().map_err(invalid)?;
        let rootfs =
            rootfs::plan(&req.mounts, bundle).map_err(|e| invalid(format!("rootfs: {e}")))?;
        let grouping = annotations::grouping(&annotations, &req.id);
        let sandbox_dir = sandbox_dir(cfg, &grouping);
        // Only a pod gets more containers later; they need empty slots.
        let in_pod = annotations.contains_key(annotations::SANDBOX_ID);
        Ok(CreatePlan {
            work_dir: sandbox_dir.join("containers").join(&req.id),
            spare_slots: if in_pod {
                cfg.spare_block_slots as usize
            } else {
                0
            },
            upper: match cfg.upper {
                UpperKind::Ext4 => UpperSpec::Ext4 {
                    size_mib: cfg.upper_size_mib,
                    image: upper_image(cfg, &grouping, &req.id),
                    pod_limit_mib: cfg.pod_upper_limit_mib,
                },
                UpperKind::Tmpfs => UpperSpec::Tmpfs,
            },
            upper_dir: upper_dir(cfg, &grouping),
            id: req.id,
            bundle: req.bundle,
            stdio: req.stdio,
            spec_json,
            volumes,
            copies,
            rootfs,
            size,
            grouping,
            sandbox_dir,
            netns,
            host_cgroup,
        })
    }
}

/// The guest is cgroup v2 only; there, as containerd does on a v2 host, a
/// container gets a cgroup namespace of its own, so its /sys/fs/cgroup is
/// its own cgroup (its limits, as on runc) and not the guest's root. A
/// spec written on a v1 host has none.
pub(super) fn private_cgroup_namespace(spec: &mut serde_json::Value) {
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        if !ns.iter().any(|n| n["type"] == "cgroup") {
            ns.push(serde_json::json!({"type": "cgroup"}));
        }
    }
}

/// A VM has a network and processes of its own: a spec that shares the
/// host's network or pid namespace (no `network` or `pid` entry in
/// `linux.namespaces`: a Kubernetes hostNetwork or hostPID pod, `ctr run
/// --net-host`) cannot be honoured, and is refused rather than silently
/// given the guest's.
fn refuse_host_namespaces(spec: &serde_json::Value) -> PodResult<()> {
    let namespaces = spec["linux"]["namespaces"].as_array();
    let has = |kind: &str| namespaces.is_some_and(|ns| ns.iter().any(|n| n["type"] == kind));
    for (kind, what) in [("network", "network"), ("pid", "process (pid)")] {
        if !has(kind) {
            return Err(invalid(format!(
                "the spec shares the host's {what} namespace (no {kind:?} entry in \
                 linux.namespaces: hostNetwork, hostPID, --net-host); a container in a \
                 moat VM cannot share the host's namespaces"
            )));
        }
    }
    Ok(())
}

/// A container's host resources. Dropping it releases them: its block
/// slots, its own rootfs files and its work directory. A failed create
/// drops it half-built; a delete drops it whole.
pub struct Resources {
    work_dir: PathBuf,
    rootfs: Option<Prepared>,
    slots: Option<(Arc<dyn PodVm>, Vec<String>)>,
    /// The servers of its shared directories.
    shares: Vec<ShareServer>,
}

impl Resources {
    pub fn new(work_dir: PathBuf) -> Resources {
        Resources {
            work_dir,
            rootfs: None,
            slots: None,
            shares: Vec::new(),
        }
    }

    /// Has the guest mount each of `shares` and starts their servers.
    pub fn start_shares(&mut self, vm: &Arc<dyn PodVm>, shares: &[Share]) -> PodResult<()> {
        for s in shares {
            let failed = |e: String| {
                PodError::Internal(format!("sharing {} with the VM: {e}", s.dir.display()))
            };
            let (connector, port) = vm
                .agent()
                .connector()
                .ok_or_else(|| failed("no connection to the agent's ports".into()))?;
            let conn = moat_protocol::open_share(&connector, port, &s.tag)
                .map_err(|e| failed(e.to_string()))?;
            // The running shim binary, even if its file was replaced since.
            let cgroup = vm.host_cgroup_procs();
            let server = ShareServer::spawn(Path::new("/proc/self/exe"), s, conn, cgroup)
                .map_err(|e| failed(e.to_string()))?;
            self.shares.push(server);
        }
        Ok(())
    }

    /// Builds the rootfs images.
    pub fn prepare(&mut self, cfg: &Config, plan: &CreatePlan) -> PodResult<()> {
        let cache = LayerCache::new(&cfg.layer_cache_dir);
        let prepared = rootfs::prepare(&plan.rootfs, &cache, &self.work_dir, &plan.upper)
            .map_err(|e| PodError::Internal(format!("rootfs: {e}")))?;
        self.rootfs = Some(prepared);
        Ok(())
    }

    /// The prepared disks: layers, then the upper.
    pub fn disks(&self) -> Vec<Disk> {
        let Some(p) = &self.rootfs else {
            return Vec::new();
        };
        p.layers.iter().chain(&p.upper).cloned().collect()
    }

    /// Gives the disks slots of a running `vm`.
    pub fn attach(&mut self, vm: &Arc<dyn PodVm>) -> PodResult<()> {
        let serials = vm
            .attach(&self.disks())
            .map_err(|e| PodError::ResourceExhausted(e.to_string()))?;
        self.slots = Some((vm.clone(), serials));
        Ok(())
    }

    /// Takes the slots `vm` was booted with for these disks.
    pub fn adopt(&mut self, vm: &Arc<dyn PodVm>) {
        self.slots = Some((vm.clone(), vm.serials_of(&self.disks())));
    }

    /// The rootfs as the agent mounts it.
    pub fn agent_rootfs(&self) -> agent::Rootfs {
        let (Some(p), Some((_, serials))) = (&self.rootfs, &self.slots) else {
            return agent::Rootfs::default();
        };
        let vol = |serial: &String, fs_type: &str| agent::Volume {
            source: MessageField::some(agent::Source {
                kind: Some(agent::source::Kind::Serial(serial.clone())),
                ..Default::default()
            }),
            fs_type: fs_type.to_owned(),
            options: rootfs::mount_options(fs_type),
            ..Default::default()
        };
        let n = p.layers.len();
        agent::Rootfs {
            layers: p
                .layers
                .iter()
                .zip(serials)
                .map(|(d, s)| vol(s, &d.fs_type))
                .collect(),
            upper: match (&p.upper, serials.get(n)) {
                (Some(u), Some(s)) => MessageField::some(vol(s, &u.fs_type)),
                _ => MessageField::none(),
            },
            ..Default::default()
        }
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        if let Some((vm, serials)) = self.slots.take() {
            vm.release(&serials);
        }
        if let Some(p) = self.rootfs.take() {
            p.remove_owned();
        }
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}

/// A created container of the pod.
pub struct Container {
    pub(crate) id: String,
    pub(crate) bundle: String,
    pub(crate) init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    /// Taken (and so released) by delete.
    resources: Mutex<Option<Resources>>,
    /// Set when the container is deleted: its volume sync stops.
    pub gone: Arc<AtomicBool>,
}

impl Container {
    pub(crate) fn new(plan: &CreatePlan, resources: Resources) -> Container {
        Container {
            id: plan.id.clone(),
            bundle: plan.bundle.clone(),
            init: Arc::new(Process::new(&plan.id, "", plan.stdio.clone(), Vec::new())),
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            resources: Mutex::new(Some(resources)),
            gone: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The init process (`exec_id` empty) or an exec.
    pub fn process(&self, exec_id: &str) -> PodResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.lock_execs()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id}")))
    }

    /// Every process of the container, init first.
    pub fn processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(self.lock_execs().values().cloned());
        all
    }

    fn lock_execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Process>>> {
        self.execs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new exec; its id must be unused.
    pub fn add_exec(&self, p: Process) -> PodResult<()> {
        let mut execs = self.lock_execs();
        if execs.contains_key(&p.exec_id) {
            return Err(PodError::AlreadyExists(format!("exec {}", p.exec_id)));
        }
        execs.insert(p.exec_id.clone(), Arc::new(p));
        Ok(())
    }

    pub(crate) fn remove_exec(&self, exec_id: &str) {
        self.lock_execs().remove(exec_id);
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Releases the host resources (once) and stops the volume sync.
    pub fn release(&self) {
        self.gone.store(true, Ordering::Relaxed);
        let taken = self
            .resources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(taken);
    }
}
