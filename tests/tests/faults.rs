//! Faults end to end through a private containerd: a moat-vmm killed with
//! SIGKILL, a shim killed with SIGKILL or SIGTERM, a guest kernel panic, a
//! containerd restart and a full layer cache. Each case checks the task's
//! status and then that nothing is left (`assert_no_leaks`: processes,
//! mounts, loop devices, taps, network namespaces, cgroups, state, upper
//! and cache files, shim sockets).
//!
//! Every guest boot costs 40-65 s of emulated guest kernel here, so cases
//! share VMs where one fault does not end the VM another needs: the
//! containerd restart and the moat-vmm kill run in one pod (the restart
//! first), and the two shim kills run side by side in two pods. The full
//! cache fails before any VM boots. Four VMs in all.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use moat_tests::*;

/// A private containerd with the agent's log on the guest console (for a
/// failed test's diagnostics). The timeouts are long: on this project's
/// 2-core machines several VMs booting at once take minutes each.
fn setup(tag: &str) -> Option<Arc<Containerd>> {
    setup_booting(
        tag,
        "boot_timeout_secs = 800\nagent_timeout_secs = 800\n\
         kernel_cmdline = \"moat.verbose\"",
    )
    .map(Arc::new)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The STATUS column of `ctr tasks ls` for `id`; None when it is not listed.
fn task_status(c: &Containerd, id: &str) -> Option<String> {
    let ls = stdout(&c.ctr(&["tasks", "ls"]));
    ls.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
    })
}

