//! A sandbox is one microVM (one pod): its state directory, the moat-vmm
//! process, the agent connection and the VM's block slots.

pub mod cgroup;
pub mod jail;
pub mod template;
pub mod vmm;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::RawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_protocol::{AgentClient, ClientError, Connector};
use thiserror::Error;

use crate::annotations::VmSize;
use crate::config::Config;
use crate::network::port_forward::{self, PortForward};
use crate::network::{NetworkError, PodNetwork};
use crate::rootfs::cache::fnv1a;
use crate::rootfs::Disk;
use cgroup::HostCgroup;
use moat_vmm_api::limits::{MAX_SOCKET_PATH, MAX_VIRTIO_DEVICES};
use moat_vmm_api::{
    BlockConfig, ClientError as VmmClientError, ConfigError, JailConfig, NetConfig, SerialOutput,
    VmConfig, VsockConfig,
};
use vmm::Vmm;

const VMM_PID_FILE: &str = "vmm.pid";
const VSOCK_SOCKET: &str = "vsock.sock";
/// What a hashed sandbox name always has: `-` and 16 hex digits.
const HASHED_NAME_SUFFIX: usize = 17;
// Under the longest state_dir there is still room for a hashed name.
const _: () = assert!(
    MAX_SOCKET_PATH - crate::config::MAX_STATE_DIR - VSOCK_SOCKET.len() - 2 > HASHED_NAME_SUFFIX
);

/// Block slots and network interfaces together: every VM also has a vsock
/// and an rng device, and moat-vmm takes at most [`MAX_VIRTIO_DEVICES`].
pub const MAX_BLOCK_SLOTS: usize = MAX_VIRTIO_DEVICES - 2;

/// The guest's vsock CID (each VM has a vsock device of its own).
const GUEST_CID: u64 = 3;

/// Why a VM cannot be booted, changed or reached.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// A file the boot needs (kernel, initramfs, moat-vmm) is absent.
    #[error("{what} not found at {}", path.display())]
    Missing {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A host operation (a state file, a socket, a spawn) failed.
    #[error("failed to {what}: {source}")]
    Io {
        /// The operation, as a verb phrase.
        what: String,
        /// The operation's error.
        source: std::io::Error,
    },
    /// moat-vmm's API answered something unexpected.
    #[error("VMM API error: {0}")]
    Api(String),
    /// A request to moat-vmm's API failed.
    #[error("failed to {what}: {}", moat_crash::error_chain(source))]
    VmmApi {
        /// The request, as a verb phrase.
        what: String,
        /// The API client's error.
        source: VmmClientError,
    },
    /// The VM's configuration breaks one of moat-vmm's limits.
    #[error("invalid VM configuration: {0}")]
    VmConfig(#[from] ConfigError),
    /// moat-vmm exited before the guest agent answered.
    #[error("moat-vmm exited during boot ({status}); vmm log: {log}; console: {console}")]
    VmmExited {
        /// How it exited.
        status: String,
        /// The end of its log.
        log: String,
        /// The end of the guest's console.
        console: String,
    },
    /// The guest agent did not answer within the boot timeout.
    #[error("the guest agent did not answer within {timeout:?} (last error: {last}); console: {console}")]
    BootTimeout {
        /// The boot timeout.
        timeout: Duration,
        /// The last connection attempt's error.
        last: String,
        /// The end of the guest's console.
        console: String,
    },
    /// A call to the guest agent failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Every block slot of the VM is taken: it has `0` slots (the disks
    /// it booted with and `spare_block_slots`, at most [`MAX_BLOCK_SLOTS`]
    /// less one per network interface).
    #[error(
        "no free block slot in the VM for another disk: all {0} are in use \
         (a pod VM gets spare_block_slots more than its first container's \
         disks, up to {MAX_BLOCK_SLOTS})"
    )]
    NoBlockSlot(usize),
    /// A VM cannot boot with this many disks.
    #[error("{disks} disks do not fit in a VM, which takes at most {slots}")]
    TooManyDisks {
        /// The disks asked for.
        disks: usize,
        /// The VM's block slots (less one per network interface).
        slots: usize,
    },
    /// The pod's network could not be set up.
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
}

/// The state directory of a sandbox: `<state_dir>/<id>`, with long ids
/// shortened so that its socket paths stay within moat-vmm's limit.
pub fn sandbox_dir(cfg: &Config, id: &str) -> PathBuf {
    cfg.state_dir.join(dir_name(cfg, id))
}

/// Where a sandbox's writable uppers live: `<upper_dir>/<name>`, named as
/// its state directory, on disk (not under the state dir, a tmpfs), and
/// removed with the sandbox.
pub fn upper_dir(cfg: &Config, id: &str) -> PathBuf {
    cfg.upper_dir.join(dir_name(cfg, id))
}

