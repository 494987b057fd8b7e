//! Host integration tests: the real agent binary, as root, in a throwaway
//! mount namespace (`unshare -m`), listening on unix sockets instead of
//! vsock, with its cgroup root in a sub-cgroup. Containers come from a
//! busybox rootfs, as a directory and as loop-mounted erofs layers (+ an
//! ext4 upper). The scenarios live in `moat_agent_scenarios` so the same
//! checks can run against a VM over vsock.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio as PStdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{busybox_tree, case, sh, vol, Case, Limits};
use moat_agent_scenarios::{self as scenarios, Env};
use moat_protocol::agent::{source::Kind, Rootfs};
use moat_protocol::Connector;
use protobuf::MessageField;

fn skip(why: &str) -> ! {
    common::skip("moat-agent integration tests", why)
}

fn preflight() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("not running as root (mounts, namespaces and cgroups need it)");
    }
    if cgroup2().is_none() {
        skip("no cgroup2 mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified");
    }
    for tool in ["unshare", "mkfs.erofs", "mkfs.ext4", "losetup"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            skip(&format!("{tool} is not installed"));
        }
    }
    if !Path::new("/bin/busybox").exists() {
        skip("/bin/busybox (busybox-static) is not installed");
    }
}

/// The cgroup2 mount and whether it has the memory controller.
fn cgroup2() -> Option<(PathBuf, bool)> {
    for m in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(ctl) = std::fs::read_to_string(format!("{m}/cgroup.controllers")) {
            return Some((m.into(), ctl.split_whitespace().any(|c| c == "memory")));
        }
    }
    None
}

struct Fixture {
    dir: PathBuf,
    agent: Child,
    loops: Vec<String>,
    cgroup: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        // Leftover container cgroups first, then the root.
        if let Ok(entries) = std::fs::read_dir(&self.cgroup) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn losetup(img: &Path, ro: bool) -> String {
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show"]);
    if ro {
        cmd.arg("--read-only");
    }
    sh(cmd.arg(img))
}

fn main() {
    preflight();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("moat-agent-it-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs");
    busybox_tree(&rootfs);

    // Two erofs layers: the binaries, and etc (top-most).
    let (la, lb) = (dir.join("layer-bin"), dir.join("layer-etc"));
    busybox_tree(&la);
    std::fs::remove_dir_all(la.join("etc")).unwrap();
    std::fs::create_dir_all(lb.join("etc")).unwrap();
    std::fs::write(lb.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(lb.join("etc/layer"), "top\n").unwrap();
    sh(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(dir.join("bin.erofs"))
        .arg(&la));
    sh(Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(dir.join("etc.erofs"))
        .arg(&lb));
    let upper_img = dir.join("upper.ext4");
    sh(Command::new("truncate").args(["-s", "64M"]).arg(&upper_img));
    sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&upper_img));

    let (cg_mount, cgroup_limits) = cgroup2().unwrap();
    if !cgroup_limits {
        eprintln!(
            "!!! cgroup2 at {} has no controllers (they are bound to cgroup v1 here):",
            cg_mount.display()
        );
        eprintln!("!!! resource limits, OOM and limit stats checks are SKIPPED");
    }
    let cgroup = cg_mount.join(format!("moat-it-{pid}"));
    let mut fx = Fixture {
        dir: dir.clone(),
        agent: Command::new("true").spawn().unwrap(),
        loops: Vec::new(),
        cgroup: cgroup.clone(),
    };
    let loop_bin = losetup(&dir.join("bin.erofs"), true);
    fx.loops.push(loop_bin.clone());
    let loop_etc = losetup(&dir.join("etc.erofs"), true);
    fx.loops.push(loop_etc.clone());
    let loop_upper = losetup(&upper_img, false);
    fx.loops.push(loop_upper.clone());

