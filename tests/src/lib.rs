//! Test harness: a private containerd (scripts/private-containerd.sh, as
//! the demo and the bench use) with moat's shim on its PATH and a moat
//! config of its own, a locally built busybox image, and leak checks.
//! Everything is stopped on drop.

pub mod cri;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// The containerd runtime name of moat's shim.
pub const RUNTIME: &str = "io.containerd.moat.v1";
/// The image the tests run (built locally, see [`Containerd::import_busybox`]).
pub const IMAGE: &str = "docker.io/library/busybox:latest";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Builds the shim and moat-vmm (debug) once per test process, and returns
/// the directory holding them.
pub fn binaries() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .current_dir(workspace())
            .args(["build", "-p", "containerd-shim-moat-v1", "-p", "moat-vmm"])
            .status()
            .expect("run cargo build");
        assert!(st.success(), "building the shim and moat-vmm failed");
    });
    target_dir().join("debug")
}

/// Prints a loud notice that a test did not run, and why.
pub fn skip(test: &str, why: &str) {
    let line = "=".repeat(78);
    eprintln!("\n{line}\nSKIPPED {test}: {why}\n{line}\n");
}

/// Guest kernel and initramfs for tests that boot VMs: `MOAT_KERNEL` /
/// `MOAT_INITRAMFS` (scripts/test.sh sets them), else the installed ones.
pub fn guest_assets() -> Result<(PathBuf, PathBuf), String> {
    let pick = |env: &str, default: &str| {
        std::env::var_os(env)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let kernel = pick("MOAT_KERNEL", "/var/lib/moat/vmlinux");
    let initramfs = pick("MOAT_INITRAMFS", "/var/lib/moat/initramfs.cpio");
    for (what, p) in [("kernel", &kernel), ("initramfs", &initramfs)] {
        if !p.exists() {
            return Err(format!(
                "no guest {what} at {} (set MOAT_KERNEL/MOAT_INITRAMFS or run scripts/install.sh)",
                p.display()
            ));
        }
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm is missing".into());
    }
    Ok((kernel, initramfs))
}

/// Whether the tools the harness needs are installed.
pub fn host_tools() -> Result<(), String> {
    for tool in ["containerd", "ctr", "mkfs.erofs", "mkfs.ext4", "busybox"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "{tool} is not installed (scripts/deps.sh installs it)"
            ));
        }
    }
    if unsafe_is_root() {
        Ok(())
    } else {
        Err("containerd needs root".into())
    }
}

/// Starts a private containerd for the test `tag` with `moat`'s config
/// and busybox imported; None, after a loud skip, when the host lacks the
/// tools.
pub fn setup_containerd(tag: &str, moat: MoatConfig) -> Option<Containerd> {
    setup_with(tag, || Ok(moat))
}

/// [`setup_containerd`] for tests that boot guests: the kernel and
/// initramfs of [`guest_assets`], the workspace's moat-vmm and `extra`
/// config lines; None, after a loud skip, when the host lacks the tools
/// or the guest assets.
pub fn setup_booting(tag: &str, extra: &str) -> Option<Containerd> {
    setup_with(tag, || {
        let (kernel, initramfs) = guest_assets()?;
        Ok(MoatConfig {
            kernel,
            initramfs,
            vmm: None,
            extra: extra.into(),
        })
    })
}

