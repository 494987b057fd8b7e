//! One seccomp filter per thread kind, installed before the guest runs.
//!
//! Each filter is an allowlist of system calls, with `ioctl` limited to the
//! requests the thread uses and `socket` to unix sockets; anything else
//! kills the VMM process (as in Firecracker), so a compromised thread
//! cannot open files, exec or reach the network.
//!
//! Threads, and the filter each installs:
//! - the main thread, once the guest runs, is the event thread: it waits
//!   for the end, activates devices when their driver sets DRIVER_OK (so it
//!   starts the device workers), and cleans up ([`ThreadKind::Main`]);
//! - vCPU threads run KVM_RUN and the device registers ([`ThreadKind::Vcpu`]);
//! - the control API thread ([`ThreadKind::Api`]);
//! - one worker thread per active virtio device, with a filter of its
//!   device type ([`ThreadKind::Block`], [`ThreadKind::Net`],
//!   [`ThreadKind::Vsock`], [`ThreadKind::Rng`]).
//!
//! A thread inherits its creator's filter and both apply: so the event
//! thread's filter also holds what the workers it starts need, and each
//! worker then narrows it to its own. `--no-seccomp` turns filtering off
//! for debugging.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a seccomp filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules of a thread kind's filter are invalid.
    #[error("Cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// A thread kind's filter does not compile to BPF.
    #[error("Cannot compile the {0:?} seccomp filter")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("Cannot install a seccomp filter")]
    Apply(#[source] seccompiler::Error),
}

/// The kinds of thread, each with a filter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the guest runs: the event thread (waits for
    /// the end, activates devices, cleans up).
    Main,
    /// vCPU threads.
    Vcpu,
    /// The control API thread.
    Api,
    /// virtio-blk workers.
    Block,
    /// virtio-net workers.
    Net,
    /// virtio-vsock workers.
    Vsock,
    /// virtio-rng workers.
    Rng,
}

impl ThreadKind {
    /// Every kind, in filter-building order.
    pub const ALL: [ThreadKind; 7] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
    ];

    /// The device worker kinds: what the event thread starts.
    const WORKERS: [ThreadKind; 4] = [
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
    ];
}

/// KVM's ioctl requests; a private module, as the macro makes a `pub fn`.
mod ioctls {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    // What `PUT /vm/snapshot` reads (`crate::vstate::snapshot`).
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

    /// Every request a snapshot makes.
    pub fn snapshot() -> Vec<u64> {
        vec![
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_IRQCHIP(),
            KVM_GET_CLOCK(),
            KVM_GET_PIT2(),
        ]
    }
}
use ioctls::KVM_RUN;

/// Memory, time, signals, logging: what any Rust thread needs. pread,
/// pwrite and ftruncate serve log rotation (`logger.rs`), which happens on
/// whichever thread logs.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
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

/// Starting device workers (event thread only); each installs its own
/// filter (seccomp, and prctl for no_new_privs), which can only narrow this.
const THREADS: &[i64] = &[
    libc::SYS_seccomp,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
];

/// Stopping the VM: removing socket files.
const MAIN: &[i64] = &[libc::SYS_unlink, libc::SYS_unlinkat, libc::SYS_fsync];

/// KVM_RUN; device registers only signal eventfds and join workers.
const VCPU: &[i64] = &[libc::SYS_ioctl];

/// Serving the API: accepting clients, receiving or opening a replacement
/// disk file, saving the VM into a template file passed open (the KVM
/// reads, then the file written sparse and synced).
const API: &[i64] = &[
    libc::SYS_setsockopt,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_openat,
    libc::SYS_fsync,
    libc::SYS_ioctl,
];

/// Disk I/O.
const BLOCK: &[i64] = &[
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// Guest-initiated streams to host unix sockets, and host ones accepted.
const VSOCK: &[i64] = &[
    libc::SYS_ioctl,
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
];

/// The system calls `kind` adds to [`BASE`] by itself.
fn own_calls(kind: ThreadKind) -> &'static [&'static [i64]] {
    match kind {
        ThreadKind::Main => &[THREADS, MAIN],
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Api => &[API],
        ThreadKind::Block => &[BLOCK],
        // A tap is read and written: nothing beyond the base.
        ThreadKind::Net => &[],
        ThreadKind::Vsock => &[VSOCK],
        // getrandom is in the base.
        ThreadKind::Rng => &[],
    }
}

