//! Creating container processes: fork (into the container's pid
//! namespace), then in the child join/create the other namespaces and the
//! cgroup, set up the root (init only), drop privileges, install seccomp
//! and exec. The parent learns the pty master and any setup error through
//! a close-on-exec socket.
//!
//! The child runs Rust code after fork in a multi-threaded agent. That is
//! safe here because glibc's fork resets malloc's locks in the child, and
//! the child touches no other lock (no logging, no shared state).

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};
use seccompiler::BpfProgram;

use crate::capabilities::{self, CapSets};
use crate::error::{AgentError, IoContext, Result};
use crate::mount::{ensure_in_root, fd_path, MountOptions};
use crate::oci;
use crate::seccomp;
use crate::syscall::{LinuxSyscall, Syscall};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What kind of process to create.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A container's first process: new namespaces and the root at `rootfs`.
    Init {
        /// The container's root directory.
        rootfs: PathBuf,
        /// The container's spec (namespaces, mounts, hooks...).
        spec: Arc<oci::Spec>,
    },
    /// A process joining the namespaces of the running `init_pid`.
    Exec {
        /// The pid of the container's init, in the agent's pid namespace.
        init_pid: i32,
    },
}

/// Everything the child needs, prepared before fork.
pub struct ChildPlan {
    /// Init or exec.
    pub kind: Kind,
    /// The OCI process: args, env, cwd, user, rlimits...
    pub process: oci::Process,
    /// The seccomp filters to install before exec.
    pub seccomp: Arc<Vec<BpfProgram>>,
    /// The cgroup.procs file the child joins.
    pub cgroup_procs: PathBuf,
    /// Extra environment, e.g. GLIBC_TUNABLES under emul_compat.
    pub extra_env: Vec<(String, String)>,
    /// Init waits for [`Spawned::start`] before exec.
    pub gated: bool,
}

/// The child's ends of its stdio.
#[derive(Default)]
pub struct ChildStdio {
    /// The child's stdin, if it has one.
    pub stdin: Option<OwnedFd>,
    /// The child's stdout, if it has one.
    pub stdout: Option<OwnedFd>,
    /// The child's stderr, if it has one.
    pub stderr: Option<OwnedFd>,
    /// A terminal of this size (rows, cols) instead of pipes. The child
    /// opens it from the container's own /dev/ptmx, as runc does, so that
    /// `tty` names it inside the container, and hands the master back.
    pub terminal: Option<(u16, u16)>,
}

/// A forked child; for gated children the exec is still to come.
pub struct Spawned {
    /// Its pid in the agent's pid namespace.
    pub pid: i32,
    /// The master side of the child's terminal, if it has one.
    pub pty_master: Option<OwnedFd>,
    report: File,
    start: Option<File>,
}

const TAG_PTY: u8 = b'T';
const TAG_READY: u8 = b'R';
const TAG_ERROR: u8 = b'E';

fn send(fd: RawFd, tag: u8, payload: &[u8]) {
    let mut msg = Vec::with_capacity(5 + payload.len());
    msg.push(tag);
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    // SAFETY: writes from a valid buffer to an fd this process owns; one
    // write keeps the message whole (well under PIPE_BUF for pids/ready).
    unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
}

/// Reads one message; None on EOF (the child exec'd or exited silently).
fn recv(r: &mut File) -> Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(AgentError::Spawn("truncated message from child".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).ctx(|| "reading from child".into()),
        }
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len.min(64 * 1024)];
    r.read_exact(&mut payload)
        .ctx(|| "reading from child".into())?;
    Ok(Some((head[0], payload)))
}

