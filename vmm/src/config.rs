//! VM configuration: the JSON file format, the equivalent command-line flags,
//! and the checks that run before any guest code does (see `API.md`).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_VCPUS: u8 = 32;
/// virtio-blk GET_ID returns at most this many bytes.
pub const BLOCK_SERIAL_MAX: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read the configuration file {0}")]
    ReadFile(PathBuf, #[source] std::io::Error),
    #[error("Invalid configuration file {0}")]
    ParseFile(PathBuf, #[source] serde_json::Error),
    #[error("Invalid command line: {0}")]
    Cli(String),
    #[error("No kernel given (--kernel or \"kernel\")")]
    NoKernel,
    #[error("Cannot open {what} {path}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vcpus must be between 1 and {MAX_VCPUS}, not {0}")]
    Vcpus(u8),
    #[error("memory_mib must be at least {MIN_MEMORY_MIB}, not {0}")]
    MemoryTooSmall(u64),
    #[error("memory_mib {0} is more than the host's {1} MiB of memory")]
    MemoryTooLarge(u64, u64),
    #[error("Device id {0:?} is used twice")]
    DuplicateId(String),
    #[error("Device id must not be empty")]
    EmptyId,
    #[error("Block device {0:?} has a serial longer than {BLOCK_SERIAL_MAX} bytes")]
    SerialTooLong(String),
    #[error("Net device {0:?} needs exactly one of tap and tap_fd")]
    NetBackend(String),
    #[error("Invalid MAC address {0:?}")]
    Mac(String),
    #[error("Too many devices: at most {0} virtio devices fit")]
    TooManyDevices(u32),
    #[error("Socket path {0} is longer than 107 bytes")]
    SocketPath(PathBuf),
    #[error("Guest CID {0} is reserved (use 3 or more)")]
    GuestCid(u64),
    #[error("A jail's user and group must not be root (0)")]
    JailRoot,
}

/// The unprivileged user and group moat-vmm runs as once its files are open,
/// and the only paths it may open from then on (see `privileges`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JailConfig {
    pub uid: u32,
    pub gid: u32,
    /// Directories (or files) whose content it may read and write.
    #[serde(default)]
    pub read_write: Vec<PathBuf>,
    /// Directories (or files) whose content it may read.
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    #[default]
    Stdout,
    Off,
    File(PathBuf),
    Fd(i32),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    pub id: String,
    /// None: a spare, empty slot that the API can fill later.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub id: String,
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub tap_fd: Option<i32>,
    #[serde(default)]
    pub mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub kernel: PathBuf,
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub serial: SerialOutput,
    #[serde(default)]
    pub block: Vec<BlockConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    #[serde(default = "default_true")]
    pub seccomp: bool,
    #[serde(default)]
    pub jail: Option<JailConfig>,
}

impl VmConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::ReadFile(path.to_owned(), e))?;
        serde_json::from_str(&text).map_err(|e| ConfigError::ParseFile(path.to_owned(), e))
    }

    /// Parses `moat-vmm` arguments (without the program name).
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let mut args = args.into_iter();
        let mut cfg = VmConfig {
            kernel: PathBuf::new(),
            initramfs: None,
            cmdline: String::new(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            serial: SerialOutput::Stdout,
            block: vec![],
            net: vec![],
            vsock: None,
            rng: false,
            api_socket: None,
            seccomp: true,
            jail: None,
        };
        let mut from_file = None;
        let mut jail_ids = None;
        let (mut jail_rw, mut jail_ro) = (Vec::new(), Vec::new());
        while let Some(flag) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| ConfigError::Cli(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "--config" => from_file = Some(PathBuf::from(value("--config")?)),
                "--kernel" => cfg.kernel = value("--kernel")?.into(),
                "--initramfs" => cfg.initramfs = Some(value("--initramfs")?.into()),
                "--cmdline" => cfg.cmdline = value("--cmdline")?,
                "--vcpus" => cfg.vcpus = parse_num("--vcpus", &value("--vcpus")?)?,
                "--memory-mib" => {
                    cfg.memory_mib = parse_num("--memory-mib", &value("--memory-mib")?)?
                }
                "--serial" => cfg.serial = parse_serial(&value("--serial")?)?,
                "--block" => cfg.block.push(parse_block(&value("--block")?)?),
                "--net" => cfg.net.push(parse_net(&value("--net")?)?),
                "--vsock" => cfg.vsock = Some(parse_vsock(&value("--vsock")?)?),
                "--rng" => cfg.rng = true,
                "--api-socket" => cfg.api_socket = Some(value("--api-socket")?.into()),
                "--no-seccomp" => cfg.seccomp = false,
                "--jail" => jail_ids = Some(parse_jail(&value("--jail")?)?),
                "--jail-rw" => jail_rw.push(value("--jail-rw")?.into()),
                "--jail-ro" => jail_ro.push(value("--jail-ro")?.into()),
                other => return Err(ConfigError::Cli(format!("unknown flag {other:?}"))),
            }
        }
        match jail_ids {
            Some((uid, gid)) => {
                cfg.jail = Some(JailConfig {
                    uid,
                    gid,
                    read_write: jail_rw,
                    read_only: jail_ro,
                })
            }
            None if !jail_rw.is_empty() || !jail_ro.is_empty() => {
                return Err(ConfigError::Cli(
                    "--jail-rw and --jail-ro need --jail".into(),
                ))
            }
            None => {}
        }
        match from_file {
            Some(path) if cfg.kernel.as_os_str().is_empty() => {
                let mut file_cfg = Self::from_file(&path)?;
                // --no-seccomp is a debugging aid that also applies to file configs.
                file_cfg.seccomp &= cfg.seccomp;
                Ok(file_cfg)
            }
            Some(_) => Err(ConfigError::Cli(
                "--config cannot be combined with --kernel".into(),
            )),
            None if cfg.kernel.as_os_str().is_empty() => Err(ConfigError::NoKernel),
            None => Ok(cfg),
        }
    }

    /// Checks everything that can be checked without KVM: ranges, ids,
    /// readable files. `host_mem_mib` is the host's total memory.
    pub fn validate(&self, host_mem_mib: u64) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        check_readable("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_readable("initramfs", initramfs)?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        if self.memory_mib > host_mem_mib {
            return Err(ConfigError::MemoryTooLarge(self.memory_mib, host_mem_mib));
        }
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
        let count = self.block.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng);
        if count > crate::layout::MAX_VIRTIO_DEVICES as usize {
            return Err(ConfigError::TooManyDevices(
                crate::layout::MAX_VIRTIO_DEVICES,
            ));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
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
        Ok(())
    }
}