/// The upper image of container `container_id` (a valid id) of sandbox `id`.
pub fn upper_image(cfg: &Config, id: &str, container_id: &str) -> PathBuf {
    upper_dir(cfg, id).join(format!("{container_id}.ext4"))
}

fn dir_name(cfg: &Config, id: &str) -> String {
    // Room for the name in `<state_dir>/<name>/vsock.sock`.
    let room = MAX_SOCKET_PATH
        .saturating_sub(cfg.state_dir.as_os_str().len() + VSOCK_SOCKET.len() + 2)
        .min(64);
    if id.len() <= room && moat_protocol::ids::is_valid_id(id) {
        id.to_owned()
    } else {
        // A hash of the whole id, after as much of it as fits.
        let keep: String = id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(room.saturating_sub(HASHED_NAME_SUFFIX).min(40))
            .collect();
        format!("{keep}-{:016x}", fnv1a(id.as_bytes()))
    }
}

/// The last `max` bytes of a log file, for error messages.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} is missing)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).trim().replace('\n', " | ");
    if text.is_empty() {
        "(empty)".into()
    } else {
        text
    }
}

struct Slot {
    id: String,
    path: Option<PathBuf>,
    users: usize,
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// Where a pod's VM is placed on the host: the pod network it joins (its
/// taps and addresses) and the cgroup its VMM runs in.
#[derive(Default)]
pub struct HostPlacement {
    /// The pod's network, joined.
    pub network: Option<PodNetwork>,
    /// The pod's host cgroup ([`cgroup`]).
    pub cgroup: Option<PathBuf>,
}

/// What a boot that fails half-way must undo: the VM it started, the
/// cgroup it made and the pod network it joined.
struct UndoBoot {
    vmm: Option<Vmm>,
    cgroup: Option<HostCgroup>,
    network: Option<PodNetwork>,
}

impl UndoBoot {
    /// The boot worked: hands over what it built, undoing nothing.
    fn disarm(mut self) -> (Vmm, Option<HostCgroup>, Option<PodNetwork>) {
        let vmm = self.vmm.take().expect("a booted sandbox has a VMM");
        (vmm, self.cgroup.take(), self.network.take())
    }
}

impl Drop for UndoBoot {
    fn drop(&mut self) {
        if let Some(vmm) = &self.vmm {
            vmm.kill();
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        if let Some(n) = &self.network {
            n.teardown();
        }
    }
}

/// A booted VM with a connected agent.
pub struct Sandbox {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    /// The containers' writable uppers ([`upper_dir`]).
    uppers: PathBuf,
    vmm: Vmm,
    agent: AgentClient,
    slots: Mutex<Vec<Slot>>,
    cgroup: Option<HostCgroup>,
    network: Option<PodNetwork>,
    /// CRI PortForward into the guest ([`PortForward`]).
    forward: Option<PortForward>,
}

impl Sandbox {
    /// The open `cgroup.procs` of the pod's host cgroup, one per
    /// hierarchy; empty when the VMM has none.
    pub fn host_cgroup_procs(&self) -> Vec<std::os::fd::RawFd> {
        self.cgroup
            .as_ref()
            .map(HostCgroup::procs_fds)
            .unwrap_or_default()
    }