/// Waits until `ready` holds for `id`'s status (None: not listed).
fn wait_for(c: &Containerd, id: &str, what: &str, ready: impl Fn(Option<&str>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(500);
    loop {
        let status = task_status(c, id);
        if ready(status.as_deref()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {what} (is {status:?})\n{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    wait_for(c, id, want, |s| s == Some(want));
}

/// `ctr run -d` of a long-lived container, with more run flags.
fn run_detached(c: &Containerd, flags: &[&str], id: &str, cmd: &[&str]) {
    let mut all = vec!["-d"];
    all.extend_from_slice(flags);
    let o = c.run(&all, id, cmd);
    assert!(o.status.success(), "{}\n{}", text(&o), c.diagnostics());
}

/// A container that runs until killed (`sleep & wait`: every fork costs
/// the emulated guest kernel most of a second).
const SLEEPER: &[&str] = &["sh", "-c", "sleep 100000 & wait"];

/// PIDs of this containerd's processes whose executable names `what`.
fn pids_of(c: &Containerd, what: &str) -> Vec<i32> {
    pids_with_env_or_arg(&c.dir.to_string_lossy())
        .iter()
        .filter(|p| p.contains(what))
        .filter_map(|p| p.split(' ').next()?.parse().ok())
        .collect()
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a pid of this test's containerd's shim or VMM.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
}

fn elapsed(start: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// One pod of two containers. containerd restarts while they run: both are
/// still listed as running, and one can be exec'd into and killed. Then
/// its moat-vmm is killed with SIGKILL: the other container shows STOPPED
/// with a non-zero exit, and deleting it leaves nothing behind.
#[test]
fn containerd_restart_then_a_killed_vmm() {
    let Some(c) = setup("f-restart") else { return };
    let _stop = StopOnDrop(c.clone());
    let t = Instant::now();
    let pod = format!("{SANDBOX_ID_ANNOTATION}=pod-r");
    let in_pod = ["--annotation", pod.as_str()];
    run_detached(&c, &in_pod, "r1", SLEEPER);
    wait_status(&c, "r1", "RUNNING");
    run_detached(&c, &in_pod, "r2", SLEEPER);
    wait_status(&c, "r2", "RUNNING");
    elapsed(t, "r1 and r2 run");

    c.restart();
    elapsed(t, "containerd restarted");
    for id in ["r1", "r2"] {
        assert_eq!(task_status(&c, id).as_deref(), Some("RUNNING"), "{id}");
    }
    let o = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "r1",
        "sh",
        "-c",
        "echo still-here",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o),
        c.diagnostics()
    );
    assert_eq!(stdout(&o), "still-here\n", "{}", text(&o));
    let o = c.ctr(&["tasks", "kill", "-s", "SIGKILL", "r1"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_status(&c, "r1", "STOPPED");
    assert_eq!(c.delete_task("r1").unwrap(), Some(137));
    elapsed(t, "r1 exec'd and killed after the restart");

    let vmms = pids_of(&c, "moat-vmm");
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    signal(vmms[0], libc::SIGKILL);
    wait_status(&c, "r2", "STOPPED");
    let code = c.delete_task("r2").unwrap();
    assert!(
        code.is_some_and(|c| c != 0),
        "a container whose VM was killed exited {code:?}"
    );
    elapsed(t, "r2 stopped with its VM");
    c.assert_no_leaks();
}

/// Two pods, one VM each; one shim is killed with SIGKILL, the other
/// stopped with SIGTERM. Neither VM outlives its shim; containerd's
/// `shim delete` cleans up the rest, and the tasks are gone or stopped.
#[test]
fn a_dead_shim_takes_its_vm_along() {
    let Some(c) = setup("f-shim") else { return };
    let _stop = StopOnDrop(c.clone());
    let t = Instant::now();
    let pods: Vec<thread::JoinHandle<()>> = ["s-kill", "s-term"]
        .into_iter()
        .map(|id| {
            let c = c.clone();
            thread::spawn(move || {
                run_detached(&c, &[], id, SLEEPER);
                wait_status(&c, id, "RUNNING");
            })
        })
        .collect();
    for p in pods {
        p.join().unwrap();
    }
    elapsed(t, "both pods run");
    let shims = pids_of(&c, "containerd-shim-moat");
    let vmms = pids_of(&c, "moat-vmm");
    assert_eq!((shims.len(), vmms.len()), (2, 2), "{shims:?} {vmms:?}");
    // Which shim serves which pod: the sandbox dir in its VMM's command line.
    for (id, sig) in [("s-kill", libc::SIGKILL), ("s-term", libc::SIGTERM)] {
        let vmm = *vmms
            .iter()
            .find(|p| {
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline).contains(&format!("/{id}/"))
            })
            .unwrap_or_else(|| panic!("no VMM of {id} in {vmms:?}"));
        let shim = std::fs::read_to_string(format!("/proc/{vmm}/stat"))
            .unwrap()
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1)?.parse::<i32>().ok())
            .unwrap();
        assert!(
            shims.contains(&shim),
            "{id}'s VMM's parent {shim}: {shims:?}"
        );
        signal(shim, sig);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::path::Path::new(&format!("/proc/{vmm}")).exists() {
            assert!(
                Instant::now() < deadline,
                "{id}'s VMM outlived its shim ({sig})"
            );
            thread::sleep(Duration::from_millis(100));
        }
        // containerd sees the shim gone, runs `shim delete` and reports the
        // task exited: it is listed as stopped, or no longer at all.
        wait_for(&c, id, "stopped or gone", |s| {
            s.is_none_or(|s| s == "STOPPED")
        });
        let _ = c.ctr(&["tasks", "delete", id]);
        let o = c.ctr(&["containers", "delete", id]);
        assert!(o.status.success(), "{}", text(&o));
        elapsed(t, &format!("{id}: shim and VM gone"));
    }
    c.assert_no_leaks();
}

/// A privileged container panics the guest kernel (`panic_on_oom = 2` and
/// a memory cgroup OOM; the guest kernel has no magic SysRq). With the
/// shim's `panic=-1` the guest resets, which moat-vmm reports with exit
/// code 5. The VM ends, the task shows STOPPED with a non-zero exit, and
/// nothing is left.
#[test]
fn a_guest_kernel_panic_stops_the_task() {
    let Some(c) = setup("f-panic") else { return };
    let _stop = StopOnDrop(c.clone());
    let t = Instant::now();
    run_detached(
        &c,
        &["--privileged", "--memory-limit", "33554432"],
        "panic",
        &[
            "sh",
            "-c",
            // A refused sysctl exits 0, which fails the test.
            // dd's 64 MiB buffer, filled by one read, passes the 32 MiB
            // limit at once (`cat /dev/zero | tail`, whose buffer grows
            // 8 KiB at a time, did not reach it within 500 s here).
            "sleep 2; echo 2 >/proc/sys/vm/panic_on_oom || exit 0; \
             dd if=/dev/zero of=/dev/null bs=64M count=1",
        ],
    );
    wait_for(&c, "panic", "STOPPED", |s| s == Some("STOPPED"));
    elapsed(t, "the panicked guest's task stopped");
    // The VM ended with the guest, not at the task's delete.
    assert!(pids_of(&c, "moat-vmm").is_empty(), "the VM still runs");
    let code = c.delete_task("panic").unwrap();
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
    c.assert_no_leaks();
}

/// The layer cache sits on a 128 KiB tmpfs, too small for busybox's
/// image: the container fails with an error that says so, and the cache
/// holds no entry, whole or half-written.
#[test]
fn a_full_layer_cache_is_a_clear_error() {
    let Some(c) = setup("f-full") else { return };
    let _stop = StopOnDrop(c.clone());
    let cache = c.layer_cache();
    std::fs::create_dir_all(&cache).unwrap();
    let o = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128k", "tmpfs"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = c.run(&["--rm"], "full", &["true"]);
    let listed = files_under(&cache);
    let _ = std::process::Command::new("umount").arg(&cache).output();
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("No space left on device") && err.contains("mkfs.erofs"),
        "{}",
        text(&o)
    );
    let entries: Vec<_> = listed
        .iter()
        .filter(|f| !f.to_string_lossy().ends_with(".lock"))
        .collect();
    assert!(entries.is_empty(), "left in the cache: {entries:?}");
    // `ctr run --rm` leaves the container when its task never started.
    let _ = c.ctr(&["containers", "delete", "full"]);
    c.assert_no_leaks();
}
