//! Agent configuration: kernel command line in the guest, flags in tests.

use std::path::PathBuf;

use moat_protocol::AGENT_PORT_PARAM;

use crate::transport::Listen;

/// Turns glibc's AVX code paths off (see shared/guest-kernel/README.md).
pub const GLIBC_TUNABLES: &str = "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-AVX_Usable,-AVX2_Usable,-AVX512F_Usable,-AVX512DQ_Usable,\
-AVX_Fast_Unaligned_Load";

/// Where the agent listens and where it keeps its state. [`Default`] is
/// the in-guest setup; tests point the paths at temporary directories.
#[derive(Debug, Clone)]
pub struct Config {
    /// Transport of the ttrpc and stdio servers: vsock in the guest, unix
    /// sockets in host tests.
    pub listen: Listen,
    /// ttrpc port; stdio is port + 1.
    pub port: u32,
    /// Where the cgroup v2 hierarchy is (or gets) mounted.
    pub cgroup_mount: PathBuf,
    /// Parent of the containers' cgroups.
    pub cgroup_root: PathBuf,
    /// Agent state: containers/, shared/, network/.
    pub state_dir: PathBuf,
    /// sysfs directory of block devices, searched for virtio-blk serials.
    pub sysfs_block: PathBuf,
    /// sysfs directory of network interfaces, searched for MAC addresses.
    pub sys_class_net: PathBuf,
    /// Log info and debug messages too (`moat.verbose`), not only warnings
    /// and errors.
    pub verbose: bool,
    /// Kernel booted with emul_compat: no AVX in guest user space.
    pub emul_compat: bool,
    /// Running as PID 1 of the guest.
    pub init: bool,
    /// pids.max of containers whose spec sets no pids limit (0: none).
    pub pids_limit: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: Listen::Vsock,
            port: moat_protocol::DEFAULT_AGENT_PORT,
            cgroup_mount: "/sys/fs/cgroup".into(),
            cgroup_root: "/sys/fs/cgroup/moat".into(),
            state_dir: "/run/moat".into(),
            sysfs_block: "/sys/block".into(),
            sys_class_net: "/sys/class/net".into(),
            verbose: false,
            emul_compat: false,
            init: false,
            pids_limit: moat_protocol::DEFAULT_PIDS_LIMIT,
        }
    }
}

impl Config {
    /// Where CopyFile writes the files the host copies in (`<state>/shared`).
    pub fn shared_dir(&self) -> PathBuf {
        self.state_dir.join("shared")
    }

    /// Where SetNetwork writes the pod's resolv.conf, hosts and hostname
    /// files (`<state>/network`).
    pub fn network_dir(&self) -> PathBuf {
        self.state_dir.join("network")
    }

    /// Applies the kernel command line (`moat.port=`, `moat.verbose`,
    /// `moat.pids_limit=`, `emul_compat`).
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Result<(), String> {
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some((AGENT_PORT_PARAM, v)) => {
                    self.port = v
                        .parse()
                        .map_err(|_| format!("bad {AGENT_PORT_PARAM} {v:?}"))?
                }
                Some(("moat.verbose", v)) => self.verbose = v != "0",
                Some((moat_protocol::PIDS_LIMIT_PARAM, v)) => {
                    self.pids_limit = v.parse().map_err(|_| format!("bad {word:?}"))?
                }
                None if word == "moat.verbose" => self.verbose = true,
                None if word == "emul_compat" => self.emul_compat = true,
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies command-line flags (host tests and debugging).
    pub fn apply_args(&mut self, args: &[String]) -> Result<(), String> {
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--unix" => self.listen = Listen::Unix(val("--unix")?.into()),
                "--port" => self.port = val("--port")?.parse().map_err(|_| "bad --port")?,
                "--cgroup-root" => self.cgroup_root = val("--cgroup-root")?.into(),
                "--cgroup-mount" => self.cgroup_mount = val("--cgroup-mount")?.into(),
                "--state-dir" => self.state_dir = val("--state-dir")?.into(),
                "--pids-limit" => {
                    self.pids_limit = val("--pids-limit")?
                        .parse()
                        .map_err(|_| "bad --pids-limit")?
                }
                "--emul-compat" => self.emul_compat = true,
                "--verbose" | "-v" => self.verbose = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_shared_dir_is_where_the_shim_points() {
        use std::path::Path;
        assert_eq!(
            Config::default().shared_dir(),
            Path::new(moat_protocol::GUEST_SHARED_DIR)
        );
    }

    #[test]
    fn cmdline() {
        let mut c = Config::default();
        assert_eq!(c.pids_limit, moat_protocol::DEFAULT_PIDS_LIMIT);
        c.apply_cmdline(
            "console=ttyS0 emul_compat quiet moat.port=2000 moat.verbose moat.pids_limit=64",
        )
        .unwrap();
        assert_eq!(c.port, 2000);
        assert_eq!(c.pids_limit, 64);
        assert!(c.verbose && c.emul_compat);
        assert!(c.apply_cmdline("moat.port=x").is_err());
        assert!(c.apply_cmdline("moat.pids_limit=-1").is_err());
    }

    #[test]
    fn args() {
        let mut c = Config::default();
        let a: Vec<String> = [
            "--unix",
            "/tmp/a",
            "--cgroup-root",
            "/sys/fs/cgroup/t",
            "-v",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        c.apply_args(&a).unwrap();
        assert_eq!(c.listen, Listen::Unix("/tmp/a".into()));
        assert!(c.apply_args(&["--bogus".into()]).is_err());
    }
}
