//! Load: containers created, started, killed and deleted in parallel,
//! three rounds, through a private containerd; after each round nothing
//! may be left (`assert_no_leaks`: processes, mounts, loop devices, taps,
//! cgroups, state and cache files, shim sockets).
//!
//! A round's containers are spread over pods (the CRI sandbox-id
//! annotation puts a pod's containers in one VM) and all `ctr run -d` at
//! once, so that a round exercises both what is per VM (shim daemons, VMM
//! spawns and stops, jail ids, state dirs; pods whose first containers
//! race to create the VM) and what is per container (disks hot added to a
//! running VM, exec streams, deletes). Each round's pods are new, so VM
//! teardown is under load too.
//!
//! Size: 4 pods of 5 (20 containers a round) is the full load, run by hand
//! with `MOAT_LOAD_PODS=4 MOAT_LOAD_PER_POD=5` (or 3 pods of 7). On this
//! project's 2-core PVM CI machines the guest kernel is emulated: a
//! container costs 20-40 s of guest vCPU (each fork and exec in the guest
//! about a second). A round of 21 (3 pods of 7) took 10 minutes, one of
//! 6 about 2, so CI runs 2 pods of 3 (18 containers in all) to stay inside
//! its 60 minutes. A pod holds at most 9 containers with the default
//! `spare_block_slots` (busybox's one layer disk is shared, and each
//! container has an upper disk of its own).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use moat_tests::*;

const ROUNDS: usize = 3;

/// `MOAT_LOAD_PODS` and `MOAT_LOAD_PER_POD`, or CI's size (see above).
fn size() -> (usize, usize) {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
            .unwrap_or(default)
    };
    (var("MOAT_LOAD_PODS", 2), var("MOAT_LOAD_PER_POD", 3))
}

fn setup(tag: &str) -> Option<Arc<Containerd>> {
    // Small uppers: the busybox containers write nothing, and a full-size
    // run's 20 sparse images then stay far below any disk's size.
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
fn round(c: &Arc<Containerd>, r: usize, (pods, per_pod): (usize, usize)) {
    let ids: Vec<String> = (0..pods)
        .flat_map(|p| (0..per_pod).map(move |i| format!("l{r}-p{p}-{i}")))
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
    assert_eq!(vmms.len(), pods, "one VM per pod: {vmms:?}");
    let cc = c.clone();
    in_parallel(&ids, move |id| {
        let o = cc.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        if !o.status.success() {
            return Err(format!("kill {id}: {}", text(&o)));
        }
        wait_status(&cc, id, "STOPPED");
        match cc.delete_task(id)? {
            Some(137) => {}
            code => return Err(format!("{id} exited with {code:?}, not 137 (SIGKILL)")),
        }
        Ok(())
    });
}

/// Three rounds of containers in pods: created, started, killed and
/// deleted in parallel; nothing left after each round.
#[test]
fn containers_in_parallel_three_rounds_leave_nothing() {
    let Some(c) = setup("load") else { return };
    let _stop = StopOnDrop(c.clone());
    let (pods, per_pod) = size();
    eprintln!(
        "load: {pods} pods of {per_pod} a round (full load: MOAT_LOAD_PODS=4 MOAT_LOAD_PER_POD=5)"
    );
    let t = Instant::now();
    for r in 0..ROUNDS {
        round(&c, r, (pods, per_pod));
        c.assert_no_leaks();
        eprintln!(
            "[{:6.1}s] round {r}: {} containers, no leaks",
            t.elapsed().as_secs_f64(),
            pods * per_pod
        );
    }
}
