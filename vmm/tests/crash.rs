//! moat-vmm's crash trail: a panic leaves its message and its return
//! addresses on stderr (the shim's vmm.log), also on a thread under its
//! seccomp filter, which kills the process when the hook goes on to open
//! the executable to resolve symbols. The crash point `MOAT_CRASH_AT`
//! exists in debug builds only.

mod common;

use common::*;

#[test]
fn panic_under_seccomp_reaches_the_log() {
    if !kvm_usable("panic_under_seccomp_reaches_the_log") {
        return;
    }
    let mut cmd = guest_command("reboot", "");
    cmd.env("MOAT_CRASH_AT", "vmm-main-filtered");
    let exit = run(cmd);
    assert_ne!(exit.code, Some(0), "{exit:?}");
    let log = &exit.stderr;
    assert!(
        log.contains("moat-vmm: thread 'main' panicked at vmm/src/vmm.rs:"),
        "{log}"
    );
    assert!(
        log.contains("crash point vmm-main-filtered reached"),
        "{log}"
    );
    let raw = log
        .split_once("moat-vmm: return addresses (addr2line -f -C -e FILE ADDR):\n")
        .expect("a list of return addresses")
        .1;
    let in_exe = raw.lines().filter(|l| l.ends_with(" exe")).count();
    assert!(in_exe > 3, "{log}");
}
