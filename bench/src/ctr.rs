//! `moat-bench ctr`: `ctr run --rm busybox true` through a private
//! containerd, runc and moat alternately, with moat's time broken into
//! parts, and the host memory (PSS) of one idle container of each.
//!
//! Where each figure comes from (all wall-clock, one host clock):
//! - the bench's own clock around `ctr run` (t0, t1);
//! - `ctr events`: the TaskCreate/Start/Exit/Delete envelopes' timestamps
//!   (set by the shim when it publishes) and TaskExit's `exited_at`;
//! - the moat shim's log lines, relayed into containerd's log with their
//!   RFC 3339 timestamps: `create <id> (bundle ...)`, `sandbox <id>:
//!   moat-vmm pid N booting` (or `restoring <template>`), `sandbox <id>:
//!   agent ... is up; ...`, `sandbox <id>: VM stopped`;
//! - moat-vmm's log (`<state_dir>/<id>/vmm.log`, read while the container
//!   runs, since the shim removes it): `Guest started after N us`;
//! - the layer cache directory, listed before and after each run: a new
//!   `.erofs` image means the run converted the layer (cache miss).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};

use crate::args;
use crate::parse::{self, CtrEvent, LogLine};
use crate::proc::{self, ProcMem};
use crate::stats::{ratio, Summary};
use crate::timestamp;

pub const RUNC: &str = "io.containerd.runc.v2";
pub const MOAT: &str = "io.containerd.moat.v1";
const IMAGE: &str = "docker.io/library/busybox:latest";

const USAGE: &str = "usage: moat-bench ctr [--runs N] [--skip-moat] [--skip-pss] [--json OUT]
         [--dir DIR] [--repo DIR] [--timeout SECS] [--idle SECS]
         [--moat-bin DIR] [--moat-config FILE] [--keep-logs DIR]";

/// A runtime: its containerd name and the short name used in ids and tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Runc,
    Moat,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Runc => "runc",
            Runtime::Moat => "moat",
        }
    }
    fn containerd_name(self) -> &'static str {
        match self {
            Runtime::Runc => RUNC,
            Runtime::Moat => MOAT,
        }
    }
    fn shim_binary(self) -> &'static str {
        match self {
            Runtime::Runc => "containerd-shim-runc-v2",
            Runtime::Moat => "containerd-shim-moat-v1",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Opts {
    pub runs: usize,
    pub skip_moat: bool,
    pub skip_pss: bool,
    pub json: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub repo: Option<PathBuf>,
    /// Per `ctr run` of moat (runc gets at most 60 s).
    pub timeout: Duration,
    /// How long an idle container sits before its memory is read.
    pub idle: Duration,
    pub moat_bin: Option<PathBuf>,
    pub moat_config: Option<PathBuf>,
    pub keep_logs: Option<PathBuf>,
    /// With more than one, the memory of this many idle containers started
    /// together is read too (`moat-bench start`'s density figure).
    pub pods: usize,
}

pub fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 5,
        skip_moat: false,
        skip_pss: false,
        json: None,
        dir: None,
        repo: None,
        timeout: Duration::from_secs(300),
        idle: Duration::from_secs(5),
        moat_bin: None,
        moat_config: None,
        keep_logs: None,
        pods: 1,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || args::value(&mut it, a);
        let secs = |v: String| args::seconds(a, &v, true);
        match a.as_str() {
            "--runs" => o.runs = args::runs(&val()?)?,
            "--skip-moat" => o.skip_moat = true,
            "--skip-pss" => o.skip_pss = true,
            "--json" => o.json = Some(val()?.into()),
            "--dir" => o.dir = Some(val()?.into()),
            "--repo" => o.repo = Some(val()?.into()),
            "--timeout" => o.timeout = secs(val()?)?,
            "--idle" => o.idle = secs(val()?)?,
            "--moat-bin" => o.moat_bin = Some(val()?.into()),
            "--moat-config" => o.moat_config = Some(val()?.into()),
            "--keep-logs" => o.keep_logs = Some(val()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

/// What one `ctr run --rm ... true` gave.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub runtime: &'static str,
    pub index: usize,
    pub id: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// "hit" or "miss" (moat's layer cache), when the cache dir was readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_cache: Option<&'static str>,
    /// Milliseconds per part; see [`PARTS`].
    pub parts_ms: BTreeMap<&'static str, f64>,
    #[serde(skip)]
    t0: i64,
    #[serde(skip)]
    t1: i64,
    #[serde(skip)]
    vmm_log: Option<String>,
}

/// The parts, in report order: (key, description, moat only).
pub const PARTS: &[(&str, &str, bool)] = &[
    ("total", "`ctr run --rm` wall time", false),
    (
        "to_task_create",
        "ctr start → TaskCreate (container, snapshot, shim start, Create)",
        false,
    ),
    ("create_to_start", "TaskCreate → TaskStart", false),
    ("start_to_exit", "TaskStart → TaskExit", false),
    (
        "exit_to_event",
        "process exit (`exited_at`) → TaskExit published",
        false,
    ),
    ("exit_to_delete", "TaskExit → TaskDelete", false),
    (
        "delete_to_ctr_exit",
        "TaskDelete → ctr exits (shim shutdown; moat: VM stop)",
        false,
    ),
    (
        "to_shim_create",
        "ctr start → shim logs `create` (containerd + shim start)",
        true,
    ),
    (
        "rootfs_prepare",
        "shim create → moat-vmm spawned (rootfs: erofs layers, ext4 upper)",
        true,
    ),
    (
        "vmm_to_first_instruction",
        "moat-vmm start → first guest instruction (VMM log)",
        true,
    ),
    (
        "guest_boot_to_agent_ready",
        "first guest instruction → agent answers (guest kernel boot; PVM-emulated here)",
        true,
    ),
    (
        "agent_create",
        "agent up → TaskCreate (agent CreateContainer, mounts)",
        true,
    ),
    ("vm_stop", "TaskDelete → shim logs `VM stopped`", true),
];

fn first_event<'a>(events: &'a [CtrEvent], topic: &str, id: &str) -> Option<&'a CtrEvent> {
    events.iter().find(|e| {
        e.topic == topic
            && e.container() == Some(id)
            // The init process's exit, not an exec's.
            && (topic != "/tasks/exit" || e.body.get("id").and_then(Value::as_str) == Some(id))
    })
}

