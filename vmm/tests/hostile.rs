//! A hostile guest (test-guests/hostile.c) attacks every device in rounds:
//! corrupt avail rings, descriptor chains that loop, reset storms, i8042 and console floods. moat-vmm
//! must keep answering its API, keep its memory and log bounded, and stop
//! cleanly when told to.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `GET /vm` answers 200 within a second.
fn api_answers(vm: &mut Vm, sock: &Path) {
    let start = Instant::now();
    let (code, body) = vm.api(sock, "GET", "/vm", "");
    assert_eq!(code, 200, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the API took {:?}",
        start.elapsed()
    );
}

#[test]
fn hostile_guest_leaves_the_vmm_responsive_and_bounded() {
    if !kvm_usable("hostile_guest_leaves_the_vmm_responsive_and_bounded") {
        return;
    }
    let dir = TempDir::new("hostile");
    let sock = dir.join("api.sock");
    let vsock = dir.join("v.sock");
    let mut cmd = guest_command("hostile", "");
    cmd.args(["--block", "id=spare", "--rng", "--api-socket"])
        .arg(&sock)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", vsock.display()));
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("moat-test: hostile round 1 ok", TIMEOUT);
    let rss_after_one = rss_kib(vm.pid());
    // The attacks go on while the API is asked.
    for _ in 0..10 {
        api_answers(&mut vm, &sock);
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.wait_for_serial("moat-test: hostile round 3 ok", TIMEOUT);
    api_answers(&mut vm, &sock);
    let rss_after_three = rss_kib(vm.pid());
    assert!(
        rss_after_three < rss_after_one + 8 * 1024,
        "moat-vmm grew from {rss_after_one} KiB to {rss_after_three} KiB"
    );

    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let exit = vm.wait(Duration::from_secs(10));
    exit.assert_code(0);
    assert!(!exit.stdout.contains("moat-test: FAIL"), "{exit:?}");
    // Every device needed a reset at least three times, each time logged
    // at most BURST times per window.
    let ring_errors = exit.stderr.matches("Corrupt avail ring").count();
    assert!(ring_errors >= 1, "{}", exit.stderr);
    let chain_errors = exit.stderr.matches("loops or does not end").count();
    assert!(chain_errors >= 1, "{}", exit.stderr);
    assert!(
        exit.stderr.len() < 16 * 1024,
        "log of {} bytes:\n{}",
        exit.stderr.len(),
        exit.stderr
    );
    assert_eq!(dir.entries(), Vec::<String>::new(), "left behind");
}

#[test]
fn console_and_log_files_stay_under_their_cap() {
    if !kvm_usable("console_and_log_files_stay_under_their_cap") {
        return;
    }
    const CAP: u64 = 4096;
    let dir = TempDir::new("cap");
    let console = dir.join("console.log");
    let log = dir.join("vmm.log");
    let mut cmd = guest_command("hostile", "");
    cmd.args(["--rng", "--log-max-bytes", &CAP.to_string(), "--serial"])
        .arg(format!("file:{}", console.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    // Each round prints about 6 KiB: by round 3 the console rotated twice.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(text.len() as u64 <= CAP, "console of {} bytes", text.len());
        if text.contains("moat-test: hostile round 3 ok") {
            // The newest lines are kept, from a line start.
            assert!(text.starts_with("moat-test: "), "{text:.80}");
            assert!(!text.contains("guest started"), "never rotated");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no round 3 on the console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.len() as u64 <= CAP, "{log_text}");
    assert!(log_text.contains("VM stopped after"), "{log_text}");
}
