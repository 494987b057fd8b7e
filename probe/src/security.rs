//! What the container can see and do. Raw observations only: whether a
//! readable /dev/kmsg is the host's depends on the kernel the container
//! runs on, which the bench compares with the host's.

use std::ffi::CString;
use std::fs;
use std::io::{Error, Read};
use std::os::unix::fs::OpenOptionsExt;

use serde_json::{json, Value};

/// "absent", "denied: ...", or "readable" for a kernel interface file.
fn readable(path: &str) -> String {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    match f {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".into(),
        Err(e) => format!("denied: {e}"),
        Ok(mut f) => {
            // /dev/kmsg refuses buffers shorter than a record.
            let mut buf = [0u8; 8192];
            match f.read(&mut buf) {
                Ok(_) => "readable".into(),
                // /dev/kmsg with nothing new: open and readable all the same.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => "readable".into(),
                Err(e) => format!("denied: {e}"),
            }
        }
    }
}

fn writable(path: &str) -> String {
    match fs::OpenOptions::new().write(true).open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".into(),
        Err(e) => format!("denied: {e}"),
        Ok(_) => "writable".into(),
    }
}

/// Writes a sysctl's own value back: the host is left as it was, but a
/// success means the container could have written anything.
fn rewrite_sysctl(path: &str) -> String {
    match fs::read(path) {
        Err(e) => format!("denied: {e}"),
        Ok(v) => match fs::write(path, &v) {
            Ok(()) => "written".into(),
            Err(e) => format!("denied: {e}"),
        },
    }
}

fn processes(neighbour: &str) -> Value {
    let mut count = 0;
    let mut neighbour_seen = false;
    let mut daemons = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Not ourselves: our own argv holds the neighbour's marker.
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        count += 1;
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        neighbour_seen |= cmd.contains(neighbour);
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        // Processes that exist only on the host, outside any container.
        if matches!(comm, "containerd" | "kthreadd" | "systemd" | "sshd") && daemons.len() < 8 {
            daemons.push(comm.to_string());
        }
    }
    json!({ "count": count, "neighbour_seen": neighbour_seen, "host_daemons": daemons })
}

fn vsock() -> String {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return format!("socket denied: {}", Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_vm is valid; fields set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = 1;
    // SAFETY: addr is a valid sockaddr_vm of the given size; fd is ours.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    let out = if r == 0 {
        "connected to host".into()
    } else {
        format!("socket ok, host connect: {}", Error::last_os_error())
    };
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    out
}

/// Interface names from an RTM_GETLINK dump, or why it failed.
fn netlink_links() -> Result<Vec<String>, String> {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket denied: {}", Error::last_os_error()));
    }
    let r = dump_links(fd);
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    r
}

fn dump_links(fd: i32) -> Result<Vec<String>, String> {
    // nlmsghdr (16 bytes) + ifinfomsg (16 bytes).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: req is a valid buffer of its length; fd is an open netlink socket.
    if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(format!("send: {}", Error::last_os_error()));
    }
    let mut names = Vec::new();
    let mut buf = vec![0u8; 32768];
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return Err(format!("recv: {}", Error::last_os_error()));
        }
        let mut off = 0usize;
        while off + 16 <= n as usize {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap());
            if ty == libc::NLMSG_DONE as u16 {
                return Ok(names);
            }
            if ty == libc::NLMSG_ERROR as u16 || len < 16 {
                return Err("netlink error reply".into());
            }
            names.extend(ifname(&buf[off + 32..off + len]));
            off += (len + 3) & !3;
        }
    }
}

fn ifname(mut attrs: &[u8]) -> Option<String> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == libc::IFLA_IFNAME {
            let v = &attrs[4..len];
            return Some(String::from_utf8_lossy(v.split(|b| *b == 0).next()?).into());
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

fn raw_socket() -> String {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return format!("denied: {}", Error::last_os_error());
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    "opened".into()
}

/// Makes a block device node for the host's root disk and reads its first
/// sector (privileged containers only).
fn host_disk(dev: &str) -> String {
    let Some((maj, min)) = dev.split_once(':') else {
        return format!("bad device {dev:?}");
    };
    let (Ok(maj), Ok(min)) = (maj.parse::<u32>(), min.parse::<u32>()) else {
        return format!("bad device {dev:?}");
    };
    let path = CString::new("/tmp/moat-probe-disk").unwrap();
    // SAFETY: path is a valid C string; removes a stale node first.
    unsafe { libc::unlink(path.as_ptr()) };
    // SAFETY: path is a valid C string.
    let r = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(maj, min),
        )
    };
    if r != 0 {
        return format!("mknod denied: {}", Error::last_os_error());
    }
    let out = match fs::File::open("/tmp/moat-probe-disk") {
        Err(e) => format!("mknod ok, open denied: {e}"),
        Ok(mut f) => {
            let mut sector = [0u8; 512];
            match f.read(&mut sector) {
                Ok(n) if n > 0 => "read".into(),
                Ok(_) => "mknod ok, empty device".into(),
                Err(e) => format!("mknod ok, read denied: {e}"),
            }
        }
    };
    // SAFETY: path is a valid C string.
    unsafe { libc::unlink(path.as_ptr()) };
    out
}

fn debugfs() -> String {
    let entries = fs::read_dir("/sys/kernel/debug").map(|d| d.count());
    match entries {
        Ok(n) if n > 0 => format!("readable ({n} entries)"),
        Ok(_) => "empty".into(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "absent".into(),
        Err(e) => format!("denied: {e}"),
    }
}

/// Everything at once, as one JSON object.
pub fn probe(neighbour: &str, host_path: &str, disk: &str, privileged: bool) -> Value {
    let uname = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| {
            // SAFETY: utsname is plain data, filled by uname(2).
            let mut u: libc::utsname = unsafe { std::mem::zeroed() };
            // SAFETY: u is a valid utsname.
            unsafe { libc::uname(&mut u) };
            // SAFETY: release is NUL-terminated by the kernel.
            unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }
                .to_string_lossy()
                .into()
        });
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v = json!({
        "kernel_release": uname,
        "kcore": readable("/proc/kcore"),
        "kmsg": readable("/dev/kmsg"),
        "mem": readable("/dev/mem"),
        "debugfs": debugfs(),
        "sysrq": writable("/proc/sysrq-trigger"),
        "processes": processes(neighbour),
        "host_mounts_seen": mounts.contains(host_path),
        "mount_count": mounts.lines().count(),
        "vsock": vsock(),
        "netlink": match netlink_links() { Ok(l) => json!(l), Err(e) => json!(e) },
        "raw_socket": raw_socket(),
        "privileged": privileged,
    });
    if privileged {
        v["host_disk"] = json!(host_disk(disk));
        v["core_pattern"] = json!(rewrite_sysctl("/proc/sys/kernel/core_pattern"));
        v["sysctl_vm_swappiness"] = json!(rewrite_sysctl("/proc/sys/vm/swappiness"));
    }
    v
}
