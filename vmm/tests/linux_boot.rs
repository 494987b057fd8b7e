//! Boots the real guest kernel from kernel-config/ in moat-vmm, to a small
//! busybox init and back to exit 0, using on the way: the serial console,
//! a virtio-blk disk (read, write, serial), a tap in a network namespace
//! (ping both ways) and a vsock stream to the host. (The boot timer is
//! checked with the freestanding guests: this kernel has no ioperm for
//! user space to write the port with.)
//!
//! Needs MOAT_KERNEL (scripts/test.sh sets it from kernel-config/build.sh),
//! /dev/kvm, root, gcc, busybox-static, cpio and iproute2.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moat_testutil::TempDir;

#[path = "linux-guest/initramfs.rs"]
mod initramfs;

fn skip(why: &str) {
    eprintln!("\n*** SKIPPED linux_boot: {why} ***\n");
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Netns(name.into());
        let ip = |args: &str| {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", name, "ip"])
                .args(args.split_whitespace());
            run(&mut c);
        };
        ip("tuntap add dev mtap0 mode tap");
        ip("addr add 10.200.0.1/24 dev mtap0");
        ip("link set mtap0 up");
        ip("link set lo up");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn linux_guest_boots_and_uses_every_device() {
    let Some(kernel) = std::env::var_os("MOAT_KERNEL").map(PathBuf::from) else {
        return skip("MOAT_KERNEL is not set (scripts/test.sh builds the kernel and sets it)");
    };
    if !Path::new("/dev/kvm").exists() {
        return skip("/dev/kvm is missing");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root for taps and network namespaces");
    }
    let tmp = TempDir::new("linux-boot");
    let dir = tmp.path();
    let initramfs = initramfs::build(dir, "init.sh");

    let disk = dir.join("disk.img");
    let mut image = vec![0u8; 1 << 20];
    image[..15].copy_from_slice(b"MOAT-DISK-MAGIC");
    std::fs::write(&disk, &image).unwrap();

    let uds = dir.join("vsock.sock");
    let host_port = UnixListener::bind(format!("{}_1234", uds.display())).unwrap();
    let echo = std::thread::spawn(move || {
        let (stream, _) = host_port.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        writeln!(&stream, "host-echo {}", line.trim()).unwrap();
        line
    });

    let ns = Netns::new(&format!("moat-lb-{}", std::process::id()));
    let serial = dir.join("serial.log");
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_moat-vmm")])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--memory-mib", "256", "--vcpus", "1"])
        // A guest kernel panic reboots at once, so a broken guest fails fast.
        .args(["--cmdline", "panic=1"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--block")
        .arg(format!(
            "id=disk0,path={},serial=moat-test-disk",
            disk.display()
        ))
        .args(["--net", "id=eth0,tap=mtap0,mac=02:00:00:00:00:42"])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--rng")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "guest did not finish in 240 s; serial:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let console = std::fs::read_to_string(&serial).unwrap();
    eprintln!("--- serial ---\n{console}\n--- moat-vmm ---\n{stderr}");

    assert_eq!(status.code(), Some(0), "moat-vmm exit status");
    for want in [
        "linux-test: init running",
        "linux-test: disk says MOAT-DISK-MAGIC",
        "linux-test: disk serial moat-test-disk",
        "linux-test: disk written",
        "linux-test: mac 02:00:00:00:00:42",
        "linux-test: ping ok",
        "vsock reply: host-echo hello-from-guest",
        "linux-test: done",
    ] {
        assert!(console.contains(want), "serial lacks {want:?}");
    }
    assert_eq!(echo.join().unwrap().trim(), "hello-from-guest");
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(&image[512..528], b"GUEST-WROTE-THIS");
    assert!(!uds.exists(), "vsock socket left behind");
    drop(ns);
}
