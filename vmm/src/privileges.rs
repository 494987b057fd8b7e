//! Giving up privileges before the guest runs. moat-vmm starts as root to
//! open /dev/kvm, disks and taps; once they are open it needs no capability
//! at all. Without capabilities, and with an empty bounding set, a VMM taken
//! over by its guest can neither regain them nor use root's: no mounts, no
//! module loading, no raw network, no tracing of other root processes.
//!
//! With a jail (`--jail UID:GID`, as Firecracker's jailer does) it also
//! leaves root's uid, which still owns most of the host's files, for an
//! unprivileged one, and the host's network, IPC and UTS namespaces for
//! empty ones: the taps and sockets it holds are all it can reach. A
//! Landlock domain (required, unless the jail sets `allow_no_landlock`)
//! limits the files it may open from then on to the jail's `read_write` and `read_only` paths, and
//! keeps it from signalling any process outside itself: a chroot's effect
//! on paths without a mount namespace to set up. Block files replaced later
//! through the API are opened as that user, beneath those paths. This is
//! defence behind the seccomp filters.
//!
//! Credentials and namespaces are per thread: this runs on the main thread
//! before any other thread exists, and every later thread inherits them.

use thiserror::Error;

use landlock::{
    path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
};

use moat_vmm_api::JailConfig;

