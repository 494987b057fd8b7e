//! The pod's logic against a fake VM: no root, no KVM.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fake::{Behaviour, FakeLauncher, FakeVm};
use super::*;
use crate::config::UpperKind;
use crate::events::recorder::Recorder;
use crate::stdio::StdioSpec;
use moat_testutil::TempDir;

/// A pod on fake VMs, with its events recorded.
pub struct Harness {
    pub pod: Arc<Pod>,
    pub launcher: Arc<FakeLauncher>,
    pub events: Recorder,
    pub tmp: TempDir,
}

fn cfg(dir: &Path) -> Config {
    Config {
        state_dir: dir.join("st"),
        upper_dir: dir.join("up"),
        layer_cache_dir: dir.join("cache"),
        upper: UpperKind::Tmpfs,
        control_timeout_secs: 1,
        agent_timeout_secs: 10,
        ..Config::default()
    }
}

pub fn harness(launcher: FakeLauncher) -> Harness {
    let tmp = TempDir::new("pod");
    let launcher = Arc::new(FakeLauncher {
        sock_dir: tmp.path().to_owned(),
        ..launcher
    });
    let events = Recorder::default();
    let publisher = Arc::new(Publisher::new("ns".into(), events.clone()));
    let pod = Pod::new(cfg(tmp.path()), "ns", publisher, Box::new(launcher.clone()));
    Harness {
        pod,
        launcher,
        events,
        tmp,
    }
}

impl Harness {
    /// A bundle whose rootfs is a block device (nothing to build).
    pub fn request(&self, id: &str) -> CreateRequest {
        let bundle = self.tmp.path().join(format!("bundle-{id}"));
        fs::create_dir_all(&bundle).unwrap();
        let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
        spec["annotations"] = serde_json::json!({ crate::annotations::SANDBOX_ID: "pod1" });
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        CreateRequest {
            id: id.into(),
            bundle: bundle.to_string_lossy().into_owned(),
            mounts: vec![crate::rootfs::MountSpec {
                kind: "ext4".into(),
                source: format!("/dev/fake-{id}"),
                options: Vec::new(),
            }],
            stdio: StdioSpec::default(),
            checkpoint: false,
        }
    }

    fn running(&self, id: &str) -> Arc<Container> {
        self.pod.create(self.request(id)).unwrap();
        self.pod.start(id, "").unwrap();
        self.pod.container(id).unwrap()
    }

    pub fn vm(&self) -> Arc<FakeVm> {
        self.launcher.last()
    }

    fn topics(&self) -> Vec<String> {
        self.pod.events().flush(Duration::from_secs(5));
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.1.clone())
            .collect()
    }

    fn sandbox_dir(&self) -> std::path::PathBuf {
        self.tmp.path().join("st").join("pod1")
    }
}

fn err<T>(r: PodResult<T>) -> PodError {
    match r {
        Ok(_) => panic!("the call succeeded"),
        Err(e) => e,
    }
}

fn exec_req(id: &str, exec_id: &str) -> ExecRequest {
    let spec = serde_json::to_vec(&oci_spec::runtime::Process::default()).unwrap();
    ExecRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: Some(spec),
        stdio: StdioSpec::default(),
    }
}

