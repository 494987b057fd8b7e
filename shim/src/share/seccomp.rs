//! The share server's seccomp filter, installed once it is jailed and
//! before it reads the first guest request.
//!
//! The server runs as root in its jail: it needs CAP_SETUID/CAP_SETGID to
//! act as each caller. A server taken over by a hostile guest's requests
//! could still do with root's syscalls what the jail does not stop:
//! `open_by_handle_at` opens any inode of the host filesystem by handle
//! (the "shocker" escape), `mount`, `unshare` and `setns` rebuild a view
//! of the host, `socket` reaches the network, `execve` and `ptrace` reach
//! other programs. The filter allows only what the passthrough filesystem
//! and the request loop call (see `fuse-backend-rs`' passthrough and
//! [`super::server`]); anything else kills the server, and the guest's
//! mount then fails with ENOTCONN.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Everything the server may call, without argument checks.
const ALLOWED: &[i64] = &[
    // The guest connection and the INIT answer's socket pair.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Descriptors.
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    // The filesystem operations, all relative to descriptors it holds.
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_utimensat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    // Only to learn a mount id when statx has none; opening by handle
    // (open_by_handle_at) stays forbidden.
    libc::SYS_name_to_handle_at,
    libc::SYS_umask,
    // Acting as each request's caller, and dropping CAP_FSETID on writes.
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // Memory, threads' housekeeping, time and the end.
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The filter: [`ALLOWED`], and `socketpair` for unix sockets only.
pub fn filter() -> io::Result<BpfProgram> {
    let invalid = |e: seccompiler::BackendError| io::Error::new(io::ErrorKind::InvalidInput, e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|nr| (*nr, Vec::new())).collect();
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )
    .map_err(invalid)?;
    rules.insert(
        libc::SYS_socketpair,
        vec![SeccompRule::new(vec![unix]).map_err(invalid)?],
    );
    let f = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(invalid)?;
    f.try_into().map_err(invalid)
}

/// Installs [`filter`] on the calling thread (the server has one).
pub fn install() -> io::Result<()> {
    let prog = filter()?;
    seccompiler::apply_filter(&prog).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child under the filter; returns how it ended.
    fn under_filter(f: impl FnOnce() -> i32) -> nix::sys::wait::WaitStatus {
        let prog = filter().unwrap();
        // SAFETY: the child only applies the filter (prctl and seccomp),
        // runs `f` (raw syscalls) and exits: it takes no lock.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match seccompiler::apply_filter(&prog) {
                    Ok(()) => f(),
                    Err(_) => 100,
                };
                // SAFETY: plain exit of a forked child.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).unwrap()
            }
        }
    }

    /// What the server needs goes through; an escape attempt by file
    /// handle, a mount, a socket or an exec kills it.
    #[test]
    fn the_filter_allows_the_passthrough_and_kills_escapes() {
        use nix::sys::signal::Signal::SIGSYS;
        use nix::sys::wait::WaitStatus::{Exited, Signaled};
        let ok = under_filter(|| {
            // SAFETY: raw syscalls with valid (or null, refused) arguments.
            unsafe {
                let fd = libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_PATH);
                let mut fds = [0; 2];
                let pair = libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr());
                i32::from(fd < 0 || pair != 0)
            }
        });
        assert!(matches!(ok, Exited(_, 0)), "{ok:?}");
        let attempts: [(&str, i64, [i64; 3]); 5] = [
            ("open_by_handle_at", libc::SYS_open_by_handle_at, [-1, 0, 0]),
            ("mount", libc::SYS_mount, [0, 0, 0]),
            ("socket", libc::SYS_socket, [libc::AF_INET.into(), 1, 0]),
            (
                "socketpair of AF_INET",
                libc::SYS_socketpair,
                [libc::AF_INET.into(), 1, 0],
            ),
            ("execve", libc::SYS_execve, [0, 0, 0]),
        ];
        for (what, nr, [a, b, c]) in attempts {
            // SAFETY: the filter stops the call before the kernel reads
            // its arguments (null or invalid anyway).
            let st = under_filter(|| unsafe { libc::syscall(nr, a, b, c) as i32 });
            assert!(matches!(st, Signaled(_, SIGSYS, _)), "{what}: {st:?}");
        }
    }
}