/// Why privileges could not be dropped; the VMM then stops before the guest runs.
#[derive(Debug, Error)]
pub enum PrivilegeError {
    /// `capset` to empty sets failed.
    #[error("Cannot clear the capability sets")]
    Capset(#[source] std::io::Error),
    /// `PR_CAPBSET_DROP` failed for one capability.
    #[error("Cannot drop capability {cap} from the bounding set")]
    Bounding {
        /// The capability's number (`CAP_*`).
        cap: u32,
        /// The error of the prctl.
        #[source]
        source: std::io::Error,
    },
    /// `unshare` of the jail's namespaces failed.
    #[error("Cannot enter new network, IPC and UTS namespaces")]
    Unshare(#[source] std::io::Error),
    /// `PR_SET_DUMPABLE` to 0 failed.
    #[error("Cannot forbid core dumps")]
    NoDumps(#[source] std::io::Error),
    /// The Landlock ruleset could not be built or enforced.
    #[error("Cannot restrict file access with Landlock")]
    Landlock(#[source] landlock::RulesetError),
    /// The jail asks for Landlock and the kernel does not enforce it.
    #[error("This kernel has no Landlock; the jail needs it unless allow_no_landlock is set")]
    NoLandlock,
    /// The parent-death signal could not be set again after the uid switch.
    #[error("Cannot restore the parent-death signal after the jail's uid switch")]
    DeathSignal(#[source] std::io::Error),
    /// The starting process exited before the signal was set again.
    #[error("The process that started moat-vmm exited while it entered the jail")]
    ParentGone,
    /// Switching to the jail's user or groups failed.
    #[error("Cannot switch to the jail's {what} (moat-vmm must start as root to use a jail)")]
    Credentials {
        /// Which credential: supplementary groups, group or user.
        what: &'static str,
        /// The error of the set*id call.
        #[source]
        source: std::io::Error,
    },
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability of the calling thread and, with a `jail`,
/// switches to its user and group in fresh namespaces.
pub fn drop_privileges(jail: Option<&JailConfig>) -> Result<(), PrivilegeError> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, which a
    // jail's uid switch takes away.
    drop_bounding_set()?;
    if let Some(jail) = jail {
        let death_signal = parent_death_signal()?;
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        enter_jail(jail)?;
        restore_parent_death_signal(death_signal, parent)?;
    }
    forbid_dumps()?;
    clear_capabilities()
}

/// The signal this thread gets when the thread that started it exits
/// (`PR_SET_PDEATHSIG`; 0 for none).
fn parent_death_signal() -> Result<libc::c_int, PrivilegeError> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int to a pointer we own.
    if unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) } < 0 {
        return Err(PrivilegeError::DeathSignal(std::io::Error::last_os_error()));
    }
    Ok(signal)
}

/// The jail's uid switch clears the parent-death signal (prctl(2)), which
/// the shim sets so that no VMM outlives it: set it again. A parent that
/// exited in between sent nothing, which the changed parent pid shows.
fn restore_parent_death_signal(
    signal: libc::c_int,
    parent: libc::pid_t,
) -> Result<(), PrivilegeError> {
    if signal == 0 {
        return Ok(());
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) } < 0 {
        return Err(PrivilegeError::DeathSignal(std::io::Error::last_os_error()));
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != parent {
        return Err(PrivilegeError::ParentGone);
    }
    Ok(())
}

/// Guest memory never reaches a core file, and no process of the same user
/// may attach to this one or read its memory through /proc.
fn forbid_dumps() -> Result<(), PrivilegeError> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } < 0 {
        return Err(PrivilegeError::NoDumps(std::io::Error::last_os_error()));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(PrivilegeError::NoDumps(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn enter_jail(jail: &JailConfig) -> Result<(), PrivilegeError> {
    // SAFETY: unshare with flags only; no other thread exists yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) } < 0 {
        return Err(PrivilegeError::Unshare(std::io::Error::last_os_error()));
    }
    // While still root, so every listed path can be opened for its rule.
    let status = restrict_paths(jail).map_err(PrivilegeError::Landlock)?;
    check_landlock(status, jail.allow_no_landlock)?;
    let check = |what: &'static str, r: libc::c_int| {
        if r < 0 {
            Err(PrivilegeError::Credentials {
                what,
                source: std::io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    };
    // SAFETY: setgroups reads zero entries from a null list.
    check("supplementary groups", unsafe {
        libc::setgroups(0, std::ptr::null())
    })?;
    // SAFETY: set*id calls with integer arguments only; the group goes
    // first, while the uid still permits it.
    check("group", unsafe {
        libc::setresgid(jail.gid, jail.gid, jail.gid)
    })?;
    // SAFETY: as above.
    check("user", unsafe {
        libc::setresuid(jail.uid, jail.uid, jail.uid)
    })
}

/// A jail without Landlock is an error unless the jail allows it.
fn check_landlock(status: RulesetStatus, allow_none: bool) -> Result<(), PrivilegeError> {
    match status {
        RulesetStatus::FullyEnforced => log::debug!("Landlock restricts file access"),
        RulesetStatus::PartiallyEnforced => {
            log::info!("Landlock restricts file access as far as this kernel can")
        }
        RulesetStatus::NotEnforced if allow_none => log::warn!(
            "This kernel has no Landlock: file access in the jail is limited by its uid only"
        ),
        RulesetStatus::NotEnforced => return Err(PrivilegeError::NoLandlock),
    }
    Ok(())
}

/// Puts the calling thread (and every later thread) in a Landlock domain:
/// no file may be opened but beneath the jail's paths, no process outside
/// signalled, no abstract unix socket outside reached. Best effort: each
/// kernel enforces what its Landlock version knows.
fn restrict_paths(jail: &JailConfig) -> Result<RulesetStatus, landlock::RulesetError> {
    let abi = ABI::V6;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(
            &jail.read_write,
            AccessFs::from_all(abi),
        ))?
        .add_rules(path_beneath_rules(
            &jail.read_only,
            AccessFs::from_read(abi),
        ))?
        .restrict_self()?;
    Ok(status.ruleset)
}

/// Empties the bounding set; a process that never had CAP_SETPCAP (not
/// root) has nothing to drop there.
fn drop_bounding_set() -> Result<(), PrivilegeError> {
    for cap in 0..64u32 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Past the kernel's last capability.
                Some(libc::EINVAL) => break,
                Some(libc::EPERM) => break,
                _ => return Err(PrivilegeError::Bounding { cap, source: e }),
            }
        }
    }
    Ok(())
}

/// Empties the ambient, effective, permitted and inheritable sets.
fn clear_capabilities() -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only; clearing the ambient set
    // cannot fail on kernels that have one (4.3+), and is harmless to try.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a valid header and two data structs we own.
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r < 0 {
        return Err(PrivilegeError::Capset(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_landlock_fails_the_jail_unless_allowed() {
        let err = check_landlock(RulesetStatus::NotEnforced, false).unwrap_err();
        assert!(matches!(err, PrivilegeError::NoLandlock));
        assert!(err.to_string().contains("allow_no_landlock"), "{err}");
        check_landlock(RulesetStatus::NotEnforced, true).unwrap();
        check_landlock(RulesetStatus::PartiallyEnforced, false).unwrap();
        check_landlock(RulesetStatus::FullyEnforced, false).unwrap();
    }
}