    /// Boots a VM sized `size` whose first disks are `disks`, placed on
    /// the host as `host` says, and waits for its agent. On error nothing
    /// is left running, the network is torn down, the cgroup removed, and
    /// the caller removes `dir`.
    pub fn boot(
        cfg: &Config,
        id: &str,
        dir: &Path,
        size: VmSize,
        disks: &[Disk],
        spare_slots: usize,
        host: HostPlacement,
    ) -> Result<Sandbox, SandboxError> {
        let mut undo = UndoBoot {
            vmm: None,
            cgroup: None,
            network: host.network,
        };
        let network = undo.network.as_ref();
        let vmm_bin = check_files(cfg)?;
        let taps = network.map(PodNetwork::taps).unwrap_or_default();
        // Each interface takes an interrupt a block slot would have had.
        let max_slots = MAX_BLOCK_SLOTS.saturating_sub(taps.len());
        if disks.len() > max_slots {
            return Err(SandboxError::TooManyDisks {
                disks: disks.len(),
                slots: max_slots,
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(format!("create {}", dir.display())))?;

        let jail = if cfg.jail {
            Some(
                jail::claim(&cfg.state_dir, dir, cfg.jail_id_base)
                    .map_err(io_error("claim a user for the VM"))?,
            )
        } else {
            None
        };
        // For `shim delete` after this shim died: what to undo in the netns.
        if let Some(n) = network {
            n.record(dir).map_err(io_error("record the pod network"))?;
        }
        let spares = spare_slots.min(max_slots - disks.len());
        // With templates every disk comes after the restore: a template's
        // slots are empty, so that it holds no pod's data.
        let (block, slots) = if cfg.templates {
            block_slots(&[], disks.len() + spares)
        } else {
            block_slots(disks, spares)
        };
        let config = vm_config(cfg, dir, size, block, &taps, jail)?;
        if let Some(path) = &host.cgroup {
            let cg = HostCgroup::create(&cgroup::hierarchies(), path, dir)
                .map_err(io_error(format!("create cgroup {}", path.display())))?;
            undo.cgroup = Some(cg);
        }
        let start = VmStart {
            cfg,
            id,
            dir,
            vmm_bin: &vmm_bin,
            taps: taps.iter().map(|(fd, _)| *fd).collect(),
            cgroup_procs: undo
                .cgroup
                .as_ref()
                .map(HostCgroup::procs_fds)
                .unwrap_or_default(),
        };
        let (agent, restored) = start.run(&config, &mut undo.vmm)?;
        let vmm = undo.vmm.as_ref().expect("a started VM has a VMM");
        let sandbox_slots = Mutex::new(slots);
        if cfg.templates {
            attach_to(vmm, &sandbox_slots, disks)?;
        }
        if let Some(n) = network.filter(|n| !n.request.interfaces.is_empty()) {
            let request = if cfg.templates {
                with_template_macs(&n.request, &taps)
            } else {
                n.request.clone()
            };
            agent
                .set_network(agent.ctx_timeout(cfg.agent_timeout()), &request)
                .map_err(|e| SandboxError::Api(format!("SetNetwork: {e}")))?;
        }
        log_boot(id, vmm, &agent, restored);
        let forward = network
            .filter(|n| !n.request.interfaces.is_empty())
            .and_then(|n| start_port_forward(id, n, &agent));
        let (vmm, cgroup, mut network) = undo.disarm();
        if let Some(n) = &mut network {
            n.release_taps();
        }
        Ok(Sandbox {
            id: id.to_owned(),
            dir: dir.to_owned(),
            uppers: upper_dir(cfg, id),
            vmm,
            agent,
            slots: sandbox_slots,
            cgroup,
            network,
            forward,
        })
    }

    pub(crate) fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Whether moat-vmm is gone (crashed, or the guest powered off).
    pub fn vmm_exited(&self) -> bool {
        self.vmm.exited().is_some()
    }

    /// Gives `disks` block slots (reusing a slot that already has the same
    /// file) and returns their serials, in order.
    pub fn attach(&self, disks: &[Disk]) -> Result<Vec<String>, SandboxError> {
        attach_to(&self.vmm, &self.slots, disks)
    }

    /// Serials of the slots that already hold `disks` (the first container's).
    pub fn serials_of(&self, disks: &[Disk]) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        disks
            .iter()
            .filter_map(|d| {
                slots
                    .iter()
                    .find(|s| s.path.as_deref() == Some(&d.path))
                    .map(|s| s.id.clone())
            })
            .collect()
    }

    /// Returns the slots of a removed container's disks.
    pub fn release(&self, serials: &[String]) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        release_slots(&mut slots, serials);
    }

