//! Pieces shared by the agent's integration tests (host and VM).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_agent_scenarios as scenarios;
use moat_protocol::agent::{source::Kind, Source, Volume};
use protobuf::MessageField;

/// Exits the test binary successfully after a loud notice.
pub fn skip(suite: &str, why: &str) -> ! {
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {suite}: {why}");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    std::process::exit(0);
}

pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A busybox tree: /bin/busybox plus a symlink per applet, and
/// /bin/vsock-probe (built with `cc -static`).
pub fn busybox_tree(dir: &Path) {
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = sh(Command::new("/bin/busybox").arg("--list-full"));
    for applet in list.lines() {
        let p = dir.join(applet);
        if !p.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &p).unwrap();
        }
    }
    // A static vsock client for `scenarios::vsock_denied`.
    let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe/vsock_probe.c");
    sh(Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(dir.join("bin/vsock-probe"))
        .arg(probe));
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
}

pub fn vol(kind: Kind, fs: &str) -> Volume {
    Volume {
        source: MessageField::some(Source {
            kind: Some(kind),
            ..Default::default()
        }),
        fs_type: fs.into(),
        ..Default::default()
    }
}

/// A named test case. Cases own what they use (an `Arc<Env>` clone): one
/// that overruns its timeout is abandoned in its thread, and the suite goes on.
pub type Case = (&'static str, Box<dyn Fn() + Send + 'static>);

/// A case running `f` against a shared value (usually the suite's `Env`).
pub fn case<T: Send + Sync + 'static>(name: &'static str, env: &Arc<T>, f: fn(&T)) -> Case {
    let env = env.clone();
    (name, Box::new(move || f(&env)))
}

/// How the suite paces its cases.
pub struct Limits {
    /// Cases that would start after this is spent are skipped, loudly and by
    /// name: the VM suite orders its cases by value, and a slow (emulated)
    /// guest then still fits CI's time.
    pub budget: Option<Duration>,
    /// A case still running after this has failed. Its thread is left behind
    /// (a call blocked in the agent cannot be cancelled) and the next case
    /// starts on its own connection.
    pub per_case: Duration,
}

#[derive(Default)]
struct Tally {
    passed: usize,
    skipped: usize,
    failed: Vec<String>,
}

/// Runs the cases whose names contain a command-line filter word (all
/// without one): the lanes side by side, each lane's cases in order (cases
/// that share something, such as a writable disk, go in one lane). Each
/// case runs in its own thread, isolated from the others' panics and
/// hangs. Prints a closing line with the counts, checks skipped inside
/// cases (`scenarios::skipped`) included. Returns the names that failed.
pub fn run_cases(lanes: Vec<Vec<Case>>, limits: Limits) -> Vec<String> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tally = Mutex::new(Tally::default());
    let start = Instant::now();
    std::thread::scope(|s| {
        for lane in lanes {
            let (filter, tally, limits) = (&filter, &tally, &limits);
            s.spawn(move || {
                for (name, f) in lane {
                    if !filter.is_empty() && !filter.iter().any(|x| name.contains(x.as_str())) {
                        continue;
                    }
                    if let Some(budget) = limits.budget.filter(|b| start.elapsed() > *b) {
                        eprintln!(
                            "!!! SKIPPED {name}: the suite's time budget of {budget:?} is spent \
                             (raise it with MOAT_VM_SUITE_BUDGET_SECS)"
                        );
                        tally.lock().unwrap().skipped += 1;
                        continue;
                    }
                    let passed = run_case(name, f, limits.per_case);
                    let mut t = tally.lock().unwrap();
                    if passed {
                        t.passed += 1;
                    } else {
                        t.failed.push(name.to_string());
                    }
                }
            });
        }
    });
    let t = tally.into_inner().unwrap();
    println!(
        "{} passed, {} failed, {} skipped; {} check(s) inside passed cases skipped",
        t.passed,
        t.failed.len(),
        t.skipped,
        scenarios::skip_count()
    );
    t.failed
}

/// Runs one case in a thread of its own; whether it passed in time.
fn run_case(name: &str, f: Box<dyn Fn() + Send + 'static>, per_case: Duration) -> bool {
    let t = Instant::now();
    let skips_before = scenarios::skip_count();
    eprintln!("test {name} ...");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)).is_ok());
    });
    match rx.recv_timeout(per_case) {
        Ok(true) => {
            // With several lanes, another case's skips may land here too.
            let n = scenarios::skip_count() - skips_before;
            let note = if n > 0 {
                format!(", {n} check(s) SKIPPED meanwhile (see above)")
            } else {
                String::new()
            };
            eprintln!(
                "test {name} ... ok ({:.1}s{note})",
                t.elapsed().as_secs_f64()
            );
            true
        }
        Ok(false) | Err(RecvTimeoutError::Disconnected) => {
            eprintln!("test {name} ... FAILED");
            false
        }
        Err(RecvTimeoutError::Timeout) => {
            eprintln!("test {name} ... FAILED: still running after {per_case:?}; abandoned");
            false
        }
    }
}
