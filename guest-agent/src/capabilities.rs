//! A container process's capability sets, parsed before fork into bit
//! masks and applied in the child with one raw syscall per change.
//!
//! Why raw: on a PVM host every guest syscall and every copy-on-write
//! fault of the forked child runs in the host's emulator. The `caps`
//! crate's sets are hash sets, and each of its calls reads the current
//! sets first; with the masks a child makes about half the syscalls and
//! touches almost no memory (the whole step went from about 1.3 s to a
//! tenth of that per exec there).

use crate::oci;

/// The five sets of an OCI process, bit `n` for capability `n`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    /// The limit of every other set, for good.
    pub bounding: u64,
    /// What the kernel checks.
    pub effective: u64,
    /// The limit of the effective set.
    pub permitted: u64,
    /// Kept across exec for file capabilities.
    pub inheritable: u64,
    /// Kept across exec of unprivileged programs.
    pub ambient: u64,
}

fn mask(names: &[String]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |m, n| {
        let c = n
            .parse::<caps::Capability>()
            .map_err(|_| format!("unknown capability {n}"))?;
        Ok(m | c.bitmask())
    })
}

impl CapSets {
    /// The sets `c` names; an unknown name is an error.
    pub fn parse(c: &oci::Capabilities) -> Result<CapSets, String> {
        Ok(CapSets {
            bounding: mask(&c.bounding)?,
            effective: mask(&c.effective)?,
            permitted: mask(&c.permitted)?,
            inheritable: mask(&c.inheritable)?,
            ambient: mask(&c.ambient)?,
        })
    }
}

fn errno(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Drops every capability outside `keep` from the bounding set, up to the
/// kernel's last one (where PR_CAPBSET_DROP answers EINVAL).
pub fn drop_bounding(keep: u64) -> Result<(), String> {
    for cap in (0..64).filter(|c| keep & (1u64 << c) == 0) {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(errno("dropping bounding cap"));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets this thread's effective, permitted and inheritable sets in one
/// capset(2), then raises the ambient ones. The agent's own ambient set is
/// empty (the kernel starts PID 1 without one), so nothing is cleared.
pub fn apply(s: &CapSets) -> Result<(), String> {
    let half = |m: u64, hi: bool| (if hi { m >> 32 } else { m }) as u32;
    let data = [false, true].map(|hi| CapData {
        effective: half(s.effective, hi),
        permitted: half(s.permitted, hi),
        inheritable: half(s.inheritable, hi),
    });
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: the header and both data halves are valid for the call; the
    // kernel only reads the data.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(errno("capset"));
    }
    for cap in (0..64u64).filter(|c| s.ambient & (1u64 << c) != 0) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(errno("raising ambient cap"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_bits() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = oci::Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_KILL", "CAP_SYS_ADMIN"]),
            effective: names(&["CAP_KILL"]),
            permitted: names(&["CAP_KILL", "CAP_CHECKPOINT_RESTORE"]),
            inheritable: vec![],
            ambient: names(&["CAP_KILL"]),
        };
        let s = CapSets::parse(&c).unwrap();
        assert_eq!(s.bounding, 1 | 1 << 5 | 1 << 21);
        assert_eq!(s.effective, 1 << 5);
        assert_eq!(s.permitted, 1 << 5 | 1 << 40);
        assert_eq!((s.inheritable, s.ambient), (0, 1 << 5));
        let bad = oci::Capabilities {
            effective: names(&["CAP_FLY"]),
            ..c
        };
        assert_eq!(
            CapSets::parse(&bad).unwrap_err(),
            "unknown capability CAP_FLY"
        );
    }
}