fn shim_line(log: &[LogLine], pred: impl Fn(&str) -> bool) -> Option<i64> {
    log.iter().find(|l| pred(&l.msg)).map(|l| l.time)
}

/// The parts of one run, in milliseconds, from what could be observed;
/// a part whose ends were not both seen is left out.
pub fn parts(
    id: &str,
    t0: i64,
    t1: i64,
    events: &[CtrEvent],
    log: &[LogLine],
    vmm_log: Option<&str>,
) -> BTreeMap<&'static str, f64> {
    let ms = |from: Option<i64>, to: Option<i64>| Some((to? - from?) as f64 / 1e6);
    let ev = |topic| first_event(events, topic, id);
    let create = ev("/tasks/create").map(|e| e.time);
    let start = ev("/tasks/start").map(|e| e.time);
    let exit = ev("/tasks/exit");
    let exit_t = exit.map(|e| e.time);
    let exited_at = exit.and_then(|e| e.time_field("exited_at"));
    let delete = ev("/tasks/delete").map(|e| e.time);

    let sandbox = format!("sandbox {id}: ");
    let shim_create = shim_line(log, |m| m.starts_with(&format!("create {id} (")));
    // A VM started from a template logs `restoring <file>`; the first VM
    // of a template boots first, and that line counts.
    let booting = shim_line(log, |m| {
        m.strip_prefix(&sandbox).is_some_and(|r| {
            r.starts_with("moat-vmm pid ") && (r.ends_with(" booting") || r.contains(" restoring "))
        })
    });
    // `agent <version> on kernel <release> is up; <how it started>`.
    let agent_up = shim_line(log, |m| {
        m.strip_prefix(&sandbox)
            .is_some_and(|r| r.starts_with("agent ") && r.contains(" is up"))
    });
    let vm_stopped = shim_line(log, |m| m.strip_prefix(&sandbox) == Some("VM stopped"));
    let first_instruction =
        vmm_log.and_then(|l| parse::logged_us(l, "Guest started after").map(|us| us / 1e3));

    let mut p = BTreeMap::new();
    let mut put = |k: &'static str, v: Option<f64>| {
        if let Some(v) = v {
            p.insert(k, v);
        }
    };
    put("total", ms(Some(t0), Some(t1)));
    put("to_task_create", ms(Some(t0), create));
    put("create_to_start", ms(create, start));
    put("start_to_exit", ms(start, exit_t));
    put("exit_to_event", ms(exited_at, exit_t));
    put("exit_to_delete", ms(exit_t, delete));
    put("delete_to_ctr_exit", ms(delete, Some(t1)));
    put("to_shim_create", ms(Some(t0), shim_create));
    put("rootfs_prepare", ms(shim_create, booting));
    put("vmm_to_first_instruction", first_instruction);
    put(
        "guest_boot_to_agent_ready",
        ms(booting, agent_up).and_then(|b| Some(b - first_instruction?)),
    );
    put("agent_create", ms(agent_up, create));
    put("vm_stop", ms(delete, vm_stopped));
    p
}

/// The `.erofs` images in the layer cache; None if it cannot be read.
fn cache_images(dir: &Path) -> Option<BTreeSet<String>> {
    match fs::read_dir(dir) {
        Ok(d) => Some(
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".erofs"))
                .collect(),
        ),
        // Not created yet: empty, and the first run will fill it.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(BTreeSet::new()),
        Err(_) => None,
    }
}

/// Reads a file again and again until stopped, keeping the longest text
/// seen: the shim removes moat-vmm's log when the container is deleted.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Option<String>>,
}

impl Watch {
    fn start(path: PathBuf) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut best: Option<String> = None;
            loop {
                let last = s.load(Ordering::SeqCst);
                if let Ok(t) = fs::read_to_string(&path) {
                    if best.as_ref().is_none_or(|b| t.len() >= b.len()) {
                        best = Some(t);
                    }
                }
                if last {
                    return best;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watch { stop, thread }
    }

    fn finish(self) -> Option<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().ok().flatten()
    }
}

/// What cleanup needs; also reachable from the panic hook.
#[derive(Debug, Clone)]
pub struct Cleanup {
    pub repo: PathBuf,
    pub dir: PathBuf,
    pub sock: String,
    pub events_pid: Option<u32>,
    pub state_dir: PathBuf,
    pub id_prefix: String,
}

static CLEANUP: Mutex<Option<Cleanup>> = Mutex::new(None);

