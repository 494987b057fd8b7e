//! The agent's scenarios over real vsock: one moat-vmm VM booted with the
//! guest kernel from kernel-config/ and the agent's initramfs, the busybox
//! rootfs as an erofs layer plus ext4 uppers on virtio-blk devices found
//! by serial, and every check of `moat_agent_scenarios` run against it,
//! two at a time.
//! The guest has real cgroup2 controllers, so limits and OOM run here even
//! where the host's cgroup2 is bare. Ends with the Shutdown call, after
//! which moat-vmm must exit 0.
//!
//! Needs MOAT_KERNEL (scripts/test.sh sets it), /dev/kvm, root, erofs-utils
//! and e2fsprogs; MOAT_INITRAMFS or guest-agent/build-initramfs.sh builds
//! the initramfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{busybox_tree, case, sh, vol, Case, Limits};
use moat_agent_scenarios::{self as scenarios, Env};
use moat_protocol::agent::{source::Kind, Rootfs, Volume};
use moat_protocol::{AgentClient, Connector, DEFAULT_AGENT_PORT};
use protobuf::MessageField;

const SUITE: &str = "moat-agent VM tests";
/// Cases that run at once, each lane with a writable upper disk of its own.
const LANES: usize = 2;
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Time after which no further case starts (see `common::run_cases`).
const DEFAULT_BUDGET: Duration = Duration::from_secs(720);
/// A case still running after this has failed (exec_exit_codes, four
/// containers, takes about two minutes on a PVM host).
const PER_CASE: Duration = Duration::from_secs(300);
/// Room for Shutdown and the VMM's exit after the last case.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(300);
/// The agent's default pids limit here: small, so `fork_bomb` fills it
/// fast in an emulated guest.
const PIDS_LIMIT: u32 = 32;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// moat-vmm from this workspace's target dir (scripts/test.sh builds it).
fn moat_vmm() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_VMM") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/vm-<hash> -> target/<profile>/moat-vmm
    exe.parent().unwrap().parent().unwrap().join("moat-vmm")
}

fn initramfs() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_INITRAMFS") {
        return p.into();
    }
    PathBuf::from(sh(&mut Command::new(
        workspace().join("guest-agent/build-initramfs.sh"),
    )))
}

struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn main() {
    let Some(kernel) = std::env::var_os("MOAT_KERNEL").map(PathBuf::from) else {
        common::skip(
            SUITE,
            "MOAT_KERNEL is not set (scripts/test.sh builds the kernel and sets it)",
        );
    };
    if !Path::new("/dev/kvm").exists() {
        common::skip(SUITE, "/dev/kvm is missing");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(SUITE, "not running as root");
    }
    let vmm = moat_vmm();
    if !vmm.exists() {
        common::skip(
            SUITE,
            &format!("{} is not built (cargo build -p moat-vmm)", vmm.display()),
        );
    }
    let initramfs = initramfs();

    let dir = std::env::temp_dir().join(format!("moat-agent-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tree = dir.join("rootfs");
    busybox_tree(&tree);
    std::fs::write(tree.join("etc/layer"), "erofs\n").unwrap();
    let layer = dir.join("busybox.erofs");
    sh(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&layer)
        .arg(&tree));
    // One writable upper per lane: a lane's containers take turns on it.
    let uppers: Vec<PathBuf> = (0..LANES)
        .map(|i| dir.join(format!("upper{i}.ext4")))
        .collect();
    for upper in &uppers {
        sh(Command::new("truncate").args(["-s", "64M"]).arg(upper));
        sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(upper));
    }

    let uds = dir.join("vsock.sock");
    let serial = dir.join("console.log");
    let started = Instant::now();
    let mut cmd = Command::new(&vmm);
    for (i, upper) in uppers.iter().enumerate() {
        cmd.arg("--block").arg(format!(
            "id=upper{i},path={},serial=upper{i}",
            upper.display()
        ));
    }
    let child = cmd
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--vcpus", "2", "--memory-mib", "512", "--cmdline"])
        .arg(format!(
            "panic=1 {}={PIDS_LIMIT}",
            moat_protocol::PIDS_LIMIT_PARAM
        ))
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .arg("--block")
        .arg(format!(
            "id=layer0,path={},ro,serial=layer0",
            layer.display()
        ))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .arg("--rng")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start moat-vmm");
    let mut vm = Vm {
        child,
        dir: dir.clone(),
    };
    let budget = std::env::var("MOAT_VM_SUITE_BUDGET_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_BUDGET, Duration::from_secs);
    // Cases time out one by one; this is the last resort should the
    // harness itself block (a guest that stops answering Shutdown).
    let watchdog_pid = vm.child.id();
    std::thread::spawn(move || {
        std::thread::sleep(BOOT_TIMEOUT + budget + PER_CASE + SHUTDOWN_GRACE);
        eprintln!("!!! FAILED: the VM suite ran past its hard deadline; stopping the VM");
        // SAFETY: signals our own child, still unreaped by the main thread.
        unsafe { libc::kill(watchdog_pid as i32, libc::SIGKILL) };
        std::process::exit(1);
    });

    // The agent is up once the version handshake succeeds.
    let client = loop {
        match AgentClient::connect_hybrid_vsock(&uds, DEFAULT_AGENT_PORT) {
            Ok(c) => break c,
            Err(e) => {
                if let Some(status) = vm.child.try_wait().unwrap() {
                    panic!(
                        "moat-vmm exited ({status}) before the agent answered: {e}\nconsole:\n{}",
                        std::fs::read_to_string(&serial).unwrap_or_default()
                    );
                }
                assert!(
                    started.elapsed() < BOOT_TIMEOUT,
                    "agent not reachable after {BOOT_TIMEOUT:?}: {e}\nconsole:\n{}",
                    std::fs::read_to_string(&serial).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    eprintln!(
        "agent answered after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Lane i's containers use upper disk i, one at a time.
    let env = |lane: usize| {
        Arc::new(Env {
            connector: Connector::hybrid_vsock(&uds),
            port: DEFAULT_AGENT_PORT,
            rootfs: Rootfs {
                layers: vec![vol(Kind::Serial("layer0".into()), "erofs")],
                // As the shim mounts uppers: no background inode-table
                // zeroing, which would cost minutes of emulated guest-kernel
                // time.
                upper: MessageField::some(Volume {
                    options: vec!["noinit_itable".into()],
                    ..vol(Kind::Serial(format!("upper{lane}")), "ext4")
                }),
                ..Default::default()
            },
            prefix: format!("vm{lane}"),
            cgroup_limits: true,
            // 100 MiB takes over 5 minutes here: each byte is copied three
            // times (pipe in, pipe out, vsock) by guest kernel code, which
            // runs in the PVM host's instruction emulator.
            big_output_mib: 8,
            pids_limit: PIDS_LIMIT,
        })
    };
    // Two lanes side by side, as the VM has vCPUs (and this host cores),
    // of about the same length. In each, most valuable first: a guest whose
    // kernel runs in an emulator spends a minute or more on a case, and the
    // suite stops starting cases once its budget is spent (the rest are
    // skipped loudly, by name).
    let (a, b) = (env(0), env(1));
    let lanes: Vec<Vec<Case>> = vec![
        vec![
            case("layers by serial, ext4 upper", &a, upper_is_writable),
            case("exec_exit_codes", &a, scenarios::exec_exit_codes),
            case("stdin", &a, scenarios::stdin),
            case("seccomp_denial", &a, scenarios::seccomp_denial),
            case("path_escapes", &a, scenarios::path_escapes),
            case("fork_bomb", &a, scenarios::fork_bomb),
            case("malformed_messages", &a, scenarios::malformed_messages),
            case("oom", &a, scenarios::oom),
        ],
        vec![
            case("signals", &b, scenarios::signals),
            // Needs the guest kernel: vsock from a container, loopback off.
            case("vsock_denied", &b, scenarios::vsock_denied),
            case("tty_and_resize", &b, scenarios::tty_and_resize),
            case("dropped_capabilities", &b, scenarios::dropped_capabilities),
            // Here with real controllers: UpdateContainer and Stats limits run.
            case("bad_requests", &b, scenarios::bad_requests),
            case("rootfs_propagation", &b, scenarios::rootfs_propagation),
            case("sysctls", &b, scenarios::sysctls),
            case(
                "own_network_namespace",
                &b,
                scenarios::own_network_namespace,
            ),
            case("big_output (8 MiB)", &b, scenarios::big_output),
        ],
    ];
    let failed = common::run_cases(
        lanes,
        Limits {
            budget: Some(budget),
            per_case: PER_CASE,
        },
    );

    // Shutdown powers the guest off; moat-vmm must then exit 0.
    let shutdown = client.shutdown(client.ctx(), &Default::default());
    eprintln!("Shutdown answered: {shutdown:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let clean_exit = status.is_some_and(|s| s.code() == Some(0));
    if !clean_exit {
        eprintln!("moat-vmm did not exit 0 after Shutdown: {status:?}");
    }
    if !failed.is_empty() || !clean_exit {
        eprintln!(
            "console:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        );
        eprintln!("failed: {failed:?}");
        drop(vm);
        std::process::exit(1);
    }
    assert!(!uds.exists(), "vsock socket left behind");
    drop(vm);
}

/// Layers found by virtio-blk serial; writes land in the ext4 upper.
fn upper_is_writable(env: &Env) {
    let c = env.client();
    let s = scenarios::spec(
        &["sh", "-c", "cat /etc/layer; echo hi > /root/f; cat /root/f"],
        false,
    );
    let (w, out, err) = scenarios::run(env, &c, "upper", &s);
    assert_eq!(w.exit_status, 0, "{err}");
    assert_eq!(out, "erofs\nhi\n");
}
