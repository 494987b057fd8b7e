//! Bad configurations: moat-vmm must exit 1 with a clear `moat-vmm: error:`
//! line before any guest code runs, and leave nothing behind (each run
//! also asks for a vsock socket and an API socket in an empty directory,
//! which must stay empty).
//!
//! There is no flag to point moat-vmm at another KVM device, so "/dev/kvm
//! unusable" is not simulated here.

mod common;

use std::process::Command;

use common::*;

/// Runs moat-vmm with `args` plus a vsock and an API socket in a fresh
/// directory; checks the error and that the directory stays empty.
fn expect_error(dir: &TempDir, args: &[&str], needle: &str) {
    let mut cmd = Command::new(VMM);
    cmd.args(args)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", dir.join("v.sock").display()))
        .arg("--api-socket")
        .arg(dir.join("api.sock"));
    let exit = run(cmd);
    exit.assert_setup_error(needle);
    let left: Vec<String> = dir
        .entries()
        .into_iter()
        .filter(|e| e.ends_with(".sock") || e.contains(".sock_"))
        .collect();
    assert!(left.is_empty(), "left behind {left:?} after {args:?}");
}

fn guest_str() -> String {
    guest().display().to_string()
}

#[test]
fn no_kernel() {
    let dir = TempDir::new("cfg");
    expect_error(&dir, &["--memory-mib", "32"], "No kernel");
}

#[test]
fn missing_kernel_file() {
    let dir = TempDir::new("cfg");
    let k = dir.join("no-such-vmlinux").display().to_string();
    expect_error(&dir, &["--kernel", &k], "no-such-vmlinux");
}

#[test]
fn kernel_that_is_not_elf() {
    if !kvm_usable("kernel_that_is_not_elf") {
        return;
    }
    let dir = TempDir::new("cfg");
    let k = dir.join("script");
    std::fs::write(&k, "#!/bin/sh\necho I am not a kernel\n".repeat(200)).unwrap();
    let k = k.display().to_string();
    expect_error(&dir, &["--kernel", &k, "--memory-mib", "32"], "neither");
}

#[test]
fn memory_too_small() {
    let dir = TempDir::new("cfg");
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--memory-mib", "8"],
        "at least",
    );
}

#[test]
fn memory_larger_than_the_host() {
    let dir = TempDir::new("cfg");
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--memory-mib", "1073741824"],
        "host",
    );
}

#[test]
fn vcpus_out_of_range() {
    let dir = TempDir::new("cfg");
    for n in ["0", "33"] {
        expect_error(&dir, &["--kernel", &guest_str(), "--vcpus", n], "vcpus");
    }
    // 256 does not even fit the field; still a clean error.
    expect_error(&dir, &["--kernel", &guest_str(), "--vcpus", "256"], "vcpus");
}

#[test]
fn duplicate_device_ids() {
    let dir = TempDir::new("cfg");
    let img = dir.join("d.img");
    make_image(&img, 8);
    let b = format!("id=disk,path={}", img.display());
    expect_error(
        &dir,
        &[
            "--kernel",
            &guest_str(),
            "--block",
            &b,
            "--block",
            "id=disk",
        ],
        "used twice",
    );
    expect_error(
        &dir,
        &[
            "--kernel",
            &guest_str(),
            "--block",
            "id=x",
            "--net",
            "id=x,tap=mtap-none",
        ],
        "used twice",
    );
}

#[test]
fn unreadable_disk() {
    let dir = TempDir::new("cfg");
    let missing = format!("id=d0,path={}", dir.join("no-such.img").display());
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--block", &missing],
        "no-such.img",
    );
}

#[test]
fn nonexistent_tap() {
    let dir = TempDir::new("cfg");
    expect_error(
        &dir,
        &[
            "--kernel",
            &guest_str(),
            "--memory-mib",
            "32",
            "--net",
            "id=eth0,tap=moatnotap0",
        ],
        "moatnotap0",
    );
    // Checked without creating it: opening a tap by name can create one.
    let listed = Command::new("ip")
        .args(["link", "show", "moatnotap0"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(!listed, "moat-vmm created the tap it was asked to open");
}

#[test]
fn bad_flags_and_json() {
    let dir = TempDir::new("cfg");
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--frobnicate"],
        "frobnicate",
    );
    expect_error(&dir, &["--kernel", &guest_str(), "--vcpus", "two"], "two");
    let json = dir.join("vm.json");
    std::fs::write(&json, r#"{"kernel": "/k", "cpus": 2}"#).unwrap();
    let mut cmd = Command::new(VMM);
    cmd.arg("--config").arg(&json);
    run(cmd).assert_setup_error("vm.json");
    let mut cmd = Command::new(VMM);
    cmd.arg("--config").arg(dir.join("missing.json"));
    run(cmd).assert_setup_error("missing.json");
}

#[test]
fn invalid_vsock_cid() {
    let dir = TempDir::new("cfg");
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(guest())
        .arg("--vsock")
        .arg(format!("cid=2,uds={}", dir.join("v.sock").display()));
    run(cmd).assert_setup_error("reserved");
    assert!(dir.entries().is_empty());
}

#[test]
fn unusable_serial_outputs() {
    let dir = TempDir::new("cfg");
    let file = format!("file:{}", dir.join("no-dir/serial.log").display());
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--serial", &file],
        "no-dir/serial.log",
    );
    // Not open in moat-vmm (the test runner does not pass fds on).
    expect_error(
        &dir,
        &["--kernel", &guest_str(), "--serial", "fd:987"],
        "987",
    );
}

#[test]
fn log_cap_too_small() {
    let dir = TempDir::new("cfg");
    let mut cmd = Command::new(VMM);
    cmd.arg("--kernel")
        .arg(guest())
        .args(["--log-max-bytes", "100", "--serial"])
        .arg(format!("file:{}", dir.join("console.log").display()));
    run(cmd).assert_setup_error("log_max_bytes must be at least 4096, not 100");
    assert!(dir.entries().is_empty());
}
