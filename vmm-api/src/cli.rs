//! moat-vmm's command-line flags, which build the same [`VmConfig`] as
//! `vm.json` does.

use std::path::PathBuf;

use crate::config::{
    BlockConfig, ConfigError, JailConfig, NetConfig, SerialOutput, VmConfig, VsockConfig,
};

/// The jail flags, gathered until every flag is read.
#[derive(Default)]
struct JailFlags {
    ids: Option<(u32, u32)>,
    read_write: Vec<PathBuf>,
    read_only: Vec<PathBuf>,
    allow_no_landlock: bool,
}

impl JailFlags {
    fn into_config(self) -> Result<Option<JailConfig>, ConfigError> {
        match self.ids {
            Some((uid, gid)) => Ok(Some(JailConfig {
                read_write: self.read_write,
                read_only: self.read_only,
                allow_no_landlock: self.allow_no_landlock,
                ..JailConfig::new(uid, gid)
            })),
            None if !self.read_write.is_empty()
                || !self.read_only.is_empty()
                || self.allow_no_landlock =>
            {
                Err(ConfigError::Cli(
                    "--jail-rw, --jail-ro and --jail-no-landlock need --jail".into(),
                ))
            }
            None => Ok(None),
        }
    }
}

impl VmConfig {
    /// Parses `moat-vmm` arguments (without the program name).
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let mut args = args.into_iter();
        let mut cfg = VmConfig::new(PathBuf::new());
        let mut from_file = None;
        let mut jail = JailFlags::default();
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
                "--log-max-bytes" => {
                    cfg.log_max_bytes = parse_num("--log-max-bytes", &value("--log-max-bytes")?)?
                }
                "--jail" => jail.ids = Some(parse_jail(&value("--jail")?)?),
                "--jail-rw" => jail.read_write.push(value("--jail-rw")?.into()),
                "--jail-ro" => jail.read_only.push(value("--jail-ro")?.into()),
                "--jail-no-landlock" => jail.allow_no_landlock = true,
                "--restore" => cfg.restore = Some(value("--restore")?.into()),
                other => return Err(ConfigError::Cli(format!("unknown flag {other:?}"))),
            }
        }
        cfg.jail = jail.into_config()?;
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
}

fn parse_jail(text: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::Cli(format!("--jail wants UID:GID, not {text:?}"));
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    Ok((
        uid.parse().map_err(|_| bad())?,
        gid.parse().map_err(|_| bad())?,
    ))
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
