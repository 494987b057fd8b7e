//! Shared helpers of the moat-vmm integration tests: building the test guest
//! (vmm/test-guests), running moat-vmm with a timeout, temporary
//! directories, network namespaces with a tap, and raw Ethernet sockets.
//!
//! Each test binary uses a subset of these.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "../../src/devices/virtio/net/packet_socket.rs"]
mod packet_socket;
use packet_socket::bind_packet_socket;

pub const VMM: &str = env!("CARGO_BIN_EXE_moat-vmm");
/// Longest a VM may run in a test before it is killed and the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Guest memory for the test guest: it needs well under 1 MiB.
pub const GUEST_MEMORY_MIB: &str = "32";

/// True if moat-vmm can use KVM here; otherwise says loudly that `test` is
/// skipped (an open that fails is as good as a missing device).
pub fn kvm_usable(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            eprintln!("\n*** SKIPPED: {test} because /dev/kvm is missing or unusable ({e}) ***\n");
            false
        }
    }
}

/// True if we may create network namespaces and taps; else says loudly
/// that `test` is skipped.
pub fn netns_usable(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !ip || !Path::new("/dev/net/tun").exists() {
        eprintln!(
            "\n*** SKIPPED: {test} because it needs root, iproute2 and /dev/net/tun \
             (root={root}, ip={ip}) ***\n"
        );
        return false;
    }
    true
}

/// Builds the test guest once per test binary and returns its path. Test
/// binaries may run concurrently (`cargo test` in two shells), so the build
/// directory is locked while `make` runs.
pub fn guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-guests");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-guests");
        std::fs::create_dir_all(&out).unwrap();
        let lock = File::create(out.join(".lock")).unwrap();
        // SAFETY: flock on an fd we own; released when `lock` is closed.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let res = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&src)
            .arg(format!("O={}", out.display()))
            .output()
            .expect("cannot run make (the test guest needs make and gcc)");
        assert!(
            res.status.success(),
            "building the test guest failed:\n{}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        out.join("moat-test-guest")
    })
}

// Not every test binary uses it.
#[allow(unused_imports)]
pub use moat_testutil::TempDir;

/// `moat-vmm --kernel <test guest> --memory-mib 32 --cmdline "moat.test=<test> <extra>"`;
/// callers add device flags.
pub fn guest_command(test: &str, extra_cmdline: &str) -> Command {
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(guest())
        .args(["--memory-mib", GUEST_MEMORY_MIB])
        .arg("--cmdline")
        .arg(format!("moat.test={test} {extra_cmdline}").trim_end());
    cmd
}

/// How a moat-vmm run ended.
#[derive(Debug)]
pub struct Exit {
    pub code: Option<i32>,
    /// How the process ended, in words (shows a killing signal).
    pub status: String,
    /// The guest's serial console (moat-vmm's stdout by default).
    pub stdout: String,
    /// moat-vmm's log.
    pub stderr: String,
}

impl Exit {
    fn describe(&self) -> String {
        format!(
            "{} (exit code {:?})\n--- stdout (serial) ---\n{}\n--- stderr (log) ---\n{}",
            self.status, self.code, self.stdout, self.stderr
        )
    }

    pub fn assert_code(&self, want: i32) {
        assert_eq!(
            self.code,
            Some(want),
            "moat-vmm should exit {want}:\n{}",
            self.describe()
        );
    }

    /// The guest ran its check to the end without a failure and reset the
    /// machine, so moat-vmm exited 0.
    pub fn assert_guest_ok(&self) {
        assert!(
            !self.stdout.contains("moat-test: FAIL"),
            "the guest reported a failure:\n{}",
            self.describe()
        );
        assert!(
            self.stdout.contains("moat-test: done"),
            "the guest did not finish its check:\n{}",
            self.describe()
        );
        self.assert_code(0);
    }

    /// Asserts that the serial output has a line equal to `moat-test: <line>`.
    pub fn assert_serial_line(&self, line: &str) {
        let want = format!("moat-test: {line}");
        assert!(
            self.stdout.lines().any(|l| l == want),
            "no serial line {want:?}:\n{}",
            self.describe()
        );
    }

    /// The text after `moat-test: <prefix>` on the first such line.
    pub fn serial_value(&self, prefix: &str) -> String {
        let want = format!("moat-test: {prefix}");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&want))
            .unwrap_or_else(|| panic!("no serial line starting {want:?}:\n{}", self.describe()))
            .to_string()
    }

    /// A configuration error: exit code 1, the error line on stderr
    /// containing `needle`, and no guest output.
    pub fn assert_setup_error(&self, needle: &str) {
        self.assert_code(1);
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("moat-vmm: error:"))
            .unwrap_or_else(|| panic!("no \"moat-vmm: error:\" line:\n{}", self.describe()));
        assert!(
            line.contains(needle),
            "the error line should mention {needle:?}:\n{}",
            self.describe()
        );
        assert!(
            !self.stdout.contains("moat-test:"),
            "guest code ran despite the error:\n{}",
            self.describe()
        );
    }
}

/// A running moat-vmm whose stdout and stderr are collected by threads.
pub struct Vm {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    exited: bool,
}

fn collect<R: Read + Send + 'static>(
    pipe: R,
    into: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).into_owned();
            into.lock().unwrap().push_str(&line);
            if let Some(tx) = &lines {
                let _ = tx.send(line.trim_end_matches('\n').to_string());
            }
            buf.clear();
        }
    })
}