fn parse_jail(text: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::Cli(format!("--jail wants UID:GID, not {text:?}"));
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((
        uid.parse().map_err(|_| bad())?,
        gid.parse().map_err(|_| bad())?,
    ))
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
    // sun_path holds 108 bytes including the terminating NUL; the vsock
    // muxer also appends `_<port>` for guest-initiated connections.
    if path.as_os_str().len() > 100 {
        return Err(ConfigError::SocketPath(path.to_owned()));
    }
    Ok(())
}

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

fn parse_num<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, ConfigError> {
    text.parse()
        .map_err(|_| ConfigError::Cli(format!("{flag} wants a number, not {text:?}")))
}

fn parse_serial(text: &str) -> Result<SerialOutput, ConfigError> {
    Ok(match text {
        "stdout" => SerialOutput::Stdout,
        "off" => SerialOutput::Off,
        _ if text.starts_with("file:") => SerialOutput::File(text[5..].into()),
        _ if text.starts_with("fd:") => SerialOutput::Fd(parse_num("--serial fd:", &text[3..])?),
        _ => {
            return Err(ConfigError::Cli(format!(
                "--serial wants stdout, off, file:PATH or fd:N, not {text:?}"
            )))
        }
    })
}

/// Splits `k=v,k2,k3=v3` into pairs; a bare key has an empty value.
fn key_values<'a>(flag: &str, text: &'a str) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    text.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if k.is_empty() {
                Err(ConfigError::Cli(format!("{flag}: empty key in {text:?}")))
            } else {
                Ok((k, v))
            }
        })
        .collect()
}

fn unknown_key(flag: &str, key: &str) -> ConfigError {
    ConfigError::Cli(format!("{flag}: unknown key {key:?}"))
}

fn parse_block(text: &str) -> Result<BlockConfig, ConfigError> {
    let mut b = BlockConfig {
        id: String::new(),
        path: None,
        read_only: false,
        serial: None,
    };
    for (k, v) in key_values("--block", text)? {
        match k {
            "id" => b.id = v.into(),
            "path" => b.path = Some(v.into()),
            "ro" => b.read_only = true,
            "serial" => b.serial = Some(v.into()),
            _ => return Err(unknown_key("--block", k)),
        }
    }
    Ok(b)
}

fn parse_net(text: &str) -> Result<NetConfig, ConfigError> {
    let mut n = NetConfig {
        id: String::new(),
        tap: None,
        tap_fd: None,
        mac: None,
    };
    for (k, v) in key_values("--net", text)? {
        match k {
            "id" => n.id = v.into(),
            "tap" => n.tap = Some(v.into()),
            "tap_fd" => n.tap_fd = Some(parse_num("--net tap_fd", v)?),
            "mac" => n.mac = Some(v.into()),
            _ => return Err(unknown_key("--net", k)),
        }
    }
    Ok(n)
}

fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let (mut cid, mut uds) = (None, None);
    for (k, v) in key_values("--vsock", text)? {
        match k {
            "cid" => cid = Some(parse_num("--vsock cid", v)?),
            "uds" => uds = Some(PathBuf::from(v)),
            _ => return Err(unknown_key("--vsock", k)),
        }
    }
    match (cid, uds) {
        (Some(guest_cid), Some(uds_path)) => Ok(VsockConfig {
            guest_cid,
            uds_path,
        }),
        _ => Err(ConfigError::Cli("--vsock needs cid=N,uds=PATH".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_flags() {
        let cfg = VmConfig::from_args(args(
            "--kernel /k --vcpus 2 --memory-mib 128 --serial file:/tmp/s \
             --block id=a,path=/d,ro,serial=layer0 --block id=spare \
             --net id=n,tap=tap0,mac=02:00:00:00:00:01 --vsock cid=3,uds=/tmp/v --rng --no-seccomp \
             --jail 1000:100 --jail-rw /run/x --jail-ro /var/y --jail-ro /var/z",
        ))
        .unwrap();
        assert_eq!(
            cfg.jail,
            Some(JailConfig {
                uid: 1000,
                gid: 100,
                read_write: vec!["/run/x".into()],
                read_only: vec!["/var/y".into(), "/var/z".into()],
            })
        );
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.serial, SerialOutput::File("/tmp/s".into()));
        assert_eq!(cfg.block[0].path.as_deref(), Some(Path::new("/d")));
        assert!(cfg.block[0].read_only);
        assert_eq!(cfg.block[0].serial.as_deref(), Some("layer0"));
        assert_eq!(cfg.block[1].path, None);
        assert_eq!(cfg.net[0].tap.as_deref(), Some("tap0"));
        assert_eq!(cfg.vsock.as_ref().unwrap().guest_cid, 3);
        assert!(cfg.rng);
        assert!(!cfg.seccomp);
    }

    #[test]
    fn rejects_bad_flags() {
        for bad in [
            "",
            "--kernel",
            "--kernel /k --vcpus two",
            "--kernel /k --bogus",
            "--kernel /k --block id=a,colour=red",
            "--kernel /k --serial tty",
            "--kernel /k --vsock cid=3",
            "--kernel /k --jail 1000",
            "--kernel /k --jail a:b",
            "--kernel /k --jail-rw /run/x",
        ] {
            assert!(VmConfig::from_args(args(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_json_and_rejects_unknown_fields() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","serial":{"file":"/s"},"block":[{"id":"a","path":"/d"}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 256);
        assert!(cfg.seccomp);
        assert_eq!(cfg.serial, SerialOutput::File("/s".into()));
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpus":2}"#).is_err());
    }

    fn valid() -> VmConfig {
        VmConfig::from_args(args("--kernel /proc/self/exe")).unwrap()
    }

    #[test]
    fn validation() {
        assert!(valid().validate(1024).is_ok());
        let check = |f: &dyn Fn(&mut VmConfig), want: &str| {
            let mut c = valid();
            f(&mut c);
            let err = c.validate(1024).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        };
        check(&|c| c.kernel = "/nonexistent".into(), "Cannot open kernel");
        check(&|c| c.vcpus = 0, "vcpus");
        check(&|c| c.vcpus = 33, "vcpus");
        check(&|c| c.memory_mib = 1, "at least");
        check(&|c| c.memory_mib = 4096, "host");
        let jail = |uid, gid| {
            Some(JailConfig {
                uid,
                gid,
                read_write: Vec::new(),
                read_only: Vec::new(),
            })
        };
        check(&|c| c.jail = jail(0, 5), "root");
        check(&|c| c.jail = jail(5, 0), "root");
        check(
            &|c| {
                c.block.push(BlockConfig {
                    id: "x".into(),
                    path: None,
                    read_only: false,
                    serial: None,
                });
                c.net.push(NetConfig {
                    id: "x".into(),
                    tap: Some("t".into()),
                    tap_fd: None,
                    mac: None,
                });
            },
            "used twice",
        );
        check(
            &|c| {
                c.net.push(NetConfig {
                    id: "n".into(),
                    tap: None,
                    tap_fd: None,
                    mac: None,
                })
            },
            "exactly one",
        );
        check(
            &|c| {
                c.net.push(NetConfig {
                    id: "n".into(),
                    tap: Some("t".into()),
                    tap_fd: None,
                    mac: Some("zz".into()),
                })
            },
            "MAC",
        );
        check(
            &|c| {
                c.vsock = Some(VsockConfig {
                    guest_cid: 2,
                    uds_path: "/tmp/v".into(),
                })
            },
            "reserved",
        );
    }

    #[test]
    fn mac() {
        assert_eq!(
            parse_mac("02:0a:FF:00:00:01").unwrap(),
            [2, 10, 255, 0, 0, 1]
        );
        assert!(parse_mac("02:0a:FF:00:00").is_err());
        assert!(parse_mac("02:0a:FF:00:00:001").is_err());
    }
}
