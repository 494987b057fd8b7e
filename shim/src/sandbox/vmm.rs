//! The moat-vmm process: spawning it with its config (moat-vmm-api's
//! [`VmConfig`]), its control API, and an orderly stop that always reaps it.

use std::fs::{self, File};
use std::os::fd::{AsFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use moat_vmm_api::{ApiClient, BlockRequest, ShutdownRequest, VmConfig};

use super::SandboxError;

/// A running (or exited) moat-vmm, reaped by a watcher thread.
pub struct Vmm {
    pid: u32,
    api: ApiClient,
    exit: Arc<(Mutex<Option<ExitStatus>>, Condvar)>,
}

impl Vmm {
    /// Writes the config to `config_path` and starts moat-vmm with it;
    /// its own log goes to `log_path`. `keep_fds` are passed on (tap fds).
    /// The VMM joins the cgroups whose open `cgroup.procs` are
    /// `cgroup_procs` before it execs.
    pub fn spawn(
        binary: &Path,
        config: &VmConfig,
        config_path: &Path,
        log_path: &Path,
        keep_fds: Vec<i32>,
        cgroup_procs: Vec<RawFd>,
    ) -> Result<Vmm, SandboxError> {
        if !binary.exists() {
            return Err(SandboxError::Missing {
                what: "moat-vmm binary",
                path: binary.to_owned(),
            });
        }
        let json = serde_json::to_vec_pretty(config).map_err(|e| SandboxError::Io {
            what: "encode vm.json".into(),
            source: e.into(),
        })?;
        fs::write(config_path, json).map_err(|source| SandboxError::Io {
            what: format!("write {}", config_path.display()),
            source,
        })?;
        let log = File::create(log_path).map_err(|source| SandboxError::Io {
            what: format!("create {}", log_path.display()),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| SandboxError::Io {
            what: "dup the vmm log".into(),
            source,
        })?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let shim = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (write, fcntl, setsid,
        // prctl, getppid) between fork and exec; `cgroup_procs` is open
        // until `spawn` returns (the caller holds it).
        unsafe {
            cmd.pre_exec(move || {
                super::cgroup::join_from_child(&cgroup_procs)?;
                for fd in &keep_fds {
                    let flags = libc::fcntl(*fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Its own session: signals to the shim's group do not hit the VM.
                libc::setsid();
                // No VMM outlives its shim, however the shim ends (SIGKILL
                // included); `shim delete` then cleans up the rest. moat-vmm
                // sets it again after its jail's uid switch clears it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The shim died before the prctl: nothing would signal us.
                if libc::getppid() != shim {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let child = spawn_from_lasting_thread(cmd).map_err(|source| SandboxError::Io {
            what: format!("start {}", binary.display()),
            source,
        })?;
        let api_socket = config.api_socket.clone().unwrap_or_default();
        Ok(Vmm::watch(child, api_socket))
    }

    fn watch(mut child: Child, api_socket: PathBuf) -> Vmm {
        let pid = child.id();
        let exit = Arc::new((Mutex::new(None), Condvar::new()));
        let exit2 = exit.clone();
        std::thread::Builder::new()
            .name("vmm-reaper".into())
            .spawn(move || {
                let status = child.wait();
                let (lock, cv) = &*exit2;
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                *slot =
                    Some(status.unwrap_or_else(|_| {
                        std::os::unix::process::ExitStatusExt::from_raw(255 << 8)
                    }));
                cv.notify_all();
            })
            .expect("spawn the vmm reaper");
        Vmm {
            pid,
            api: ApiClient::new(api_socket),
            exit,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status once moat-vmm has exited (and was reaped).
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.exit.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for moat-vmm to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let (lock, cv) = &*self.exit;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }

    /// Fills block slot `id` with `file`, passed over the API socket: a
    /// jailed VMM cannot open the shim's files itself.
    pub fn replace_block(
        &self,
        id: &str,
        file: &File,
        read_only: bool,
    ) -> Result<(), SandboxError> {
        let request = BlockRequest {
            path: None,
            read_only,
        };
        self.api
            .put_block(id, &request, Some(file.as_fd()))
            .map(drop)
            .map_err(|source| SandboxError::VmmApi {
                what: format!("fill block slot {id}"),
                source,
            })
    }

    /// Pauses the VM and saves it as a template into `file` (open for
    /// writing). The VM serves nothing afterwards: stop it.
    pub fn save_template(&self, file: &File) -> Result<(), SandboxError> {
        let api = |what: &str| {
            let what = what.to_string();
            move |source| SandboxError::VmmApi { what, source }
        };
        self.api
            .pause()
            .map_err(api("pause the VM for its template"))?;
        self.api
            .snapshot(file.as_fd())
            .map(drop)
            .map_err(api("save the VM as a template"))
    }

    /// From moat-vmm's start to the guest's boot-timer write (the agent
    /// writes it as it begins to serve); None until then or on API errors.
    pub fn boot_time(&self) -> Option<Duration> {
        let info = self.api.vm_info().ok()?;
        info.boot_time_us.map(Duration::from_micros)
    }

    /// Stops moat-vmm: the API's shutdown, then SIGKILL; always reaped.
    /// (The caller asks the agent to power off first.)
    pub fn stop(&self, grace: Duration) {
        if self.wait_timeout(grace).is_some() {
            return;
        }
        let request = ShutdownRequest {
            timeout_ms: Some(2000),
        };
        if let Err(e) = self.api.shutdown(&request) {
            log::debug!("vm shutdown through the API failed: {e}");
        }
        if self.wait_timeout(Duration::from_secs(5)).is_some() {
            return;
        }
        self.kill();
    }

    /// SIGKILL and reap.
    pub fn kill(&self) {
        if self.exited().is_none() {
            // The reaper has not collected the pid yet, so it is still ours.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if self.wait_timeout(Duration::from_secs(10)).is_none() {
            log::error!("moat-vmm {} did not exit after SIGKILL", self.pid);
        }
    }
}

/// A spawn request for the spawner thread, and where its answer goes.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the shim. The
/// parent-death signal fires when the *thread* that forked exits, not the
/// process; the shim's ttrpc handler threads come and go, so a VMM forked
/// from one would be killed with it. (A pidfd watch of the shim in moat-vmm
/// would work too, but needs an event source there for what the kernel
/// already does.)
fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    // The sender lives in a static: the thread never ends before the shim.
    static SPAWNER: Mutex<Option<mpsc::Sender<SpawnRequest>>> = Mutex::new(None);
    let tx = {
        let mut spawner = SPAWNER.lock().unwrap_or_else(|e| e.into_inner());
        match &*spawner {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel::<SpawnRequest>();
                std::thread::Builder::new()
                    .name("vmm-spawner".into())
                    .spawn(move || {
                        for (mut cmd, reply) in rx {
                            let _ = reply.send(cmd.spawn());
                        }
                    })?;
                spawner.insert(tx).clone()
            }
        }
    };
    let gone = || std::io::Error::other("the vmm spawner thread is gone");
    let (reply, answer) = mpsc::channel();
    tx.send((cmd, reply)).map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    #[test]
    fn a_block_file_travels_with_its_request() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::unix::fs::MetadataExt;
        let t = TempDir::new("api-fd");
        let sock = t.path().join("api.sock");
        let disk = t.path().join("disk.img");
        fs::write(&disk, [0u8; 4096]).unwrap();
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                .unwrap();
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            let n = msg.bytes;
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let body = r#"{"state":"Running","boot_time_us":null}"#;
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(answer.as_bytes()).unwrap();
            (req, fds)
        });
        let vmm = Vmm::watch(Command::new("true").spawn().unwrap(), sock);
        let file = File::open(&disk).unwrap();
        vmm.replace_block("b3", &file, true).unwrap();
        let (req, fds) = server.join().unwrap();
        assert!(req.starts_with("PUT /block/b3 HTTP/1.1\r\n"), "{req}");
        assert!(req.ends_with(r#"{"read_only":true}"#), "{req}");
        assert_eq!(fds.len(), 1);
        // SAFETY: the descriptor was just received and is owned by nobody else.
        let got = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
        let (a, b) = (got.metadata().unwrap(), file.metadata().unwrap());
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    }

    const STAND_IN_DIR: &str = "MOAT_TEST_SHIM_STAND_IN";

    /// Not a test on its own: the shim that `a_vmm_does_not_outlive_its_shim`
    /// runs and kills. It starts a "VMM" from a thread that then exits, as
    /// a ttrpc handler thread may.
    #[test]
    #[ignore = "not a test: the child process a_vmm_does_not_outlive_its_shim starts and kills"]
    fn shim_stand_in() {
        let Some(dir) = std::env::var_os(STAND_IN_DIR).map(PathBuf::from) else {
            return;
        };
        let vmm = std::thread::spawn(move || {
            let config = VmConfig::new(dir.join("vmlinux"));
            let vmm = Vmm::spawn(
                &dir.join("moat-vmm"),
                &config,
                &dir.join("vm.json"),
                &dir.join("vmm.log"),
                Vec::new(),
                Vec::new(),
            )
            .unwrap();
            fs::write(dir.join("pid"), vmm.pid().to_string()).unwrap();
            vmm
        })
        .join()
        .unwrap();
        std::thread::sleep(Duration::from_secs(600));
        drop(vmm);
    }

    /// Whether `pid` runs (not gone, not a zombie).
    fn alive(pid: &str) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    }

    /// A shell script standing in for moat-vmm, at `dir/moat-vmm`.
    fn fake_vmm(dir: &Path, script: &str) -> PathBuf {
        let vmm = dir.join("moat-vmm");
        fs::write(&vmm, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&vmm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        vmm
    }

    /// A VMM outlives the thread that started it, but not its shim, even
    /// one killed with SIGKILL.
    #[test]
    fn a_vmm_does_not_outlive_its_shim() {
        let t = TempDir::new("pdeath");
        fake_vmm(t.path(), "exec sleep 600");
        let mut shim = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sandbox::vmm::tests::shim_stand_in", "--ignored"])
            .env(STAND_IN_DIR, t.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid_file = t.path().join("pid");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pid_file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = fs::read_to_string(&pid_file).unwrap();
        // The starting thread has exited; the VMM must not have.
        std::thread::sleep(Duration::from_millis(500));
        assert!(alive(&pid), "the VMM died with the thread that started it");
        shim.kill().unwrap();
        shim.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(&pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(&pid), "the VMM outlived its shim");
    }

    /// The VMM writes "0" (itself) to the cgroup.procs it is given before
    /// it execs; a plain file stands in for the cgroup's.
    #[test]
    fn the_vmm_joins_its_cgroup_before_exec() {
        let t = TempDir::new("vmm-cgroup");
        let vmm = fake_vmm(t.path(), "exit 0");
        let procs_path = t.path().join("cgroup.procs");
        let procs = File::create(&procs_path).unwrap();
        let config = VmConfig::new(t.path().join("vmlinux"));
        let spawned = Vmm::spawn(
            &vmm,
            &config,
            &t.path().join("vm.json"),
            &t.path().join("vmm.log"),
            Vec::new(),
            vec![procs.as_raw_fd()],
        )
        .unwrap();
        spawned.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(fs::read_to_string(&procs_path).unwrap(), "0");
    }

    #[test]
    fn a_vmm_that_exits_is_reaped_and_reported() {
        let child = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        let vmm = Vmm::watch(child, "/nonexistent".into());
        let st = vmm.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(st.code(), Some(3));
        // Stopping an exited VMM returns at once.
        vmm.stop(Duration::from_millis(10));
    }

    #[test]
    fn stop_kills_a_vmm_that_ignores_the_api() {
        let child = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = child.id();
        let vmm = Vmm::watch(child, "/nonexistent/api.sock".into());
        let t = Instant::now();
        vmm.stop(Duration::from_millis(100));
        assert!(vmm.exited().is_some());
        assert!(t.elapsed() < Duration::from_secs(20));
        // Reaped: no zombie left with that pid.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
