//! A host tap device opened through `/dev/net/tun`, with a vnet header.
//!
//! moat never creates taps here: the shim does, and a tap missing by the
//! time the VMM starts is a configuration error.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::VNET_HDR_LEN;

/// The tun driver's ioctl requests (`linux/if_tun.h`). The macros make
/// `pub fn`s; this private module keeps them out of the crate's API.
mod ioctls {
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

    const TUNTAP: u32 = b'T' as u32;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, ::std::os::raw::c_int);
    ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, ::std::os::raw::c_uint);
    ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, ::std::os::raw::c_uint);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, ::std::os::raw::c_int);
}
pub(crate) use ioctls::TUNSETIFF;
use ioctls::{TUNGETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ};

/// `IFF_TAP`: an Ethernet (layer 2) device.
pub const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`: frames without the packet-information prefix.
pub const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`: frames with a virtio-net header.
pub const IFF_VNET_HDR: i16 = 0x4000;
pub(crate) const IFF_PERSIST: i16 = 0x0800;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as the tun ioctls read it: the name and the flags union
/// member, padded to the kernel's 40 bytes.
#[repr(C)]
#[derive(Default)]
pub struct IfReq {
    pub(crate) name: [u8; IFNAMSIZ],
    pub(crate) flags: i16,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request for interface `name` (cut to fit) with `flags`.
    pub fn new(name: &str, flags: i16) -> Self {
        let mut req = IfReq {
            flags,
            ..Default::default()
        };
        let n = name.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }
}

/// Why a tap could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long for IFNAMSIZ, or not one a kernel interface can have.
    #[error("Tap name {0:?} is not a valid interface name")]
    InvalidName(String),
    /// No interface of that name exists, or it is a tap that is not persistent.
    #[error("Tap device {0} does not exist (moat-vmm never creates taps)")]
    NotFound(String),
    /// The interface exists but is not a tap.
    #[error("Network device {0} is not a tap device")]
    NotATap(String),
    /// The tap's queue is attached to another process already.
    #[error("Tap device {0} is already attached to another process")]
    Busy(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF on the named tap failed for another reason.
    #[error("Cannot attach to tap device {name}")]
    Attach {
        /// The tap's interface name.
        name: String,
        /// The error of TUNSETIFF.
        #[source]
        source: io::Error,
    },
    /// An inherited descriptor number is not an open file.
    #[error("File descriptor {0} is not open")]
    BadFd(RawFd),
    /// An inherited descriptor does not answer TUNGETIFF.
    #[error("File descriptor {fd} is not an attached tap")]
    NotTapFd {
        /// The descriptor number.
        fd: RawFd,
        /// The error of TUNGETIFF.
        #[source]
        source: io::Error,
    },
    /// An inherited descriptor is not a tap with IFF_NO_PI and IFF_VNET_HDR.
    #[error("Tap file descriptor {0} must be a tap opened with IFF_NO_PI and IFF_VNET_HDR")]
    FdFlags(RawFd),
    /// Setting the vnet header size or the offloads failed.
    #[error("Cannot configure the tap's vnet header and offloads")]
    Configure(#[source] io::Error),
}

/// An attached tap queue in non-blocking mode, reading and writing frames
/// prefixed with a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

impl Tap {
    /// Attaches to the existing tap `name` (in this thread's network namespace).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let cname = CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: `file` is a tun fd and `req` a properly sized ifreq the
        // kernel reads and updates; the return value is checked.
        let ret = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                _ => TapError::Attach {
                    name: name.to_string(),
                    source: err,
                },
            });
        }
        // The name check above can race with the tap's removal, in which case
        // TUNSETIFF just created a fresh, non-persistent tap: every tap the
        // shim makes for us is persistent, so reject that one (closing `file`
        // destroys it).
        if get_flags(&file).map_err(TapError::Configure)? & IFF_PERSIST == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes ownership of an inherited tap fd, which must have been attached
    /// with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::BadFd(fd));
        }
        // SAFETY: the fd is open and handed to us by the caller, who gives up
        // ownership: it is closed when the Tap (or this error path) drops it.
        let file = unsafe { File::from_raw_fd(fd) };
        let flags = get_flags(&file).map_err(|source| TapError::NotTapFd { fd, source })?;
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if flags & wanted != wanted {
            return Err(TapError::FdFlags(fd));
        }
        // SAFETY: plain fcntl on an fd we own; return values are checked.
        let ret = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 {
                fl
            } else {
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK)
            }
        };
        if ret < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            name: format!("fd{fd}"),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// The guest sees 12-byte headers (`virtio_net_hdr_v1`) and no offloads
    /// are negotiated, so the tap must neither send GSO nor partial checksums.
    fn configure(&self) -> Result<(), TapError> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from a valid reference.
        if unsafe { ioctl_with_ref(&self.file, TUNSETVNETHDRSZ(), &hdr_len) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), 0) } < 0 {
            return Err(TapError::Configure(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Interface name (or `fdN` for an inherited fd), for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame with its vnet header; `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame with its vnet header.
    pub fn write_frame(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn get_flags(file: &File) -> io::Result<i16> {
    let mut req = IfReq::default();
    // SAFETY: TUNGETIFF fills a properly sized ifreq; the return value is checked.
    if unsafe { ioctl_with_mut_ref(file, TUNGETIFF(), &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::test_utils::{create_tap, in_netns, open_tap_fd};

    #[test]
    fn rejects_bad_names() {
        for name in ["", "a/b", "0123456789abcdef", "..", "a b"] {
            assert!(
                matches!(Tap::open(name), Err(TapError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn never_creates_a_tap() {
        in_netns(|| {
            assert!(matches!(
                Tap::open("moatnotap0"),
                Err(TapError::NotFound(_))
            ));
            // Still absent afterwards.
            let name = CString::new("moatnotap0").unwrap();
            // SAFETY: valid C string.
            assert_eq!(unsafe { libc::if_nametoindex(name.as_ptr()) }, 0);
            // Loopback exists but is no tap.
            assert!(matches!(Tap::open("lo"), Err(TapError::NotATap(_))));
        });
    }

    #[test]
    fn opens_persistent_tap_once() {
        in_netns(|| {
            create_tap("mtap0");
            let tap = Tap::open("mtap0").unwrap();
            assert_eq!(tap.name(), "mtap0");
            // A single-queue tap takes one attachment.
            assert!(matches!(Tap::open("mtap0"), Err(TapError::Busy(_))));
            drop(tap);
            Tap::open("mtap0").unwrap();
        });
    }

    #[test]
    fn checks_inherited_fds() {
        in_netns(|| {
            // A closed fd.
            let file = File::open("/dev/null").unwrap();
            let fd = file.as_raw_fd();
            drop(file);
            assert!(matches!(Tap::from_fd(fd), Err(TapError::BadFd(_))));
            assert!(matches!(Tap::from_fd(-1), Err(TapError::BadFd(_))));
            // Not a tap.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(File::open("/dev/null").unwrap());
            assert!(matches!(Tap::from_fd(fd), Err(TapError::NotTapFd { .. })));
            // A tap without a vnet header.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(open_tap_fd("mtap1", IFF_TAP | IFF_NO_PI));
            assert!(matches!(Tap::from_fd(fd), Err(TapError::FdFlags(_))));
            // The right kind, made non-blocking.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(open_tap_fd(
                "mtap2",
                IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            ));
            let tap = Tap::from_fd(fd).unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(
                tap.read_frame(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
        });
    }
}
