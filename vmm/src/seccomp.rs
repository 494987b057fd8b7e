//! One seccomp filter per thread kind, installed before the guest runs.
//!
//! Each filter is an allowlist of system calls; anything else kills the
//! VMM process (as in Firecracker), so a compromised thread cannot open
//! files, exec or reach the network. virtio device workers are started by a
//! vCPU thread when the guest activates a device, and a thread inherits its
//! parent's filter: so the vCPU filter also holds what device workers need.
//! `--no-seccomp` turns filtering off for debugging.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("Cannot compile the {0:?} seccomp filter")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    #[error("Cannot install a seccomp filter")]
    Apply(#[source] seccompiler::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the guest runs: waits for the end, cleans up.
    Main,
    /// vCPU threads and the device workers they start.
    Vcpu,
    /// The control API thread.
    Api,
}

/// Memory, threads, time, signals: what any Rust thread needs.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sched_getaffinity,
];

/// Starting a thread (device workers, from a vCPU thread).
const THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_dup,
];

/// KVM_RUN and device I/O: disk files, taps, vsock unix sockets.
const VCPU_AND_DEVICES: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_unlink,
];

/// Serving the API: accepting clients, receiving or opening a replacement
/// disk file.
const API: &[i64] = &[
    libc::SYS_setsockopt,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_openat,
    libc::SYS_ioctl,
    libc::SYS_eventfd2,
    libc::SYS_fsync,
];

/// Stopping the VM: kicking and joining threads, removing socket files.
const MAIN: &[i64] = &[
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_ioctl,
    libc::SYS_fsync,
];

fn allowlist(kind: ThreadKind) -> Vec<i64> {
    let extra: &[&[i64]] = match kind {
        ThreadKind::Main => &[MAIN],
        ThreadKind::Vcpu => &[THREADS, VCPU_AND_DEVICES],
        ThreadKind::Api => &[API],
    };
    let mut all: Vec<i64> = BASE
        .iter()
        .chain(extra.iter().flat_map(|s| s.iter()))
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Conditions on a call's arguments; an empty list allows any.
fn argument_rules(nr: i64, kind: ThreadKind) -> Result<Vec<SeccompRule>, SeccompError> {
    if nr != libc::SYS_socket {
        return Ok(Vec::new());
    }
    // Unix sockets only (guest-initiated vsock streams): no IP, netlink or
    // packet socket, whatever namespace the VMM is in.
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    Ok(vec![
        SeccompRule::new(vec![unix]).map_err(|e| SeccompError::Build(kind, e))?
    ])
}

fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowlist(kind)
        .into_iter()
        .map(|nr| Ok((nr, argument_rules(nr, kind)?)))
        .collect::<Result<_, SeccompError>>()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind, e))?;
    BpfProgram::try_from(filter).map_err(|e| SeccompError::Compile(kind, e))
}

/// Compiled filters, built once before any thread starts.
pub struct Filters(BTreeMap<ThreadKind, BpfProgram>);

impl Filters {
    pub fn build() -> Result<Self, SeccompError> {
        let mut map = BTreeMap::new();
        for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Api] {
            map.insert(kind, compile(kind)?);
        }
        Ok(Self(map))
    }

    pub fn get(&self, kind: ThreadKind) -> BpfProgram {
        self.0[&kind].clone()
    }
}

/// Installs `filter` on the calling thread.
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(filter).map_err(SeccompError::Apply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_differ_by_kind() {
        let f = Filters::build().unwrap();
        assert!(allowlist(ThreadKind::Vcpu).contains(&libc::SYS_ioctl));
        assert!(!allowlist(ThreadKind::Vcpu).contains(&libc::SYS_openat));
        assert!(!allowlist(ThreadKind::Vcpu).contains(&libc::SYS_execve));
        assert!(allowlist(ThreadKind::Api).contains(&libc::SYS_openat));
        assert!(!allowlist(ThreadKind::Main).contains(&libc::SYS_socket));
        assert_ne!(f.get(ThreadKind::Vcpu), f.get(ThreadKind::Api));
    }

    /// Runs `call` in a forked child under `kind`'s filter; its wait status.
    fn under_filter(kind: ThreadKind, call: fn()) -> i32 {
        // SAFETY: fork in a test; the child only applies a filter and makes
        // raw system calls before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let f = compile(kind).unwrap();
            if seccompiler::apply_filter(&f).is_err() {
                // SAFETY: _exit in the forked child.
                unsafe { libc::_exit(2) };
            }
            call();
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn device_threads_may_open_unix_sockets_only() {
        let unix = under_filter(ThreadKind::Vcpu, || {
            // SAFETY: socket(2) with constant arguments.
            unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        });
        assert!(
            libc::WIFEXITED(unix) && libc::WEXITSTATUS(unix) == 0,
            "{unix:#x}"
        );
        let inet = under_filter(ThreadKind::Vcpu, || {
            // SAFETY: socket(2) with constant arguments.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        });
        assert!(libc::WIFSIGNALED(inet), "{inet:#x}");
        assert_eq!(libc::WTERMSIG(inet), libc::SIGSYS);
    }

    #[test]
    fn an_installed_filter_kills_a_forbidden_call() {
        let status = under_filter(ThreadKind::Main, || {
            // SAFETY: socket(2) with constant arguments; forbidden for Main.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