    /// Powers the VM off: the agent's Shutdown, then the VMM API, then
    /// SIGKILL. moat-vmm is always reaped.
    pub fn stop(&self) {
        if self.vmm.exited().is_none() {
            if let Err(e) = self.agent.shutdown(
                self.agent.ctx_timeout(Duration::from_secs(5)),
                &Default::default(),
            ) {
                log::debug!("sandbox {}: agent shutdown: {e}", self.id);
            }
        }
        self.vmm.stop(Duration::from_secs(5));
        if let Some(f) = &self.forward {
            f.stop();
        }
        if let Some(cg) = &self.cgroup {
            cg.remove();
        }
        if let Some(n) = &self.network {
            n.teardown();
        }
        let _ = fs::remove_dir_all(&self.uppers);
        log::info!("sandbox {}: VM stopped", self.id);
    }
}

/// Gives `disks` slots of `vmm`'s (see [`Sandbox::attach`]).
fn attach_to(
    vmm: &Vmm,
    slots: &Mutex<Vec<Slot>>,
    disks: &[Disk],
) -> Result<Vec<String>, SandboxError> {
    let mut slots = slots.lock().unwrap_or_else(|e| e.into_inner());
    let mut serials = Vec::new();
    for d in disks {
        if let Some(s) = slots
            .iter_mut()
            .find(|s| s.path.as_deref() == Some(&d.path) && d.read_only)
        {
            s.users += 1;
            serials.push(s.id.clone());
            continue;
        }
        let Some(s) = slots.iter_mut().find(|s| s.users == 0) else {
            release_slots(&mut slots, &serials);
            return Err(SandboxError::NoBlockSlot(slots.len()));
        };
        // The shim opens the file and passes it: the VMM, jailed, may
        // open no file at all (not even a host device passed through).
        let filled = fs::OpenOptions::new()
            .read(true)
            .write(!d.read_only)
            .open(&d.path)
            .map_err(io_error(format!("open {}", d.path.display())))
            .and_then(|file| vmm.replace_block(&s.id, &file, d.read_only));
        if let Err(e) = filled {
            release_slots(&mut slots, &serials);
            return Err(e);
        }
        s.path = Some(d.path.clone());
        s.users = 1;
        serials.push(s.id.clone());
    }
    Ok(serials)
}

fn release_slots(slots: &mut [Slot], serials: &[String]) {
    for id in serials {
        if let Some(s) = slots.iter_mut().find(|s| &s.id == id) {
            s.users = s.users.saturating_sub(1);
        }
    }
}

/// The pod's network request for a VM whose NICs have the template's
/// MACs: each interface is found by its NIC's template MAC and given its own.
fn with_template_macs(
    request: &moat_protocol::agent::SetNetworkRequest,
    taps: &[(RawFd, String)],
) -> moat_protocol::agent::SetNetworkRequest {
    let mut request = request.clone();
    for iface in &mut request.interfaces {
        if let Some(index) = taps.iter().position(|(_, mac)| *mac == iface.mac) {
            iface.guest_mac = template::template_mac(index);
        }
    }
    request
}

/// What starting a pod's VM needs besides its configuration.
struct VmStart<'a> {
    cfg: &'a Config,
    /// The sandbox's id, for the log.
    id: &'a str,
    dir: &'a Path,
    vmm_bin: &'a Path,
    /// Tap fds moat-vmm inherits.
    taps: Vec<RawFd>,
    /// The pod's host cgroup, joined by moat-vmm before it execs.
    cgroup_procs: Vec<RawFd>,
}

impl VmStart<'_> {
    /// Starts the VM of `config` and connects to its agent; the running
    /// moat-vmm is left in `slot` (for the caller's undo). With templates
    /// the VM is restored from its shape's template, made first by a boot
    /// if there is none. Returns the agent and whether the VM was restored.
    fn run(
        &self,
        config: &VmConfig,
        slot: &mut Option<Vmm>,
    ) -> Result<(AgentClient, bool), SandboxError> {
        if !self.cfg.templates {
            return Ok((self.boot(config, slot)?, false));
        }
        let path = template::template_path(&self.cfg.template_dir, config, self.vmm_bin)?;
        if path.exists() {
            match self.restore(config, &path, slot) {
                Ok(agent) => return Ok((agent, true)),
                Err(e) => {
                    log::warn!(
                        "template {} failed ({e}): booting a new one",
                        path.display()
                    );
                    self.end(slot);
                    template::discard(&path);
                }
            }
        }
        let agent = self.boot(config, slot)?;
        // The template must hold no connection of ours.
        drop(agent);
        let vmm = slot.as_ref().expect("a booted VM has a VMM");
        if let Some(t) = vmm.boot_time() {
            log::info!(
                "sandbox {}: template VM booted in {} ms (boot timer)",
                self.id,
                t.as_millis()
            );
        }
        if let Err(e) = template::save(vmm, &path) {
            // Saving leaves the VM spent: boot again, without a template.
            log::warn!("cannot save a template ({e}): booting without one");
            self.end(slot);
            return Ok((self.boot(config, slot)?, false));
        }
        log::info!("saved template {}", path.display());
        self.end(slot);
        match self.restore(config, &path, slot) {
            Ok(agent) => Ok((agent, true)),
            Err(e) => {
                // A template that cannot be restored right after it was
                // made never will be: boot this VM, and let the next try.
                log::warn!("new template {} failed ({e}): booting", path.display());
                self.end(slot);
                template::discard(&path);
                Ok((self.boot(config, slot)?, false))
            }
        }
    }

    /// Boots the VM and waits for its agent.
    fn boot(&self, config: &VmConfig, slot: &mut Option<Vmm>) -> Result<AgentClient, SandboxError> {
        let vmm = slot.insert(self.spawn(config)?);
        connect_agent(self.cfg, self.dir, &self.dir.join(VSOCK_SOCKET), vmm)
    }