impl Vm {
    pub fn spawn(mut cmd: Command) -> Vm {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone(), Some(tx)),
            collect(child.stderr.take().unwrap(), stderr.clone(), None),
        ];
        Vm {
            child,
            lines,
            stdout,
            stderr,
            readers,
            exited: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn snapshot(&self) -> String {
        format!(
            "--- stdout (serial) so far ---\n{}\n--- stderr (log) so far ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for a serial line containing `needle` and returns it; kills
    /// the VM and fails the test if none comes within `timeout`.
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.kill();
                    panic!(
                        "no serial line with {needle:?} within {timeout:?}\n{}",
                        self.snapshot()
                    );
                }
            }
        }
    }

    /// One control API request; if it fails, fails the test with what
    /// became of moat-vmm (a seccomp kill shows as SIGSYS, for example).
    pub fn api(&mut self, socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
        self.api_passing(socket, method, path, body, None)
    }

    /// [`Vm::api`], passing `fd` along with the request (SCM_RIGHTS).
    pub fn api_passing(
        &mut self,
        socket: &Path,
        method: &str,
        path: &str,
        body: &str,
        fd: Option<&File>,
    ) -> (u16, String) {
        match api_passing(socket, method, path, body, fd) {
            Ok(r) => r,
            Err(e) => {
                std::thread::sleep(Duration::from_millis(300));
                let status = match self.child.try_wait() {
                    Ok(Some(s)) => format!("moat-vmm ended: {s}"),
                    _ => "moat-vmm still runs".to_string(),
                };
                let _ = self.child.kill();
                panic!(
                    "API request {method} {path} failed: {e}; {status}\n{}",
                    self.snapshot()
                );
            }
        }
    }

    /// Waits for moat-vmm to exit; kills it and fails after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Exit {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.exited = true;
                panic!(
                    "moat-vmm did not exit within {timeout:?}; killed it\n{}",
                    self.snapshot()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.exited = true;
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        Exit {
            code: status.code(),
            status: status.to_string(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A failing test must not leave a VM running.
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `cmd` to its end (at most [`TIMEOUT`]).
pub fn run(cmd: Command) -> Exit {
    Vm::spawn(cmd).wait(TIMEOUT)
}

/// Runs the test guest's check `test` with extra moat-vmm flags.
pub fn run_guest(test: &str, flags: &[&str]) -> Exit {
    let mut cmd = guest_command(test, "");
    cmd.args(flags);
    run(cmd)
}

/// Byte `i` of sector `sector` of every disk image the tests create; the
/// guest checks it (host_pattern in test-guests/blk.c).
pub fn host_pattern(sector: u64, i: u64) -> u8 {
    (sector.wrapping_mul(31) + i * 7 + 0x5a) as u8
}

/// What the guest writes to sectors 2..6 of a writable disk (guest_pattern
/// in test-guests/blk.c).
pub fn guest_pattern(sector: u64, i: u64) -> u8 {
    (sector * 13 + i * 3 + 0xa5) as u8
}

/// A disk image of `sectors` 512-byte sectors filled with [`host_pattern`].
pub fn make_image(path: &Path, sectors: u64) {
    let data: Vec<u8> = (0..sectors * 512)
        .map(|o| host_pattern(o / 512, o % 512))
        .collect();
    std::fs::write(path, data).unwrap();
}

/// One request to the control API; returns (status, body).
pub fn api(socket: &Path, method: &str, path: &str, body: &str) -> io::Result<(u16, String)> {
    api_passing(socket, method, path, body, None)
}

/// [`api`], passing `fd` along with the request's bytes (SCM_RIGHTS),
/// through the client every caller of moat-vmm uses.
pub fn api_passing(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
    fd: Option<&File>,
) -> io::Result<(u16, String)> {
    let client = moat_vmm_api::ApiClient::new(socket).with_timeout(Duration::from_secs(30));
    let r = client
        .request(method, path, body, fd.map(|f| f.as_fd()))
        .map_err(io::Error::other)?;
    Ok((r.status, r.body))
}

/// A network namespace with a tap device in it, deleted on drop.
pub struct Netns {
    pub name: String,
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("moat-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &str) {
        run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "ip"])
                .args(args.split_whitespace()),
        );
    }

    /// Adds a persistent tap, up (it gets a carrier once moat-vmm opens it).
    pub fn add_tap(&self, tap: &str) {
        self.ip(&format!("tuntap add dev {tap} mode tap"));
        self.ip(&format!("link set {tap} up"));
    }

    /// `program` run inside the namespace (`ip netns exec` execs it, so the
    /// child is the program itself and can be killed directly).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a thread that has joined the namespace; sockets created
    /// there stay in the namespace wherever they are used later.
    pub fn run_inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace fd we own; it only changes this
            // thread's network namespace, and the thread ends after `f`.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An AF_PACKET raw socket bound to one interface: sees every frame that
/// crosses it and sends frames out of it.
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub fn bind(ifname: &str) -> io::Result<PacketSocket> {
        let sock = PacketSocket(bind_packet_socket(ifname)?);
        let fd = sock.0.as_raw_fd();
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    /// The next frame, or None after the socket's 200 ms receive timeout.
    pub fn recv(&self) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is readable for its whole length.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        assert_eq!(n as usize, frame.len(), "short packet send");
        Ok(())
    }
}