#[test]
fn create_start_exec_kill_wait_delete() {
    let h = harness(FakeLauncher::default());
    let c = h.running("c1");
    assert_eq!(c.init.state().pid, 100);
    h.pod.exec(exec_req("c1", "e1")).unwrap();
    assert_eq!(h.pod.start("c1", "e1").unwrap(), 200);
    h.pod.kill("c1", "e1", 9, false).unwrap();
    assert_eq!(h.pod.wait("c1", "e1").unwrap().exit_status, 137);
    h.pod.delete_exec("c1", "e1").unwrap();
    assert_eq!(h.pod.pids("c1").unwrap(), vec![0]);
    h.pod.kill("c1", "", 15, false).unwrap();
    assert_eq!(h.pod.wait("c1", "").unwrap().exit_status, 143);
    let e = h.pod.delete("c1").unwrap();
    assert_eq!(e.exit_status, 143);
    assert!(h.vm().stopped.load(Ordering::SeqCst));
    assert!(!h.sandbox_dir().exists() || fs::read_dir(h.sandbox_dir()).is_err());
    assert_eq!(
        h.topics(),
        [
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
}

/// Deleting a container that others outlive removes it in the guest; the
/// last one's removal is skipped, since the VM is powered off with it, and
/// its slots are released before.
#[test]
fn the_last_container_goes_with_the_vm_without_guest_teardown() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    h.running("c2");
    let vm = h.vm();
    for id in ["c1", "c2"] {
        h.pod.kill(id, "", 9, false).unwrap();
        h.pod.wait(id, "").unwrap();
    }
    h.pod.delete("c1").unwrap();
    assert_eq!(vm.state.removes.load(Ordering::SeqCst), 1);
    assert!(!vm.stopped.load(Ordering::SeqCst));
    h.pod.delete("c2").unwrap();
    assert_eq!(
        vm.state.removes.load(Ordering::SeqCst),
        1,
        "guest teardown of the last"
    );
    assert!(vm.stopped.load(Ordering::SeqCst));
    assert!(vm.slots.lock().unwrap().iter().all(|u| *u == 0));
    assert!(h.pod.is_empty());
    // A later container boots a VM of its own.
    h.running("c3");
    assert!(!h.vm().stopped.load(Ordering::SeqCst));
}

#[test]
fn bad_calls_get_clear_errors() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    let e = err(h.pod.create(h.request("c1")));
    assert!(matches!(e, PodError::AlreadyExists(_)), "{e}");
    let e = err(h.pod.kill("c1", "", 200, false));
    assert!(matches!(e, PodError::InvalidArgument(_)), "{e}");
    let e = err(h.pod.kill("nope", "", 9, false));
    assert_eq!(e.to_string(), "container nope not found");
    let e = err(h.pod.start("c1", ""));
    assert!(e.to_string().contains("already started"), "{e}");
    h.pod.exec(exec_req("c1", "e1")).unwrap();
    let e = err(h.pod.exec(exec_req("c1", "e1")));
    assert!(matches!(e, PodError::AlreadyExists(_)), "{e}");
    let e = err(h.pod.delete("c1"));
    assert!(e.to_string().contains("is running"), "{e}");
}

/// An update within the VM's size reaches the agent; one beyond it is
/// refused, saying the VM cannot grow (the default VM: 1 vCPU, 256 MiB).
#[test]
fn updates_beyond_the_vm_are_refused() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    let update = |r: serde_json::Value| h.pod.update("c1", r.to_string().into_bytes());
    update(serde_json::json!({"memory": {"limit": 256i64 << 20}, "cpu": {"quota": 50000, "period": 100000}}))
        .unwrap();
    update(serde_json::json!({"memory": {"limit": -1}, "cpu": {"quota": -1}})).unwrap();
    let e = err(update(serde_json::json!({"memory": {"limit": 1i64 << 30}})));
    assert!(matches!(e, PodError::FailedPrecondition(_)), "{e}");
    assert_eq!(
        e.to_string(),
        "a memory limit of 1024 MiB does not fit the pod's VM of 256 MiB, which cannot grow"
    );
    let e = err(update(
        serde_json::json!({"cpu": {"quota": 150000, "period": 100000}}),
    ));
    assert!(
        e.to_string()
            .contains("1.50 CPUs does not fit the pod's VM of 1 vCPUs"),
        "{e}"
    );
}

/// The guest spec gets a cgroup namespace of its own (the guest is
/// cgroup v2); one the spec names already stays as it is.
#[test]
fn guest_specs_get_a_cgroup_namespace() {
    let mut spec = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
    super::container::private_cgroup_namespace(&mut spec);
    assert_eq!(
        spec["linux"]["namespaces"][1],
        serde_json::json!({"type": "cgroup"})
    );
    let mut named = serde_json::json!({"linux": {"namespaces": [
        {"type": "cgroup", "path": "/proc/1/ns/cgroup"}
    ]}});
    let before = named.clone();
    super::container::private_cgroup_namespace(&mut named);
    assert_eq!(named, before);
}