/// Receives the pty master the child sends with a TAG_PTY message.
fn expect_fd(r: &File) -> Result<OwnedFd> {
    let mut head = [0u8; 5];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = loop {
        let mut iov = [std::io::IoSliceMut::new(&mut head)];
        let msg = match nix::sys::socket::recvmsg::<()>(
            r.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => other.ctx(|| "receiving the pty from the child".into())?,
        };
        let mut fd = None;
        for c in msg
            .cmsgs()
            .ctx(|| "receiving the pty from the child".into())?
        {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the kernel just installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    fd.get_or_insert(owned);
                }
            }
        }
        break (msg.bytes, fd);
    };
    if len == 0 {
        return Err(AgentError::Spawn("child exited during setup".into()));
    }
    let mut rest = r;
    if len < head.len() {
        rest.read_exact(&mut head[len..])
            .ctx(|| "reading from child".into())?;
    }
    let plen = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0u8; plen.min(64 * 1024)];
    rest.read_exact(&mut payload)
        .ctx(|| "reading from child".into())?;
    match (head[0], fd) {
        (TAG_PTY, Some(fd)) => Ok(fd),
        (TAG_ERROR, _) => Err(AgentError::Spawn(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        (t, _) => Err(AgentError::Spawn(format!(
            "expected the pty from the child, got message {t}"
        ))),
    }
}

fn expect(r: &mut File, tag: u8) -> Result<Vec<u8>> {
    match recv(r)? {
        Some((t, p)) if t == tag => Ok(p),
        Some((TAG_ERROR, p)) => Err(AgentError::Spawn(String::from_utf8_lossy(&p).into_owned())),
        Some((t, _)) => Err(AgentError::Spawn(format!(
            "unexpected message {t} from child"
        ))),
        None => Err(AgentError::Spawn("child exited during setup".into())),
    }
}

impl Spawned {
    /// Lets a gated child exec, and reports whether the exec worked.
    pub fn start(mut self) -> Result<()> {
        if let Some(mut s) = self.start.take() {
            s.write_all(b"S").ctx(|| "releasing the child".into())?;
        }
        match recv(&mut self.report)? {
            None => Ok(()),
            Some((TAG_ERROR, p)) => {
                Err(AgentError::Spawn(String::from_utf8_lossy(&p).into_owned()))
            }
            Some((t, _)) => Err(AgentError::Spawn(format!(
                "unexpected message {t} from child"
            ))),
        }
    }
}

/// Forks and sets up a process. Returns once the child reported its pid and,
/// when gated, that it is ready to exec; otherwise once it exec'd.
pub fn spawn(plan: &ChildPlan, stdio: ChildStdio) -> Result<Spawned> {
    // A socket rather than a pipe: it also carries the pty master back.
    let (report_r, report_w) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .ctx(|| "socketpair".into())?;
    let (start_r, start_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    let parts = ExecParts::of(plan).map_err(AgentError::Spawn)?;
    // Open the namespace files while the agent's view of /proc is certain.
    let mut ns_fds = namespace_fds(plan)?;
    let pid_ns = ns_fds
        .iter()
        .position(|(_, f)| *f == CloneFlags::CLONE_NEWPID)
        .map(|i| ns_fds.remove(i).0);
    let new_pid_ns = parts.new_namespaces.contains(CloneFlags::CLONE_NEWPID);
    let children_pid_ns = ChildrenPidNs::enter(pid_ns.as_ref(), new_pid_ns)?;

    // SAFETY: fork is async-signal-safe; the child only runs `child_main`,
    // which avoids locks other threads might hold (see module docs).
    let pid = unsafe { libc::fork() };
    let fork_error = std::io::Error::last_os_error();
    if pid != 0 {
        drop(children_pid_ns);
    }
    if pid < 0 {
        return Err(AgentError::Spawn(format!("fork: {fork_error}")));
    }
    if pid == 0 {
        drop(report_r);
        drop(start_w);
        let w = report_w.as_raw_fd();
        let err = match child_main(plan, &parts, &stdio, ns_fds, w, start_r.as_raw_fd()) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        send(w, TAG_ERROR, err.as_bytes());
        // SAFETY: leaves the child without running the parent's destructors.
        unsafe { libc::_exit(127) };
    }
    drop(report_w);
    drop(start_r);
    let terminal = stdio.terminal.is_some();
    drop(stdio);
    drop(ns_fds);
    let mut report = File::from(report_r);
    let mut spawned = Spawned {
        pid,
        pty_master: None,
        report: report.try_clone().ctx(|| "dup".into())?,
        start: plan.gated.then(|| File::from(start_w)),
    };
    if terminal {
        spawned.pty_master = Some(expect_fd(&report)?);
    }
    if plan.gated {
        expect(&mut report, TAG_READY)?;
    } else {
        match recv(&mut report)? {
            None => {}
            Some((TAG_ERROR, p)) => {
                return Err(AgentError::Spawn(String::from_utf8_lossy(&p).into_owned()))
            }
            Some((t, _)) => return Err(AgentError::Spawn(format!("unexpected message {t}"))),
        }
    }
    Ok(spawned)
}

/// The pid namespace of the calling thread's children, moved for one
/// fork: a process cannot enter a pid namespace itself (only its children
/// would), so the agent's thread moves its own children's namespace and
/// the child is born in it, with one fork instead of two. Every fork costs
/// hundreds of milliseconds of emulated guest kernel on a PVM host. Only
/// this thread is affected; dropping this moves it back.
struct ChildrenPidNs {
    own: Option<&'static File>,
}

/// The agent's own pid namespace, opened once: it never changes, and each
/// open is emulated guest-kernel work on a PVM host.
fn own_pid_ns() -> Result<&'static File> {
    static OWN: OnceLock<std::result::Result<File, String>> = OnceLock::new();
    OWN.get_or_init(|| File::open("/proc/self/ns/pid").map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| AgentError::Spawn(format!("opening our pid namespace: {e}")))
}

impl ChildrenPidNs {
    /// Children of this thread go to `join`, or to a new pid namespace if
    /// `new`, until this is dropped.
    fn enter(join: Option<&File>, new: bool) -> Result<ChildrenPidNs> {
        if join.is_none() && !new {
            return Ok(ChildrenPidNs { own: None });
        }
        let own = own_pid_ns()?;
        match join {
            Some(f) => nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWPID)
                .ctx(|| "entering the container's pid namespace".into())?,
            None => nix::sched::unshare(CloneFlags::CLONE_NEWPID)
                .ctx(|| "making a pid namespace".into())?,
        }
        Ok(ChildrenPidNs { own: Some(own) })
    }
}

