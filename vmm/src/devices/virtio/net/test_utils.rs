//! Network namespaces, taps and packet sockets for the net unit tests.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

use super::packet_socket::bind_packet_socket;
use super::tap::{IfReq, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF};

ioctl_iow_nr!(TUNSETPERSIST, b'T' as u32, 203, ::std::os::raw::c_int);

/// Runs `f` on a thread of its own network namespace; the namespace and its
/// taps vanish when the thread ends. Panics in `f` fail the test.
pub fn in_netns<F: FnOnce() + Send + 'static>(f: F) {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        // Keep IPv6 autoconfiguration chatter off the taps (best effort).
        for path in [
            "/proc/sys/net/ipv6/conf/default/disable_ipv6",
            "/proc/sys/net/ipv6/conf/all/disable_ipv6",
        ] {
            let _ = std::fs::write(path, "1");
        }
        f()
    })
    .join()
    .unwrap()
}

fn ifreq(name: &str, flags: i16) -> IfReq {
    IfReq::new(name, flags)
}

/// Opens a tap queue with `flags`, as the shim would (creating the tap).
pub fn open_tap_fd(name: &str, flags: i16) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = ifreq(name, flags);
    // SAFETY: valid tun fd and ifreq.
    assert!(unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) } >= 0);
    file
}

/// Creates a persistent tap `name` and brings it up.
pub fn create_tap(name: &str) {
    let file = open_tap_fd(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    // SAFETY: valid tun fd; TUNSETPERSIST takes its argument by value.
    assert!(unsafe { ioctl_with_val(&file, TUNSETPERSIST(), 1) } >= 0);
    drop(file);
    set_up(name);
}

fn set_up(name: &str) {
    // SAFETY: plain socket creation, checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: we own the fresh fd.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name, 0);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a valid ifreq.
    unsafe {
        assert!(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) >= 0);
        req.flags |= libc::IFF_UP as i16;
        assert!(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) >= 0);
    }
}

pub const TEST_ETHERTYPE: u16 = 0x88b5;

/// A raw packet socket on one interface: sees what the guest sends and
/// injects what the guest should receive.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    pub fn bind(ifname: &str) -> PacketSocket {
        let fd =
            bind_packet_socket(ifname).unwrap_or_else(|e| panic!("packet socket on {ifname}: {e}"));
        PacketSocket { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// Waits for an incoming frame of the test ethertype.
    pub fn recv_test_frame(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !super::super::test_driver::readable_within(&self.fd, left) {
                return None;
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut addr_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffers are valid for the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut addr as *mut libc::sockaddr_ll).cast(),
                    &mut addr_len,
                )
            };
            if n < 14 || addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            if buf[12..14] == TEST_ETHERTYPE.to_be_bytes() {
                return Some(buf[..n].to_vec());
            }
        }
    }
}

/// An Ethernet frame of the test ethertype to `dst` with `payload_len`
/// bytes of a pattern starting at `seed`.
pub fn test_frame(dst: [u8; 6], seed: u8, payload_len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload_len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend((0..payload_len).map(|i| seed.wrapping_add(i as u8)));
    frame
}

/// CPU ticks (user + system) used so far by this process's thread whose
/// name starts with `comm`, if there is one.
pub fn thread_ticks(comm: &str) -> Option<u64> {
    for entry in std::fs::read_dir("/proc/self/task").ok()? {
        let path = entry.ok()?.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim_end() == comm {
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            // Fields after the parenthesised name: utime and stime are the
            // 12th and 13th of them.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split(' ').collect();
            return Some(fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?);
        }
    }
    None
}
