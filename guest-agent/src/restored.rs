//! What a VM restored from a template must not keep of the template's
//! life: its random number generator's state and its wall clock. The
//! shim's first call after a restore hands over host entropy and time.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::error::{AgentError, Result};

/// Fewer bytes would not reseed the CRNG with a full 256 bits.
pub const MIN_ENTROPY: usize = 32;
/// More is pointless, and the request is bounded.
pub const MAX_ENTROPY: usize = 512;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with its buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

fn last_error(context: &str) -> AgentError {
    AgentError::Io {
        context: context.into(),
        source: std::io::Error::last_os_error(),
    }
}

/// Checks the entropy's size before anything is changed.
pub fn check_entropy(entropy: &[u8]) -> Result<()> {
    if (MIN_ENTROPY..=MAX_ENTROPY).contains(&entropy.len()) {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "Restored needs {MIN_ENTROPY} to {MAX_ENTROPY} bytes of entropy, not {}",
            entropy.len()
        )))
    }
}

/// Mixes `entropy` into the kernel's pool, credited in full, and reseeds
/// the CRNG from it at once, so that no two VMs of one template draw the
/// same bytes from here on.
pub fn reseed(entropy: &[u8]) -> Result<()> {
    check_entropy(entropy)?;
    let mut info = PoolInfo {
        entropy_count: (entropy.len() * 8) as libc::c_int,
        buf_size: entropy.len() as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..entropy.len()].copy_from_slice(entropy);
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|source| AgentError::Io {
            context: "opening /dev/urandom".into(),
            source,
        })?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds
    // `buf_size` bytes; `info` is one, alive for the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &info) } < 0 {
        return Err(last_error("adding the host's entropy (RNDADDENTROPY)"));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } < 0 {
        return Err(last_error("reseeding the CRNG (RNDRESEEDCRNG)"));
    }
    Ok(())
}

/// Sets CLOCK_REALTIME to `ns` since the epoch.
pub fn set_clock(ns: i64) -> Result<()> {
    if ns <= 0 {
        return Err(AgentError::InvalidArgument(format!(
            "Restored needs the host's time, not {ns} ns"
        )));
    }
    let ts = libc::timespec {
        tv_sec: ns / 1_000_000_000,
        tv_nsec: ns % 1_000_000_000,
    };
    // SAFETY: clock_settime reads the timespec, alive for the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(last_error("setting the clock"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_size_is_bounded() {
        assert!(check_entropy(&[0; MIN_ENTROPY]).is_ok());
        assert!(check_entropy(&[0; MAX_ENTROPY]).is_ok());
        assert!(check_entropy(&[0; MIN_ENTROPY - 1]).is_err());
        assert!(check_entropy(&[0; MAX_ENTROPY + 1]).is_err());
        assert!(set_clock(0).is_err());
    }
}