impl Drop for ChildrenPidNs {
    fn drop(&mut self) {
        let Some(own) = self.own else { return };
        // Entering one's own active pid namespace needs only the
        // CAP_SYS_ADMIN the agent has. Should it fail, this thread's next
        // child would be born in another container's namespace: stop.
        if let Err(e) = nix::sched::setns(own.as_fd(), CloneFlags::CLONE_NEWPID) {
            log::error!("cannot return to the agent's pid namespace: {e}");
            std::process::abort();
        }
    }
}

const NAMESPACES: &[(&str, &str, CloneFlags)] = &[
    ("ipc", "ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", "uts", CloneFlags::CLONE_NEWUTS),
    ("network", "net", CloneFlags::CLONE_NEWNET),
    ("cgroup", "cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("pid", "pid", CloneFlags::CLONE_NEWPID),
    // Mount last: joining it changes what paths mean.
    ("mount", "mnt", CloneFlags::CLONE_NEWNS),
];

/// Namespaces to join, as open files (in join order).
fn namespace_fds(plan: &ChildPlan) -> Result<Vec<(File, CloneFlags)>> {
    let mut out = Vec::new();
    match &plan.kind {
        Kind::Init { spec, .. } => {
            let linux = spec
                .linux
                .as_ref()
                .map(|l| l.namespaces.as_slice())
                .unwrap_or(&[]);
            for (oci_name, _, flag) in NAMESPACES {
                if let Some(path) = linux
                    .iter()
                    .find(|n| n.typ == *oci_name)
                    .and_then(|n| n.path.as_deref())
                    .filter(|p| !p.is_empty())
                {
                    let f = File::open(path).map_err(|e| {
                        AgentError::InvalidSpec(format!("{oci_name} namespace {path}: {e}"))
                    })?;
                    out.push((f, *flag));
                }
            }
        }
        Kind::Exec { init_pid } => {
            let own = |n: &str| fs::read_link(format!("/proc/self/ns/{n}")).ok();
            for (_, proc_name, flag) in NAMESPACES {
                let path = format!("/proc/{init_pid}/ns/{proc_name}");
                let theirs = fs::read_link(&path).ok();
                // Joining our own namespace is pointless (and for pid wrong).
                if theirs.is_none() || theirs == own(proc_name) {
                    continue;
                }
                let f = File::open(&path).ctx(|| format!("opening {path}"))?;
                out.push((f, *flag));
            }
        }
    }
    Ok(out)
}

fn new_namespaces(plan: &ChildPlan) -> CloneFlags {
    let mut flags = CloneFlags::empty();
    if let Kind::Init { spec, .. } = &plan.kind {
        for ns in spec.linux.iter().flat_map(|l| &l.namespaces) {
            if ns.path.as_deref().is_none_or(str::is_empty) {
                if let Some((_, _, f)) = NAMESPACES.iter().find(|(n, _, _)| *n == ns.typ) {
                    flags |= *f;
                }
            }
        }
    }
    flags
}

fn errno_str(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// The child's side. Returns only on error.
fn child_main(
    plan: &ChildPlan,
    parts: &ExecParts,
    stdio: &ChildStdio,
    ns_fds: Vec<(File, CloneFlags)>,
    report: RawFd,
    start: RawFd,
) -> std::result::Result<std::convert::Infallible, String> {
    // The agent blocks SIGCHLD and Rust ignores SIGPIPE; neither may leak
    // into the container.
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| errno_str("sigprocmask", e))?;
    for sig in nix::sys::signal::Signal::iterator() {
        if sig != nix::sys::signal::Signal::SIGKILL && sig != nix::sys::signal::Signal::SIGSTOP {
            // SAFETY: resetting to the default disposition installs no handler.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
    }

    fs::write(&plan.cgroup_procs, "0").map_err(|e| errno_str("joining the cgroup", e))?;
    if let Some(adj) = plan.process.oom_score_adj {
        fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| errno_str("oom_score_adj", e))?;
    }

    // The pid namespace is the one the agent forked this child into.
    for (f, flag) in &ns_fds {
        nix::sched::setns(f.as_fd(), *flag).map_err(|e| errno_str("setns", e))?;
    }
    drop(ns_fds);
    let new = parts.new_namespaces - CloneFlags::CLONE_NEWPID;
    if !new.is_empty() {
        LinuxSyscall
            .unshare(new)
            .map_err(|e| errno_str("unshare", e))?;
    }
    if new.contains(CloneFlags::CLONE_NEWNET) {
        // As runc: a network namespace of the container's own has its
        // loopback up, so 127.0.0.1 works without any CNI.
        crate::network::link_up("lo").map_err(|e| errno_str("loopback", e))?;
    }

    nix::unistd::setsid().map_err(|e| errno_str("setsid", e))?;
    if stdio.terminal.is_none() {
        setup_stdio(stdio)?;
    }

    // SAFETY: umask cannot fail; device nodes below need exact modes.
    unsafe { libc::umask(0) };
    if let Kind::Init { rootfs, spec } = &plan.kind {
        setup_root(&LinuxSyscall, spec, rootfs).map_err(|e| e.to_string())?;
    }
    if let Some(size) = stdio.terminal {
        // Now /dev/ptmx is the container's (its root, or the mount
        // namespace an exec joined).
        let master = open_terminal(size)?;
        send_fd(report, TAG_PTY, master.as_raw_fd())?;
    }
    for rl in &plan.process.rlimits {
        let res = rlimit_resource(&rl.typ).ok_or_else(|| format!("unknown rlimit {}", rl.typ))?;
        nix::sys::resource::setrlimit(res, rl.soft, rl.hard)
            .map_err(|e| errno_str(&format!("setrlimit {}", rl.typ), e))?;
    }

    if plan.gated {
        send(report, TAG_READY, &[]);
        let mut b = [0u8; 1];
        // SAFETY: reads into a 1-byte buffer we own.
        let n = unsafe { libc::read(start, b.as_mut_ptr().cast(), 1) };
        if n != 1 {
            // The agent dropped the container before starting it.
            // SAFETY: plain exit of a child that never exec'd.
            unsafe { libc::_exit(0) };
        }
    }
    finish_and_exec(plan, parts)
}

/// Opens a terminal from /dev/ptmx, makes its slave our controlling
/// terminal and stdio, and returns the master.
fn open_terminal((rows, cols): (u16, u16)) -> std::result::Result<OwnedFd, String> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| errno_str("opening /dev/ptmx in the container", e))?;
    nix::pty::unlockpt(&master).map_err(|e| errno_str("unlockpt", e))?;
    // SAFETY: TIOCGPTPEER opens the slave of a master we own, without a
    // path lookup the container could redirect.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY,
        )
    };
    if slave < 0 {
        return Err(errno_str(
            "opening the pty slave",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the ioctl returned a new descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct we own.
    unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    // SAFETY: makes the slave our controlling terminal (we are a session
    // leader without one).
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(errno_str("TIOCSCTTY", std::io::Error::last_os_error()));
    }
    for to in 0..3 {
        dup_to(slave.as_raw_fd(), to)?;
    }
    let master: OwnedFd = master.into();
    Ok(master)
}

/// Sends a message with one descriptor attached.
fn send_fd(sock: RawFd, tag: u8, fd: RawFd) -> std::result::Result<(), String> {
    let head = [tag, 0, 0, 0, 0];
    let iov = [std::io::IoSlice::new(&head)];
    let fds = [fd];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(sock, &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
        .map_err(|e| errno_str("sending the pty", e))?;
    Ok(())
}

fn dup_to(from: RawFd, to: RawFd) -> std::result::Result<(), String> {
    // SAFETY: both fds are open; dup2 atomically replaces `to`.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(errno_str("dup2", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn setup_stdio(stdio: &ChildStdio) -> std::result::Result<(), String> {
    let devnull = || {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|e| errno_str("/dev/null", e))
    };
    let null = devnull()?;
    for (fd, to) in [(&stdio.stdin, 0), (&stdio.stdout, 1), (&stdio.stderr, 2)] {
        dup_to(fd.as_ref().unwrap_or(&null).as_raw_fd(), to)?;
    }
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<nix::sys::resource::Resource> {
    use nix::sys::resource::Resource as R;
    Some(match name {
        "RLIMIT_AS" => R::RLIMIT_AS,
        "RLIMIT_CORE" => R::RLIMIT_CORE,
        "RLIMIT_CPU" => R::RLIMIT_CPU,
        "RLIMIT_DATA" => R::RLIMIT_DATA,
        "RLIMIT_FSIZE" => R::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => R::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => R::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => R::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => R::RLIMIT_NICE,
        "RLIMIT_NOFILE" => R::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => R::RLIMIT_NPROC,
        "RLIMIT_RSS" => R::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => R::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => R::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => R::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => R::RLIMIT_STACK,
        _ => return None,
    })
}

/// Mounts the spec's mounts into `rootfs`, pivots into it and applies
/// masked/read-only paths, devices and the hostname. Runs in the child's
/// fresh mount namespace.
pub fn setup_root(sys: &dyn Syscall, spec: &oci::Spec, rootfs: &Path) -> Result<()> {
    let linux = spec.linux.clone().unwrap_or_default();
    let prop = match linux.rootfs_propagation.as_deref() {
        Some("shared") | Some("rshared") => MsFlags::MS_SHARED,
        Some("slave") | Some("rslave") => MsFlags::MS_SLAVE,
        _ => MsFlags::MS_PRIVATE,
    };
    sys.mount(None, Path::new("/"), None, MsFlags::MS_REC | prop, None)
        .ctx(|| "setting the propagation of /".into())?;
    // pivot_root refuses a new root whose mount or parent mount is shared:
    // as runc does, make the mount that holds the rootfs private (only
    // that one) before binding the rootfs from it.
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").ctx(|| "reading /proc/self/mountinfo".into())?;
    let real_root = fs::canonicalize(rootfs).ctx(|| format!("resolving {}", rootfs.display()))?;
    if let Some(parent) = crate::mount::mount_point_of(&mountinfo, &real_root) {
        sys.mount(None, &parent, None, MsFlags::MS_PRIVATE, None)
            .ctx(|| format!("making {} private", parent.display()))?;
    }
    sys.mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .ctx(|| "binding the rootfs".into())?;
    let root_fd: OwnedFd = File::open(rootfs)
        .ctx(|| format!("opening {}", rootfs.display()))?
        .into();

    let mut dev_is_tmpfs = false;
    for m in &spec.mounts {
        mount_one(sys, &root_fd, m)?;
        if m.destination.trim_end_matches('/') == "/dev" && m.typ.as_deref() == Some("tmpfs") {
            dev_is_tmpfs = true;
        }
    }

    nix::unistd::chdir(rootfs).ctx(|| "chdir rootfs".into())?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .ctx(|| "pivot_root".into())?;
    // The old root now lies over the new one. Unmounting it must not
    // propagate to its peers (with a shared / they are the agent's).
    sys.mount(
        None,
        Path::new("."),
        None,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None,
    )
    .ctx(|| "making the old root a slave".into())?;
    sys.umount(Path::new("."), MntFlags::MNT_DETACH)
        .ctx(|| "detaching the old root".into())?;
    nix::unistd::chdir("/").ctx(|| "chdir /".into())?;

    if dev_is_tmpfs {
        default_devices()?;
    }
    for d in &linux.devices {
        create_device(d)?;
    }
    // Sysctls before the read-only paths: /proc/sys is one of them (as
    // runc orders it).
    for (k, v) in &linux.sysctl {
        if k.contains("..") || k.contains('/') {
            return Err(AgentError::InvalidSpec(format!("bad sysctl {k:?}")));
        }
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        fs::write(&path, v).ctx(|| format!("setting sysctl {k}"))?;
    }
    for p in &linux.masked_paths {
        mask_path(sys, p)?;
    }
    for p in &linux.readonly_paths {
        readonly_path(sys, p)?;
    }
    let new_uts = linux
        .namespaces
        .iter()
        .any(|n| n.typ == "uts" && n.path.as_deref().is_none_or(str::is_empty));
    if let Some(h) = spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        if new_uts {
            sys.sethostname(h).ctx(|| "sethostname".into())?;
        }
    }
    if spec.root.as_ref().is_some_and(|r| r.readonly) {
        sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )
        .ctx(|| "making the root read-only".into())?;
    }
    Ok(())
}