/// Checks the host tools first, then builds the config (which may need
/// more of the host), then starts containerd and imports busybox.
fn setup_with(
    tag: &str,
    config: impl FnOnce() -> Result<MoatConfig, String>,
) -> Option<Containerd> {
    match host_tools().and_then(|()| config()) {
        Ok(moat) => {
            let c = Containerd::start(tag, &moat);
            c.import_busybox();
            Some(c)
        }
        Err(why) => {
            skip(tag, &why);
            None
        }
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A private containerd.
pub struct Containerd {
    /// The directory of this containerd's state, config and logs.
    pub dir: PathBuf,
    /// containerd's ttrpc/gRPC socket.
    pub sock: PathBuf,
    /// Whether containerd runs (until `stop`).
    running: Mutex<bool>,
    /// containerd's environment (and so its shims').
    env: Vec<(String, String)>,
    /// Tun/tap devices of the host's network namespace before the test.
    taps_before: Vec<String>,
    /// cgroup directories before the test.
    cgroups_before: Vec<PathBuf>,
    /// The pods (shim groupings) the test ran containers in.
    groupings: Mutex<Vec<String>>,
}

/// Extra `moat` config lines (TOML) on top of the harness's own.
pub struct MoatConfig {
    /// The guest kernel (vmlinux).
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initramfs: PathBuf,
    /// moat-vmm to use; default: the one built from this workspace.
    pub vmm: Option<PathBuf>,
    /// More TOML lines, appended as they are.
    pub extra: String,
}

/// The last `n` lines of a file, under a header naming it.
fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    tail(&path.display().to_string(), text.lines().collect(), n)
}

/// The last `n` of `lines`, under a header naming where they come from.
fn tail(name: &str, lines: Vec<&str>, n: usize) -> String {
    format!(
        "--- {name} (last {n} of {} lines) ---\n{}\n",
        lines.len(),
        lines[lines.len().saturating_sub(n)..].join("\n")
    )
}

/// How long one ctr command may take: long enough for a pod's container
/// that lives through a whole test on a slow emulated guest, short enough
/// that a hang fails the test while CI still has time to report it.
pub const CTR_TIMEOUT_SECS: u64 = 900;

/// `scripts/private-containerd.sh ACTION DIR [ARGS]`, with `env`.
fn private_containerd(action: &str, dir: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(workspace().join("scripts/private-containerd.sh"))
        .arg(action)
        .arg(dir)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/private-containerd.sh")
}

impl Containerd {
    /// Starts containerd in a fresh short directory (socket paths stay short).
    pub fn start(tag: &str, moat: &MoatConfig) -> Containerd {
        Containerd::start_with_env(tag, moat, &[])
    }

    /// [`Containerd::start`], with `env` added to the environment of
    /// containerd and so of its shims.
    pub fn start_with_env(tag: &str, moat: &MoatConfig, extra_env: &[(&str, &str)]) -> Containerd {
        let bin = binaries();
        let dir = PathBuf::from(format!("/tmp/mt-{tag}-{}", std::process::id()));
        // What an earlier run with this pid may have left.
        private_containerd("stop", &dir, &[], &[]);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("moat.toml"),
            format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\nvmm = \"{}\"\nstate_dir = \"{}/run\"\n\
                 layer_cache_dir = \"{}/layers\"\nupper_dir = \"{}/uppers\"\n\
                 template_dir = \"{}/templates\"\n{}\n",
                moat.kernel.display(),
                moat.initramfs.display(),
                moat.vmm
                    .clone()
                    .unwrap_or_else(|| bin.join("moat-vmm"))
                    .display(),
                dir.display(),
                dir.display(),
                dir.display(),
                dir.display(),
                moat.extra
            ),
        )
        .unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let moat_config = dir.join("moat.toml");
        let mut env = vec![
            ("PATH".to_owned(), path),
            (
                "MOAT_CONFIG".to_owned(),
                moat_config.to_string_lossy().into_owned(),
            ),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let taps_before = taps();
        // debug: containerd also passes -debug to the shims.
        let out = private_containerd("start", &dir, &["debug"], &env);
        assert!(
            out.status.success(),
            "containerd did not start: {}",
            text(&out)
        );
        Containerd {
            dir,
            sock: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            running: Mutex::new(true),
            env,
            taps_before,
            cgroups_before: cgroup_dirs(),
            groupings: Mutex::new(Vec::new()),
        }
    }

    /// Stops containerd with SIGTERM, leaving its shims and their tasks
    /// running, and starts it again on the same root, state, config and
    /// environment.
    pub fn restart(&self) {
        let out = private_containerd("restart", &self.dir, &["debug"], &self.env);
        assert!(
            out.status.success(),
            "containerd did not restart: {}",
            text(&out)
        );
    }

    /// moat's state directory (`<dir>/run`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// moat's layer cache directory (`<dir>/layers`).
    pub fn layer_cache(&self) -> PathBuf {
        self.dir.join("layers")
    }

    /// Where the shim puts containers' writable upper images.
    pub fn upper_dir(&self) -> PathBuf {
        self.dir.join("uppers")
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// What a failed test needs to say why: the shim's and containerd's
    /// last log lines and the end of every guest console.
    pub fn diagnostics(&self) -> String {
        // CI shows only the first hundred lines or so of a failure: skip
        // containerd's start-up (plugin loading), which says nothing.
        let path = self.dir.join("containerd.log");
        let log = fs::read_to_string(&path).unwrap_or_default();
        let started = log
            .lines()
            .skip_while(|l| !l.contains("successfully booted"));
        let mut out = tail(&path.display().to_string(), started.skip(1).collect(), 60);
        for entry in fs::read_dir(self.state_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            out += &last_lines(&entry.path().join("console.log"), 40);
        }
        out
    }

    /// Runs ctr (bounded, so a hung task fails the test instead of hanging it).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL", &CTR_TIMEOUT_SECS.to_string(), "ctr"])
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// Deletes a stopped task and its container; the task's exit code as
    /// ctr reports it (ctr 1.6 exits 0 and warns "task ID exit with
    /// non-zero exit code N"), or why either delete failed.
    pub fn delete_task(&self, id: &str) -> Result<Option<i32>, String> {
        let o = self.ctr(&["tasks", "delete", id]);
        if !o.status.success() {
            return Err(format!("delete task {id}: {}", text(&o)));
        }
        let err = String::from_utf8_lossy(&o.stderr);
        let code = match err.split("non-zero exit code ").nth(1) {
            Some(rest) => rest
                .split(|ch: char| !ch.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok()),
            None => Some(0),
        };
        let o = self.ctr(&["containers", "delete", id]);
        if !o.status.success() {
            return Err(format!("delete container {id}: {}", text(&o)));
        }
        Ok(code)
    }

    /// `ctr run --rm` (or other run flags) with the moat runtime.
    pub fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        self.note_grouping(flags, id);
        let mut args = vec!["run", "--runtime", RUNTIME];
        args.extend_from_slice(flags);
        args.push(IMAGE);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Remembers the pod of a container, for the leak check of its shim
    /// socket: CRI's sandbox id when an annotation names one, else the id.
    pub fn note_grouping(&self, flags: &[&str], id: &str) {
        let pod = flags
            .iter()
            .find_map(|f| f.strip_prefix(SANDBOX_ID_ANNOTATION))
            .and_then(|v| v.strip_prefix('='))
            .unwrap_or(id);
        let mut g = self.groupings.lock().unwrap_or_else(|e| e.into_inner());
        if !g.iter().any(|x| x == pod) {
            g.push(pod.to_owned());
        }
    }

    /// The socket the shim daemon of pod `grouping` serves (the path
    /// containerd-shim's `socket_address` derives from containerd's
    /// address, the namespace and the grouping).
    pub fn shim_socket(&self, grouping: &str) -> PathBuf {
        use sha2::Digest;
        let key = self.sock.join("default").join(grouping);
        let digest = sha2::Sha256::digest(key.to_string_lossy().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        PathBuf::from("/run/containerd/s").join(hex)
    }

    /// Builds the busybox image from Debian's busybox-static and imports it.
    pub fn import_busybox(&self) {
        let tar = self.dir.join("busybox.tar");
        let out = Command::new(workspace().join("scripts/busybox-image.sh"))
            .arg(&tar)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = self.ctr(&["images", "import", tar.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What a finished test must leave: no tasks or containers, nothing
    /// under the state directory or the upper directory, no half-built
    /// image in the layer cache, no shim or moat-vmm process started from
    /// this containerd, no mount or loop device of its files, no new tap,
    /// no new cgroup of moat's or of the test's pods, no shim socket.
    pub fn assert_no_leaks(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let leaks = self.leaks();
            if leaks.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "leaked: {leaks:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn leaks(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        if let Ok(entries) = fs::read_dir(self.state_dir()) {
            for e in entries.flatten() {
                leaks.push(format!("state {}", e.path().display()));
            }
        }
        for what in ["tasks", "containers"] {
            let ids = String::from_utf8_lossy(&self.ctr(&[what, "ls", "-q"]).stdout).into_owned();
            for t in ids.lines().filter(|l| !l.trim().is_empty()) {
                leaks.push(format!("{what} {t}"));
            }
        }
        for e in fs::read_dir(self.upper_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            leaks.push(format!("upper {}", e.path().display()));
        }
        for f in files_under(&self.layer_cache()) {
            // Images are built under a temporary name and renamed when whole.
            if f.to_string_lossy().contains(".tmp.") {
                leaks.push(format!("half-built cache entry {}", f.display()));
            }
        }
        let marker = self.dir.to_string_lossy().into_owned();
        for pid in pids_with_env_or_arg(&marker) {
            let threads = pid.split(' ').next().map(thread_states).unwrap_or_default();
            leaks.push(format!("process {pid}; threads: {threads}"));
        }
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for m in mounts.lines().filter(|l| l.contains(&marker)) {
            leaks.push(format!("mount {m}"));
        }
        for (dev, file) in loop_devices() {
            if file.contains(&marker) {
                leaks.push(format!("loop device {dev} on {file}"));
            }
        }
        for tap in taps() {
            if !self.taps_before.contains(&tap) {
                leaks.push(format!("tap {tap}"));
            }
        }
        // Other tests on the host may add cgroups: only moat's and this
        // test's pods' count. (moat makes no named network namespace: a
        // pod's is CNI's, and a test checks inside it for moat's tap.)
        let groupings = self
            .groupings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for cg in cgroup_dirs() {
            let name = cg.file_name().unwrap_or_default().to_string_lossy();
            let ours = name.contains("moat") || groupings.iter().any(|g| name.contains(g.as_str()));
            if ours && !self.cgroups_before.contains(&cg) {
                leaks.push(format!("cgroup {}", cg.display()));
            }
        }
        for g in &groupings {
            let s = self.shim_socket(g);
            if s.exists() {
                leaks.push(format!("shim socket {} of {g}", s.display()));
            }
        }
        leaks
    }
}

/// The annotation that puts containers into one pod (one VM).
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// Tun/tap devices of this network namespace.
pub fn taps() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        for e in entries.flatten() {
            if e.path().join("tun_flags").exists() {
                found.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    found
}

/// cgroup directories down to four levels below /sys/fs/cgroup (where
/// runtimes put a container's: `<slice or runtime>/<pod>/<container>`).
pub fn cgroup_dirs() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut level = vec![PathBuf::from("/sys/fs/cgroup")];
    for _ in 0..4 {
        let mut next = Vec::new();
        for dir in &level {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    next.push(e.path());
                }
            }
        }
        found.extend(next.iter().cloned());
        level = next;
    }
    found
}

/// Every file below `dir` (none if it is missing).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Loop devices in use, with their backing files.
pub fn loop_devices() -> Vec<(String, String)> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Ok(file) = fs::read_to_string(e.path().join("loop/backing_file")) {
                found.push((name, file.trim().to_owned()));
            }
        }
    }
    found
}

