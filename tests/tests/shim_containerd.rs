//! The shim through a real (private) containerd and ctr, without a booted
//! guest: bad input must fail clearly and leave nothing behind, and the
//! shim's own actions (start grouping, delete, -info) must follow the
//! containerd shim protocol.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim::shim::{ConnectRequest, DeleteResponse, ShutdownRequest};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::types::introspection::RuntimeInfo;
use moat_tests::*;
use moat_testutil::TempDir;

fn setup(tag: &str, kernel: PathBuf, initramfs: PathBuf, extra: &str) -> Option<Containerd> {
    setup_vmm(tag, kernel, initramfs, None, extra)
}

fn setup_vmm(
    tag: &str,
    kernel: PathBuf,
    initramfs: PathBuf,
    vmm: Option<PathBuf>,
    extra: &str,
) -> Option<Containerd> {
    setup_containerd(
        tag,
        MoatConfig {
            kernel,
            initramfs,
            vmm,
            extra: extra.into(),
        },
    )
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn erofs_images(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".erofs"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    let Some(c) = setup(
        "bad",
        "/nonexistent/vmlinux".into(),
        "/nonexistent/initramfs.cpio".into(),
        "",
    ) else {
        return;
    };

    // A missing kernel: clear error in ctr's output and in containerd's log.
    let o = c.run(&["--rm"], "nokernel", &["echo", "hi"]);
    assert!(!o.status.success(), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("guest kernel") && e.contains("/nonexistent/vmlinux"),
        "{e}"
    );
    assert!(
        c.log().contains("guest kernel"),
        "containerd log lacks the error"
    );
    c.assert_no_leaks();
    // The layer was converted once (before the boot failed) and is cached.
    assert_eq!(erofs_images(&c.layer_cache()), 1);
    let _ = c.ctr(&["containers", "rm", "nokernel"]);

    // An invalid annotation value.
    let o = c.run(
        &["--rm", "--annotation", "io.moat.memory_mib=plenty"],
        "badann",
        &["true"],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let e = stderr(&o);
    assert!(
        e.contains("io.moat.memory_mib") && e.contains("plenty"),
        "{e}"
    );
    c.assert_no_leaks();
    let _ = c.ctr(&["containers", "rm", "badann"]);

    // A misspelt moat annotation.
    let o = c.run(
        &["--rm", "--annotation", "io.moat.cpus=2"],
        "typo",
        &["true"],
    );
    assert!(
        stderr(&o).contains("unknown moat annotation"),
        "{}",
        text(&o)
    );
    c.assert_no_leaks();
    let _ = c.ctr(&["containers", "rm", "typo"]);

    // A config.json that containerd accepts but is not a valid OCI spec.
    let spec = c.dir.join("broken-spec.json");
    fs::write(
        &spec,
        r#"{"ociVersion":"1.0.2","process":{"args":["true"],"cwd":"/"},"root":{"path":"rootfs"},
            "linux":{"namespaces":[{"type":"no-such-namespace"}]}}"#,
    )
    .unwrap();
    let o = c.ctr(&[
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        "--config",
        spec.to_str().unwrap(),
        "broken",
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(stderr(&o).contains("config.json"), "{}", text(&o));
    c.assert_no_leaks();
    let _ = c.ctr(&["containers", "rm", "broken"]);
    // Still one cached layer: nothing was rebuilt.
    assert_eq!(erofs_images(&c.layer_cache()), 1);
}

/// A panic in the shim daemon reaches containerd's log, message and
/// backtrace (the crash point exists in debug builds only).
#[test]
fn shim_panic_reaches_containerds_log() {
    if let Err(why) = host_tools() {
        return skip("shim_panic_reaches_containerds_log", &why);
    }
    let moat = MoatConfig {
        kernel: "/nonexistent/vmlinux".into(),
        initramfs: "/nonexistent/initramfs.cpio".into(),
        vmm: None,
        extra: String::new(),
    };
    let c = Containerd::start_with_env("crash", &moat, &[("MOAT_CRASH_AT", "shim-serve")]);
    c.import_busybox();
    let o = c.run(&["--rm"], "crash", &["true"]);
    assert!(!o.status.success(), "{}", text(&o));
    let log = c.log();
    assert!(
        log.contains("containerd-shim-moat-v1: thread 'main' panicked at shim/src/main.rs:"),
        "{log}"
    );
    assert!(log.contains("crash point shim-serve reached"), "{log}");
    assert!(
        log.contains("containerd-shim-moat-v1: backtrace:\n"),
        "{log}"
    );
    c.assert_no_leaks();
    let _ = c.ctr(&["containers", "rm", "crash"]);
}

fn write_script(path: &Path, body: &str) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn vm_that_does_not_boot_fails_within_the_timeout() {
    let tmp = TempDir::new("fake");
    let dir = tmp.path();
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio");
    fs::write(&kernel, b"not a kernel").unwrap();
    fs::write(&initramfs, b"").unwrap();
    // A VMM that starts but never brings up an agent.
    let pidfile = dir.join("vmm.pid");
    let hang = dir.join("hanging-vmm");
    write_script(
        &hang,
        &format!(
            "#!/bin/sh\necho $$ >> {}\nexec sleep 600\n",
            pidfile.display()
        ),
    );
    let Some(c) = setup_vmm(
        "noboot",
        kernel.clone(),
        initramfs.clone(),
        Some(hang),
        "boot_timeout_secs = 3",
    ) else {
        return;
    };
    let t = Instant::now();
    let o = c.run(&["--rm"], "hang", &["true"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        stderr(&o).contains("did not answer within 3s"),
        "{}",
        text(&o)
    );
    assert!(t.elapsed() < Duration::from_secs(60));
    c.assert_no_leaks();
    let pid = fs::read_to_string(&pidfile).unwrap();
    assert!(
        !Path::new(&format!("/proc/{}", pid.trim())).exists(),
        "the hanging VMM was not killed"
    );
}

#[test]
fn real_vmm_refusing_a_bad_kernel_is_reported() {
    let tmp = TempDir::new("kernelfile");
    let dir = tmp.path();
    let kernel = dir.join("vmlinux");
    let initramfs = dir.join("initramfs.cpio");
    fs::write(&kernel, b"not a kernel at all").unwrap();
    fs::write(&initramfs, b"").unwrap();
    if !Path::new("/dev/kvm").exists() {
        skip(
            "real_vmm_refusing_a_bad_kernel_is_reported",
            "/dev/kvm is missing",
        );
        return;
    }
    let Some(c) = setup("badk", kernel, initramfs, "") else {
        return;
    };
    let o = c.run(&["--rm"], "badk", &["true"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        stderr(&o).contains("moat-vmm exited during boot"),
        "{}",
        text(&o)
    );
    c.assert_no_leaks();
}

fn shim() -> PathBuf {
    binaries().join("containerd-shim-moat-v1")
}

fn bundle(root: &Path, name: &str, sandbox: &str) -> PathBuf {
    let b = root.join(name);
    fs::create_dir_all(&b).unwrap();
    fs::write(
        b.join("config.json"),
        format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{"io.kubernetes.cri.sandbox-id":"{sandbox}"}}}}"#
        ),
    )
    .unwrap();
    b
}

fn shim_action(c: &Containerd, bundle: &Path, id: &str, action: &str) -> std::process::Output {
    Command::new(shim())
        .current_dir(bundle)
        .args(["-namespace", "moat-test", "-id", id])
        .arg("-address")
        .arg(&c.sock)
        .args(["-publish-binary", "containerd", action])
        .env("TTRPC_ADDRESS", format!("{}.ttrpc", c.sock.display()))
        .env("MOAT_CONFIG", c.dir.join("moat.toml"))
        .output()
        .unwrap()
}

fn daemons_serving(address: &str) -> usize {
    pids_with_env_or_arg(address).len()
}

#[test]
fn start_groups_a_pod_into_one_shim_that_serves_task_v2_and_v3() {
    let Some(c) = setup("start", "/none".into(), "/none".into(), "") else {
        return;
    };
    let root = c.dir.join("bundles");
    let b1 = bundle(&root, "c1", "pod-a");
    let b2 = bundle(&root, "c2", "pod-a");
    let b3 = bundle(&root, "c3", "pod-b");
    let o1 = shim_action(&c, &b1, "c1", "start");
    assert!(o1.status.success(), "{}", text(&o1));
    let a1 = String::from_utf8_lossy(&o1.stdout).trim().to_owned();
    assert!(a1.starts_with("unix:///"), "{a1}");
    let a2 = String::from_utf8_lossy(&shim_action(&c, &b2, "c2", "start").stdout)
        .trim()
        .to_owned();
    let a3 = String::from_utf8_lossy(&shim_action(&c, &b3, "c3", "start").stdout)
        .trim()
        .to_owned();
    assert_eq!(a1, a2, "containers of one pod must share a shim");
    assert_ne!(a1, a3);
    assert_eq!(daemons_serving(&a1), 1);
    assert_eq!(fs::read_to_string(b2.join("address")).unwrap(), a1);

    for addr in [&a1, &a3] {
        let client = ttrpc::Client::connect(addr).unwrap();
        let task = containerd_shim_protos::TaskClient::new(client.clone());
        let r = task
            .connect(
                ttrpc::context::with_timeout(5_000_000_000),
                &ConnectRequest::new(),
            )
            .unwrap();
        assert!(r.shim_pid > 0);
        // containerd 1.6 and 1.7 call the same service by its v2 name.
        let req = ttrpc::Request {
            service: "containerd.task.v2.Task".into(),
            method: "Connect".into(),
            timeout_nano: 5_000_000_000,
            payload: ConnectRequest::new().write_to_bytes().unwrap(),
            ..Default::default()
        };
        let resp = client.request(req).unwrap();
        assert!(
            resp.status.is_none() || resp.status.code() == ttrpc::Code::OK,
            "{resp:?}"
        );
        task.shutdown(
            ttrpc::context::with_timeout(5_000_000_000),
            &ShutdownRequest::new(),
        )
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemons_serving(&a1) + daemons_serving(&a3) > 0 {
        assert!(
            Instant::now() < deadline,
            "shim daemons did not exit on Shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!Path::new(a1.trim_start_matches("unix://")).exists());

    // `delete` after a dead shim answers a DeleteResponse.
    let o = shim_action(&c, &b1, "c1", "delete");
    assert!(o.status.success(), "{}", text(&o));
    let d = DeleteResponse::parse_from_bytes(&o.stdout).unwrap();
    assert_eq!(d.exit_status, 137);
    assert!(d.exited_at.seconds > 0);
    c.assert_no_leaks();
}

#[test]
fn info_reports_moat_itself() {
    let o = Command::new(shim()).arg("-info").output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = RuntimeInfo::parse_from_bytes(&o.stdout).unwrap();
    assert_eq!(info.name, RUNTIME);
    assert!(!info.version.version.is_empty());
}