fn mount_one(sys: &dyn Syscall, root: &OwnedFd, m: &oci::Mount) -> Result<()> {
    let opts = MountOptions::parse(&m.options);
    let typ = m.typ.as_deref().unwrap_or("");
    let bind = opts.bind || typ == "bind";
    let source = m.source.as_deref().unwrap_or("");
    let dir = !bind || fs::metadata(source).map(|md| md.is_dir()).unwrap_or(true);
    let target = ensure_in_root(root, &m.destination, dir)?;
    let tpath = fd_path(&target);
    let what = || {
        format!(
            "mounting {} on {}",
            if source.is_empty() { typ } else { source },
            m.destination
        )
    };
    if bind {
        sys.mount(
            Some(Path::new(source)),
            &tpath,
            None,
            MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC),
            None,
        )
        .ctx(what)?;
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            // Bind mounts take their flags on a remount of the new mount.
            let top = ensure_in_root(root, &m.destination, dir)?;
            sys.mount(
                None,
                &fd_path(&top),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None,
            )
            .ctx(what)?;
        }
    } else {
        // The guest has cgroup v2 only.
        let typ = if typ == "cgroup" { "cgroup2" } else { typ };
        let src = if source.is_empty() { typ } else { source };
        sys.mount(
            Some(Path::new(src)),
            &tpath,
            Some(typ),
            opts.flags,
            opts.data_string().as_deref(),
        )
        .ctx(what)?;
    }
    if !opts.propagation.is_empty() {
        let top = ensure_in_root(root, &m.destination, dir)?;
        sys.mount(None, &fd_path(&top), None, opts.propagation, None)
            .ctx(what)?;
    }
    Ok(())
}

