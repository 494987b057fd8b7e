//! Boot and exit paths of moat-vmm with the test guest: serial console,
//! command line, i8042 reset, triple fault, boot timer, JSON config, SMP,
//! memory above the MMIO gap, signals and the control API.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn serial_prints_text_and_command_line() {
    if !kvm_usable("serial_prints_text_and_command_line") {
        return;
    }
    let exit = run(guest_command("serial", "user.word=42 last"));
    exit.assert_guest_ok();
    exit.assert_serial_line("guest started");
    exit.assert_serial_line("serial hello 0123456789 ~!@#$%^&*()_+ ABCxyz");
    let cmdline = exit.serial_value("cmdline: ");
    for word in ["console=ttyS0", "reboot=k"] {
        assert!(
            cmdline.split(' ').any(|w| w == word),
            "{word} missing from {cmdline:?}"
        );
    }
    // The user's words come last, so they can override the VMM's.
    assert!(
        cmdline.ends_with(" moat.test=serial user.word=42 last"),
        "{cmdline:?}"
    );
    // API.md: on a PVM host the VMM adds what the guest kernel needs there.
    let m = std::path::Path::new("/sys/module");
    let pvm =
        m.join("kvm_pvm").exists() && !m.join("kvm_intel").exists() && !m.join("kvm_amd").exists();
    let has = |w: &str| cmdline.split(' ').any(|x| x == w);
    assert_eq!(has("emul_compat") && has("quiet"), pvm, "{cmdline:?}");
    // No devices configured, so no virtio-mmio windows.
    assert!(!cmdline.contains("virtio_mmio"), "{cmdline:?}");
    exit.assert_serial_line("devices:");
}

#[test]
fn i8042_reset_exits_0() {
    if !kvm_usable("i8042_reset_exits_0") {
        return;
    }
    let start = Instant::now();
    let exit = run_guest("reboot", &[]);
    exit.assert_guest_ok();
    exit.assert_serial_line("rebooting through the i8042");
    // The guest waits 3 s after the reset write before it reports that the
    // reset did not happen; moat-vmm must be gone well before that.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn triple_fault_exits_3() {
    if !kvm_usable("triple_fault_exits_3") {
        return;
    }
    let exit = run_guest("triple", &[]);
    exit.assert_code(3);
    exit.assert_serial_line("triple fault next");
    assert!(!exit.stdout.contains("moat-test: done"), "{exit:?}");
}

#[test]
fn guest_panic_reset_exits_5_at_once() {
    if !kvm_usable("guest_panic_reset_exits_5_at_once") {
        return;
    }
    let start = Instant::now();
    let exit = run_guest("panicreset", &[]);
    exit.assert_code(5);
    exit.assert_serial_line("panic reset next");
    assert!(
        exit.stderr
            .contains("Guest kernel panicked and reset the machine"),
        "{exit:?}"
    );
    // The guest waits 3 s for the reset to take effect before it says
    // FAIL: the VMM stopped it well before.
    assert!(!exit.stdout.contains("FAIL"), "{exit:?}");
    assert!(start.elapsed() < Duration::from_secs(3), "{exit:?}");
    // An ordinary reboot is no panic.
    run_guest("reboot", &[]).assert_code(0);
}