    /// Starts the VM from the template at `path`, hands the guest fresh
    /// entropy and the time.
    fn restore(
        &self,
        config: &VmConfig,
        path: &Path,
        slot: &mut Option<Vmm>,
    ) -> Result<AgentClient, SandboxError> {
        let config = VmConfig {
            restore: Some(path.to_owned()),
            ..config.clone()
        };
        let vmm = slot.insert(self.spawn(&config)?);
        let agent = connect_agent(self.cfg, self.dir, &self.dir.join(VSOCK_SOCKET), vmm)?;
        template::refresh_guest(&agent, self.cfg.agent_timeout())?;
        Ok(agent)
    }

    /// Starts moat-vmm; the log line says whether it boots or restores
    /// (`moat-bench ctr` times the parts from it).
    fn spawn(&self, config: &VmConfig) -> Result<Vmm, SandboxError> {
        let vmm = Vmm::spawn(
            self.vmm_bin,
            config,
            &self.dir.join("vm.json"),
            &self.dir.join("vmm.log"),
            self.taps.clone(),
            self.cgroup_procs.clone(),
        )?;
        match &config.restore {
            Some(t) => log::info!(
                "sandbox {}: moat-vmm pid {} restoring {}",
                self.id,
                vmm.pid(),
                t.display()
            ),
            None => log::info!("sandbox {}: moat-vmm pid {} booting", self.id, vmm.pid()),
        }
        // For `shim delete` after this shim died: it finds the VM by this file.
        let pid_file = self.dir.join(VMM_PID_FILE);
        fs::write(&pid_file, vmm.pid().to_string())
            .map_err(io_error(format!("write {}", pid_file.display())))?;
        Ok(vmm)
    }

    /// Stops the VM in `slot` (spent or failed) and removes what a VMM
    /// that did not exit cleanly left, so the next one can bind its sockets.
    fn end(&self, slot: &mut Option<Vmm>) {
        if let Some(vmm) = slot.take() {
            vmm.stop(Duration::ZERO);
        }
        for socket in [VSOCK_SOCKET, "api.sock"] {
            let _ = fs::remove_file(self.dir.join(socket));
        }
    }
}

/// Port forwarding for a pod with a network. A pod works without it, so a
/// failure (no `iptables` on the host, say) is logged, not fatal.
fn start_port_forward(id: &str, n: &PodNetwork, agent: &AgentClient) -> Option<PortForward> {
    let (connector, agent_port) = agent.connector()?;
    let dial: port_forward::Dial = Arc::new(move |port| {
        moat_protocol::open_forward(&connector, agent_port, port).map_err(|e| e.to_string())
    });
    PortForward::start(n.netns(), dial)
        .inspect_err(|e| log::warn!("sandbox {id}: no port forwarding: {e}"))
        .ok()
}

/// Block slots `b0`, `b1`, ...: `disks` first, then `spares` empty ones.
fn block_slots(disks: &[Disk], spares: usize) -> (Vec<BlockConfig>, Vec<Slot>) {
    let mut block = Vec::new();
    let mut slots = Vec::new();
    for i in 0..disks.len() + spares {
        let id = format!("b{i}");
        let disk = disks.get(i);
        block.push(BlockConfig {
            id: id.clone(),
            path: disk.map(|d| d.path.clone()),
            read_only: disk.is_some_and(|d| d.read_only),
            serial: Some(id.clone()),
        });
        slots.push(Slot {
            id,
            path: disk.map(|d| d.path.clone()),
            users: usize::from(disk.is_some()),
        });
    }
    (block, slots)
}

/// Checks that the guest kernel, initramfs and moat-vmm exist; returns moat-vmm's path.
fn check_files(cfg: &Config) -> Result<PathBuf, SandboxError> {
    let vmm_bin = cfg.vmm_path();
    for (what, path) in [
        (
            "guest kernel (set `kernel` in /etc/moat/config.toml)",
            &cfg.kernel,
        ),
        (
            "guest initramfs (set `initramfs` in /etc/moat/config.toml)",
            &cfg.initramfs,
        ),
        ("moat-vmm binary", &vmm_bin),
    ] {
        if !path.exists() {
            return Err(SandboxError::Missing {
                what,
                path: path.clone(),
            });
        }
    }
    Ok(vmm_bin)
}

fn log_boot(id: &str, vmm: &Vmm, agent: &AgentClient, restored: bool) {
    // A restored VM has no boot time: no API round trip for it.
    let booted = if restored {
        "restored from a template".into()
    } else {
        match vmm.boot_time() {
            Some(t) => format!("booted in {} ms (boot timer)", t.as_millis()),
            None => "boot timer not written".into(),
        }
    };
    log::info!(
        "sandbox {id}: agent {} on kernel {} is up; {booted}",
        agent.agent_version().agent_version,
        agent.agent_version().kernel
    );
}

