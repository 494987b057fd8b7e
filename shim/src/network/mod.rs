//! The pod's network: CNI put a veth with the pod's addresses into a
//! network namespace; the VM gets it through a tap in that namespace, with
//! tc ingress filters redirecting every frame veth -> tap and tap -> veth
//! (Kata's "tcfilter", firecracker-containerd's tc-redirect-tap). The guest
//! interface takes the veth's MAC, addresses, MTU and routes (SetNetwork).
//!
//! A container without a network namespace path (plain `ctr run`) gets a
//! new, loopback-only namespace in the guest, as with runc.
//!
//! [`port_forward`] makes CRI PortForward reach ports in the guest.

mod discover;
pub mod port_forward;

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use moat_protocol::agent::SetNetworkRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

pub use discover::TAP_PREFIX;
use discover::{Link, RouteEntry};

/// virtio-mmio interrupts are few: the rest go to block slots.
pub const MAX_INTERFACES: usize = 2;

/// Where the teardown record lives in a sandbox directory (for `shim delete`).
const RECORD: &str = "network.json";

#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("cannot open the network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter the network namespace {}: {source}", path.display())]
    Setns { path: PathBuf, source: nix::Error },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cannot read `{command}` output: {source}")]
    Parse {
        command: String,
        source: serde_json::Error,
    },
    #[error("cannot create tap {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("the pod has {0} interfaces; a moat VM takes at most {MAX_INTERFACES}")]
    TooManyInterfaces(usize),
}

/// One pod interface joined to its tap.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Joined {
    veth: String,
    tap: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    netns: PathBuf,
    links: Vec<Joined>,
}

/// A pod network joined to taps, ready for the VM.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    links: Vec<Joined>,
    /// Tap fds for moat-vmm, and the guest MAC of each.
    taps: Vec<(OwnedFd, String)>,
    /// What the agent is told.
    pub request: SetNetworkRequest,
}

/// The network namespace path of an OCI spec, if it names one.
pub fn netns_path(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The spec the guest gets: a network namespace given by path is the pod's
/// own, which in the VM is the agent's namespace, so the entry goes (the
/// host path means nothing in the guest). Other namespace paths stay: the
/// pids containerd knows are guest pids, so `/proc/<pid>/ns/...` resolves
/// in the guest to the pod's sandbox container.
pub fn guest_spec(spec: &mut Value) {
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| {
            !(n["type"] == "network" && n["path"].as_str().is_some_and(|p| !p.is_empty()))
        });
    }
}

/// Runs `f` in a thread that entered the network namespace at `path`, so
/// that the shim's own namespace never changes. Commands spawned from that
/// thread run in the namespace too.
fn in_netns<T: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    let ns = File::open(path).map_err(|source| NetworkError::Netns {
        path: path.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetworkError::Setns {
                    path: path.to_owned(),
                    source,
                }
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetworkError::Command {
                command: "network setup".into(),
                detail: "the setup thread panicked".into(),
            })
        })
    })
}

fn run(args: &[&str]) -> Result<String, NetworkError> {
    run_with_input(args, None)
}

