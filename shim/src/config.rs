//! moat's host configuration: `/etc/moat/config.toml`, every field optional,
//! with compiled-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use moat_vmm_api::limits::{MAX_MEMORY_MIB, MAX_SOCKET_PATH, MAX_VCPUS};
use serde::Deserialize;
use thiserror::Error;

/// Where the configuration is read from unless `MOAT_CONFIG` names another file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/moat/config.toml";
/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`] (tests, private setups).
pub const CONFIG_ENV: &str = "MOAT_CONFIG";

const DEFAULT_KERNEL: &str = "/var/lib/moat/vmlinux";
const DEFAULT_INITRAMFS: &str = "/var/lib/moat/initramfs.cpio";
const DEFAULT_VMM: &str = "/usr/local/bin/moat-vmm";
const VMM_NAME: &str = "moat-vmm";

/// Least memory of a VM: moat's guest kernel and agent need this much,
/// above moat-vmm's own floor.
pub const MIN_MEMORY_MIB: u32 = 64;
const _: () = assert!(MIN_MEMORY_MIB as u64 >= moat_vmm_api::limits::MIN_MEMORY_MIB);
/// How many VMs can hold a uid at once.
pub const JAIL_IDS: u32 = 65536;
/// The longest any configured timeout may be (a day): deadlines computed
/// from it cannot overflow.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// The longest `state_dir`: a sandbox's sockets,
/// `<state_dir>/<sandbox name>/<socket>`, must fit moat-vmm's
/// [`MAX_SOCKET_PATH`] with room left for a sandbox name (at worst a hash;
/// `sandbox` checks that it fits).
pub const MAX_STATE_DIR: usize = 30;

/// Why the shim's configuration file cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The read's error.
        source: std::io::Error,
    },
    /// The file is not TOML of the expected shape (unknown key, wrong type).
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The TOML decoder's error.
        source: toml::de::Error,
    },
    /// The values parse but break a rule (a size or timeout out of range).
    #[error("invalid configuration in {path}: {reason}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The rule broken.
        reason: String,
    },
}

/// How a container's writable layer is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpperKind {
    /// A sparse ext4 image on the host, attached as a block device.
    Ext4,
    /// A tmpfs inside the guest (lost with the VM, counts against guest memory).
    Tmpfs,
}

/// The shim's configuration (`/etc/moat/config.toml`); every key is
/// optional and defaults to [`Config::default`]'s value.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Guest kernel (uncompressed vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs (uncompressed newc cpio) with moat-agent as /init.
    pub initramfs: PathBuf,
    /// The moat-vmm binary. Default: /usr/local/bin/moat-vmm, else next to the shim.
    pub vmm: Option<PathBuf>,
    /// Default guest vCPUs, before annotations.
    pub vcpus: u32,
    /// Default guest memory in MiB, before annotations.
    pub memory_mib: u32,
    /// The most vCPUs a container's annotations (`io.moat.*`, CRI's pod
    /// resources) may ask for.
    pub max_vcpus: u32,
    /// The most guest memory, in MiB, the annotations may ask for.
    pub max_memory_mib: u32,
    /// Extra guest kernel command line.
    pub kernel_cmdline: String,
    /// How long a VM may take to boot until its agent answers.
    pub boot_timeout_secs: u64,
    /// How long one call to the guest agent (create, start, exec, kill,
    /// stats, ...) may take. Mounting a rootfs takes a minute or more where
    /// the guest kernel runs in an emulator (PVM hosts).
    pub agent_timeout_secs: u64,
    /// How long the other agent calls (kill, delete, pids, stats, pause,
    /// resume, update, resize) may take: a hung agent fails them after it.
    pub control_timeout_secs: u64,
    /// State directories (`<state_dir>/<sandbox-id>/`).
    pub state_dir: PathBuf,
    /// Cache of read-only layer images.
    pub layer_cache_dir: PathBuf,
    /// How containers' writable layers are provided.
    pub upper: UpperKind,
    /// Apparent size of each sparse ext4 upper image.
    pub upper_size_mib: u64,
    /// Where the ext4 upper images live (`<upper_dir>/<sandbox>/`): on
    /// disk, never on a tmpfs such as the state dir, since the guest
    /// fills them.
    pub upper_dir: PathBuf,
    /// Cap on the apparent sizes of one sandbox's upper images together,
    /// and so on the host disk its guest can fill. The default (64 GiB)
    /// fits 16 containers with the default upper, more than a pod's block
    /// slots hold, so a Kubernetes pod (pause + apps) is never refused
    /// by it with the defaults.
    pub pod_upper_limit_mib: u64,
    /// Empty block slots each pod VM (CRI sandbox) gets for its later
    /// containers (virtio-mmio has no hotplug); plain containers get none.
    pub spare_block_slots: u32,
    /// Whether moat-vmm installs its seccomp filters.
    pub seccomp: bool,
    /// Guest vsock port of the agent.
    pub agent_port: u32,
    /// Whether each moat-vmm runs as a user of its own, in network, IPC and
    /// UTS namespaces of its own (moat-vmm's `jail`).
    pub jail: bool,
    /// The VMs' users and groups are the 65536 ids above it (one of each
    /// per VM). The default lies above the ranges that subuid files,
    /// systemd and systemd-nspawn hand out.
    pub jail_id_base: u32,
    /// Whether a jailed moat-vmm may run where the kernel has no Landlock
    /// (its files then limited by its uid alone); by default that is an
    /// error.
    pub allow_no_landlock: bool,
    /// pids.max of each container whose spec sets no pids limit (0: none),
    /// passed to the agent on the guest kernel command line.
    pub pids_limit: u32,
    /// Whether VMs start from templates (`sandbox::template`): the first
    /// VM of a shape boots and is saved, the others restore it.
    pub templates: bool,
    /// Where the templates live (root only: they hold a booted guest's
    /// memory).
    pub template_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            kernel: PathBuf::from(DEFAULT_KERNEL),
            initramfs: PathBuf::from(DEFAULT_INITRAMFS),
            vmm: None,
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: u32::from(MAX_VCPUS),
            max_memory_mib: 16384,
            kernel_cmdline: String::new(),
            // Guest boots take 20-130 s on PVM hosts (the guest kernel runs
            // in an emulator there); leave ample room.
            boot_timeout_secs: 300,
            agent_timeout_secs: 300,
            control_timeout_secs: 30,
            state_dir: PathBuf::from("/run/moat"),
            layer_cache_dir: PathBuf::from("/var/lib/moat/layers"),
            upper: UpperKind::Ext4,
            upper_size_mib: 4096,
            upper_dir: PathBuf::from("/var/lib/moat/uppers"),
            pod_upper_limit_mib: 65536,
            spare_block_slots: 8,
            seccomp: true,
            agent_port: moat_protocol::DEFAULT_AGENT_PORT,
            jail: true,
            jail_id_base: 0x7000_0000,
            allow_no_landlock: false,
            pids_limit: moat_protocol::DEFAULT_PIDS_LIMIT,
            templates: true,
            template_dir: PathBuf::from("/var/lib/moat/templates"),
        }
    }
}

impl Config {
    /// Loads `MOAT_CONFIG` or [`DEFAULT_CONFIG_PATH`]; a missing default file means defaults.
    pub fn load() -> Result<Config, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) => Config::from_file(Path::new(&p)),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            None => Ok(Config::default()),
        }
    }

    /// Reads and checks the configuration file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.check().map_err(|reason| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Checks the values' ranges; the error says which one is wrong.
    fn check(&self) -> Result<(), String> {
        if self.max_vcpus == 0 || self.max_vcpus > u32::from(MAX_VCPUS) {
            return Err(format!(
                "max_vcpus must be between 1 and {MAX_VCPUS} (moat-vmm's limit)"
            ));
        }
        if self.vcpus == 0 || self.vcpus > self.max_vcpus {
            return Err(format!(
                "vcpus must be between 1 and {} (max_vcpus)",
                self.max_vcpus
            ));
        }
        if self.max_memory_mib < MIN_MEMORY_MIB || u64::from(self.max_memory_mib) > MAX_MEMORY_MIB {
            return Err(format!(
                "max_memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > self.max_memory_mib {
            return Err(format!(
                "memory_mib must be between {MIN_MEMORY_MIB} and max_memory_mib ({})",
                self.max_memory_mib
            ));
        }
        if self.upper_size_mib > self.pod_upper_limit_mib {
            return Err("upper_size_mib must not be above pod_upper_limit_mib".into());
        }
        for (name, secs) in [
            ("boot_timeout_secs", self.boot_timeout_secs),
            ("agent_timeout_secs", self.agent_timeout_secs),
            ("control_timeout_secs", self.control_timeout_secs),
        ] {
            if secs == 0 || secs > MAX_TIMEOUT_SECS {
                return Err(format!("{name} must be between 1 and {MAX_TIMEOUT_SECS}"));
            }
        }
        // Stdio streams use the next port.
        if self.agent_port == u32::MAX {
            return Err(format!("agent_port must be below {}", u32::MAX));
        }
        self.check_paths()
    }

    fn check_paths(&self) -> Result<(), String> {
        let invalid = |reason: &str| Err(reason.to_owned());
        if self.jail_id_base == 0 || self.jail_id_base > u32::MAX - JAIL_IDS - 1 {
            return invalid(
                "jail_id_base must be above 0 and leave room for 65536 ids below 2^32-1",
            );
        }
        // Sockets live in the state directory and must fit sun_path.
        if self.state_dir.as_os_str().len() > MAX_STATE_DIR {
            return Err(format!(
                "state_dir must be at most {MAX_STATE_DIR} bytes long, so that socket paths \
                 under it fit in {MAX_SOCKET_PATH} bytes"
            ));
        }
        Ok(())
    }

    /// How long a VM may take to boot until its agent answers.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs)
    }

    /// The deadline of a create, start or exec call to the guest agent.
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_secs)
    }

    /// The deadline of the other guest agent calls.
    pub fn control_timeout(&self) -> Duration {
        Duration::from_secs(self.control_timeout_secs)
    }

    /// The moat-vmm binary: configured, else /usr/local/bin, else next to this shim.
    pub fn vmm_path(&self) -> PathBuf {
        if let Some(p) = &self.vmm {
            return p.clone();
        }
        if Path::new(DEFAULT_VMM).exists() {
            return PathBuf::from(DEFAULT_VMM);
        }
        if let Some(beside) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(VMM_NAME)))
            .filter(|p| p.exists())
        {
            return beside;
        }
        PathBuf::from(DEFAULT_VMM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/moat/config.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.kernel, PathBuf::from(DEFAULT_KERNEL));
        assert_eq!(c.initramfs, PathBuf::from(DEFAULT_INITRAMFS));
        assert_eq!(c.boot_timeout(), Duration::from_secs(300));
        assert_eq!(c.upper, UpperKind::Ext4);
        assert_eq!(c.state_dir, PathBuf::from("/run/moat"));
        assert_eq!(c.pids_limit, moat_protocol::DEFAULT_PIDS_LIMIT);
        assert_eq!(c.upper_dir, PathBuf::from("/var/lib/moat/uppers"));
        assert!(!c.upper_dir.starts_with(&c.state_dir));
    }

    /// scripts/install.sh writes where it put moat's files and nothing
    /// else, so the defaults live here alone.
    #[test]
    fn installed_config_repeats_no_default() {
        let script = include_str!("../../scripts/install.sh");
        let toml = script
            .split_once("<<TOML\n")
            .and_then(|(_, rest)| rest.split_once("\nTOML"))
            .expect("install.sh writes a config")
            .0
            .replace("$LIB", "/var/lib/moat")
            .replace("$PREFIX", "/usr/local");
        parse(&toml).unwrap();
        let keys: Vec<&str> = toml
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        assert_eq!(
            keys,
            ["kernel", "initramfs", "vmm", "layer_cache_dir", "upper_dir"]
        );
    }

    #[test]
    fn values_are_read() {
        let c = parse(
            "kernel = \"/k\"\ninitramfs = \"/i\"\nvmm = \"/v\"\nvcpus = 2\nmemory_mib = 512\n\
             boot_timeout_secs = 30\nagent_timeout_secs = 45\nupper = \"tmpfs\"\nspare_block_slots = 3\n\
             pids_limit = 64\n",
        )
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.vmm_path(), PathBuf::from("/v"));
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.upper, UpperKind::Tmpfs);
        assert_eq!(c.spare_block_slots, 3);
        assert_eq!(c.agent_timeout(), Duration::from_secs(45));
        assert!(!c.allow_no_landlock);
        assert!(parse("allow_no_landlock = true").unwrap().allow_no_landlock);
        assert_eq!(c.pids_limit, 64);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_path() {
        let e = parse("kernal = \"/k\"").unwrap_err().to_string();
        assert!(
            e.contains("/etc/moat/config.toml") && e.contains("kernal"),
            "{e}"
        );
        let e = parse("agent_timeout_secs = 0").unwrap_err().to_string();
        assert!(e.contains("agent_timeout_secs"), "{e}");
        let e = parse("vcpus = 0").unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        // More than moat-vmm takes is refused here, with its limit.
        let e = parse(&format!("vcpus = {}", MAX_VCPUS + 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("between 1 and {MAX_VCPUS}")), "{e}");
        parse(&format!("vcpus = {MAX_VCPUS}")).unwrap();
        let e = parse("memory_mib = 16").unwrap_err().to_string();
        assert!(e.contains("memory_mib"), "{e}");
        let e = parse("jail_id_base = 4294967000").unwrap_err().to_string();
        assert!(e.contains("jail_id_base"), "{e}");
        let e = parse("upper_size_mib = 2048\npod_upper_limit_mib = 1024")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pod_upper_limit_mib"), "{e}");
        // Finding 11: values whose arithmetic would overflow are refused.
        let e = parse("boot_timeout_secs = 18446744073709551615")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boot_timeout_secs"), "{e}");
        let e = parse("control_timeout_secs = 0").unwrap_err().to_string();
        assert!(e.contains("control_timeout_secs"), "{e}");
        let e = parse("agent_port = 4294967295").unwrap_err().to_string();
        assert!(e.contains("agent_port"), "{e}");
        // Finding 9: the default size must fit under the caps.
        let e = parse("vcpus = 8\nmax_vcpus = 4").unwrap_err().to_string();
        assert!(e.contains("max_vcpus"), "{e}");
        let e = parse("max_memory_mib = 8").unwrap_err().to_string();
        assert!(e.contains("max_memory_mib"), "{e}");
        let e = parse("upper = \"zfs\"").unwrap_err().to_string();
        assert!(e.contains("zfs"), "{e}");
        let e = parse("state_dir = \"/a/very/long/state/directory/path/that/is/too/long\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains(&MAX_SOCKET_PATH.to_string()), "{e}");
    }
}
