//! Load: 20 containers created, started, killed and deleted in parallel,
//! three rounds, through a private containerd; after each round nothing
//! may be left (`assert_no_leaks`: processes, mounts, loop devices, taps,
//! network namespaces, cgroups, state and cache files, shim sockets).
//!
//! The 20 containers of a round are 4 pods of 5 (the CRI sandbox-id
//! annotation puts a pod's containers in one VM), all 20 `ctr run -d` at
//! once, so that a round exercises both what is per VM (shim daemons, VMM
//! spawns and stops, taps of none, jail ids, state dirs; pods whose first
//! containers race to create the VM) and what is per container (disks hot
//! added to a running VM, exec streams, deletes). 20 VMs a round would be
//! the most thorough, but every guest boot costs 40-65 s of emulated guest
//! kernel on this project's 2-core CI machines: 60 boots would not fit in
//! CI's 60 minutes, 12 do. Each round's pods are new, so VM teardown is
//! under load too.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use moat_tests::*;

const ROUNDS: usize = 3;
const PODS: usize = 4;
const PER_POD: usize = 5;

fn setup(tag: &str) -> Option<Arc<Containerd>> {
    // Five uppers of the default 4096 MiB would pass the default
    // pod_upper_limit_mib (16384): the shim refuses a pod's fifth
    // container. The busybox containers write nothing.
    setup_booting(
        tag,
        "boot_timeout_secs = 600\nagent_timeout_secs = 600\nupper_size_mib = 1024\n",
    )
    .map(Arc::new)
}

/// The STATUS column of `ctr tasks ls` for `id`.
fn task_status(c: &Containerd, id: &str) -> Option<String> {
    let ls = String::from_utf8_lossy(&c.ctr(&["tasks", "ls"]).stdout).into_owned();
    ls.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.first() == Some(&id)).then(|| cols.last().unwrap_or(&"").to_string())
    })
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(900);
    while task_status(c, id).as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{id} never became {want}\n{}",
            c.diagnostics()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `f` for every id at once; fails with every failure's message.
fn in_parallel(ids: &[String], f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let f = Arc::new(f);
    let handles: Vec<_> = ids
        .iter()
        .map(|id| {
            let (f, id) = (f.clone(), id.clone());
            thread::spawn(move || f(&id))
        })
        .collect();
    let errors: Vec<String> = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())).err())
        .collect();
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Creates and starts a round's containers, then kills and deletes them,
/// all in parallel.
fn round(c: &Arc<Containerd>, r: usize) {
    let ids: Vec<String> = (0..PODS)
        .flat_map(|p| (0..PER_POD).map(move |i| format!("l{r}-p{p}-{i}")))
        .collect();
    let cc = c.clone();
    in_parallel(&ids, move |id| {
        let pod_no = id.split('-').nth(1).unwrap_or_default();
        let pod = format!("{SANDBOX_ID_ANNOTATION}=load{r}-{pod_no}");
        let o = cc.run(
            &["-d", "--annotation", &pod],
            id,
            &["sh", "-c", "sleep 100000 & wait"],
        );
        if !o.status.success() {
            return Err(format!("{id}: {}", text(&o)));
        }
        wait_status(&cc, id, "RUNNING");
        Ok(())
    });
    let vmms = vmm_pids(&c.dir.to_string_lossy());
    assert_eq!(vmms.len(), PODS, "one VM per pod: {vmms:?}");
    let cc = c.clone();
    in_parallel(&ids, move |id| {
        let o = cc.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        if !o.status.success() {
            return Err(format!("kill {id}: {}", text(&o)));
        }
        wait_status(&cc, id, "STOPPED");
        let o = cc.ctr(&["tasks", "delete", id]);
        if o.status.code() != Some(137) {
            return Err(format!("delete {id}: {}", text(&o)));
        }
        let o = cc.ctr(&["containers", "delete", id]);
        if !o.status.success() {
            return Err(format!("delete container {id}: {}", text(&o)));
        }
        Ok(())
    });
}

/// Three rounds of 20 containers in 4 pods: created, started, killed and
/// deleted in parallel; nothing left after each round.
#[test]
fn twenty_containers_three_rounds_leave_nothing() {
    let Some(c) = setup("load") else { return };
    let _stop = StopOnDrop(c.clone());
    let t = Instant::now();
    for r in 0..ROUNDS {
        round(&c, r);
        c.assert_no_leaks();
        eprintln!(
            "[{:6.1}s] round {r}: {} containers, no leaks",
            t.elapsed().as_secs_f64(),
            PODS * PER_POD
        );
    }
}