/// Parses `Guest boot completed after N us` from the log.
fn boot_time_us(stderr: &str) -> Option<u64> {
    let rest = stderr.split("Guest boot completed after ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn boot_timer_write_is_logged() {
    if !kvm_usable("boot_timer_write_is_logged") {
        return;
    }
    let start = Instant::now();
    let exit = run_guest("boottimer", &[]);
    let wall = start.elapsed();
    exit.assert_guest_ok();
    exit.assert_serial_line("boot timer written");
    let us = boot_time_us(&exit.stderr)
        .unwrap_or_else(|| panic!("no boot time in the log:\n{}", exit.stderr));
    assert!(
        us > 0 && u128::from(us) < wall.as_micros(),
        "boot time {us} us, run took {wall:?}"
    );
}

#[test]
fn guest_without_boot_timer_write_logs_no_boot_time() {
    if !kvm_usable("guest_without_boot_timer_write_logs_no_boot_time") {
        return;
    }
    let exit = run_guest("reboot", &[]);
    exit.assert_guest_ok();
    assert_eq!(boot_time_us(&exit.stderr), None, "{}", exit.stderr);
}

#[test]
fn json_config_with_serial_to_a_file() {
    if !kvm_usable("json_config_with_serial_to_a_file") {
        return;
    }
    let dir = TempDir::new("json");
    let serial = dir.join("serial.log");
    let config = serde_json::json!({
        "kernel": guest(),
        "memory_mib": 32,
        "vcpus": 2,
        "cmdline": "moat.test=serial from.json",
        "serial": { "file": serial },
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = std::process::Command::new(VMM);
    cmd.arg("--config").arg(&path);
    let exit = run(cmd);
    exit.assert_code(0);
    assert!(
        !exit.stdout.contains("moat-test"),
        "serial went to stdout: {exit:?}"
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(
        text.contains("moat-test: serial hello 0123456789"),
        "{text:?}"
    );
    assert!(text.contains("moat.test=serial from.json\n"), "{text:?}");
    assert!(text.contains("moat-test: done"), "{text:?}");
}

#[test]
fn serial_off_discards_output() {
    if !kvm_usable("serial_off_discards_output") {
        return;
    }
    let exit = run_guest("serial", &["--serial", "off"]);
    exit.assert_code(0);
    assert_eq!(exit.stdout, "", "{exit:?}");
}

#[test]
fn several_vcpus_boot() {
    if !kvm_usable("several_vcpus_boot") {
        return;
    }
    // The boot vCPU runs the guest; the others wait for INIT/SIPI, which
    // never comes, and must not stop the VM.
    let exit = run_guest("serial", &["--vcpus", "4"]);
    exit.assert_guest_ok();
}

fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    kib / 1024
}

#[test]
fn memory_above_the_mmio_gap() {
    if !kvm_usable("memory_above_the_mmio_gap") {
        return;
    }
    // 4 GiB: RAM continues above 4 GiB past the 0xd0000000 MMIO hole. Only
    // touched pages cost host memory, but the size check needs the total.
    if host_memory_mib() < 4096 {
        eprintln!("\n*** SKIPPED: memory_above_the_mmio_gap because the host has < 4 GiB ***\n");
        return;
    }
    let mut cmd = guest_command("serial", "");
    cmd.args(["--memory-mib", "4096"]);
    let exit = run(cmd);
    exit.assert_guest_ok();
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_sockets() {
    if !kvm_usable("sigterm_stops_the_vm_and_removes_its_sockets") {
        return;
    }
    let dir = TempDir::new("sig");
    let sock = dir.join("api.sock");
    let vsock = dir.join("v.sock");
    let mut cmd = guest_command("halt", "");
    cmd.arg("--api-socket")
        .arg(&sock)
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", vsock.display()));
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("moat-test: halting", TIMEOUT);
    assert!(sock.exists() && vsock.exists(), "{:?}", dir.entries());
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(vm.pid(), libc::SIGTERM) }, 0);
    let exit = vm.wait(Duration::from_secs(20));
    exit.assert_code(0);
    assert_eq!(dir.entries(), Vec::<String>::new(), "left behind");
}

#[test]
fn api_reports_state_pauses_resumes_and_shuts_down() {
    if !kvm_usable("api_reports_state_pauses_resumes_and_shuts_down") {
        return;
    }
    let dir = TempDir::new("api");
    let sock = dir.join("api.sock");
    let mut cmd = guest_command("halt", "");
    cmd.arg("--api-socket").arg(&sock);
    let mut vm = Vm::spawn(cmd);
    // The halt guest writes the boot timer before it says so.
    vm.wait_for_serial("moat-test: halting", TIMEOUT);

    let state = |vm: &mut Vm, want: &str| {
        let (code, body) = vm.api(&sock, "GET", "/vm", "");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], want, "{body}");
        assert!(
            v["boot_time_us"].as_u64().is_some_and(|us| us > 0),
            "{body}"
        );
    };
    state(&mut vm, "Running");
    // No core file could hold guest memory.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vm.pid())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().skip(4).take(2).collect::<Vec<_>>(),
        ["0", "0"],
        "{core}"
    );
    // Every thread (main, vCPU, API, device workers) runs without any
    // capability, bounding set included.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap();
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(set))
                .unwrap_or_else(|| panic!("no {set} in {status}"));
            assert!(
                line.ends_with("0000000000000000"),
                "thread {:?} still has {line}",
                t.file_name()
            );
        }
    }
    assert_eq!(vm.api(&sock, "PUT", "/vm/pause", "").0, 200);
    state(&mut vm, "Paused");
    assert_eq!(vm.api(&sock, "PUT", "/vm/resume", "").0, 200);
    state(&mut vm, "Running");
    let (code, body) = vm.api(&sock, "GET", "/nope", "");
    assert_eq!(code, 404, "{body}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(),
        "{body}"
    );

    // The test guest has no keyboard driver: Ctrl-Alt-Del goes unanswered
    // and the VM is stopped hard after the timeout, with exit code 0.
    let (code, body) = vm.api(&sock, "PUT", "/vm/shutdown", r#"{"timeout_ms": 300}"#);
    assert_eq!(code, 200, "{body}");
    let exit = vm.wait(Duration::from_secs(20));
    exit.assert_code(0);
    assert!(!exit.stdout.contains("moat-test: FAIL"), "{exit:?}");
    assert_eq!(dir.entries(), Vec::<String>::new(), "left behind");
}