/// The guest kernel's command line. `panic=-1` makes a panicking guest
/// reboot at once, which ends moat-vmm: the pod's tasks then exit instead
/// of showing Running over a dead kernel.
pub fn guest_cmdline(cfg: &Config) -> String {
    let mut cmdline = format!(
        "{}={} {}={} panic=-1",
        moat_protocol::AGENT_PORT_PARAM,
        cfg.agent_port,
        moat_protocol::PIDS_LIMIT_PARAM,
        cfg.pids_limit
    );
    if !cfg.kernel_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&cfg.kernel_cmdline);
    }
    cmdline
}

/// The VM moat-vmm is asked for, in `jail` (if any) as far as the config
/// allows, checked against moat-vmm's limits so that a VM it would refuse
/// fails here, with the limit in the error.
fn vm_config(
    cfg: &Config,
    dir: &Path,
    size: VmSize,
    block: Vec<BlockConfig>,
    taps: &[(RawFd, String)],
    jail: Option<JailConfig>,
) -> Result<VmConfig, SandboxError> {
    let vcpus = u8::try_from(size.vcpus).map_err(|_| ConfigError::Vcpus(u64::from(size.vcpus)))?;
    let cmdline = guest_cmdline(cfg);
    let net = taps
        .iter()
        .enumerate()
        .map(|(i, (fd, mac))| NetConfig {
            id: format!("net{i}"),
            tap: None,
            tap_fd: Some(*fd),
            // A template's NICs must not carry the first pod's MACs.
            mac: Some(if cfg.templates {
                template::template_mac(i)
            } else {
                mac.clone()
            }),
        })
        .collect();
    let config = VmConfig {
        initramfs: Some(cfg.initramfs.clone()),
        cmdline,
        vcpus,
        memory_mib: u64::from(size.memory_mib),
        serial: SerialOutput::File(dir.join("console.log")),
        block,
        net,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.join(VSOCK_SOCKET),
        }),
        rng: true,
        api_socket: Some(dir.join("api.sock")),
        seccomp: cfg.seccomp,
        // Ids only: once jailed, the VMM opens no file. It holds what it
        // opened as root, and `attach` passes it later disks already open.
        jail: jail.map(|j| JailConfig {
            allow_no_landlock: cfg.allow_no_landlock,
            ..j
        }),
        ..VmConfig::new(cfg.kernel.clone())
    };
    config.check_limits()?;
    Ok(config)
}