    let base = dir.join("agent");
    fx.agent = Command::new("unshare")
        .args(["-m", "--propagation", "private"])
        .arg(env!("CARGO_BIN_EXE_moat-agent"))
        .arg("--unix")
        .arg(&base)
        .arg("--cgroup-mount")
        .arg(&cg_mount)
        .arg("--cgroup-root")
        .arg(&cgroup)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stderr(PStdio::piped())
        .spawn()
        .expect("start the agent");
    let mut lines = BufReader::new(fx.agent.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .next()
            .expect("agent exited before it was ready")
            .unwrap();
        eprintln!("{line}");
        if line.contains("moat-agent: ready") {
            break;
        }
        assert!(Instant::now() < deadline, "agent not ready in 30s");
    }
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            eprintln!("{l}");
        }
    });

    let dir_env = Env {
        connector: Connector::unix_ports(&base),
        port: moat_protocol::DEFAULT_AGENT_PORT,
        rootfs: Rootfs {
            layers: vec![vol(Kind::Directory(rootfs.display().to_string()), "")],
            ..Default::default()
        },
        prefix: "dir".into(),
        cgroup_limits,
        big_output_mib: 100,
        pids_limit: moat_protocol::DEFAULT_PIDS_LIMIT,
    };
    let erofs_env = Env {
        rootfs: Rootfs {
            layers: vec![
                vol(Kind::DevicePath(loop_etc.clone()), "erofs"),
                vol(Kind::DevicePath(loop_bin.clone()), "erofs"),
            ],
            ..Default::default()
        },
        prefix: "erofs".into(),
        ..dir_env.clone()
    };
    let ext4_env = Env {
        rootfs: Rootfs {
            upper: MessageField::some(vol(Kind::DevicePath(loop_upper.clone()), "ext4")),
            ..erofs_env.rootfs.clone()
        },
        prefix: "ext4".into(),
        ..erofs_env.clone()
    };

    let (dir_env, erofs_env) = (Arc::new(dir_env), Arc::new(erofs_env));
    let erofs_upper = Arc::new((ext4_env, loop_upper.clone(), dir.clone()));
    let cases: Vec<Case> = vec![
        case(
            "exec_exit_codes (dir rootfs)",
            &dir_env,
            scenarios::exec_exit_codes,
        ),
        case(
            "exec_exit_codes (erofs layers)",
            &erofs_env,
            scenarios::exec_exit_codes,
        ),
        case(
            "erofs layer order + ext4 upper",
            &erofs_upper,
            |(env, dev, dir)| erofs_ext4(env, dev, dir),
        ),
        case("signals", &dir_env, scenarios::signals),
        case(
            "rootfs_propagation",
            &erofs_env,
            scenarios::rootfs_propagation,
        ),
        case("sysctls", &dir_env, scenarios::sysctls),
        case(
            "own_network_namespace",
            &dir_env,
            scenarios::own_network_namespace,
        ),
        case("stdin", &dir_env, scenarios::stdin),
        case("tty_and_resize", &dir_env, scenarios::tty_and_resize),
        case("seccomp_denial", &dir_env, scenarios::seccomp_denial),
        case("vsock_denied", &dir_env, scenarios::vsock_denied),
        case(
            "dropped_capabilities",
            &erofs_env,
            scenarios::dropped_capabilities,
        ),
        case("path_escapes", &dir_env, scenarios::path_escapes),
        case("bad_requests", &dir_env, scenarios::bad_requests),
        case(
            "malformed_messages",
            &dir_env,
            scenarios::malformed_messages,
        ),
        case("oom", &dir_env, scenarios::oom),
        case("fork_bomb", &dir_env, scenarios::fork_bomb),
        case("big_output (100 MiB)", &dir_env, scenarios::big_output),
    ];
    // One lane: the cases share loop devices and the host's cgroup.
    let failed = common::run_cases(
        vec![cases],
        Limits {
            budget: None,
            per_case: Duration::from_secs(300),
        },
    );
    drop(fx);
    if !failed.is_empty() {
        eprintln!("failed: {failed:?}");
        std::process::exit(1);
    }
    eprintln!("all agent integration tests passed");
}

/// The top erofs layer wins, and writes land in the ext4 upper.
fn erofs_ext4(env: &Env, upper_dev: &str, dir: &Path) {
    let c = env.client();
    let s = scenarios::spec(
        &[
            "sh",
            "-c",
            "cat /etc/layer; echo written > /root/hello; ls /bin/busybox",
        ],
        false,
    );
    let (w, out, err) = scenarios::run(env, &c, "ext4", &s);
    assert_eq!(w.exit_status, 0, "{err}");
    assert_eq!(out, "top\n/bin/busybox\n");
    // The container is gone: the upper holds the write, in the container's
    // own directory (its id) there.
    let mnt = dir.join("check-upper");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(Command::new("unshare").args([
        "-m",
        "sh",
        "-c",
        &format!(
            "mount -o ro {upper_dev} {m} && cat {m}/*/upper/root/hello > {m}.out",
            m = mnt.display()
        ),
    ]));
    assert_eq!(
        std::fs::read_to_string(format!("{}.out", mnt.display())).unwrap(),
        "written\n"
    );
}
