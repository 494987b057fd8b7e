//! A VM's configuration: the JSON that `moat-vmm --config` reads (the
//! flags of `moat-vmm` build the same thing), and the checks that run
//! before any guest code does.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::{
    BLOCK_SERIAL_MAX, DEFAULT_LOG_MAX_BYTES, MAX_MEMORY_MIB, MAX_SOCKET_PATH, MAX_VCPUS,
    MAX_VIRTIO_DEVICES, MIN_GUEST_CID, MIN_LOG_MAX_BYTES, MIN_MEMORY_MIB,
};

/// A configuration that cannot be read or that breaks a limit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("Cannot read the configuration file {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
    /// The configuration file is not a valid configuration.
    #[error("Invalid configuration file {0}")]
    ParseFile(PathBuf, #[source] serde_json::Error),
    /// Bad command-line flags.
    #[error("Invalid command line: {0}")]
    Cli(String),
    /// No kernel was named.
    #[error("No kernel given (--kernel or \"kernel\")")]
    NoKernel,
    /// The kernel or initramfs cannot be opened.
    #[error("Cannot open {what} {path}")]
    Unreadable {
        /// Which file: "kernel" or "initramfs".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: std::io::Error,
    },
    /// Too few or too many vCPUs.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u64),
    /// Less memory than [`MIN_MEMORY_MIB`].
    #[error("memory_mib must be at least {MIN_MEMORY_MIB}, not {0}")]
    MemoryTooSmall(u64),
    /// More memory than [`MAX_MEMORY_MIB`].
    #[error("memory_mib must be at most {MAX_MEMORY_MIB}, not {0}")]
    MemoryTooLarge(u64),
    /// More memory than the host has.
    #[error("memory_mib {0} is more than the host's {1} MiB of memory")]
    MemoryAboveHost(u64, u64),
    /// Two devices share an id.
    #[error("Device id {0:?} is used twice")]
    DuplicateId(String),
    /// A device has an empty id.
    #[error("Device id must not be empty")]
    EmptyId,
    /// A block device's serial is longer than [`BLOCK_SERIAL_MAX`].
    #[error("Block device {0:?} has a serial longer than {BLOCK_SERIAL_MAX} bytes")]
    SerialTooLong(String),
    /// A net device names no tap, or two.
    #[error("Net device {0:?} needs exactly one of tap and tap_fd")]
    NetBackend(String),
    /// A MAC address is not six hex bytes separated by colons.
    #[error("Invalid MAC address {0:?}")]
    Mac(String),
    /// More devices than [`MAX_VIRTIO_DEVICES`].
    #[error("Too many devices: at most {MAX_VIRTIO_DEVICES} virtio devices fit, not {0}")]
    TooManyDevices(usize),
    /// A socket path longer than [`MAX_SOCKET_PATH`].
    #[error("Socket path {0} is longer than {MAX_SOCKET_PATH} bytes")]
    SocketPath(PathBuf),
    /// A reserved vsock CID.
    #[error("Guest CID {0} is reserved (use {MIN_GUEST_CID} to 4294967295)")]
    GuestCid(u64),
    /// A jail with root's user or group.
    #[error("A jail's user and group must not be root (0)")]
    JailRoot,
    /// A log size cap below [`MIN_LOG_MAX_BYTES`].
    #[error("log_max_bytes must be at least {MIN_LOG_MAX_BYTES}, not {0}")]
    LogMaxBytes(u64),
}

/// The unprivileged user and group moat-vmm runs as once its files are
/// open, and the only paths it may open from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    /// The user moat-vmm switches to; not 0.
    pub uid: u32,
    /// The group moat-vmm switches to; not 0.
    pub gid: u32,
    /// Directories (or files) whose content it may read and write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_write: Vec<PathBuf>,
    /// Directories (or files) whose content it may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_only: Vec<PathBuf>,
    /// Whether the jail may go without Landlock where the kernel lacks it
    /// (then only the uid limits which files it opens); without this, a
    /// kernel without Landlock is an error.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_no_landlock: bool,
}