fn default_devices() -> Result<()> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let path = format!("/dev/{name}");
        match nix::sys::stat::mknod(
            path.as_str(),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e).ctx(|| format!("creating {path}")),
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/ptmx", "pts/ptmx"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("creating {link}")),
        }
    }
    Ok(())
}

fn create_device(d: &oci::Device) -> Result<()> {
    let kind = match d.typ.as_str() {
        "c" | "u" => SFlag::S_IFCHR,
        "b" => SFlag::S_IFBLK,
        "p" => SFlag::S_IFIFO,
        other => return Err(AgentError::InvalidSpec(format!("device type {other:?}"))),
    };
    if !d.path.starts_with("/dev/") || d.path.contains("..") {
        return Err(AgentError::InvalidSpec(format!("device path {:?}", d.path)));
    }
    if let Some(parent) = Path::new(&d.path).parent() {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
    }
    let mode = Mode::from_bits_truncate(d.file_mode.unwrap_or(0o666));
    let dev = nix::sys::stat::makedev(d.major as u64, d.minor as u64);
    match nix::sys::stat::mknod(d.path.as_str(), kind, mode, dev) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e).ctx(|| format!("creating device {}", d.path)),
    }
    nix::unistd::chown(
        d.path.as_str(),
        d.uid.map(Uid::from_raw),
        d.gid.map(Gid::from_raw),
    )
    .ctx(|| format!("chown {}", d.path))
}