impl Cleanup {
    /// Makes this the cleanup that runs at the end, or from the panic hook.
    pub fn arm(&self) {
        *CLEANUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.clone());
    }

    /// Starts the private containerd in `dir` with `path_env` as its PATH
    /// (and `MOAT_CONFIG` if given), setting `sock`. Armed before the
    /// start: a failed start is stopped too.
    pub fn start_containerd(
        &mut self,
        path_env: &str,
        moat_config: Option<&Path>,
    ) -> Result<(), String> {
        let mut start = Command::new("bash");
        start
            .arg(self.repo.join("scripts/private-containerd.sh"))
            .arg("start")
            .arg(&self.dir)
            .env("PATH", path_env);
        if let Some(c) = moat_config {
            start.env("MOAT_CONFIG", c);
        }
        self.arm();
        self.sock = proc::run(&mut start, Duration::from_secs(60))?
            .ok("private-containerd.sh start")?
            .trim()
            .to_owned();
        self.arm();
        Ok(())
    }

    fn ctr(&self, args: &[&str], timeout: u64) -> Result<String, String> {
        proc::run_to_end(
            Command::new("ctr").arg("-a").arg(&self.sock).args(args),
            Duration::from_secs(timeout),
        )?
        .ok(&format!("ctr {}", args.join(" ")))
    }

    /// Removes every task and container, kills shims of this containerd
    /// that are left (and their VMs), stops containerd and removes its
    /// directory. Returns what did not go as it should.
    pub fn run(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(pid) = self.events_pid {
            // SAFETY: kill(2) on our own `ctr events` child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if Path::new(&self.sock).exists() {
            let tasks = self.ctr(&["task", "ls", "-q"], 30).unwrap_or_default();
            for t in tasks.split_whitespace() {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", t], 30);
                let end = Instant::now() + Duration::from_secs(30);
                while let Err(e) = self.ctr(&["task", "rm", "-f", t], 60) {
                    if Instant::now() > end {
                        notes.push(format!("cleanup: task {t}: {e}"));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            let containers = self.ctr(&["c", "ls", "-q"], 30).unwrap_or_default();
            for c in containers.split_whitespace() {
                if let Err(e) = self.ctr(&["c", "rm", c], 60) {
                    notes.push(format!("cleanup: container {c}: {e}"));
                }
            }
        }
        // Shims outlive containerd: kill those serving our socket, with their children.
        let table = proc::table();
        for (&pid, (comm, _)) in &table {
            let cmd = proc::cmdline(pid);
            let ours = comm.starts_with("containerd-shim")
                && cmd
                    .windows(2)
                    .any(|w| w[0] == "-address" && w[1] == self.sock);
            if ours {
                notes.push(format!(
                    "cleanup: killed leftover {comm} {pid} and its children"
                ));
                for p in proc::tree(&table, pid).into_iter().rev() {
                    // SAFETY: kill(2) on a shim this benchmark started, and its children.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let stop = proc::run_to_end(
            Command::new("bash")
                .arg(self.repo.join("scripts/private-containerd.sh"))
                .arg("stop")
                .arg(&self.dir),
            Duration::from_secs(60),
        )
        .and_then(|f| f.ok("private-containerd.sh stop"));
        if let Err(e) = stop {
            notes.push(format!("cleanup: {e}"));
        }
        if let Ok(d) = fs::read_dir(&self.state_dir) {
            for e in d.flatten() {
                if e.file_name().to_string_lossy().starts_with(&self.id_prefix) {
                    notes.push(format!("cleanup: removed leftover {}", e.path().display()));
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        notes
    }
}

pub fn take_cleanup() -> Option<Cleanup> {
    CLEANUP.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The repository root: `--repo`, else the first parent of the binary (or
/// of the working directory) that holds scripts/private-containerd.sh.
pub fn find_repo(opt: Option<&PathBuf>) -> Result<PathBuf, String> {
    let has = |d: &Path| d.join("scripts/private-containerd.sh").exists();
    if let Some(r) = opt {
        return if has(r) {
            Ok(r.clone())
        } else {
            Err(format!(
                "{} has no scripts/private-containerd.sh",
                r.display()
            ))
        };
    }
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    starts
        .into_iter()
        .flatten()
        .flat_map(|s| s.ancestors().map(Path::to_owned).collect::<Vec<_>>())
        .find(|d| has(d))
        .ok_or_else(|| "cannot find the moat repository (give --repo DIR)".into())
}

pub fn on_path(path: &str, tool: &str) -> bool {
    std::env::split_paths(path).any(|d| d.join(tool).is_file())
}

/// `/sys/module` tells what /dev/kvm is.
pub fn kvm_kind() -> &'static str {
    let m = |n: &str| Path::new("/sys/module").join(n).exists();
    if m("kvm_intel") || m("kvm_amd") {
        "hardware"
    } else if m("kvm_pvm") {
        "pvm"
    } else if Path::new("/dev/kvm").exists() {
        "unknown"
    } else {
        "none"
    }
}

pub fn host_json() -> Value {
    let uname = proc::run(Command::new("uname").arg("-r"), Duration::from_secs(10))
        .map(|f| f.stdout.trim().to_owned())
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": uname,
        "kvm": kvm_kind(),
        "load_avg": fs::read_to_string("/proc/loadavg").map(|s| s.trim().to_owned()).unwrap_or_default(),
    })
}

struct Bench {
    opts: Opts,
    repo: PathBuf,
    dir: PathBuf,
    sock: String,
    path_env: String,
    state_dir: PathBuf,
    cache_dir: PathBuf,
    id_prefix: String,
    events: Option<Child>,
}

impl Bench {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.sock).env("PATH", &self.path_env);
        c
    }

    fn cleanup(&self) -> Cleanup {
        Cleanup {
            repo: self.repo.clone(),
            dir: self.dir.clone(),
            sock: self.sock.clone(),
            events_pid: self.events.as_ref().map(Child::id),
            state_dir: self.state_dir.clone(),
            id_prefix: self.id_prefix.clone(),
        }
    }

    fn set_cleanup(&self) {
        self.cleanup().arm();
    }

    fn setup(&mut self) -> Result<(), String> {
        let mut c = self.cleanup();
        c.start_containerd(&self.path_env, self.opts.moat_config.as_deref())?;
        self.sock = c.sock;
        let tar = self.dir.join("busybox.tar");
        proc::run(
            Command::new("bash")
                .arg(self.repo.join("scripts/busybox-image.sh"))
                .arg(&tar),
            Duration::from_secs(120),
        )?
        .ok("busybox-image.sh")?;
        import_image(self.ctr(), &tar)?;
        let log = fs::File::create(self.dir.join("events.log"))
            .map_err(|e| format!("create events.log: {e}"))?;
        self.events = Some(
            self.ctr()
                .arg("events")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("start ctr events: {e}"))?,
        );
        self.set_cleanup();
        // Let the subscription settle before the first run.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    fn id(&self, rt: Runtime, what: &str) -> String {
        format!("{}-{}-{what}", self.id_prefix, rt.name())
    }

    fn one_run(&self, rt: Runtime, index: usize) -> RunRecord {
        let id = self.id(rt, &index.to_string());
        let moat = rt == Runtime::Moat;
        let before = moat.then(|| cache_images(&self.cache_dir)).flatten();
        let watch = moat.then(|| Watch::start(self.state_dir.join(&id).join("vmm.log")));
        let timeout = match rt {
            Runtime::Runc => self.opts.timeout.min(Duration::from_secs(60)),
            Runtime::Moat => self.opts.timeout,
        };
        let result = proc::run(
            self.ctr()
                .args(["run", "--rm", "--runtime", rt.containerd_name(), IMAGE])
                .arg(&id)
                .arg("true"),
            timeout,
        );
        let vmm_log = watch.and_then(Watch::finish);
        let after = moat.then(|| cache_images(&self.cache_dir)).flatten();
        let layer_cache = match (before, after) {
            (Some(b), Some(a)) => Some(if a.difference(&b).next().is_some() {
                "miss"
            } else {
                "hit"
            }),
            _ => None,
        };
        let (ok, error, t0, t1) = match result {
            Ok(f) => {
                let t0 = timestamp::nanos_of(f.started);
                let t1 = t0 + f.elapsed.as_nanos() as i64;
                let ok = f.status.success();
                let err = (!ok).then(|| format!("ctr run: {}: {}", f.status, f.stderr.trim()));
                (ok, err, t0, t1)
            }
            Err(e) => (false, Some(e), 0, 0),
        };
        RunRecord {
            runtime: rt.name(),
            index,
            id,
            ok,
            error,
            layer_cache,
            parts_ms: BTreeMap::new(),
            t0,
            t1,
            vmm_log,
        }
    }

    /// Starts `pods` idle containers at once, waits, and reads the memory
    /// of every shim tree together; all are removed afterwards.
    fn density_memory(&self, rt: Runtime, pods: usize) -> Result<Vec<ProcMem>, String> {
        let ids: Vec<String> = (0..pods).map(|i| self.id(rt, &format!("pod{i}"))).collect();
        let started: Vec<Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .iter()
                .map(|id| {
                    s.spawn(move || {
                        proc::run(
                            self.ctr()
                                .args(["run", "-d", "--runtime", rt.containerd_name(), IMAGE])
                                .arg(id)
                                .args(["sleep", "3600"]),
                            self.opts.timeout,
                        )?
                        .ok("ctr run -d")
                        .map(drop)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
                .collect()
        });
        let measured = match started.into_iter().find_map(Result::err) {
            Some(e) => Err(e),
            None if proc::sleep(self.opts.idle) => ids
                .iter()
                .map(|id| shim_tree_mem(&self.sock, rt.shim_binary(), id))
                .collect::<Result<Vec<_>, _>>()
                .map(|all| all.concat()),
            None => Err("interrupted".to_string()),
        };
        let cleanup: Vec<String> = ids
            .iter()
            .flat_map(|id| remove_container(|| self.ctr(), id))
            .collect();
        match (measured, cleanup.is_empty()) {
            (Ok(m), _) => Ok(m),
            (Err(e), true) => Err(e),
            (Err(e), false) => Err(format!("{e}; then {}", cleanup.join("; "))),
        }
    }

    /// Starts `sleep 3600`, waits, and sums PSS over the shim and all its
    /// descendants (runc: the container's process; moat: moat-vmm).
    fn idle_memory(&self, rt: Runtime) -> Result<Vec<ProcMem>, String> {
        let id = self.id(rt, "idle");
        let timeout = self.opts.timeout;
        proc::run(
            self.ctr()
                .args(["run", "-d", "--runtime", rt.containerd_name(), IMAGE])
                .arg(&id)
                .args(["sleep", "3600"]),
            timeout,
        )?
        .ok("ctr run -d")?;
        let measured = if proc::sleep(self.opts.idle) {
            shim_tree_mem(&self.sock, rt.shim_binary(), &id)
        } else {
            Err("interrupted".to_string())
        };
        let cleanup = remove_container(|| self.ctr(), &id);
        match (measured, cleanup.is_empty()) {
            (Ok(m), _) => Ok(m),
            (Err(e), true) => Err(e),
            (Err(e), false) => Err(format!("{e}; then {}", cleanup.join("; "))),
        }
    }
}

/// `ctr images import TAR`.
pub fn import_image(mut ctr: Command, tar: &Path) -> Result<(), String> {
    proc::run(
        ctr.args(["images", "import"]).arg(tar),
        Duration::from_secs(120),
    )?
    .ok("ctr images import")
    .map(drop)
}

/// The shim (`shim_binary`) serving container `id` on containerd `sock`.
pub fn find_shim(sock: &str, shim_binary: &str, id: &str) -> Result<i32, String> {
    let table = proc::table();
    let shims: Vec<i32> = table
        .keys()
        .copied()
        .filter(|pid| {
            let cmd = proc::cmdline(*pid);
            let has = |k: &str, v: &str| cmd.windows(2).any(|w| w[0] == k && w[1] == v);
            cmd.first()
                .is_some_and(|a| Path::new(a).file_name() == Some(shim_binary.as_ref()))
                && has("-address", sock)
                && has("-id", id)
                && !matches!(cmd.last().map(String::as_str), Some("start" | "delete"))
        })
        .collect();
    match shims[..] {
        [shim] => Ok(shim),
        _ => Err(format!(
            "expected one {shim_binary} for {id}, found {shims:?}"
        )),
    }
}

/// PSS and RSS of the shim serving `id` and of all its descendants
/// (runc: the container's processes; moat: moat-vmm).
pub fn shim_tree_mem(sock: &str, shim_binary: &str, id: &str) -> Result<Vec<ProcMem>, String> {
    let shim = find_shim(sock, shim_binary, id)?;
    let table = proc::table();
    proc::tree(&table, shim)
        .into_iter()
        .map(|pid| {
            // comm is cut at 15 bytes ("containerd-shim"): name it by its binary.
            let cmd = proc::cmdline(pid);
            let name = cmd
                .first()
                .and_then(|a| Path::new(a).file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .or_else(|| table.get(&pid).map(|t| t.0.clone()))
                .unwrap_or_default();
            proc::mem(pid, &name)
        })
        .collect()
}

/// Kills container `id`'s task, removes it and the container; returns
/// what failed.
pub fn remove_container(ctr: impl Fn() -> Command, id: &str) -> Vec<String> {
    let mut cleanup = Vec::new();
    let _ = proc::run_to_end(
        ctr().args(["task", "kill", "-s", "SIGKILL"]).arg(id),
        Duration::from_secs(30),
    );
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match proc::run_to_end(ctr().args(["task", "rm"]).arg(id), Duration::from_secs(60))
            .and_then(|f| f.ok("ctr task rm"))
        {
            Ok(_) => break,
            // No task (it never started): nothing to wait for.
            Err(e) if e.contains("not found") => break,
            Err(e) if Instant::now() > end => {
                cleanup.push(e);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    if let Err(e) = proc::run_to_end(ctr().args(["c", "rm"]).arg(id), Duration::from_secs(60))
        .and_then(|f| f.ok("ctr c rm"))
    {
        cleanup.push(e);
    }
    cleanup
}

fn read_lines<T>(path: &Path, f: impl Fn(&str) -> Option<T>) -> Vec<T> {
    fs::read_to_string(path)
        .map(|t| t.lines().filter_map(f).collect())
        .unwrap_or_default()
}

/// Everything measured, for the JSON file and the tables.
#[derive(Debug, Default)]
pub struct Report {
    pub runs: Vec<RunRecord>,
    pub idle: BTreeMap<&'static str, Result<Vec<ProcMem>, String>>,
    /// The memory of `Opts::pods` idle containers together, when asked.
    pub density: BTreeMap<&'static str, Result<Vec<ProcMem>, String>>,
    pub notes: Vec<String>,
    pub runtimes: Vec<Runtime>,
}

impl Report {
    pub fn summary(&self, rt: Runtime, part: &str) -> Option<Summary> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.ok && r.runtime == rt.name())
            .filter_map(|r| r.parts_ms.get(part).copied())
            .collect();
        Summary::of(&v)
    }

    fn pss_kib(&self, rt: Runtime) -> Option<u64> {
        match self.idle.get(rt.name())? {
            Ok(p) => Some(p.iter().map(|m| m.pss_kib).sum()),
            Err(_) => None,
        }
    }

    pub fn to_json(&self, runs: usize) -> Value {
        let mut summary = serde_json::Map::new();
        for &rt in &self.runtimes {
            let mut s = serde_json::Map::new();
            for (part, _, _) in PARTS {
                if let Some(x) = self.summary(rt, part) {
                    s.insert(part.to_string(), json!(x));
                }
            }
            summary.insert(rt.name().into(), Value::Object(s));
        }
        let total = |rt, f: fn(&Summary) -> f64| self.summary(rt, "total").as_ref().map(f);
        let idle: serde_json::Map<String, Value> = self
            .idle
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Ok(p) => json!({
                        "processes": p,
                        "pss_kib": p.iter().map(|m| m.pss_kib).sum::<u64>(),
                        "rss_kib": p.iter().map(|m| m.rss_kib).sum::<u64>(),
                    }),
                    Err(e) => json!({ "error": e }),
                };
                (k.to_string(), v)
            })
            .collect();
        json!({
            "benchmark": "ctr run --rm busybox true",
            "date": timestamp::format_utc(timestamp::nanos_of(SystemTime::now())),
            "host": host_json(),
            "runs_per_runtime": runs,
            "image": IMAGE,
            "parts": PARTS.iter().map(|(k, d, m)| json!({"key": k, "what": d, "moat_only": m})).collect::<Vec<_>>(),
            "runs": self.runs,
            "summary_ms": summary,
            "ratio_moat_runc": {
                "total_p50": ratio(total(Runtime::Moat, |s| s.p50), total(Runtime::Runc, |s| s.p50)),
                "total_p90": ratio(total(Runtime::Moat, |s| s.p90), total(Runtime::Runc, |s| s.p90)),
                "idle_pss": ratio(self.pss_kib(Runtime::Moat).map(|v| v as f64), self.pss_kib(Runtime::Runc).map(|v| v as f64)),
            },
            "idle_memory": idle,
            "notes": self.notes,
        })
    }

    pub fn markdown(&self, runs: usize) -> String {
        let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
        let x = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}×"));
        let mut out = String::new();
        let moat = self.runtimes.contains(&Runtime::Moat);
        out += &format!(
            "### `ctr run --rm busybox true`, {runs} runs per runtime, alternating (ms)\n\n"
        );
        if moat {
            out += "| part | runc p50 | runc p90 | moat p50 | moat p90 | moat/runc p50 | moat/runc p90 |\n";
            out += "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n";
        } else {
            out += "| part | runc p50 | runc p90 | n |\n| --- | ---: | ---: | ---: |\n";
        }
        for (part, what, moat_only) in PARTS {
            let r = self.summary(Runtime::Runc, part);
            let m = self.summary(Runtime::Moat, part);
            if *moat_only && m.is_none() {
                continue;
            }
            if moat {
                out += &format!(
                    "| {what} | {} | {} | {} | {} | {} | {} |\n",
                    f(r.map(|s| s.p50)),
                    f(r.map(|s| s.p90)),
                    f(m.map(|s| s.p50)),
                    f(m.map(|s| s.p90)),
                    x(ratio(m.map(|s| s.p50), r.map(|s| s.p50))),
                    x(ratio(m.map(|s| s.p90), r.map(|s| s.p90))),
                );
            } else if r.is_some() {
                out += &format!(
                    "| {what} | {} | {} | {} |\n",
                    f(r.map(|s| s.p50)),
                    f(r.map(|s| s.p90)),
                    r.map_or(0, |s| s.n)
                );
            }
        }
        let moat_runs: Vec<&RunRecord> = self.runs.iter().filter(|r| r.runtime == "moat").collect();
        if !moat_runs.is_empty() {
            out += "\nmoat runs: ";
            let each: Vec<String> = moat_runs
                .iter()
                .map(|r| {
                    let total = r
                        .parts_ms
                        .get("total")
                        .map_or("–".into(), |t| format!("{t:.0} ms"));
                    let status = if r.ok { "ok" } else { "FAILED" };
                    match r.layer_cache {
                        Some(c) => format!("#{} {status} {total} (layer cache {c})", r.index),
                        None => format!("#{} {status} {total}", r.index),
                    }
                })
                .collect();
            out += &each.join(", ");
            out += "\n";
        }
        for r in self.runs.iter().filter(|r| !r.ok) {
            out += &format!(
                "\n{} run {} failed: {}\n",
                r.runtime,
                r.index,
                r.error.as_deref().unwrap_or("?")
            );
            // What was seen before it failed (not in the figures above).
            let seen: Vec<String> = PARTS
                .iter()
                .filter_map(|(k, what, _)| Some(format!("{what}: {:.1}", r.parts_ms.get(k)?)))
                .collect();
            if !seen.is_empty() {
                out += &format!("  parts seen (ms): {}\n", seen.join("; "));
            }
        }
        if !self.idle.is_empty() {
            out += "\n### Host memory of one idle container (`sleep 3600`)\n\n";
            out += "| runtime | processes (PSS) | PSS total | RSS total |\n| --- | --- | ---: | ---: |\n";
            for (rt, v) in &self.idle {
                match v {
                    Ok(p) => {
                        let procs: Vec<String> = p
                            .iter()
                            .map(|m| format!("{} {:.1} MiB", m.name, m.pss_kib as f64 / 1024.0))
                            .collect();
                        let pss: u64 = p.iter().map(|m| m.pss_kib).sum();
                        let rss: u64 = p.iter().map(|m| m.rss_kib).sum();
                        out += &format!(
                            "| {rt} | {} | {:.1} MiB | {:.1} MiB |\n",
                            procs.join(", "),
                            pss as f64 / 1024.0,
                            rss as f64 / 1024.0
                        );
                    }
                    Err(e) => out += &format!("| {rt} | failed: {e} | – | – |\n"),
                }
            }
            let r = ratio(
                self.pss_kib(Runtime::Moat).map(|v| v as f64),
                self.pss_kib(Runtime::Runc).map(|v| v as f64),
            );
            if r.is_some() {
                out += &format!("| moat/runc | | {} | |\n", x(r));
            }
        }
        for n in &self.notes {
            out += &format!("\nnote: {n}\n");
        }
        out
    }
}

/// What each `moat-bench` command that drives containerd does first:
/// takes its parsed arguments (on an error, prints it with `usage` and
/// exits 2), stops on Ctrl-C, and cleans up on a panic (with panic =
/// "abort" nothing unwinds: the hook is the last chance to clean up).
pub fn begin<T>(command: &str, usage: &str, parsed: Result<T, String>) -> T {
    let opts = match parsed {
        Ok(o) => o,
        Err(e) => {
            eprintln!("moat-bench {command}: {e}\n{usage}");
            std::process::exit(2);
        }
    };
    proc::catch_signals();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        prev(info);
        if let Some(c) = take_cleanup() {
            for n in c.run() {
                eprintln!("{n}");
            }
        }
    }));
    opts
}

