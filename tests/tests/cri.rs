//! Kubernetes pods through containerd's CRI plugin, as kubelet drives
//! them, on the `runc` handler and then on `moat`, in one private
//! containerd: what passes on runc must pass on moat.
//!
//! One pod per handler serves every check (a moat pod boots a guest
//! kernel, about a minute on this project's emulating CI hosts):
//! RunPodSandbox, PodSandboxStatus (READY, the pod IP from CNI),
//! ListPodSandbox; two containers created and started in the pod;
//! ExecSync (exit codes, the CRI hostname and DNS config, the CNI address
//! inside the pod); an image of 32 layers, whiteouts and an opaque
//! directory among them, in the same pod (on moat one disk); the container's CRI log file; StopContainer,
//! RemoveContainer and the container re-created in the running pod (on
//! moat without a new VM); ListContainers; StopPodSandbox and
//! RemovePodSandbox; the pod's cgroup (under its cgroup_parent) holding
//! what runs it on the host (moat-vmm on moat); a hostNetwork pod (which
//! moat refuses, saying why); and after all pods nothing left anywhere.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_cri::v1::*;
use moat_tests::cri::{setup_cri, Cri, LAYERED_EXTRA, LAYERED_IMAGE};
use moat_tests::*;

const HANDLERS: &[&str] = &["runc", "moat"];

/// The cgroup_parent of the test's pods, as kubelet's cgroupfs driver
/// gives one per pod.
fn cgroup_parent(pod_name: &str) -> String {
    format!("/moat-cri-{}/{pod_name}", std::process::id())
}