fn mask_path(sys: &dyn Syscall, p: &str) -> Result<()> {
    let md = match fs::metadata(p) {
        Ok(md) => md,
        Err(_) => return Ok(()),
    };
    let path = Path::new(p);
    if md.is_dir() {
        sys.mount(
            Some(Path::new("tmpfs")),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        )
    } else {
        sys.mount(
            Some(Path::new("/dev/null")),
            path,
            None,
            MsFlags::MS_BIND,
            None,
        )
    }
    .ctx(|| format!("masking {p}"))
}

fn readonly_path(sys: &dyn Syscall, p: &str) -> Result<()> {
    let path = Path::new(p);
    if !path.exists() {
        return Ok(());
    }
    sys.mount(
        Some(path),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .ctx(|| format!("binding {p}"))?;
    sys.mount(
        None,
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None,
    )
    .ctx(|| format!("making {p} read-only"))
}

/// Builds the final environment: the spec's, plus `extra` merged in.
pub fn build_env(env: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<String> = env.to_vec();
    for (k, v) in extra {
        let prefix = format!("{k}=");
        match out.iter_mut().find(|e| e.starts_with(&prefix)) {
            // Keep the container's own tunables after ours.
            Some(e) if k == "GLIBC_TUNABLES" => *e = format!("{prefix}{v}:{}", &e[prefix.len()..]),
            Some(_) => {}
            None => out.push(format!("{prefix}{v}")),
        }
    }
    out
}

fn find_executable(arg0: &str, env: &[String]) -> std::result::Result<CString, String> {
    let cs = |s: &str| CString::new(s).map_err(|_| "NUL in path".to_string());
    if arg0.contains('/') {
        return cs(arg0);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{arg0}");
        if let Ok(md) = fs::metadata(&candidate) {
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return cs(&candidate);
            }
        }
    }
    Err(format!("executable {arg0:?} not found in PATH"))
}

