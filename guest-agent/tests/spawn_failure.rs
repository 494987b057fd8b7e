//! The agent as the guest runs it (the initramfs's build profile) survives
//! a connection for which ttrpc cannot spawn its threads: ttrpc panics
//! then, and in the guest the agent is PID 1, whose end is the guest's.
//! A Shutdown that cannot spawn its thread fails with an error.
//!
//! The agent runs on the host on a unix socket, in a pids cgroup whose
//! limit leaves room for one more thread only. Needs root and a pids
//! controller (cgroup v1 `pids`, or cgroup2 with `pids`); builds the agent
//! with guest-agent/build-initramfs.sh unless MOAT_AGENT_BIN names it.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moat_protocol::{AgentClient, Connector, DEFAULT_AGENT_PORT};

const SUITE: &str = "moat-agent thread spawn failure test";

fn skip(why: &str) {
    eprintln!("\n!!! SKIPPED {SUITE}: {why}\n");
}

/// A pids cgroup directory to create ours in, and the file that moves a
/// process there.
fn pids_hierarchy() -> Option<PathBuf> {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.join("cgroup.procs").exists() {
        return Some(v1.into());
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let ctl = std::fs::read_to_string(v2.join("cgroup.subtree_control")).ok()?;
    ctl.split_whitespace()
        .any(|c| c == "pids")
        .then(|| v2.into())
}

fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MOAT_AGENT_BIN").filter(|p| !p.is_empty()) {
        return p.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-initramfs.sh");
    let out = Command::new(script).arg("--agent").output().unwrap();
    assert!(
        out.status.success(),
        "build-initramfs.sh --agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

struct Fixture {
    agent: Child,
    cgroup: PathBuf,
    /// The agent's cgroup2 root, which the agent creates.
    agent_cgroup: PathBuf,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
        remove_cgroup_tree(&self.agent_cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a cgroup and the ones under it, deepest first (a cgroup
/// directory goes with rmdir, once it has no process and no child).
fn remove_cgroup_tree(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

#[test]
fn ttrpc_thread_spawn_failure_does_not_end_the_agent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not running as root");
    }
    let Some(pids) = pids_hierarchy() else {
        return skip("no pids cgroup controller");
    };
    let agent = agent_binary();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("moat-agent-spawn-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cgroup = pids.join(format!("moat-agent-spawn-{pid}"));
    std::fs::create_dir(&cgroup).unwrap();
    let base = dir.join("agent");
    // The agent's own cgroup root: a bare one under the cgroup2 mount.
    let cg2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|m| Path::new(m).join("cgroup.controllers").exists())
        .expect("a cgroup2 mount");
    let agent_cgroup = Path::new(cg2).join(format!("moat-agent-spawn-{pid}"));
    let mut fx = Fixture {
        agent: Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(&agent)
            .arg("--unix")
            .arg(&base)
            .args(["--cgroup-mount", cg2, "--cgroup-root"])
            .arg(&agent_cgroup)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent"),
        cgroup: cgroup.clone(),
        agent_cgroup,
        dir,
    };
    let mut lines = BufReader::new(fx.agent.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        eprintln!("{line}");
        if line.contains("moat-agent: ready") {
            break;
        }
    }
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));

    // Connected (its threads running) before the limit.
    let early = AgentClient::connect(Connector::unix_ports(&base), DEFAULT_AGENT_PORT)
        .expect("the agent answers");
    // Room for one more thread: ttrpc's connection thread starts, and the
    // threads it spawns in turn cannot.
    write(&cgroup.join("cgroup.procs"), &fx.agent.id().to_string());
    let current = || -> u64 {
        std::fs::read_to_string(cgroup.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    write(&cgroup.join("pids.max"), &(current() + 1).to_string());
    let port_path = moat_protocol::client::unix_port_path(&base, DEFAULT_AGENT_PORT);
    let held: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&port_path).expect("connect"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(status) = fx.agent.try_wait().unwrap() {
            panic!("the agent ended ({status}) when a thread could not be spawned");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    // Shutdown needs a thread too: without one it fails, and says why.
    write(&cgroup.join("pids.max"), &current().to_string());
    let r = early.shutdown(
        ttrpc::context::with_duration(Duration::from_secs(10)),
        &Default::default(),
    );
    let e = format!("{:?}", r.expect_err("Shutdown without a thread"));
    assert!(e.contains("shutdown thread"), "{e}");
    assert!(fx.agent.try_wait().unwrap().is_none(), "the agent ended");

    write(&cgroup.join("pids.max"), "max");
    let client = AgentClient::connect(Connector::unix_ports(&base), DEFAULT_AGENT_PORT)
        .expect("the agent answers once threads can be spawned again");
    assert!(fx.agent.try_wait().unwrap().is_none());
    drop(client);
}