/// The ioctl requests `kind` makes by itself.
fn own_ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vcpu => vec![KVM_RUN()],
        ThreadKind::Api => ioctls::snapshot(),
        // Accepted host streams are made non-blocking (std uses FIONBIO).
        ThreadKind::Vsock => vec![libc::FIONBIO],
        _ => Vec::new(),
    }
}

/// The kinds whose calls a `kind` thread must allow: its own, and for the
/// event thread also those of the workers it starts (they inherit its
/// filter).
fn covered(kind: ThreadKind) -> Vec<ThreadKind> {
    let mut kinds = vec![kind];
    if kind == ThreadKind::Main {
        kinds.extend(ThreadKind::WORKERS);
    }
    kinds
}

/// Every system call a `kind` thread may make, sorted.
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<i64> {
    let mut all: Vec<i64> = BASE.to_vec();
    for k in covered(kind) {
        all.extend(own_calls(k).iter().flat_map(|s| s.iter()));
    }
    all.sort_unstable();
    all.dedup();
    all
}

/// Every system call some moat-vmm thread may make once its filter is
/// installed: the union of [`allowed_syscalls`] over [`ThreadKind::ALL`],
/// sorted. Calls allowed only with some arguments count. This is the host
/// kernel surface a guest reaches through moat-vmm (moat-bench reports it).
pub fn union_allowed_syscalls() -> Vec<i64> {
    let mut all: Vec<i64> = ThreadKind::ALL
        .into_iter()
        .flat_map(allowed_syscalls)
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Every ioctl request a `kind` thread may make, sorted.
pub fn allowed_ioctls(kind: ThreadKind) -> Vec<u64> {
    let mut all: Vec<u64> = covered(kind).into_iter().flat_map(own_ioctls).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// A rule that allows the call when argument `arg` equals `value`.
fn arg_equals(kind: ThreadKind, arg: u8, value: u64) -> Result<SeccompRule, SeccompError> {
    let build = |e| SeccompError::Build(kind, e);
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(build)?;
    SeccompRule::new(vec![cond]).map_err(build)
}

/// Conditions on a call's arguments (any rule matching allows it); an
/// empty list allows any arguments.
fn argument_rules(nr: i64, kind: ThreadKind) -> Result<Vec<SeccompRule>, SeccompError> {
    match nr {
        libc::SYS_ioctl => allowed_ioctls(kind)
            .into_iter()
            .map(|request| arg_equals(kind, 1, request))
            .collect(),
        // Unix sockets only (guest-initiated vsock streams): no IP, netlink
        // or packet socket, whatever namespace the VMM is in.
        libc::SYS_socket => Ok(vec![arg_equals(kind, 0, libc::AF_UNIX as u64)?]),
        _ => Ok(Vec::new()),
    }
}

fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls(kind)
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
    /// Compiles the filter of every thread kind.
    pub fn build() -> Result<Self, SeccompError> {
        let mut map = BTreeMap::new();
        for kind in ThreadKind::ALL {
            map.insert(kind, compile(kind)?);
        }
        Ok(Self(map))
    }

    /// The filter of `kind`.
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
    fn union_allowed_syscalls_is_the_union_of_the_kinds() {
        let all = union_allowed_syscalls();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        for kind in ThreadKind::ALL {
            let own = allowed_syscalls(kind);
            assert!(own.iter().all(|nr| all.contains(nr)), "{kind:?}");
        }
        for nr in &all {
            assert!(ThreadKind::ALL
                .into_iter()
                .any(|k| allowed_syscalls(k).contains(nr)));
        }
        assert!(!all.contains(&libc::SYS_execve));
    }

    #[test]
    fn filters_compile_and_differ_by_kind() {
        let f = Filters::build().unwrap();
        let vcpu = allowed_syscalls(ThreadKind::Vcpu);
        assert!(vcpu.contains(&libc::SYS_ioctl));
        for nr in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_unlink,
        ] {
            assert!(!vcpu.contains(&nr), "vCPU threads may make call {nr}");
        }
        assert!(allowed_syscalls(ThreadKind::Api).contains(&libc::SYS_openat));
        assert!(!allowed_syscalls(ThreadKind::Main).contains(&libc::SYS_openat));
        // Workers inherit the event thread's filter: it covers theirs.
        let main = allowed_syscalls(ThreadKind::Main);
        for kind in ThreadKind::WORKERS {
            assert!(allowed_syscalls(kind).iter().all(|nr| main.contains(nr)));
            assert!(allowed_ioctls(kind)
                .iter()
                .all(|r| allowed_ioctls(ThreadKind::Main).contains(r)));
        }
        assert_eq!(allowed_ioctls(ThreadKind::Vcpu), [KVM_RUN()]);
        assert_ne!(f.get(ThreadKind::Vcpu), f.get(ThreadKind::Api));
    }

    /// Runs `call` in a forked child under `kind`'s filter; its wait status.
    fn under_filter(kind: ThreadKind, call: impl FnOnce()) -> i32 {
        let filter = compile(kind).unwrap();
        // SAFETY: fork in a test; the child only installs a prepared filter
        // and makes raw system calls before _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if seccompiler::apply_filter(&filter).is_err() {
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

    fn assert_survives(kind: ThreadKind, what: &str, call: impl FnOnce()) {
        let status = under_filter(kind, call);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{kind:?}: {what} was refused: status {status:#x}"
        );
    }

    fn assert_killed(kind: ThreadKind, what: &str, call: impl FnOnce()) {
        let status = under_filter(kind, call);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{kind:?}: {what} was let through: status {status:#x}"
        );
    }

    fn socket(domain: i32) {
        // SAFETY: socket(2) with constant arguments.
        unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    }

    fn ioctl(request: u64) {
        let mut arg = 0u64;
        // SAFETY: the request goes to fd -1, which the kernel refuses
        // (EBADF) before it looks at `arg`; the filter acts first.
        unsafe { libc::ioctl(-1, request, &mut arg) };
    }

    fn syscall0(nr: i64) {
        // SAFETY: calls whose arguments the filter checks before the kernel
        // runs them: each test expects them to be killed.
        unsafe { libc::syscall(nr, 0, 0, 0, 0, 0) };
    }

    #[test]
    fn every_filter_kills_a_call_outside_its_list() {
        for kind in ThreadKind::ALL {
            assert_killed(kind, "execve", || syscall0(libc::SYS_execve));
            assert_killed(kind, "an inet socket", || socket(libc::AF_INET));
            // TCGETS: what no thread of moat-vmm asks for.
            assert_killed(kind, "ioctl TCGETS", || ioctl(libc::TCGETS));
        }
        for kind in [ThreadKind::Vcpu, ThreadKind::Api] {
            assert_killed(kind, "clone", || syscall0(libc::SYS_clone3));
        }
        for kind in [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Block] {
            assert_killed(kind, "a unix socket", || socket(libc::AF_UNIX));
            assert_killed(kind, "connect", || syscall0(libc::SYS_connect));
            assert_killed(kind, "unlink", || syscall0(libc::SYS_unlink));
        }
        assert_killed(ThreadKind::Vcpu, "FIONBIO", || ioctl(libc::FIONBIO));
        assert_killed(ThreadKind::Vsock, "KVM_RUN", || ioctl(KVM_RUN()));
        assert_killed(ThreadKind::Net, "openat", || syscall0(libc::SYS_openat));
    }

    #[test]
    fn every_filter_lets_its_own_calls_through() {
        for kind in ThreadKind::ALL {
            assert_survives(kind, "getpid", || {
                // SAFETY: getpid(2) has no arguments.
                unsafe { libc::getpid() };
            });
        }
        assert_survives(ThreadKind::Vcpu, "KVM_RUN", || ioctl(KVM_RUN()));
        for kind in [ThreadKind::Vsock, ThreadKind::Main] {
            assert_survives(kind, "a unix socket", || socket(libc::AF_UNIX));
            assert_survives(kind, "FIONBIO", || ioctl(libc::FIONBIO));
        }
    }
}
