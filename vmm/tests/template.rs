//! VM templates with the real guest kernel: boot Linux once, save it with
//! `PUT /vm/snapshot`, start two VMs from the file (`--restore`) and talk
//! to each guest over vsock, host to guest, as the shim talks to the
//! agent. The guest's listener was made before the save; each restored VM
//! answers through its own VMM and socket, and its timers fire. A VM of
//! another shape is refused before any guest code runs.
//!
//! Needs MOAT_KERNEL (scripts/test.sh sets it), /dev/kvm, gcc,
//! busybox-static and cpio.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use moat_testutil::TempDir;
use moat_vmm_api::ApiClient;

#[path = "linux-guest/initramfs.rs"]
mod initramfs;

const VMM: &str = env!("CARGO_BIN_EXE_moat-vmm");
const PORT: u32 = 1234;

fn skip(why: &str) {
    let line = "=".repeat(70);
    eprintln!("\n{line}\nSKIPPED template test: {why}\n{line}\n");
}

/// One moat-vmm of the test, killed if the test fails.
struct Vmm {
    name: &'static str,
    child: Child,
    uds: PathBuf,
    api: PathBuf,
    serial: PathBuf,
}

impl Vmm {
    /// Starts a VM of the test's one shape in `dir`, from `template` if given.
    fn start(
        dir: &Path,
        name: &'static str,
        kernel: &Path,
        initrd: &Path,
        memory: u32,
        template: Option<&Path>,
    ) -> Vmm {
        let uds = dir.join(format!("{name}.vsock"));
        let api = dir.join(format!("{name}.api"));
        let serial = dir.join(format!("{name}.console"));
        let mut cmd = Command::new(VMM);
        cmd.arg("--kernel")
            .arg(kernel)
            .arg("--initramfs")
            .arg(initrd)
            .args(["--memory-mib", &memory.to_string(), "--vcpus", "1"])
            .args(["--cmdline", "panic=1"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--vsock")
            .arg(format!("cid=3,uds={}", uds.display()))
            .arg("--rng")
            .arg("--api-socket")
            .arg(&api)
            .stderr(File::create(dir.join(format!("{name}.log"))).unwrap());
        if let Some(t) = template {
            cmd.arg("--restore").arg(t);
        }
        let child = cmd.spawn().unwrap();
        Vmm {
            name,
            child,
            uds,
            api,
            serial,
        }
    }

    /// Sends `line` to the guest's port and returns its answer; retries
    /// until `within` has passed (the guest may not listen yet).
    fn ask(&mut self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(answer) = ask_once(&self.uds, line) {
                return answer;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{}: moat-vmm ended with {status}\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no answer in {within:?}\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        let log = self.serial.with_extension("log");
        format!(
            "--- console ---\n{}\n--- moat-vmm ---\n{}",
            std::fs::read_to_string(&self.serial).unwrap_or_default(),
            std::fs::read_to_string(log).unwrap_or_default()
        )
    }

    /// Stops moat-vmm with SIGTERM and checks it left no socket behind.
    fn stop(mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{}: moat-vmm exit {status}\n{}",
            self.name,
            self.logs()
        );
        assert!(
            !self.uds.exists() && !self.api.exists(),
            "{}: sockets left behind",
            self.name
        );
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One exchange over hybrid vsock: CONNECT, then a line each way.
fn ask_once(uds: &Path, line: &str) -> Option<String> {
    let stream = UnixStream::connect(uds).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    writeln!(&stream, "CONNECT {PORT}").ok()?;
    let mut ok = String::new();
    reader.read_line(&mut ok).ok()?;
    if !ok.starts_with("OK ") {
        return None;
    }
    writeln!(&stream, "{line}").ok()?;
    let mut answer = String::new();
    reader.read_line(&mut answer).ok()?;
    (!answer.is_empty()).then(|| answer.trim().to_string())
}

#[test]
fn a_saved_linux_vm_starts_twice_without_a_boot() {
    let Some(kernel) = std::env::var_os("MOAT_KERNEL").map(PathBuf::from) else {
        return skip("MOAT_KERNEL is not set (scripts/test.sh builds the kernel and sets it)");
    };
    if File::open("/dev/kvm").is_err() {
        return skip("/dev/kvm cannot be opened");
    }
    let tmp = TempDir::new("template");
    let dir = tmp.path();
    let initrd = initramfs::build(dir, "template-init.sh");
    let template = dir.join("vm.template");

    let booted = Instant::now();
    let mut original = Vmm::start(dir, "original", &kernel, &initrd, 128, None);
    let first = original.ask("boot", Duration::from_secs(240));
    assert!(first.starts_with("echo boot rand="), "{first}");
    let boot = booted.elapsed();
    let client = ApiClient::new(&original.api);
    client.pause().unwrap();
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&template)
        .unwrap();
    let saving = Instant::now();
    client.snapshot(file.as_fd()).unwrap();
    let save = saving.elapsed();
    // A saved VM cannot go on: its devices are stopped.
    assert!(client.resume().is_err());
    original.stop();
    let size = file.metadata().unwrap().len();
    // SAFETY: stat on a valid path into a zeroed struct.
    let allocated = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let path = std::ffi::CString::new(template.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(libc::stat(path.as_ptr(), &mut st), 0);
        st.st_blocks as u64 * 512
    };
    assert!(size >= 128 << 20, "the template holds all guest memory");
    assert!(
        allocated < size,
        "zero pages are holes ({allocated} of {size} bytes)"
    );

    // Another shape is refused before any guest code runs.
    let mut wrong = Vmm::start(dir, "wrong", &kernel, &initrd, 256, Some(&template));
    let status = wrong.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.join("wrong.log")).unwrap();
    assert!(
        log.contains("memory size differs from the template"),
        "{log}"
    );
    assert!(!wrong.uds.exists() && !wrong.api.exists());

    let mut answers = Vec::new();
    let mut restored = Vec::new();
    for name in ["first-copy", "second-copy"] {
        let started = Instant::now();
        let mut vm = Vmm::start(dir, name, &kernel, &initrd, 128, Some(&template));
        let answer = vm.ask(name, Duration::from_secs(60));
        eprintln!("{name}: answered after {:?}: {answer}", started.elapsed());
        assert!(
            answer.starts_with(&format!("echo {name} rand=")),
            "{answer}"
        );
        // The guest goes on serving, and its timers fire: a tickless guest
        // whose next timer interrupt was lost in the restore would sleep
        // until a device woke it.
        let asked = Instant::now();
        let slept = vm.ask("sleep", Duration::from_secs(30));
        assert!(slept.starts_with("echo sleep"), "{slept}");
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "a 200 ms sleep took {:?}",
            asked.elapsed()
        );
        answers.push(answer);
        restored.push(vm);
    }
    eprintln!("boot to first answer {boot:?}; save {save:?}; template {size} bytes, {allocated} allocated");
    for vm in restored {
        vm.stop();
    }
}