/// [`run`], with `input` on the command's stdin.
fn run_with_input(args: &[&str], input: Option<&str>) -> Result<String, NetworkError> {
    let command = args.join(" ");
    let failed = |e: std::io::Error| NetworkError::Command {
        command: command.clone(),
        detail: e.to_string(),
    };
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(failed)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A few hundred bytes: the pipe takes them before the child reads.
        stdin.write_all(text.as_bytes()).map_err(failed)?;
    }
    let out = child.wait_with_output().map_err(failed)?;
    if !out.status.success() {
        return Err(NetworkError::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T, NetworkError> {
    let text = run(args)?;
    serde_json::from_str(&text).map_err(|source| NetworkError::Parse {
        command: args.join(" "),
        source,
    })
}

/// Creates a tap named `name` in the calling thread's network namespace,
/// with the flags moat-vmm requires of an inherited tap fd.
fn create_tap(name: &str) -> Result<OwnedFd, NetworkError> {
    let tap_err = |source| NetworkError::Tap {
        name: name.to_owned(),
        source,
    };
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(tap_err)?;
    // struct ifreq: a 16-byte name, then the flags (a short) in the union.
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    // ifr_flags is a short: the flags all fit in its 16 bits.
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads (and writes back) an ifreq-sized buffer we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) } < 0 {
        return Err(tap_err(std::io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(f))
}

/// tc: every frame arriving on `from` leaves through `to`.
fn redirect(from: &str, to: &str) -> Result<(), NetworkError> {
    run(&["tc", "qdisc", "add", "dev", from, "ingress"])?;
    run(&[
        "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
        "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ])?;
    Ok(())
}

/// Undoes what `join` did to the pod's namespace; errors are only logged
/// (the namespace or its veth may be gone already).
fn unjoin(links: &[Joined]) {
    for l in links {
        let commands: [&[&str]; 2] = [
            &["tc", "qdisc", "del", "dev", &l.veth, "ingress"],
            &["ip", "link", "del", "dev", &l.tap],
        ];
        for args in commands {
            if let Err(e) = run(args) {
                log::debug!("network teardown: {e}");
            }
        }
    }
}

impl PodNetwork {
    /// Joins every Ethernet interface of the namespace at `netns` to a new
    /// tap. A namespace with none (loopback only) gives an empty network.
    /// On error nothing is left behind in the namespace.
    pub fn join(netns: &Path) -> Result<PodNetwork, NetworkError> {
        in_netns(netns, || {
            let all: Vec<Link> = json(&["ip", "-j", "addr", "show"])?;
            let links = discover::pod_links(&all);
            if links.len() > MAX_INTERFACES {
                return Err(NetworkError::TooManyInterfaces(links.len()));
            }
            let mut entries: Vec<RouteEntry> = json(&["ip", "-j", "-4", "route", "show"])?;
            // A host booted with IPv6 off refuses the query: no v6 routes.
            match json::<Vec<RouteEntry>>(&["ip", "-j", "-6", "route", "show"]) {
                Ok(v6) => entries.extend(v6),
                Err(e) => log::debug!("no IPv6 routes: {e}"),
            }

            let mut joined = Vec::new();
            let mut taps = Vec::new();
            let result = (|| {
                for (i, l) in links.iter().enumerate() {
                    let tap = format!("{TAP_PREFIX}{i}");
                    let fd = create_tap(&tap)?;
                    joined.push(Joined {
                        veth: l.ifname.clone(),
                        tap: tap.clone(),
                    });
                    taps.push((fd, l.address.clone()));
                    let mtu = l.mtu.max(68).to_string();
                    run(&["ip", "link", "set", "dev", &tap, "mtu", &mtu, "up"])?;
                    redirect(&l.ifname, &tap)?;
                    redirect(&tap, &l.ifname)?;
                }
                Ok(())
            })();
            if let Err(e) = result {
                unjoin(&joined);
                return Err(e);
            }
            Ok(PodNetwork {
                netns: netns.to_owned(),
                links: joined,
                taps,
                request: SetNetworkRequest {
                    interfaces: links.iter().map(discover::interface).collect(),
                    routes: discover::routes(&entries, &links),
                    ..Default::default()
                },
            })
        })
    }

    /// The taps for moat-vmm: (fd, guest MAC).
    pub fn taps(&self) -> Vec<(RawFd, String)> {
        self.taps
            .iter()
            .map(|(fd, mac)| (fd.as_raw_fd(), mac.clone()))
            .collect()
    }

    /// Drops the shim's copies of the tap fds once moat-vmm holds them: the
    /// taps then vanish with the VM.
    pub fn release_taps(&mut self) {
        self.taps.clear();
    }

    /// Writes what `teardown_recorded` needs into the sandbox directory.
    pub fn record(&self, dir: &Path) -> std::io::Result<()> {
        let r = Record {
            netns: self.netns.clone(),
            links: self.links.clone(),
        };
        fs::write(dir.join(RECORD), serde_json::to_vec(&r)?)
    }

    /// The pod's network namespace on the host.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    /// Removes the redirects (port forwarding's too) and taps from the
    /// pod's namespace.
    pub fn teardown(&self) {
        if self.links.is_empty() {
            return;
        }
        if let Err(e) = in_netns(&self.netns, || {
            port_forward::remove_redirect();
            unjoin(&self.links);
            Ok(())
        }) {
            log::warn!("network teardown: {e}");
        }
    }
}

/// Teardown for `shim delete`, from the record a dead shim left.
pub fn teardown_recorded(dir: &Path) {
    let Ok(bytes) = fs::read(dir.join(RECORD)) else {
        return;
    };
    let Ok(r) = serde_json::from_slice::<Record>(&bytes) else {
        return;
    };
    let _ = in_netns(&r.netns, || {
        port_forward::remove_redirect();
        unjoin(&r.links);
        Ok(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn netns_path_and_guest_spec() {
        let mut spec = json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"}
        ]}});
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        guest_spec(&mut spec);
        assert_eq!(
            spec["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"}])
        );
        // A new (empty) network namespace stays: loopback only, as runc.
        let mut spec = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(netns_path(&spec), None);
        guest_spec(&mut spec);
        assert_eq!(spec["linux"]["namespaces"], json!([{"type": "network"}]));
    }

    fn ip(args: &[&str]) -> bool {
        Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A real namespace with a veth: taps and redirects appear, the agent
    /// request carries the pod's address and route, and teardown leaves the
    /// namespace as it was.
    #[test]
    fn joins_and_leaves_a_real_pod_namespace() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !ip(&["-V"]) {
            eprintln!("!!! SKIPPED joins_and_leaves_a_real_pod_namespace: needs root and iproute2");
            return;
        }
        let ns = format!("moat-unit-{}", std::process::id());
        let peer = format!("mu{}", std::process::id() % 100_000);
        struct Del(String);
        impl Drop for Del {
            fn drop(&mut self) {
                ip(&["netns", "del", &self.0]);
            }
        }
        assert!(ip(&["netns", "add", &ns]));
        let _del = Del(ns.clone());
        assert!(ip(&[
            "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &ns
        ]));
        assert!(ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            "10.214.0.2/24",
            "dev",
            "eth0"
        ]));
        assert!(ip(&["-n", &ns, "link", "set", "eth0", "mtu", "1400", "up"]));
        assert!(ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            "10.214.0.1"
        ]));
        let path = PathBuf::from("/run/netns").join(&ns);
        let in_ns = |args: &[&str]| {
            let o = Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        };

        let mut net = PodNetwork::join(&path).unwrap();
        let r = &net.request;
        assert_eq!(r.interfaces.len(), 1);
        assert_eq!(r.interfaces[0].addresses, ["10.214.0.2/24"]);
        assert_eq!(r.interfaces[0].mtu, 1400);
        assert_eq!(r.routes.len(), 1);
        assert_eq!(
            (
                r.routes[0].destination.as_str(),
                r.routes[0].gateway.as_str()
            ),
            ("default", "10.214.0.1")
        );
        assert_eq!(net.taps().len(), 1);
        assert!(in_ns(&["ip", "-o", "link"]).contains("moat0"));
        assert!(in_ns(&["tc", "filter", "show", "dev", "eth0", "ingress"]).contains("moat0"));
        assert!(in_ns(&["tc", "filter", "show", "dev", "moat0", "ingress"]).contains("eth0"));
        // The shim's own namespace is untouched.
        assert!(!Path::new("/sys/class/net/moat0").exists());

        net.release_taps();
        net.teardown();
        assert!(!in_ns(&["ip", "-o", "link"]).contains("moat0"));
        assert!(!in_ns(&["tc", "qdisc", "show", "dev", "eth0"]).contains("ingress"));
    }

    #[test]
    fn a_missing_namespace_is_a_clear_error() {
        let e = PodNetwork::join(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot open the network namespace /nonexistent/netns"),
            "{e}"
        );
    }
}