pub fn main(args: &[String]) {
    let opts = begin("ctr", USAGE, parse_args(args));
    match run(opts.clone()) {
        Ok(report) => {
            print!("{}", report.markdown(opts.runs));
            if let Some(path) = &opts.json {
                let text = serde_json::to_string_pretty(&report.to_json(opts.runs))
                    .expect("a JSON value always serializes");
                if let Err(e) = fs::write(path, text + "\n") {
                    eprintln!("moat-bench ctr: write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            if report.runs.iter().any(|r| !r.ok) || proc::interrupted() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("moat-bench ctr: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs the benchmark; the private containerd and everything it ran are
/// gone when it returns.
pub fn run(opts: Opts) -> Result<Report, String> {
    let repo = find_repo(opts.repo.as_ref())?;
    let mut path_env = std::env::var("PATH").unwrap_or_default();
    if let Some(b) = &opts.moat_bin {
        let b = fs::canonicalize(b).map_err(|e| format!("--moat-bin {}: {e}", b.display()))?;
        path_env = format!("{}:{path_env}", b.display());
    }
    for tool in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        if !on_path(&path_env, tool) {
            return Err(format!("{tool} is not installed"));
        }
    }
    if !opts.skip_moat && !on_path(&path_env, Runtime::Moat.shim_binary()) {
        return Err(format!(
            "{} is not on PATH: run scripts/install.sh, give --moat-bin DIR, or --skip-moat",
            Runtime::Moat.shim_binary()
        ));
    }
    let config_path = opts
        .moat_config
        .clone()
        .or_else(|| std::env::var_os("MOAT_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| "/etc/moat/config.toml".into());
    let config = fs::read_to_string(&config_path).unwrap_or_default();
    let key = |k: &str, default: &str| {
        PathBuf::from(parse::toml_string(&config, k).unwrap_or_else(|| default.into()))
    };
    let id_prefix = format!("mb{}", std::process::id());
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("moat-bench-{id_prefix}")));
    if dir.exists() {
        return Err(format!("{} exists; give another --dir", dir.display()));
    }
    let mut b = Bench {
        repo,
        dir,
        sock: String::new(),
        path_env,
        state_dir: key("state_dir", "/run/moat"),
        cache_dir: key("layer_cache_dir", "/var/lib/moat/layers"),
        id_prefix,
        events: None,
        opts,
    };
    let result = measure(&mut b);
    // Logs first: the cleanup removes the directory.
    if let Some(keep) = &b.opts.keep_logs {
        let _ = fs::create_dir_all(keep);
        for f in ["containerd.log", "events.log"] {
            let _ = fs::copy(b.dir.join(f), keep.join(f));
        }
    }
    let notes = take_cleanup().map(|c| c.run()).unwrap_or_default();
    if let Some(mut e) = b.events.take() {
        let _ = e.wait();
    }
    let mut report = result?;
    report.notes.extend(notes);
    Ok(report)
}

fn measure(b: &mut Bench) -> Result<Report, String> {
    b.setup()?;
    let mut report = Report {
        runtimes: if b.opts.skip_moat {
            vec![Runtime::Runc]
        } else {
            vec![Runtime::Runc, Runtime::Moat]
        },
        ..Default::default()
    };
    let mut moat_failed = false;
    'runs: for i in 0..b.opts.runs {
        // Alternate which runtime goes first, so neither always follows the other.
        let mut order = report.runtimes.clone();
        if i % 2 == 1 {
            order.reverse();
        }
        for rt in order {
            if proc::interrupted() {
                report.notes.push("interrupted".into());
                break 'runs;
            }
            if rt == Runtime::Moat && moat_failed {
                continue;
            }
            let r = b.one_run(rt, i);
            eprintln!(
                "{} #{i}: {}",
                rt.name(),
                match (&r.error, r.t1 - r.t0) {
                    (Some(e), _) => format!("FAILED: {e}"),
                    (None, ns) => format!("{:.1} ms", ns as f64 / 1e6),
                }
            );
            if !r.ok && rt == Runtime::Moat {
                moat_failed = true;
                report.notes.push(format!(
                    "moat run {i} failed; the remaining moat runs were skipped"
                ));
            }
            report.runs.push(r);
        }
    }
    if !b.opts.skip_pss {
        for rt in report.runtimes.clone() {
            if proc::interrupted() || (rt == Runtime::Moat && moat_failed) {
                continue;
            }
            let m = b.idle_memory(rt);
            if let Err(e) = &m {
                eprintln!("{} idle memory: FAILED: {e}", rt.name());
            }
            report.idle.insert(rt.name(), m);
            if b.opts.pods > 1 && !proc::interrupted() {
                let m = b.density_memory(rt, b.opts.pods);
                if let Err(e) = &m {
                    eprintln!("{} memory of {} pods: FAILED: {e}", rt.name(), b.opts.pods);
                }
                report.density.insert(rt.name(), m);
            }
        }
    }
    // Let the last events reach `ctr events`, then read everything.
    std::thread::sleep(Duration::from_millis(500));
    let events = read_lines(&b.dir.join("events.log"), parse::ctr_event);
    let log = read_lines(&b.dir.join("containerd.log"), parse::log_line);
    if events.is_empty() {
        report
            .notes
            .push("no `ctr events` output: TaskCreate/Start/Exit/Delete parts are missing".into());
    }
    for r in report.runs.iter_mut().filter(|r| r.t1 > 0) {
        r.parts_ms = parts(&r.id, r.t0, r.t1, &events, &log, r.vmm_log.as_deref());
    }
    if report.runs.iter().any(|r| {
        r.runtime == "moat" && r.ok && !r.parts_ms.contains_key("vmm_to_first_instruction")
    }) {
        report.notes.push(format!(
            "moat-vmm's log was not found under {} for some runs",
            b.state_dir.display()
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &str) -> CtrEvent {
        parse::ctr_event(line).unwrap()
    }
    fn lg(line: &str) -> LogLine {
        parse::log_line(line).unwrap()
    }
    const T0: i64 = 1_764_269_922_000_000_000; // 2025-11-27T18:58:42Z

    #[test]
    fn args() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let o = parse_args(&s(&[])).unwrap();
        assert_eq!((o.runs, o.skip_moat, o.skip_pss), (5, false, false));
        let o = parse_args(&s(&[
            "--runs",
            "20",
            "--skip-moat",
            "--json",
            "o.json",
            "--timeout",
            "90",
        ]))
        .unwrap();
        assert_eq!(o.runs, 20);
        assert!(o.skip_moat);
        assert_eq!(o.json, Some(PathBuf::from("o.json")));
        assert_eq!(o.timeout, Duration::from_secs(90));
        for bad in [
            &["--runs"][..],
            &["--runs", "0"],
            &["--runs", "x"],
            &["--idle", "-1"],
            &["--what"],
        ] {
            assert!(parse_args(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn runc_parts_from_events() {
        let events = [
            ev(r#"2025-11-27 18:58:42.100 +0000 UTC default /containers/create {"id":"r0"}"#),
            ev(
                r#"2025-11-27 18:58:42.150 +0000 UTC default /tasks/create {"container_id":"r0","pid":9}"#,
            ),
            // Another container's events are not this one's.
            ev(
                r#"2025-11-27 18:58:42.160 +0000 UTC default /tasks/start {"container_id":"r1","pid":8}"#,
            ),
            ev(
                r#"2025-11-27 18:58:42.170 +0000 UTC default /tasks/start {"container_id":"r0","pid":9}"#,
            ),
            // An exec's exit is not the container's.
            ev(
                r#"2025-11-27 18:58:42.175 +0000 UTC default /tasks/exit {"container_id":"r0","id":"exec1","exited_at":"2025-11-27T18:58:42.1Z"}"#,
            ),
            ev(
                r#"2025-11-27 18:58:42.180 +0000 UTC default /tasks/exit {"container_id":"r0","id":"r0","pid":9,"exited_at":"2025-11-27T18:58:42.178Z"}"#,
            ),
            ev(
                r#"2025-11-27 18:58:42.190 +0000 UTC default /tasks/delete {"container_id":"r0","pid":9}"#,
            ),
        ];
        let p = parts("r0", T0, T0 + 250_000_000, &events, &[], None);
        let want = [
            ("total", 250.0),
            ("to_task_create", 150.0),
            ("create_to_start", 20.0),
            ("start_to_exit", 10.0),
            ("exit_to_event", 2.0),
            ("exit_to_delete", 10.0),
            ("delete_to_ctr_exit", 60.0),
        ];
        assert_eq!(p.len(), want.len(), "{p:?}");
        for (k, v) in want {
            assert!((p[k] - v).abs() < 1e-6, "{k}: {} != {v}", p[k]);
        }
    }

    #[test]
    fn moat_parts_from_shim_log_and_vmm_log() {
        let events = [
            ev(r#"2025-11-27 18:59:12.600 +0000 UTC default /tasks/create {"container_id":"m0"}"#),
            ev(r#"2025-11-27 18:59:12.700 +0000 UTC default /tasks/start {"container_id":"m0"}"#),
            ev(
                r#"2025-11-27 18:59:13 +0000 UTC default /tasks/exit {"container_id":"m0","id":"m0"}"#,
            ),
            ev(r#"2025-11-27 18:59:13.100 +0000 UTC default /tasks/delete {"container_id":"m0"}"#),
        ];
        let log = [
            lg(r#"time="2025-11-27T18:58:42.2Z" level=info msg="create m00 (bundle /b)""#),
            lg(r#"time="2025-11-27T18:58:42.3Z" level=info msg="create m0 (bundle /run/x/m0)""#),
            lg(
                r#"time="2025-11-27T18:58:42.5Z" level=info msg="sandbox m0: moat-vmm pid 77 restoring /t/x.template""#,
            ),
            lg(
                r#"time="2025-11-27T18:59:12.5Z" level=info msg="sandbox m0: agent 0.1.0 on kernel 6.12 is up; restored from a template""#,
            ),
            lg(r#"time="2025-11-27T18:59:13.4Z" level=info msg="sandbox m0: VM stopped""#),
            lg(r#"time="2025-11-27T18:59:13.5Z" level=info msg="deleted m0""#),
        ];
        let vmm = "moat-vmm: [   0.03] INFO  Guest started after 25000 us\n";
        let t1 = T0 + 31_600_000_000;
        let p = parts("m0", T0, t1, &events, &log, Some(vmm));
        let want = [
            ("total", 31_600.0),
            ("to_task_create", 30_600.0),
            ("create_to_start", 100.0),
            ("start_to_exit", 300.0),
            ("exit_to_delete", 100.0),
            ("delete_to_ctr_exit", 500.0),
            ("to_shim_create", 300.0),
            ("rootfs_prepare", 200.0),
            ("vmm_to_first_instruction", 25.0),
            ("guest_boot_to_agent_ready", 29_975.0),
            ("agent_create", 100.0),
            ("vm_stop", 300.0),
        ];
        for (k, v) in want {
            assert!((p[k] - v).abs() < 1e-6, "{k}: {:?} != {v}", p.get(k));
        }
        // No exited_at: that part is absent, not zero.
        assert!(!p.contains_key("exit_to_event"));
        assert_eq!(p.len(), want.len());

        // Without the VMM log the guest boot cannot be split from the VMM's part.
        let p = parts("m0", T0, t1, &events, &log, None);
        assert!(!p.contains_key("vmm_to_first_instruction"));
        assert!(!p.contains_key("guest_boot_to_agent_ready"));
        assert_eq!(p["rootfs_prepare"], 200.0);
    }

    #[test]
    fn report_tables_show_what_was_measured() {
        let run = |rt: Runtime, i: usize, total: f64, ok: bool| RunRecord {
            runtime: rt.name(),
            index: i,
            id: format!("x-{}-{i}", rt.name()),
            ok,
            error: (!ok).then(|| "boom".into()),
            layer_cache: (rt == Runtime::Moat).then_some(if i == 0 { "miss" } else { "hit" }),
            parts_ms: [("total", total)].into_iter().collect(),
            t0: 0,
            t1: 0,
            vmm_log: None,
        };
        let mut r = Report {
            runtimes: vec![Runtime::Runc, Runtime::Moat],
            runs: vec![
                run(Runtime::Runc, 0, 100.0, true),
                run(Runtime::Moat, 0, 3000.0, true),
                run(Runtime::Runc, 1, 200.0, true),
                run(Runtime::Moat, 1, 1000.0, true),
                run(Runtime::Moat, 2, 1.0, false),
            ],
            ..Default::default()
        };
        r.idle.insert(
            "runc",
            Ok(vec![ProcMem {
                pid: 1,
                name: "shim".into(),
                pss_kib: 1024,
                rss_kib: 2048,
            }]),
        );
        r.idle.insert("moat", Err("no VM".into()));
        // Failed runs do not count.
        assert_eq!(r.summary(Runtime::Moat, "total").unwrap().n, 2);
        let md = r.markdown(2);
        assert!(
            md.contains(
                "| `ctr run --rm` wall time | 100.0 | 200.0 | 1000.0 | 3000.0 | 10.00× | 15.00× |"
            ),
            "{md}"
        );
        assert!(md.contains("#0 ok 3000 ms (layer cache miss)"), "{md}");
        assert!(md.contains("moat run 2 failed: boom"), "{md}");
        assert!(
            md.contains("parts seen (ms): `ctr run --rm` wall time: 1.0"),
            "{md}"
        );
        assert!(
            md.contains("| runc | shim 1.0 MiB | 1.0 MiB | 2.0 MiB |"),
            "{md}"
        );
        assert!(md.contains("| moat | failed: no VM |"), "{md}");
        // Moat-only parts with no data are not listed.
        assert!(!md.contains("rootfs"), "{md}");
        let j = r.to_json(2);
        assert_eq!(j["ratio_moat_runc"]["total_p50"], json!(10.0));
        assert_eq!(j["ratio_moat_runc"]["idle_pss"], Value::Null);
        assert_eq!(j["summary_ms"]["runc"]["total"]["n"], json!(2));
        assert_eq!(j["idle_memory"]["runc"]["pss_kib"], json!(1024));
        assert_eq!(j["runs"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn layer_cache_listing() {
        let t = std::env::temp_dir().join(format!("moat-bench-cache-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        assert_eq!(cache_images(&t), Some(BTreeSet::new()));
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("a-1.erofs"), "").unwrap();
        fs::write(t.join("b.erofs.tmp.9"), "").unwrap();
        assert_eq!(
            cache_images(&t),
            Some(["a-1.erofs".to_string()].into_iter().collect())
        );
        fs::remove_dir_all(&t).unwrap();
    }
}