/// With `--jail`, every thread of moat-vmm runs as the jail's user and
/// group, without supplementary groups, in network, IPC and UTS namespaces
/// of its own. A block file put in through the API later is opened as that
/// user and only beneath the jail's paths: one it owns there is taken, a
/// root-only one is refused (but taken when passed open), and so is one it
/// owns elsewhere (Landlock).
#[test]
fn jail_runs_the_vmm_as_its_user_in_namespaces_of_its_own() {
    if !kvm_usable("jail_runs_the_vmm_as_its_user_in_namespaces_of_its_own") {
        return;
    }
    const JAIL: u32 = 65534;
    let dir = TempDir::new("jail");
    let elsewhere = TempDir::new("jail-out");
    let sock = dir.join("api.sock");
    let mut cmd = guest_command("halt", "");
    cmd.arg("--api-socket").arg(&sock).args([
        "--jail",
        &format!("{JAIL}:{JAIL}"),
        "--block",
        "id=spare",
    ]);
    cmd.arg("--jail-rw").arg(dir.path());
    let mut vm = Vm::spawn(cmd);
    vm.wait_for_serial("moat-test: halting", TIMEOUT);

    let tasks = std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap();
    for t in tasks.flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |name: &str| {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            line[name.len()..].split_whitespace().collect::<Vec<_>>()
        };
        let ids = [JAIL.to_string().as_str(); 4].join(" ");
        assert_eq!(field("Uid:").join(" "), ids, "{:?}", t.file_name());
        assert_eq!(field("Gid:").join(" "), ids, "{:?}", t.file_name());
        assert!(field("Groups:").is_empty(), "{:?}", t.file_name());
        assert_eq!(field("CapEff:"), ["0000000000000000"]);
    }
    for ns in ["net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{}/ns/{ns}", vm.pid())).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "moat-vmm shares our {ns} namespace");
    }

    let owned = dir.join("owned.img");
    make_image(&owned, 8);
    std::os::unix::fs::chown(&owned, Some(JAIL), Some(JAIL)).unwrap();
    let body = format!(r#"{{"path": "{}"}}"#, owned.display());
    let (code, text) = vm.api(&sock, "PUT", "/block/spare", &body);
    assert_eq!(code, 200, "{text}");
    let secret = dir.join("secret.img");
    make_image(&secret, 8);
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let body = format!(r#"{{"path": "{}"}}"#, secret.display());
    let (code, text) = vm.api(&sock, "PUT", "/block/spare", &body);
    assert_eq!(code, 400, "a root-only file was opened: {text}");
    assert!(text.contains("ermission denied"), "{text}");
    // Root may still hand it over open, as the shim does.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&secret)
        .unwrap();
    let (code, text) = vm.api_passing(&sock, "PUT", "/block/spare", "{}", Some(&file));
    assert_eq!(code, 200, "{text}");
    if landlock_available() {
        let outside = elsewhere.join("owned.img");
        make_image(&outside, 8);
        std::os::unix::fs::chown(&outside, Some(JAIL), Some(JAIL)).unwrap();
        let body = format!(r#"{{"path": "{}"}}"#, outside.display());
        let (code, text) = vm.api(&sock, "PUT", "/block/spare", &body);
        assert_eq!(
            code, 400,
            "a file outside the jail's paths was opened: {text}"
        );
        assert!(text.contains("ermission denied"), "{text}");
    } else {
        eprintln!(
            "!!! SKIPPED part of jail_runs_the_vmm_as_its_user_in_namespaces_of_its_own: \
             this kernel has no Landlock, so paths outside the jail stay reachable"
        );
    }

    let (code, body) = vm.api(&sock, "PUT", "/vm/shutdown", r#"{"timeout_ms": 300}"#);
    assert_eq!(code, 200, "{body}");
    vm.wait(Duration::from_secs(20)).assert_code(0);
}

/// A jailed moat-vmm started with a parent-death signal still gets it when
/// the thread that started it exits: the jail's uid switch clears the
/// setting, and moat-vmm sets it again (the shim relies on it so that its
/// VMMs do not outlive it).
#[test]
fn a_jailed_vmm_keeps_its_parent_death_signal() {
    if !kvm_usable("a_jailed_vmm_keeps_its_parent_death_signal") {
        return;
    }
    const JAIL: u32 = 65534;
    let dir = TempDir::new("pdeath");
    let sock = dir.join("api.sock");
    let parent = std::thread::spawn(move || {
        let mut cmd = guest_command("halt", "");
        cmd.arg("--api-socket").arg(&sock).args([
            "--jail",
            &format!("{JAIL}:{JAIL}"),
            "--jail-no-landlock",
        ]);
        // SAFETY: prctl with integer arguments only, between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut vm = Vm::spawn(cmd);
        vm.wait_for_serial("moat-test: halting", TIMEOUT);
        vm
    });
    // The starting thread has exited once joined.
    let vm = parent.join().unwrap();
    let exit = vm.wait(Duration::from_secs(20));
    assert!(exit.status.contains("SIGKILL"), "{exit:?}");
}

/// Whether this kernel enforces Landlock (its ABI version query answers).
fn landlock_available() -> bool {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_long = 1;
    // SAFETY: the version query takes no ruleset and writes no memory.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    abi >= 1
}