/// Cleans up after a shim that died (`shim delete`): removes the container's
/// files and, when no other container of the pod is left, kills the VM
/// (verified by its command line) and removes the state directory.
pub fn cleanup_dead(cfg: &Config, grouping: &str, container_id: &str) {
    let dir = sandbox_dir(cfg, grouping);
    let containers = dir.join("containers");
    let _ = fs::remove_dir_all(containers.join(container_id));
    let _ = fs::remove_file(upper_image(cfg, grouping, container_id));
    let others = fs::read_dir(&containers).is_ok_and(|mut d| d.next().is_some());
    if others {
        return;
    }
    if let Ok(pid) = fs::read_to_string(dir.join(VMM_PID_FILE)) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let config = dir.join("vm.json");
            let ours = String::from_utf8_lossy(&cmdline).contains(&*config.to_string_lossy());
            if ours {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // Not our child: whoever inherited it reaps it; wait until it is gone.
                let deadline = Instant::now() + Duration::from_secs(10);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    cgroup::remove_recorded(&dir);
    crate::network::teardown_recorded(&dir);
    let _ = fs::remove_dir_all(&dir);
    let _ = fs::remove_dir_all(upper_dir(cfg, grouping));
}

/// Connects to the agent, retrying while the guest boots.
fn connect_agent(
    cfg: &Config,
    dir: &Path,
    vsock: &Path,
    vmm: &Vmm,
) -> Result<AgentClient, SandboxError> {
    let timeout = cfg.boot_timeout();
    // A deadline past what `Instant` holds is no deadline.
    let deadline = Instant::now().checked_add(timeout);
    let mut last = String::from("not tried");
    loop {
        if let Some(status) = vmm.exited() {
            return Err(SandboxError::VmmExited {
                status: status.to_string(),
                log: tail(&dir.join("vmm.log"), 1500),
                console: tail(&dir.join("console.log"), 1500),
            });
        }
        if vsock.exists() {
            match AgentClient::connect(Connector::hybrid_vsock(vsock), cfg.agent_port) {
                Ok(mut c) => {
                    c.set_default_timeout(None);
                    return Ok(c);
                }
                Err(e @ ClientError::Incompatible { .. }) => return Err(e.into()),
                Err(e) => last = e.to_string(),
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(SandboxError::BootTimeout {
                timeout,
                last,
                console: tail(&dir.join("console.log"), 1500),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;

    fn cfg(dir: &Path) -> Config {
        Config {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            vmm: Some(dir.join("moat-vmm")),
            state_dir: dir.join("state"),
            upper_dir: dir.join("uppers"),
            boot_timeout_secs: 2,
            ..Config::default()
        }
    }

    #[test]
    fn uppers_live_on_disk_and_go_with_the_sandbox() {
        let c = Config::default();
        let img = upper_image(&c, "pod", "ctr");
        assert_eq!(img, PathBuf::from("/var/lib/moat/uppers/pod/ctr.ext4"));
        assert!(!img.starts_with(&c.state_dir));

        // shim delete after a shim died: the container's upper goes, and
        // the sandbox's directory with the last container.
        let t = TempDir::new("uppers");
        let c = cfg(t.path());
        for ctr in ["a", "b"] {
            fs::create_dir_all(sandbox_dir(&c, "pod").join("containers").join(ctr)).unwrap();
            fs::create_dir_all(upper_dir(&c, "pod")).unwrap();
            fs::write(upper_image(&c, "pod", ctr), "x").unwrap();
        }
        cleanup_dead(&c, "pod", "a");
        assert!(!upper_image(&c, "pod", "a").exists());
        assert!(upper_image(&c, "pod", "b").exists());
        cleanup_dead(&c, "pod", "b");
        assert!(!upper_dir(&c, "pod").exists());
        assert!(!sandbox_dir(&c, "pod").exists());
    }

    #[test]
    fn state_dirs_keep_socket_paths_short() {
        let c = Config::default();
        assert_eq!(sandbox_dir(&c, "abc"), PathBuf::from("/run/moat/abc"));
        let long = "x".repeat(76);
        let d = sandbox_dir(&c, &long);
        assert!(d.join("vsock.sock").as_os_str().len() < 100, "{d:?}");
        assert_ne!(d, sandbox_dir(&c, &"x".repeat(77)));
        let odd = sandbox_dir(&c, "../evil");
        assert!(odd.starts_with("/run/moat/") && !odd.to_string_lossy().contains(".."));
        // A CRI id (64 hex digits) below the longest state_dir the config
        // takes still gives a vsock path moat-vmm accepts.
        let c = Config {
            state_dir: PathBuf::from(format!("/{}", "s".repeat(29))),
            ..Config::default()
        };
        let cri_id = "0123456789abcdef".repeat(4);
        let d = sandbox_dir(&c, &cri_id);
        let vsock = d.join(VSOCK_SOCKET);
        assert!(vsock.as_os_str().len() <= MAX_SOCKET_PATH, "{vsock:?}");
        assert_ne!(d, sandbox_dir(&c, &"0123456789abcdef".repeat(5)));
        assert_eq!(sandbox_dir(&c, "abc"), c.state_dir.join("abc"));
    }

    /// Boots a small VM with 8 spare slots, which must fail.
    fn boot_failure(c: &Config, id: &str, dir: &Path) -> SandboxError {
        let size = VmSize {
            vcpus: 1,
            memory_mib: 128,
        };
        match Sandbox::boot(c, id, dir, size, &[], 8, HostPlacement::default()) {
            Ok(_) => panic!("{id} booted"),
            Err(e) => e,
        }
    }

    #[test]
    fn missing_kernel_is_a_clear_error_and_creates_nothing() {
        let t = TempDir::new("nokernel");
        let c = cfg(t.path());
        let dir = sandbox_dir(&c, "sb1");
        let e = boot_failure(&c, "sb1", &dir);
        let msg = e.to_string();
        assert!(
            msg.contains("guest kernel") && msg.contains("vmlinux"),
            "{msg}"
        );
        assert!(!dir.exists());
    }

    /// A "VMM" that exits at once must fail the boot fast, with its log.
    #[test]
    fn vmm_dying_during_boot_is_reported_with_its_log() {
        let t = TempDir::new("vmmdies");
        let c = cfg(t.path());
        fs::write(&c.kernel, "k").unwrap();
        fs::write(&c.initramfs, "i").unwrap();
        let vmm = c.vmm.clone().unwrap();
        fs::write(&vmm, "#!/bin/sh\necho 'bad kernel image' >&2\nexit 1\n").unwrap();
        fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let dir = sandbox_dir(&c, "sb2");
        let e = boot_failure(&c, "sb2", &dir);
        let msg = e.to_string();
        assert!(
            msg.contains("exited during boot") && msg.contains("bad kernel image"),
            "{msg}"
        );
        // The config was written where the VMM reads it.
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("vm.json")).unwrap()).unwrap();
        assert_eq!(json["block"].as_array().unwrap().len(), 8);
    }

    /// Files the boot checks for, and a "VMM" that leaves a mark if it runs.
    fn fake_vm_files(c: &Config, mark: &Path) {
        fs::write(&c.kernel, "k").unwrap();
        fs::write(&c.initramfs, "i").unwrap();
        let vmm = c.vmm.clone().unwrap();
        fs::write(
            &vmm,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", mark.display()),
        )
        .unwrap();
        fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }

    /// moat-vmm refuses more vCPUs than its maximum: such a VM fails in
    /// the shim, naming the limit, and no VMM is started.
    #[test]
    fn a_vm_the_vmm_would_refuse_fails_before_it_starts() {
        let t = TempDir::new("toobig");
        let c = cfg(t.path());
        let mark = t.path().join("vmm-ran");
        fake_vm_files(&c, &mark);
        let dir = sandbox_dir(&c, "sb4");
        let size = VmSize {
            vcpus: u32::from(moat_vmm_api::limits::MAX_VCPUS) + 1,
            memory_mib: 128,
        };
        let e = Sandbox::boot(&c, "sb4", &dir, size, &[], 8, HostPlacement::default())
            .err()
            .unwrap();
        assert!(matches!(e, SandboxError::VmConfig(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("between 1 and 32"), "{msg}");
        assert!(!mark.exists(), "moat-vmm was started");
    }

    #[test]
    fn the_vm_config_is_one_moat_vmm_takes() {
        let t = TempDir::new("vmcfg");
        let mut c = cfg(t.path());
        let dir = t.path().join("sb");
        let size = VmSize {
            vcpus: 2,
            memory_mib: 512,
        };
        let disks = [Disk {
            path: "/l.erofs".into(),
            fs_type: "erofs".into(),
            read_only: true,
        }];
        let (block, slots) = block_slots(&disks, 2);
        assert_eq!(slots.len(), 3);
        let taps = [(7, "02:00:00:00:00:01".to_string())];
        let jail = Some(JailConfig::new(1000, 1000));
        let v = vm_config(&c, &dir, size, block.clone(), &taps, jail.clone()).unwrap();
        assert_eq!(v.block[0].path.as_deref(), Some(Path::new("/l.erofs")));
        assert_eq!(v.block[2].path, None);
        assert_eq!(v.net[0].tap_fd, Some(7));
        assert_eq!(v.serial, SerialOutput::File(dir.join("console.log")));
        assert!(v.cmdline.starts_with("moat.port="));
        // The agent's default pids limit comes from the shim's config.
        let pids = format!("{}={}", moat_protocol::PIDS_LIMIT_PARAM, c.pids_limit);
        assert!(v.cmdline.split(' ').any(|w| w == pids), "{}", v.cmdline);
        // Landlock is required unless the shim's config says otherwise.
        assert!(!v.jail.unwrap().allow_no_landlock);
        c.allow_no_landlock = true;
        let v = vm_config(&c, &dir, size, block, &taps, jail).unwrap();
        assert!(v.jail.unwrap().allow_no_landlock);
        // More block slots and interfaces than moat-vmm takes are refused.
        let (block, _) = block_slots(&[], MAX_BLOCK_SLOTS);
        let e = vm_config(&c, &dir, size, block, &taps, None).unwrap_err();
        assert!(e.to_string().contains("at most 19"), "{e}");
    }

    /// Issue 10 (8): a guest panic reboots at once (moat-vmm then exits),
    /// and the config's own command line comes last.
    #[test]
    fn the_guest_reboots_on_panic() {
        let c = Config {
            kernel_cmdline: "quiet".into(),
            ..Config::default()
        };
        let want = format!(
            "moat.port=1024 moat.pids_limit={} panic=-1 quiet",
            c.pids_limit
        );
        assert_eq!(guest_cmdline(&c), want);
    }

    /// A "VMM" that never brings up an agent hits the boot timeout and is killed.
    #[test]
    fn boot_timeout_kills_the_vmm() {
        let t = TempDir::new("timeout");
        let c = cfg(t.path());
        fs::write(&c.kernel, "k").unwrap();
        fs::write(&c.initramfs, "i").unwrap();
        let vmm = c.vmm.clone().unwrap();
        let pidfile = t.path().join("pid");
        fs::write(
            &vmm,
            format!(
                "#!/bin/sh\necho $$ > {}\nexec sleep 600\n",
                pidfile.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let dir = sandbox_dir(&c, "sb3");
        let start = Instant::now();
        let e = Sandbox::boot(
            &c,
            "sb3",
            &dir,
            VmSize {
                vcpus: 1,
                memory_mib: 128,
            },
            &[],
            8,
            HostPlacement::default(),
        )
        .err()
        .unwrap();
        assert!(matches!(e, SandboxError::BootTimeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_secs(30));
        let pid = fs::read_to_string(&pidfile).unwrap();
        assert!(!Path::new(&format!("/proc/{}", pid.trim())).exists());
    }
}
