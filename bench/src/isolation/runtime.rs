//! The runtimes under test and the containers the suite runs on them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::ctr::{self, on_path};
use crate::proc;

const RUNC_SHIM: &str = "io.containerd.runc.v2";
const MOAT_SHIM: &str = "io.containerd.moat.v1";
/// The benchmark's image: busybox plus /bin/moat-probe (bench/probe-image.sh).
pub const IMAGE: &str = "localhost/moat-bench-probe:latest";

/// One runtime: how `ctr run` selects it, and whether it can run here.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub name: String,
    /// `ctr run` flags that select it.
    pub ctr_args: Vec<String>,
    /// The shim binary that serves its containers.
    pub shim: String,
    /// Why it cannot run here, if it cannot.
    pub missing: Option<String>,
}

impl Runtime {
    /// runc, crun, runsc and moat by name; any other name is taken as a
    /// containerd runtime (`io.containerd.<x>.v<n>`).
    pub fn resolve(name: &str, repo: &Path, path_env: &str) -> Runtime {
        let wrapper = |w: &str| repo.join("bench/wrappers").join(w).display().to_string();
        let need = |tools: &[&str]| {
            tools
                .iter()
                .find(|t| !on_path(path_env, t))
                .map(|t| format!("{t} is not installed (not on PATH)"))
        };
        let runc_shim = "containerd-shim-runc-v2".to_string();
        let (ctr_args, shim, missing) = match name {
            "runc" => (
                vec![],
                runc_shim,
                need(&["runc", "containerd-shim-runc-v2"]),
            ),
            "crun" | "runsc" => (
                vec!["--runc-binary".into(), wrapper(name)],
                runc_shim,
                need(&[name, "unshare", "containerd-shim-runc-v2"]),
            ),
            "moat" => (
                vec![],
                "containerd-shim-moat-v1".into(),
                need(&["containerd-shim-moat-v1"]),
            ),
            other => {
                // io.containerd.kata.v2 -> containerd-shim-kata-v2
                let shim = other.strip_prefix("io.containerd.").map(|r| {
                    let (n, v) = r.rsplit_once('.').unwrap_or((r, "v1"));
                    format!("containerd-shim-{n}-{v}")
                });
                let missing = match &shim {
                    Some(s) => need(&[s.as_str()]),
                    None => Some(format!("unknown runtime {other:?}")),
                };
                (vec![], shim.unwrap_or_default(), missing)
            }
        };
        let selector = match name {
            "moat" => MOAT_SHIM,
            "runc" | "crun" | "runsc" => RUNC_SHIM,
            other => other,
        };
        let mut args = vec!["--runtime".to_string(), selector.to_string()];
        args.extend(ctr_args);
        Runtime {
            name: name.to_string(),
            ctr_args: args,
            shim,
            missing,
        }
    }
}

/// What a container gets on every runtime: the same limits everywhere.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// Talks to one containerd.
#[derive(Debug, Clone)]
pub struct Ctr {
    pub sock: String,
    pub path_env: String,
}

/// A started process of `ctr`; its stdout lines arrive as it prints them.
pub struct Pending {
    child: Child,
    started: Instant,
    lines: Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pending {
    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The next line it prints, waiting at most `timeout`.
    pub fn wait_line(&self, timeout: Duration) -> Result<String, String> {
        self.lines.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => format!("no output within {} s", timeout.as_secs()),
            RecvTimeoutError::Disconnected => "it ended without output".to_string(),
        })
    }

    /// Waits at most `timeout`; kills it past that.
    pub fn finish(mut self, timeout: Duration) -> Result<(String, Duration), String> {
        let end = self.started + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > end => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("timed out after {} s", timeout.as_secs()));
                }
                Ok(None) if proc::interrupted() => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("interrupted".into());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
        let took = self.started.elapsed();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let stdout: Vec<String> = self.lines.try_iter().collect();
        let out = self
            .child
            .wait_with_output()
            .map_err(|e| format!("ctr output: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok((stdout.join("\n"), took))
    }
}

