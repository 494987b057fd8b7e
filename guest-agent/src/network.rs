//! SetNetwork: interfaces found by MAC get addresses, MTU and a name through
//! the classic ioctls (a handful of syscalls, no netlink library); DNS,
//! hosts and hostname become files the containers bind-mount.

use std::ffi::CString;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use moat_protocol::agent::SetNetworkRequest;

use crate::error::{AgentError, IoContext, Result};

fn bad(msg: String) -> AgentError {
    AgentError::InvalidArgument(msg)
}

/// "10.0.0.2/24" -> (addr, prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| bad(format!("{s:?} is not CIDR")))?;
    let addr: IpAddr = a.parse().map_err(|_| bad(format!("bad address {a:?}")))?;
    let prefix: u8 = p.parse().map_err(|_| bad(format!("bad prefix {p:?}")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad(format!("prefix {prefix} too long")));
    }
    Ok((addr, prefix))
}

fn normalize_mac(mac: &str) -> String {
    mac.trim().to_ascii_lowercase()
}

/// The interface name with MAC `mac`, from sysfs.
pub fn find_by_mac(sys_class_net: &Path, mac: &str) -> Result<String> {
    let want = normalize_mac(mac);
    for e in fs::read_dir(sys_class_net)
        .ctx(|| "listing interfaces".into())?
        .flatten()
    {
        if let Ok(a) = fs::read_to_string(e.path().join("address")) {
            if normalize_mac(&a) == want {
                return Ok(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    Err(AgentError::InvalidArgument(format!(
        "no interface with MAC {mac}"
    )))
}

fn socket(family: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "socket".into());
    }
    // SAFETY: fd was just returned by socket(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(bad(format!("bad interface name {name:?}")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: `arg` is the struct type the request expects, owned by us.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| what.to_owned());
    }
    Ok(())
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn mask_v4(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    })
}

fn ifindex(fd: &OwnedFd, name: &str) -> Result<i32> {
    let mut r = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFINDEX, &mut r, "SIOCGIFINDEX")?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    Ok(unsafe { r.ifr_ifru.ifru_ifindex })
}

/// The six bytes of "aa:bb:cc:dd:ee:ff".
fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = mac.trim().split(':').collect();
    let mut bytes = [0u8; 6];
    if parts.len() != 6 {
        return Err(bad(format!("bad MAC {mac:?}")));
    }
    for (b, p) in bytes.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| bad(format!("bad MAC {mac:?}")))?;
    }
    Ok(bytes)
}

/// Gives interface `name` (still down) the Ethernet address `mac`.
fn set_mac(fd: &OwnedFd, name: &str, mac: &str) -> Result<()> {
    let bytes = parse_mac(mac)?;
    let mut r = ifreq(name)?;
    let mut addr = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (d, b) in addr.sa_data.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = addr;
    ioctl(
        fd,
        libc::SIOCSIFHWADDR,
        &mut r,
        &format!("setting MAC {mac}"),
    )
}

