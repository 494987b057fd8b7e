//! The moat-vmm process: its JSON config, spawning, control API, and an
//! orderly stop that always reaps it.

use std::fs::{self, File};
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::jail::JailIds;
use super::SandboxError;

/// `vm.json` as moat-vmm reads it (vmm/API.md).
#[derive(Debug, Clone, Serialize)]
pub struct VmJson {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub serial: SerialJson,
    pub block: Vec<BlockJson>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetJson>,
    pub vsock: VsockJson,
    pub rng: bool,
    pub api_socket: PathBuf,
    pub seccomp: bool,
    /// Ids only: with no `read_write` or `read_only` paths, the jailed VMM
    /// may open no file at all (it needs none; see `Vmm::replace_block`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<JailIds>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialJson {
    File(PathBuf),
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BlockJson {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub serial: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetJson {
    pub id: String,
    pub tap_fd: i32,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VsockJson {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A running (or exited) moat-vmm, reaped by a watcher thread.
pub struct Vmm {
    pid: u32,
    api_socket: PathBuf,
    exit: Arc<(Mutex<Option<ExitStatus>>, Condvar)>,
}

impl Vmm {
    /// Writes the config to `config_path` and starts moat-vmm with it;
    /// its own log goes to `log_path`. `keep_fds` are passed on (tap fds).
    pub fn spawn(
        binary: &Path,
        config: &VmJson,
        config_path: &Path,
        log_path: &Path,
        keep_fds: Vec<i32>,
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
        // SAFETY: only async-signal-safe calls (fcntl, setsid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep_fds {
                    let flags = libc::fcntl(*fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(*fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Its own session: signals to the shim's group do not hit the VM.
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| SandboxError::Io {
            what: format!("start {}", binary.display()),
            source,
        })?;
        Ok(Vmm::watch(child, config.api_socket.clone()))
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
            api_socket,
            exit,
        }
    }

    pub fn pid(&self) -> u32 {
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

    /// One request to the control API; returns the status code and body.
    pub fn api(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), SandboxError> {
        api_request(&self.api_socket, method, path, body, None)
    }

    /// Fills block slot `id` with `file`, passed over the API socket: a
    /// jailed VMM cannot open the shim's files itself.
    pub fn replace_block(
        &self,
        id: &str,
        file: &File,
        read_only: bool,
    ) -> Result<(), SandboxError> {
        let body = serde_json::json!({ "read_only": read_only }).to_string();
        let path = format!("/block/{id}");
        match api_request(&self.api_socket, "PUT", &path, &body, Some(file.as_fd()))? {
            (200..=299, _) => Ok(()),
            (code, body) => Err(SandboxError::Api(format!(
                "fill block slot {id}: {code} {body}"
            ))),
        }
    }

    /// From moat-vmm's start to the guest's boot-timer write (the agent
    /// writes it as it begins to serve); None until then or on API errors.
    pub fn boot_time(&self) -> Option<Duration> {
        let (code, body) = self.api("GET", "/vm", "").ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["boot_time_us"].as_u64().map(Duration::from_micros)
    }

    /// Stops moat-vmm: the API's shutdown, then SIGKILL; always reaped.
    /// (The caller asks the agent to power off first.)
    pub fn stop(&self, grace: Duration) {
        if self.wait_timeout(grace).is_some() {
            return;
        }
        if let Err(e) = self.api("PUT", "/vm/shutdown", r#"{"timeout_ms": 2000}"#) {
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

/// A minimal HTTP/1.1 client for moat-vmm's API socket; `fd` travels with
/// the request's bytes (SCM_RIGHTS).
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(u16, String), SandboxError> {
    let io = |what: &str| {
        let what = format!("{what} {}", socket.display());
        move |source| SandboxError::Io { what, source }
    };
    let mut s = UnixStream::connect(socket).map_err(io("connect to the VMM API at"))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(io("configure"))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut sent = 0;
    if let Some(fd) = fd {
        let fds = [fd.as_raw_fd()];
        let rights = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        sent = nix::sys::socket::sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(req.as_bytes())],
            &rights,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| io("pass a file descriptor to")(e.into()))?;
    }
    s.write_all(&req.as_bytes()[sent..])
        .map_err(io("write to"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(io("read from"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| SandboxError::Api(format!("malformed response {head:?}")))?;
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::testutil::TempDir;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    #[test]
    fn vm_json_matches_the_vmm_contract() {
        let cfg = VmJson {
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "moat.port=1024".into(),
            vcpus: 2,
            memory_mib: 512,
            serial: SerialJson::File("/run/moat/x/console.log".into()),
            block: vec![
                BlockJson {
                    id: "b0".into(),
                    path: Some("/l.erofs".into()),
                    read_only: true,
                    serial: "b0".into(),
                },
                BlockJson {
                    id: "b1".into(),
                    path: None,
                    read_only: false,
                    serial: "b1".into(),
                },
            ],
            net: vec![],
            vsock: VsockJson {
                guest_cid: 3,
                uds_path: "/run/moat/x/vsock.sock".into(),
            },
            rng: true,
            api_socket: "/run/moat/x/api.sock".into(),
            seccomp: true,
            jail: None,
        };
        let v: serde_json::Value = serde_json::to_value(&cfg).unwrap();
        assert_eq!(v["serial"]["file"], "/run/moat/x/console.log");
        assert_eq!(v["block"][0]["path"], "/l.erofs");
        assert!(v["block"][1].get("path").is_none());
        assert_eq!(v["vsock"]["uds_path"], "/run/moat/x/vsock.sock");
        assert!(v.get("net").is_none());
    }

    #[test]
    fn api_client_speaks_http() {
        let t = TempDir::new("api");
        let sock = t.path().join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            s.write_all(
                b"HTTP/1.1 409 Conflict\r\nContent-Length: 22\r\n\r\n{\"error\": \"not paused\"}",
            )
            .unwrap();
            req
        });
        let (code, body) = api_request(&sock, "PUT", "/vm/resume", "", None).unwrap();
        assert_eq!(code, 409);
        assert!(body.contains("not paused"));
        let req = server.join().unwrap();
        assert!(req.starts_with("PUT /vm/resume HTTP/1.1\r\n"), "{req}");
    }

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
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap();
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