impl Ctr {
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a").arg(&self.sock).env("PATH", &self.path_env);
        c
    }

    fn spawn(&self, args: &[String]) -> Result<Pending, String> {
        let started = Instant::now();
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start ctr: {e}"))?;
        let (tx, lines) = channel();
        let stdout = child.stdout.take().map(BufReader::new);
        let reader = stdout.map(|out| {
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            })
        });
        Ok(Pending {
            child,
            started,
            lines,
            reader,
        })
    }

    /// `ctr run` flags for a container of `rt` under `limits`.
    fn run_args(rt: &Runtime, limits: Limits, extra: &[String]) -> Vec<String> {
        let mut a = vec!["run".to_string()];
        a.extend(rt.ctr_args.iter().cloned());
        // The default seccomp profile, as Docker and Kubernetes' RuntimeDefault apply it.
        a.push("--seccomp".into());
        a.push("--cpus".into());
        a.push(limits.cpus.to_string());
        a.push("--memory-limit".into());
        a.push(limits.memory_bytes.to_string());
        a.extend(extra.iter().cloned());
        a
    }

    /// Starts `ctr run -d` of a long-lived container (returns when its
    /// process runs: the start latency).
    pub fn start_detached(
        &self,
        rt: &Runtime,
        limits: Limits,
        id: &str,
        flags: &[String],
        cmd: &[&str],
    ) -> Result<Pending, String> {
        let mut extra = vec!["-d".to_string()];
        extra.extend(flags.iter().cloned());
        let mut a = Ctr::run_args(rt, limits, &extra);
        a.push(IMAGE.into());
        a.push(id.into());
        a.extend(cmd.iter().map(|s| s.to_string()));
        self.spawn(&a)
    }

    /// `ctr run --rm ... true`: one cold start to exit.
    pub fn run_once(
        &self,
        rt: &Runtime,
        limits: Limits,
        id: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let mut a = Ctr::run_args(rt, limits, &["--rm".to_string()]);
        a.extend([IMAGE.to_string(), id.to_string(), "true".to_string()]);
        self.spawn(&a)?.finish(timeout).map(|(_, t)| t)
    }

    /// Starts `moat-probe ARGS` in container `id` (`ctr task exec`).
    pub fn exec(&self, id: &str, exec_id: &str, probe_args: &[&str]) -> Result<Pending, String> {
        let mut a: Vec<String> = ["task", "exec", "--exec-id", exec_id, id, "/bin/moat-probe"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(probe_args.iter().map(|s| s.to_string()));
        self.spawn(&a)
    }

    /// Kills exec `exec_id` of container `id` (its end is awaited elsewhere).
    pub fn kill_exec(&self, id: &str, exec_id: &str) {
        let _ = proc::run_to_end(
            self.cmd()
                .args(["task", "kill", "-s", "SIGKILL", "--exec-id", exec_id])
                .arg(id),
            Duration::from_secs(60),
        );
    }

    pub fn remove(&self, id: &str) -> Vec<String> {
        ctr::remove_container(|| self.cmd(), id)
    }

    /// The OCI spec the runtime got for `id`: the shim runs in the bundle.
    pub fn bundle_spec(&self, rt: &Runtime, id: &str) -> Result<serde_json::Value, String> {
        let shim = ctr::find_shim(&self.sock, &rt.shim, id)?;
        let path = PathBuf::from(format!("/proc/{shim}/cwd/config.json"));
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", path.display()))
    }
}

/// Builds the probe image from the busybox one and imports it.
pub fn import_probe_image(repo: &Path, ctr: &Ctr, probe: &Path, dir: &Path) -> Result<(), String> {
    let tar = dir.join("probe-image.tar");
    proc::run(
        Command::new("bash")
            .arg(repo.join("bench/probe-image.sh"))
            .arg(probe)
            .arg(&tar)
            .arg(IMAGE),
        Duration::from_secs(180),
    )?
    .ok("bench/probe-image.sh")?;
    ctr::import_image(ctr.cmd(), &tar)
}
