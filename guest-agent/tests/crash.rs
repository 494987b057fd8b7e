//! The agent's crash trail: a panic leaves its message and a backtrace on
//! stderr, which is the console when the agent is PID 1. The crash point
//! `MOAT_CRASH_AT` exists in debug builds only.

use std::process::Command;

#[test]
fn panic_report_reaches_stderr() {
    let out = Command::new(env!("CARGO_BIN_EXE_moat-agent"))
        .env("MOAT_CRASH_AT", "agent-start")
        .output()
        .expect("run moat-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("moat-agent: thread 'main' panicked at guest-agent/src/main.rs:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("crash point agent-start reached"),
        "{stderr}"
    );
    assert!(stderr.contains("moat-agent: backtrace:\n"), "{stderr}");
    assert!(stderr.contains("moat_agent::main"), "{stderr}");
}