/// moat-vmm processes whose command line or environment names `marker`.
pub fn vmm_pids(marker: &str) -> Vec<String> {
    pids_with_env_or_arg(marker)
        .into_iter()
        .filter(|p| p.contains("moat-vmm"))
        .collect()
}

/// What each thread of `pid` is doing (name, state, kernel wait
/// channel), for the report of a leaked process.
fn thread_states(pid: &str) -> String {
    let tasks = Path::new("/proc").join(pid).join("task");
    let mut out = Vec::new();
    for t in fs::read_dir(tasks).into_iter().flatten().flatten() {
        let read = |f: &str| fs::read_to_string(t.path().join(f)).unwrap_or_default();
        let state = read("stat")
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').next().map(str::to_owned))
            .unwrap_or_default();
        out.push(format!("{} {state} {}", read("comm").trim(), read("wchan")));
    }
    out.join(", ")
}

/// Processes (shims, VMMs) whose command line or environment names `marker`,
/// other than containerd itself and this test.
pub fn pids_with_env_or_arg(marker: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let exe = fs::read_link(p.path().join("exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        if !(exe.contains("containerd-shim-moat") || exe.contains("moat-vmm")) {
            continue;
        }
        let cmdline = fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmdline_len = cmdline.len();
        let environ = fs::read(p.path().join("environ")).unwrap_or_default();
        let hay = [cmdline, environ].concat();
        if String::from_utf8_lossy(&hay).contains(marker) {
            let args = String::from_utf8_lossy(&hay[..cmdline_len]).replace('\0', " ");
            found.push(format!("{name} ({exe}) {}", args.trim_end()));
        }
    }
    found
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a shared [`Containerd`] when dropped, also while a failing test
/// unwinds and threads still hold clones of it.
pub struct StopOnDrop(pub std::sync::Arc<Containerd>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.diagnostics());
        }
        self.0.stop();
    }
}