/// Sets IFF_UP on `name`.
pub fn link_up(name: &str) -> Result<()> {
    let fd = socket(libc::AF_INET)?;
    let mut r = ifreq(name)?;
    ioctl(&fd, libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(
        &fd,
        libc::SIOCSIFFLAGS,
        &mut r,
        &format!("bringing {name} up"),
    )
}

/// struct in6_rtmsg (linux/ipv6_route.h); libc's fields are private.
#[repr(C)]
struct In6Rtmsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

/// struct rtentry (net/route.h); libc has none for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// SIOCADDRT with `rt`, the route struct of `fd`'s address family. A route
/// that is already there counts as added.
fn add_route_entry<T>(fd: &OwnedFd, rt: &mut T, dest: &str) -> Result<()> {
    match ioctl(fd, libc::SIOCADDRT, rt, &format!("adding route {dest}")) {
        Err(AgentError::Io { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

fn add_route(dest: &str, gateway: &str, dev: Option<&str>, metric: u32) -> Result<()> {
    let (dst, prefix) = if dest == "default" || dest.is_empty() {
        let v6 = gateway.contains(':');
        (
            if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            },
            0,
        )
    } else {
        parse_cidr(dest)?
    };
    let gw: Option<IpAddr> = if gateway.is_empty() {
        None
    } else {
        Some(
            gateway
                .parse()
                .map_err(|_| bad(format!("bad gateway {gateway:?}")))?,
        )
    };
    let dev_c = dev.map(|d| CString::new(d).expect("interface names have no NUL"));
    match dst {
        IpAddr::V4(d) => {
            let fd = socket(libc::AF_INET)?;
            let mut flags = libc::RTF_UP;
            let gw4 = match gw {
                Some(IpAddr::V4(g)) => {
                    flags |= libc::RTF_GATEWAY;
                    g
                }
                Some(_) => return Err(bad("IPv4 route with an IPv6 gateway".into())),
                None => Ipv4Addr::UNSPECIFIED,
            };
            let mut rt = RtEntry {
                rt_pad1: 0,
                rt_dst: sockaddr_in(d),
                rt_gateway: sockaddr_in(gw4),
                rt_genmask: sockaddr_in(mask_v4(prefix)),
                rt_flags: flags,
                rt_pad2: 0,
                rt_pad3: 0,
                rt_pad4: std::ptr::null_mut(),
                rt_metric: (metric.min(i16::MAX as u32) as i16).saturating_add(1),
                rt_dev: dev_c
                    .as_ref()
                    .map_or(std::ptr::null_mut(), |c| c.as_ptr() as *mut _),
                rt_mtu: 0,
                rt_window: 0,
                rt_irtt: 0,
            };
            add_route_entry(&fd, &mut rt, dest)
        }
        IpAddr::V6(d) => {
            let fd = socket(libc::AF_INET6)?;
            let mut flags = libc::RTF_UP as u32;
            let gw6 = match gw {
                Some(IpAddr::V6(g)) => {
                    flags |= libc::RTF_GATEWAY as u32;
                    g
                }
                Some(_) => return Err(bad("IPv6 route with an IPv4 gateway".into())),
                None => Ipv6Addr::UNSPECIFIED,
            };
            let ifindex = match dev {
                Some(d) => ifindex(&fd, d)?,
                None => 0,
            };
            let mut rt = In6Rtmsg {
                rtmsg_dst: libc::in6_addr {
                    s6_addr: d.octets(),
                },
                rtmsg_src: libc::in6_addr { s6_addr: [0; 16] },
                rtmsg_gateway: libc::in6_addr {
                    s6_addr: gw6.octets(),
                },
                rtmsg_type: 0,
                rtmsg_dst_len: prefix as u16,
                rtmsg_src_len: 0,
                rtmsg_metric: metric.max(1),
                rtmsg_info: 0,
                rtmsg_flags: flags,
                rtmsg_ifindex: ifindex,
            };
            add_route_entry(&fd, &mut rt, dest)
        }
    }
}

fn configure_interface(
    sys_class_net: &Path,
    iface: &moat_protocol::agent::Interface,
) -> Result<String> {
    let lookup = if iface.guest_mac.is_empty() {
        &iface.mac
    } else {
        &iface.guest_mac
    };
    let mut name = find_by_mac(sys_class_net, lookup)?;
    let fd4 = socket(libc::AF_INET)?;
    if normalize_mac(lookup) != normalize_mac(&iface.mac) {
        set_mac(&fd4, &name, &iface.mac)?;
    }
    if !iface.name.is_empty() && iface.name != name {
        let mut r = ifreq(&name)?;
        let new = ifreq(&iface.name)?;
        r.ifr_ifru.ifru_newname = new.ifr_name;
        ioctl(&fd4, libc::SIOCSIFNAME, &mut r, "renaming interface")?;
        name = iface.name.clone();
    }
    if iface.mtu > 0 {
        let mut r = ifreq(&name)?;
        r.ifr_ifru.ifru_mtu = iface.mtu as i32;
        ioctl(&fd4, libc::SIOCSIFMTU, &mut r, "setting MTU")?;
    }
    let mut v4_done = false;
    for a in &iface.addresses {
        match parse_cidr(a)? {
            (IpAddr::V4(ip), prefix) => {
                if v4_done {
                    return Err(AgentError::Unsupported(format!(
                        "a second IPv4 address on {name} ({a})"
                    )));
                }
                let mut r = ifreq(&name)?;
                r.ifr_ifru.ifru_addr = sockaddr_in(ip);
                ioctl(
                    &fd4,
                    libc::SIOCSIFADDR,
                    &mut r,
                    &format!("setting address {a}"),
                )?;
                let mut r = ifreq(&name)?;
                r.ifr_ifru.ifru_netmask = sockaddr_in(mask_v4(prefix));
                ioctl(
                    &fd4,
                    libc::SIOCSIFNETMASK,
                    &mut r,
                    &format!("setting netmask of {a}"),
                )?;
                v4_done = true;
            }
            (IpAddr::V6(ip), prefix) => {
                let fd6 = socket(libc::AF_INET6)?;
                let mut r = libc::in6_ifreq {
                    ifr6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ifr6_prefixlen: prefix as u32,
                    ifr6_ifindex: ifindex(&fd6, &name)?,
                };
                ioctl(
                    &fd6,
                    libc::SIOCSIFADDR,
                    &mut r,
                    &format!("setting address {a}"),
                )?;
            }
        }
    }
    link_up(&name)?;
    Ok(name)
}

/// Renders resolv.conf.
pub fn resolv_conf(req: &SetNetworkRequest) -> String {
    let mut s = String::new();
    for n in &req.dns_servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !req.dns_search.is_empty() {
        s.push_str(&format!("search {}\n", req.dns_search.join(" ")));
    }
    if !req.dns_options.is_empty() {
        s.push_str(&format!("options {}\n", req.dns_options.join(" ")));
    }
    s
}

/// Renders /etc/hosts.
pub fn hosts(req: &SetNetworkRequest) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for h in &req.hosts {
        s.push_str(&format!("{}\t{}\n", h.ip, h.names.join(" ")));
    }
    s
}

/// Applies a SetNetwork request. Files go to `files_dir` (resolv.conf,
/// hosts, hostname) for containers to bind-mount; `apply_kernel` also sets
/// the guest's hostname (false in host tests).
pub fn set_network(
    req: &SetNetworkRequest,
    sys_class_net: &Path,
    files_dir: &Path,
    apply_kernel: bool,
) -> Result<()> {
    let text_ok = |v: &str| !v.contains(['\n', '\0']);
    let all_text = req
        .dns_servers
        .iter()
        .chain(&req.dns_search)
        .chain(&req.dns_options)
        .chain(req.hosts.iter().map(|h| &h.ip))
        .chain(req.hosts.iter().flat_map(|h| &h.names))
        .all(|v| text_ok(v))
        && text_ok(&req.hostname);
    if !all_text {
        return Err(bad("network strings must not contain newlines".into()));
    }
    for d in &req.dns_servers {
        d.parse::<IpAddr>()
            .map_err(|_| bad(format!("bad DNS server {d:?}")))?;
    }
    let mut names = Vec::new();
    for iface in &req.interfaces {
        names.push((
            iface.mac.clone(),
            configure_interface(sys_class_net, iface)?,
        ));
    }
    for r in &req.routes {
        let dev = if r.interface_mac.is_empty() {
            None
        } else {
            Some(find_by_mac(sys_class_net, &r.interface_mac)?)
        };
        add_route(&r.destination, &r.gateway, dev.as_deref(), r.metric)?;
    }
    fs::create_dir_all(files_dir).ctx(|| format!("creating {}", files_dir.display()))?;
    fs::write(files_dir.join("resolv.conf"), resolv_conf(req))
        .ctx(|| "writing resolv.conf".into())?;
    fs::write(files_dir.join("hosts"), hosts(req)).ctx(|| "writing hosts".into())?;
    if !req.hostname.is_empty() {
        fs::write(files_dir.join("hostname"), format!("{}\n", req.hostname))
            .ctx(|| "writing hostname".into())?;
        if apply_kernel {
            nix::unistd::sethostname(&req.hostname).ctx(|| "sethostname".into())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_protocol::agent::HostEntry;
    use moat_testutil::TempDir;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.1.2.3/24").unwrap(),
            ("10.1.2.3".parse().unwrap(), 24)
        );
        assert!(parse_cidr("fd00::1/64").is_ok());
        for bad in ["10.1.2.3", "10.1.2.3/33", "x/24", "fd00::1/129"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(mask_v4(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(mask_v4(0), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn files_render() {
        let req = SetNetworkRequest {
            dns_servers: vec!["10.96.0.10".into()],
            dns_search: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            dns_options: vec!["ndots:5".into()],
            hosts: vec![HostEntry {
                ip: "10.0.0.5".into(),
                names: vec!["pod".into(), "pod.local".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&req),
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        assert!(hosts(&req).ends_with("10.0.0.5\tpod pod.local\n"));
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:6D:6f:61:74:00").unwrap(),
            [2, 0x6d, 0x6f, 0x61, 0x74, 0]
        );
        for bad in [
            "",
            "02:6d:6f:61:74",
            "02:6d:6f:61:74:00:01",
            "zz:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mac_lookup() {
        let tmp = TempDir::new("net");
        let dir = tmp.path();
        fs::create_dir_all(dir.join("eth0")).unwrap();
        fs::write(dir.join("eth0/address"), "AA:bb:cc:dd:ee:ff\n").unwrap();
        assert_eq!(find_by_mac(dir, "aa:BB:cc:dd:ee:ff").unwrap(), "eth0");
        assert!(find_by_mac(dir, "00:00:00:00:00:01").is_err());
    }
}