/// hostNetwork and hostPID specs, and a cgroupsPath that climbs out of
/// the hierarchy, are refused before anything is built.
#[test]
fn specs_a_vm_cannot_honour_are_refused() {
    let h = harness(FakeLauncher::default());
    let edit = |id: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let req = h.request(id);
        let path = Path::new(&req.bundle).join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        f(&mut spec);
        fs::write(&path, spec.to_string()).unwrap();
        req
    };
    let drop_ns = |kind: &'static str| {
        move |spec: &mut serde_json::Value| {
            let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != kind);
        }
    };
    let e = err(h.pod.create(edit("hostnet", &drop_ns("network"))));
    assert!(matches!(e, PodError::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("host's network namespace"), "{e}");
    let e = err(h.pod.create(edit("hostpid", &drop_ns("pid"))));
    assert!(
        e.to_string().contains("host's process (pid) namespace"),
        "{e}"
    );
    let e = err(h.pod.create(edit("climb", &|s| {
        s["linux"]["cgroupsPath"] = "/kubepods/../../etc".into();
    })));
    assert!(matches!(e, PodError::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("'..'"), "{e}");
    assert!(!h.sandbox_dir().exists());
    assert!(h.pod.is_empty());
}

#[test]
fn a_created_task_killed_before_start_exits_with_the_signal() {
    let h = harness(FakeLauncher::default());
    h.pod.create(h.request("c1")).unwrap();
    h.pod.kill("c1", "", 9, false).unwrap();
    assert_eq!(h.pod.wait("c1", "").unwrap().exit_status, 137);
    // The largest signal still fits.
    h.pod.create(h.request("c2")).unwrap();
    h.pod.kill("c2", "", 64, false).unwrap();
    assert_eq!(h.pod.wait("c2", "").unwrap().exit_status, 192);
}

#[test]
fn a_failed_first_create_leaves_nothing() {
    let h = harness(FakeLauncher {
        behaviour: Behaviour {
            create_fails: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let e = err(h.pod.create(h.request("c1")));
    assert!(e.to_string().contains("bad spec"), "{e}");
    assert!(h.vm().stopped.load(Ordering::SeqCst));
    assert!(!h.sandbox_dir().exists());
    assert!(h.pod.is_empty());
}

#[test]
fn a_failed_boot_leaves_nothing() {
    let h = harness(FakeLauncher {
        fail_boot: true,
        ..Default::default()
    });
    let e = err(h.pod.create(h.request("c1")));
    assert!(matches!(e, PodError::FailedPrecondition(_)), "{e}");
    assert!(e.to_string().contains("no KVM here"), "{e}");
    assert!(!h.sandbox_dir().exists());
    assert!(h.pod.is_empty());
}

#[test]
fn a_failed_second_create_releases_its_slots_and_keeps_the_pod() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    let vm = h.vm();
    assert_eq!(vm.slots_in_use(), 1);
    let mut req = h.request("c2");
    // Invalid stdio: refused before anything is built.
    req.stdio.stdout = "nope://x".into();
    assert!(h.pod.create(req).is_err());
    // Fill every slot: the next attach fails and gives back what it took.
    vm.slots
        .lock()
        .unwrap()
        .iter_mut()
        .skip(1)
        .for_each(|u| *u = 1);
    let e = err(h.pod.create(h.request("c3")));
    assert!(matches!(e, PodError::ResourceExhausted(_)), "{e}");
    // It says how many slots the VM has and which setting gives more.
    let text = e.to_string();
    assert!(
        text.contains("all 16 are in use") && text.contains("spare_block_slots"),
        "{text}"
    );
    vm.slots
        .lock()
        .unwrap()
        .iter_mut()
        .skip(1)
        .for_each(|u| *u = 0);
    h.pod.create(h.request("c3")).unwrap();
    assert_eq!(vm.slots_in_use(), 2);
    h.pod.kill("c3", "", 9, false).unwrap();
    h.pod.delete("c3").unwrap();
    assert_eq!(vm.slots_in_use(), 1);
    assert!(!vm.stopped.load(Ordering::SeqCst));
    h.pod.pids("c1").unwrap();
}

/// Issue 9: while a sibling is created (slow attach, slow agent create),
/// every call on a running container answers at once.
#[test]
fn a_slow_create_does_not_hold_up_the_pods_other_containers() {
    let h = Arc::new(harness(FakeLauncher::default()));
    h.running("c1");
    let vm = h.vm();
    vm.attach_delay_ms.store(2000, Ordering::SeqCst);
    vm.state.create_delay_ms.store(2000, Ordering::SeqCst);
    let creating = {
        let h = h.clone();
        std::thread::spawn(move || h.pod.create(h.request("c2")))
    };
    // Inside the attach first, then inside the agent's create.
    for (pause, e) in [(800, "e1"), (1200, "e2")] {
        std::thread::sleep(Duration::from_millis(pause));
        let pod = &h.pod;
        let start = Instant::now();
        pod.exec(exec_req("c1", e)).unwrap();
        pod.start("c1", e).unwrap();
        pod.pids("c1").unwrap();
        pod.stats("c1").unwrap();
        pod.set_paused("c1", true).unwrap();
        pod.set_paused("c1", false).unwrap();
        pod.kill("c1", e, 9, false).unwrap();
        pod.wait("c1", e).unwrap();
        pod.delete_exec("c1", e).unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert!(!creating.is_finished(), "the create was not slow");
    }
    creating.join().unwrap().unwrap();
    assert_eq!(vm.slots_in_use(), 2);
}

/// Issue 10 (8): a guest panic ends the VM; every task exits, and delete
/// cleans up.
#[test]
fn a_vm_that_dies_ends_every_task() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    h.pod.create(h.request("c2")).unwrap();
    h.pod.exec(exec_req("c1", "e1")).unwrap();
    h.pod.start("c1", "e1").unwrap();
    let vm = h.vm();
    vm.crash();
    let start = Instant::now();
    for (id, exec) in [("c1", ""), ("c1", "e1"), ("c2", "")] {
        assert_eq!(h.pod.wait(id, exec).unwrap().exit_status, 255);
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    h.pod.delete("c1").unwrap();
    h.pod.delete("c2").unwrap();
    assert!(vm.stopped.load(Ordering::SeqCst));
    assert!(!h.sandbox_dir().exists());
    let topics = h.topics();
    let exits = topics.iter().filter(|t| *t == "/tasks/exit").count();
    assert_eq!(exits, 3, "{topics:?}");
}

/// Issue 10 (4): OOM events of unknown containers are dropped, a flood
/// of them is slowed down and thinned, and the pod keeps answering.
#[test]
fn a_flooding_agent_is_throttled_and_unknown_ids_are_dropped() {
    let h = harness(FakeLauncher {
        behaviour: Behaviour {
            oom_flood: vec!["c1".into(), "ghost".into()],
            ..Default::default()
        },
        ..Default::default()
    });
    h.running("c1");
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    h.pod.pids("c1").unwrap();
    let reads = h.vm().state.get_events.load(Ordering::SeqCst);
    let ooms = h.topics().iter().filter(|t| *t == "/tasks/oom").count();
    let secs = start.elapsed().as_secs() + 2;
    assert!(reads as u64 <= 100 * secs + 1, "{reads} events read");
    assert!((1..=secs as usize).contains(&ooms), "{ooms} OOM events");
}

/// Issue 10 (3, hostile agent): an answer larger than a frame is a clear
/// error, not a hang.
#[test]
fn an_oversized_answer_is_a_clear_error() {
    let h = harness(FakeLauncher {
        behaviour: Behaviour {
            oversized: true,
            ..Default::default()
        },
        ..Default::default()
    });
    h.running("c1");
    let start = Instant::now();
    let e = err(h.pod.pids("c1"));
    assert!(e.to_string().starts_with("list processes: "), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // The connection still serves other calls.
    h.pod.stats("c1").unwrap();
}

/// Issue 10 (10): a hung agent fails each call after the configured time,
/// and delete still cleans up.
#[test]
fn a_hung_agent_fails_calls_in_bounded_time_and_delete_cleans_up() {
    let h = harness(FakeLauncher::default());
    h.running("c1");
    h.pod.kill("c1", "", 9, false).unwrap();
    h.pod.wait("c1", "").unwrap();
    let vm = h.vm();
    vm.state.silent.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let e = err(h.pod.pids("c1"));
    assert!(matches!(e, PodError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("control_timeout_secs"), "{e}");
    let e = err(h.pod.stats("c1"));
    assert!(matches!(e, PodError::Timeout { .. }), "{e}");
    h.pod.delete("c1").unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(vm.stopped.load(Ordering::SeqCst));
    assert!(!h.sandbox_dir().exists());
}

/// A create whose agent never answers fails after `agent_timeout_secs`
/// and leaves nothing behind.
#[test]
fn a_silent_agent_fails_a_create_in_bounded_time() {
    let h = harness(FakeLauncher {
        behaviour: Behaviour {
            silent: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let mut cfg = cfg(h.tmp.path());
    cfg.agent_timeout_secs = 1;
    let events = Arc::new(Publisher::new("ns".into(), Recorder::default()));
    let pod = Pod::new(cfg, "ns", events, Box::new(h.launcher.clone()));
    let start = Instant::now();
    let e = err(pod.create(h.request("c1")));
    assert!(matches!(e, PodError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("agent_timeout_secs"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(4));
    assert!(!h.sandbox_dir().exists());
    assert!(pod.is_empty());
}