impl Containerd {
    /// Stops containerd (scripts/private-containerd.sh: with the tasks, shims
    /// and VMs a failed test left, and its directory unless `MOAT_TEST_KEEP`
    /// is set) and removes the sockets of shims that were killed. Only the
    /// first call does anything.
    pub fn stop(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if !std::mem::take(&mut *running) {
            return;
        }
        let out = private_containerd("stop", &self.dir, &[], &[]);
        if !out.status.success() {
            eprintln!("stopping the private containerd: {}", text(&out));
        }
        for g in self
            .groupings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = fs::remove_file(self.shim_socket(g));
        }
    }
}

/// stdout and stderr of a command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What CNI's bridge or ptp plugin leaves for a pod: a network namespace
/// whose `eth0` is one end of a veth, with an address and a default route;
/// the other end is in this namespace with the gateway address. Removed on
/// drop (the netns, and with it both veth ends).
pub struct PodNetns {
    /// The network namespace's name (under /run/netns).
    pub name: String,
    /// The network namespace's path.
    pub path: PathBuf,
    /// The gateway address, on this namespace's end of the veth.
    pub host_ip: String,
    /// The pod's address, on its `eth0`.
    pub pod_ip: String,
}

impl PodNetns {
    /// A pod network on the first `10.213.<n>.0/24`, `n` from `subnet` up,
    /// that no interface of the host has (a namespace another test left
    /// would otherwise answer for the gateway). Namespaces of this
    /// harness whose test process is gone are removed first.
    pub fn create(tag: &str, subnet: u8) -> PodNetns {
        remove_stale_netns();
        let subnet = free_subnet("10.213", subnet);
        let name = format!("moat-{tag}-{}", std::process::id());
        let host_if = format!("mh{}-{subnet}", std::process::id() % 100_000);
        let n = PodNetns {
            path: PathBuf::from("/run/netns").join(&name),
            host_ip: format!("10.213.{subnet}.1"),
            pod_ip: format!("10.213.{subnet}.2"),
            name,
        };
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().unwrap();
            assert!(o.status.success(), "ip {args:?}: {}", text(&o));
        };
        let ns = n.name.as_str();
        ip(&["netns", "add", ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        ip(&["addr", "add", &format!("{}/24", n.host_ip), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let pod_cidr = format!("{}/24", n.pod_ip);
        for args in [
            vec!["addr", "add", pod_cidr.as_str(), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", n.host_ip.as_str()],
        ] {
            let mut full = vec!["-n", ns];
            full.extend(args);
            ip(&full);
        }
        n
    }

    /// Runs a command in the pod's namespace; its output, success or not.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap()
    }
}

/// The first `n` from `from` up such that no interface of the host has an
/// address in `<prefix>.<n>.0/24` (a namespace another test left would
/// otherwise answer for its gateway).
pub fn free_subnet(prefix: &str, from: u8) -> u8 {
    let out = Command::new("ip").args(["-o", "-4", "addr"]).output();
    let addrs = String::from_utf8_lossy(&out.map(|o| o.stdout).unwrap_or_default()).into_owned();
    (from..=254)
        .find(|n| !addrs.contains(&format!(" {prefix}.{n}.")))
        .unwrap_or_else(|| panic!("a free {prefix}.x.0/24 on this host"))
}

/// Removes the namespaces `PodNetns` named `moat-<tag>-<pid>` for a test
/// process that no longer runs (one killed before its drop ran).
fn remove_stale_netns() {
    for e in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("moat-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing network namespace {name}, left by a test process that is gone");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
