//! The shim daemon's crash trail: a panic's message and backtrace go into
//! the bundle's `log` FIFO, which containerd copies into its own log. Here
//! the test reads the FIFO in containerd's place. The crash point
//! `MOAT_CRASH_AT` exists in debug builds only.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};

use moat_testutil::TempDir;

#[test]
fn daemon_panic_reaches_containerds_log() {
    let bundle = TempDir::new("crash");
    let fifo = bundle.join("log");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Open for reading first, as containerd does, so the daemon's open
    // does not block.
    let mut log = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let socket = bundle.join("s.sock");
    let status = Command::new(env!("CARGO_BIN_EXE_containerd-shim-moat-v1"))
        .current_dir(bundle.path())
        .args([
            "-namespace",
            "crash",
            "-id",
            "c1",
            "-address",
            "/nonexistent",
        ])
        .arg("-socket")
        .arg(&socket)
        .env("MOAT_CRASH_AT", "shim-serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success());
    let mut text = Vec::new();
    // The daemon is gone, so the FIFO has no writer left: read to its end.
    let _ = log.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("containerd-shim-moat-v1: thread 'main' panicked at shim/src/main.rs:"),
        "{text}"
    );
    assert!(text.contains("crash point shim-serve reached"), "{text}");
    assert!(
        text.contains("containerd-shim-moat-v1: backtrace:\n"),
        "{text}"
    );
    assert!(text.contains("containerd_shim_moat_v1::serve"), "{text}");
}