fn pod_config(handler: &str, cri: &Cri) -> PodSandboxConfig {
    let name = format!("web-{handler}");
    PodSandboxConfig {
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent(&name),
            ..Default::default()
        }),
        metadata: Some(PodSandboxMetadata {
            name: name.clone(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("pod-{handler}"),
        log_directory: cri.log_dir(&name).to_string_lossy().into_owned(),
        dns_config: Some(DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".into(), name)]),
        ..Default::default()
    }
}

fn container_config(name: &str, attempt: u32, cmd: &[&str]) -> ContainerConfig {
    image_container_config(IMAGE, name, attempt, cmd)
}

fn image_container_config(image: &str, name: &str, attempt: u32, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/{attempt}.log"),
        ..Default::default()
    }
}

/// Runs until stopped, logging its start and its SIGTERM.
const APP: &[&str] = &[
    "sh",
    "-c",
    "trap 'echo got TERM; exit 7' TERM; echo app started; sleep 2147483647 & wait",
];

fn elapsed(start: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// ExecSync that must succeed and exit 0; its stdout.
fn exec_ok(cri: &Cri, id: &str, cmd: &[&str]) -> String {
    let r = cri
        .exec_sync(id, cmd)
        .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"));
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: stdout {out} stderr {}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

fn create_and_start(cri: &Cri, pod: &str, pc: &PodSandboxConfig, cc: ContainerConfig) -> String {
    let name = cc
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = cri
        .create_container(pod, pc, cc)
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"));
    cri.start_container(&id)
        .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
    let state = cri.container_status(&id).unwrap().state;
    assert_eq!(state, ContainerState::ContainerRunning as i32, "{name}");
    id
}

/// The pod's checks on one handler.
fn pod_lifecycle(cri: &Cri, handler: &str) {
    let t = Instant::now();
    let pc = pod_config(handler, cri);
    let pod = cri
        .run_pod(pc.clone(), handler)
        .unwrap_or_else(|e| panic!("RunPodSandbox on {handler}: {e}"));
    elapsed(t, &format!("{handler}: pod {pod} ready"));

    let status = cri.pod_status(&pod).unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(status.runtime_handler, handler);
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    let prefix = cri.subnet.trim_end_matches("0/24");
    assert!(
        ip.starts_with(prefix),
        "pod IP {ip:?} not in {}",
        cri.subnet
    );
    assert!(cri.list_pods().unwrap().iter().any(|p| p.id == pod));
    check_pod_cgroup(cri, &pc, &pod);

    let app = create_and_start(cri, &pod, &pc, container_config("app", 0, APP));
    elapsed(t, &format!("{handler}: app running"));
    assert_eq!(
        exec_ok(cri, &app, &["hostname"]).trim(),
        format!("pod-{handler}")
    );
    let resolv = exec_ok(cri, &app, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search default.svc.cluster.local"),
        "{resolv}"
    );
    let r = cri
        .exec_sync(&app, &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .unwrap();
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    let addrs = exec_ok(cri, &app, &["ip", "-4", "addr"]);
    assert!(
        addrs.contains(&format!("inet {ip}/")),
        "pod IP {ip} not in {addrs}"
    );
    elapsed(t, &format!("{handler}: execs checked"));

    // A second container, of an image of 32 layers (more than a VM has
    // block slots), shares the pod's network and hostname.
    let layered = image_container_config(LAYERED_IMAGE, "side", 0, APP);
    let side = create_and_start(cri, &pod, &pc, layered);
    check_layers(cri, &side);
    let side_addrs = exec_ok(cri, &side, &["ip", "-4", "addr"]);
    assert!(side_addrs.contains(&format!("inet {ip}/")), "{side_addrs}");
    assert_eq!(
        exec_ok(cri, &side, &["hostname"]).trim(),
        format!("pod-{handler}")
    );

    check_log(cri, &pc, "app/0.log", "app started");

    // Stopped out of order, then re-created in the running pod.
    let vmms = vmm_pids(&cri.containerd.dir.to_string_lossy());
    cri.stop_container(&app, 30).unwrap();
    let s = cri.container_status(&app).unwrap();
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 7, "the app's SIGTERM trap ends it");
    check_log(cri, &pc, "app/0.log", "got TERM");
    cri.remove_container(&app).unwrap();
    let app1 = create_and_start(cri, &pod, &pc, container_config("app", 1, APP));
    assert_eq!(
        vmm_pids(&cri.containerd.dir.to_string_lossy()),
        vmms,
        "a container re-created in a running pod needs no new VM"
    );
    check_log(cri, &pc, "app/1.log", "app started");
    let ids: Vec<String> = cri
        .list_containers(&pod)
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&app1) && ids.contains(&side), "{ids:?}");
    elapsed(t, &format!("{handler}: container re-created"));

    cri.stop_pod(&pod).unwrap();
    let status = cri.pod_status(&pod).unwrap();
    assert_eq!(status.state, PodSandboxState::SandboxNotready as i32);
    for id in [&app1, &side] {
        let s = cri.container_status(id).unwrap();
        assert_eq!(s.state, ContainerState::ContainerExited as i32, "{id}");
    }
    cri.remove_pod(&pod).unwrap();
    assert!(cri.list_pods().unwrap().iter().all(|p| p.id != pod));
    assert!(cri.list_containers(&pod).unwrap().is_empty());
    // Kubelet removes the pod's parent cgroup; it must be empty by now.
    let parent = sys_cgroup(&pc.linux.as_ref().unwrap().cgroup_parent);
    std::fs::remove_dir(&parent)
        .unwrap_or_else(|e| panic!("pod cgroup {} not empty: {e}", parent.display()));
    elapsed(t, &format!("{handler}: pod stopped and removed"));
}

fn sys_cgroup(path: &str) -> std::path::PathBuf {
    std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
}

/// The pod's sandbox cgroup (cgroup_parent/<pod id>) holds what runs the
/// pod on the host: the pause process on runc, moat-vmm on moat (so that
/// kubelet's accounting and limits see the VM).
fn check_pod_cgroup(cri: &Cri, pc: &PodSandboxConfig, pod: &str) {
    let parent = &pc.linux.as_ref().unwrap().cgroup_parent;
    let procs_path = sys_cgroup(parent).join(pod).join("cgroup.procs");
    let procs = std::fs::read_to_string(&procs_path)
        .unwrap_or_else(|e| panic!("{}: {e}", procs_path.display()));
    let pids: Vec<&str> = procs.split_whitespace().collect();
    assert!(!pids.is_empty(), "nothing runs in {}", procs_path.display());
    let vmms = vmm_pids(&cri.containerd.dir.to_string_lossy());
    for vmm in &vmms {
        let pid = vmm.split(' ').next().unwrap_or_default();
        assert!(
            pids.contains(&pid),
            "moat-vmm {vmm} is not in {}: {pids:?}",
            procs_path.display()
        );
    }
}

/// A hostNetwork pod runs on runc; on moat, RunPodSandbox fails and says why.
fn host_network_pod(cri: &Cri, handler: &str) {
    let mut pc = pod_config(handler, cri);
    let name = format!("hostnet-{handler}");
    if let Some(m) = pc.metadata.as_mut() {
        m.name = name.clone();
        m.uid = format!("uid-{name}-{}", std::process::id());
    }
    pc.log_directory = cri.log_dir(&name).to_string_lossy().into_owned();
    let linux = pc.linux.get_or_insert_with(Default::default);
    linux.cgroup_parent = cgroup_parent(&name);
    linux.security_context = Some(LinuxSandboxSecurityContext {
        namespace_options: Some(NamespaceOption {
            network: NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    match (handler, cri.run_pod(pc.clone(), handler)) {
        ("moat", Err(e)) => {
            let msg = e.message();
            assert!(msg.contains("cannot share the host's namespaces"), "{msg}");
        }
        ("moat", Ok(id)) => panic!("a hostNetwork pod {id} started on moat"),
        (_, Ok(id)) => {
            cri.stop_pod(&id).unwrap();
            cri.remove_pod(&id).unwrap();
        }
        (_, Err(e)) => panic!("hostNetwork pod on {handler}: {e}"),
    }
    let _ = std::fs::remove_dir(sys_cgroup(&cgroup_parent(&name)));
}

/// The many-layer image's view: every layer's file but the one a later
/// layer whited out, and only the new file of the directory a later layer
/// made opaque (see scripts/busybox-image.sh).
fn check_layers(cri: &Cri, id: &str) {
    let out = exec_ok(cri, id, &["ls", "/layers", "/opaque"]);
    let mut want: Vec<String> = (1..=LAYERED_EXTRA)
        .filter(|i| *i != 2)
        .map(|i| i.to_string())
        .collect();
    want.sort();
    let listed = |dir: &str| -> Vec<String> {
        let section = out.split(&format!("{dir}:\n")).nth(1).unwrap_or_default();
        let mut names: Vec<String> = section
            .split("\n\n")
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        names.sort();
        names
    };
    assert_eq!(listed("/layers"), want, "{out}");
    assert_eq!(listed("/opaque"), vec!["new".to_string()], "{out}");
}

/// The container's CRI log file has `line` as a full stdout entry:
/// `<RFC 3339 time> stdout F <line>`.
fn check_log(cri: &Cri, pc: &PodSandboxConfig, file: &str, line: &str) {
    let path = std::path::Path::new(&pc.log_directory).join(file);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        let found = log.lines().any(|l| {
            let mut f = l.splitn(4, ' ');
            let time = f.next().unwrap_or_default();
            time.contains('T')
                && f.next() == Some("stdout")
                && f.next() == Some("F")
                && f.next() == Some(line)
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no entry {line:?}: {log:?}\n{}",
            path.display(),
            cri.containerd.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn pods_through_cri_on_runc_and_moat() {
    let Some(cri) = setup_cri("cri", "boot_timeout_secs = 600\nagent_timeout_secs = 600\n") else {
        return;
    };
    for handler in HANDLERS {
        host_network_pod(&cri, handler);
        pod_lifecycle(&cri, handler);
    }
    let top = sys_cgroup(&format!("/moat-cri-{}", std::process::id()));
    std::fs::remove_dir(&top).unwrap_or_else(|e| panic!("{}: {e}", top.display()));
    cri.assert_no_leaks();
}