impl JailConfig {
    /// A jail with these ids, no paths at all, and Landlock required.
    pub fn new(uid: u32, gid: u32) -> JailConfig {
        JailConfig {
            uid,
            gid,
            read_write: Vec::new(),
            read_only: Vec::new(),
            allow_no_landlock: false,
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// moat-vmm's standard output.
    #[default]
    Stdout,
    /// Nowhere.
    Off,
    /// Appended to this file.
    File(PathBuf),
    /// This inherited descriptor.
    Fd(i32),
}

/// A virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Its id, unique among the VM's devices; the API's `/block/<id>`.
    pub id: String,
    /// Its backing file; None: a spare, empty slot that the API can fill
    /// later (virtio-mmio has no hotplug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads with VIRTIO_BLK_T_GET_ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// A virtio net device backed by a tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Its id, unique among the VM's devices.
    pub id: String,
    /// The name of a tap moat-vmm opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An inherited, open tap descriptor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A virtio vsock device, bridged to unix sockets (Firecracker's hybrid
/// vsock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID, at least [`MIN_GUEST_CID`].
    pub guest_cid: u64,
    /// The unix socket host programs connect to.
    pub uds_path: PathBuf,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_log_max_bytes() -> u64 {
    DEFAULT_LOG_MAX_BYTES
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// Everything a VM is made of (`vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest kernel: vmlinux (ELF), bzImage or a PE image.
    pub kernel: PathBuf,
    /// An initramfs (newc cpio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Appended to the command line moat-vmm writes itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// vCPUs, 1 to [`MAX_VCPUS`].
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB, [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Where the serial console goes.
    #[serde(default)]
    pub serial: SerialOutput,
    /// Block devices; the n-th is the guest's n-th virtio block device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<BlockConfig>,
    /// Net devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Whether the guest gets a virtio rng device.
    #[serde(default)]
    pub rng: bool,
    /// The control API's unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Whether each thread installs its seccomp filter.
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// The user, namespaces and paths moat-vmm is confined to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailConfig>,
    /// Size cap, in bytes, of the console file and of moat-vmm's log (its
    /// stderr, when that is a file): past it the older half is dropped.
    #[serde(default = "default_log_max_bytes")]
    pub log_max_bytes: u64,
    /// A template file (written by `PUT /vm/snapshot`) to start from
    /// instead of booting; the rest of the configuration must describe a
    /// VM of the template's shape (see API.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<PathBuf>,
}

impl VmConfig {
    /// A VM with `kernel` and every default: 1 vCPU, 256 MiB, serial on
    /// stdout, no devices, no API, seccomp on, no jail.
    pub fn new(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: String::new(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            serial: SerialOutput::Stdout,
            block: Vec::new(),
            net: Vec::new(),
            vsock: None,
            rng: false,
            api_socket: None,
            seccomp: true,
            jail: None,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            restore: None,
        }
    }

    /// Reads a `vm.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile(path.to_owned(), e))?;
        serde_json::from_str(&text).map_err(|e| ConfigError::ParseFile(path.to_owned(), e))
    }

    /// Everything moat-vmm checks before it starts a guest: the files
    /// ([`VmConfig::check_files`]), memory against the host's
    /// `host_mem_mib`, and [`VmConfig::check_limits`].
    pub fn validate(&self, host_mem_mib: u64) -> Result<(), ConfigError> {
        self.check_files()?;
        if self.memory_mib > host_mem_mib {
            return Err(ConfigError::MemoryAboveHost(self.memory_mib, host_mem_mib));
        }
        self.check_limits()
    }

    /// The kernel (and initramfs, if any) can be opened.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        check_readable("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_readable("initramfs", initramfs)?;
        }
        if let Some(template) = &self.restore {
            check_readable("template", template)?;
        }
        Ok(())
    }

    /// Every limit that holds whatever the host: sizes, ids, device
    /// counts, CIDs, socket paths, the jail's ids. A caller that builds a
    /// configuration checks it here before it starts moat-vmm.
    pub fn check_limits(&self) -> Result<(), ConfigError> {
        check_vcpus(u64::from(self.vcpus))?;
        check_memory(self.memory_mib)?;
        self.check_devices()?;
        if let Some(v) = &self.vsock {
            if v.guest_cid < MIN_GUEST_CID || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::GuestCid(v.guest_cid));
            }
            check_socket_path(&v.uds_path)?;
        }
        if let Some(api) = &self.api_socket {
            check_socket_path(api)?;
        }
        if self.jail.as_ref().is_some_and(|j| j.uid == 0 || j.gid == 0) {
            return Err(ConfigError::JailRoot);
        }
        if self.log_max_bytes < MIN_LOG_MAX_BYTES {
            return Err(ConfigError::LogMaxBytes(self.log_max_bytes));
        }
        Ok(())
    }

    /// How many virtio devices this VM has.
    pub fn virtio_devices(&self) -> usize {
        self.block.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
    }

    fn check_devices(&self) -> Result<(), ConfigError> {
        let mut ids = HashSet::new();
        let mut check_id = |id: &str| {
            if id.is_empty() {
                return Err(ConfigError::EmptyId);
            }
            if !ids.insert(id.to_owned()) {
                return Err(ConfigError::DuplicateId(id.to_owned()));
            }
            Ok(())
        };
        for b in &self.block {
            check_id(&b.id)?;
            if b.serial
                .as_ref()
                .is_some_and(|s| s.len() > BLOCK_SERIAL_MAX)
            {
                return Err(ConfigError::SerialTooLong(b.id.clone()));
            }
        }
        for n in &self.net {
            check_id(&n.id)?;
            if n.tap.is_some() == n.tap_fd.is_some() {
                return Err(ConfigError::NetBackend(n.id.clone()));
            }
            if let Some(mac) = &n.mac {
                parse_mac(mac)?;
            }
        }
        let count = self.virtio_devices();
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        Ok(())
    }
}

/// `vcpus` is within 1 to [`MAX_VCPUS`].
pub fn check_vcpus(vcpus: u64) -> Result<(), ConfigError> {
    if vcpus == 0 || vcpus > u64::from(MAX_VCPUS) {
        return Err(ConfigError::Vcpus(vcpus));
    }
    Ok(())
}

/// `memory_mib` is within [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
pub fn check_memory(memory_mib: u64) -> Result<(), ConfigError> {
    if memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::MemoryTooSmall(memory_mib));
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::MemoryTooLarge(memory_mib));
    }
    Ok(())
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::Unreadable {
            what,
            path: path.to_owned(),
            source,
        })
}

fn check_socket_path(path: &Path) -> Result<(), ConfigError> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ConfigError::SocketPath(path.to_owned()));
    }
    Ok(())
}

/// Parses a MAC address, `xx:xx:xx:xx:xx:xx` in hex.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(ConfigError::Mac(text.into()));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(ConfigError::Mac(text.into()));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| ConfigError::Mac(text.into()))?;
    }
    Ok(mac)
}