fn install_seccomp(plan: &ChildPlan) -> std::result::Result<(), String> {
    for p in plan.seccomp.iter() {
        seccomp::install(p).map_err(|e| errno_str("installing seccomp", e))?;
    }
    Ok(())
}

/// What the child needs that can be made before fork: it then neither
/// allocates nor parses (each page it writes is a copy-on-write fault,
/// emulated on a PVM host).
struct ExecParts {
    /// The namespaces made for the process (the pid one by the agent's
    /// thread, before fork; the others by the child).
    new_namespaces: CloneFlags,
    args: Vec<CString>,
    env: Vec<String>,
    envc: Vec<CString>,
    caps: Option<CapSets>,
}

impl ExecParts {
    fn of(plan: &ChildPlan) -> std::result::Result<ExecParts, String> {
        let p = &plan.process;
        let cstrings = |v: &[String], what: &str| {
            v.iter()
                .map(|a| CString::new(a.as_str()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| format!("NUL in {what}"))
        };
        let env = build_env(&p.env, &plan.extra_env);
        Ok(ExecParts {
            new_namespaces: new_namespaces(plan),
            args: cstrings(&p.args, "args")?,
            envc: cstrings(&env, "env")?,
            env,
            caps: p.capabilities.as_ref().map(CapSets::parse).transpose()?,
        })
    }
}

fn finish_and_exec(
    plan: &ChildPlan,
    parts: &ExecParts,
) -> std::result::Result<std::convert::Infallible, String> {
    let p = &plan.process;
    if !p.no_new_privileges {
        // Without no_new_privs only a privileged process may install filters.
        install_seccomp(plan)?;
    }
    if let Some(c) = &parts.caps {
        capabilities::drop_bounding(c.bounding)?;
    }
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let gids: Vec<Gid> = p
        .user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(|e| errno_str("setgroups", e))?;
    let gid = Gid::from_raw(p.user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| errno_str("setresgid", e))?;
    let uid = Uid::from_raw(p.user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| errno_str("setresuid", e))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(c) = &parts.caps {
        capabilities::apply(c)?;
    }
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(p.user.umask.unwrap_or(0o022) as libc::mode_t) };
    nix::unistd::chdir(p.cwd.as_str()).map_err(|e| errno_str(&format!("chdir {}", p.cwd), e))?;
    let exe = find_executable(&p.args[0], &parts.env)?;
    if p.no_new_privileges {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(errno_str("no_new_privs", std::io::Error::last_os_error()));
        }
        install_seccomp(plan)?;
    }
    // Close every inherited descriptor at exec (the report socket included,
    // which tells the agent the exec happened).
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    let err = nix::unistd::execve(&exe, &parts.args, &parts.envc).unwrap_err();
    Err(format!("exec {:?}: {err}", p.args[0]))
}

/// Opens a pipe whose ends are close-on-exec, with a large buffer for output.
pub fn pipe(big: bool) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
    if big {
        // Fewer wake-ups per MiB of output; best effort.
        // SAFETY: fcntl on a pipe fd we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    Ok((r, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunables_are_merged() {
        let extra = vec![(
            "GLIBC_TUNABLES".to_string(),
            "glibc.cpu.hwcaps=-AVX".to_string(),
        )];
        assert_eq!(
            build_env(&["A=1".into()], &extra),
            ["A=1", "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX"]
        );
        assert_eq!(
            build_env(&["GLIBC_TUNABLES=glibc.malloc.check=3".into()], &extra),
            ["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX:glibc.malloc.check=3"]
        );
    }

    #[test]
    fn rlimit_names() {
        assert!(rlimit_resource("RLIMIT_NOFILE").is_some());
        assert!(rlimit_resource("RLIMIT_BOGUS").is_none());
    }
}
