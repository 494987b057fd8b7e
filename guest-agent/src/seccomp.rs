//! OCI seccomp profiles compiled to BPF with `seccompiler`.
//!
//! seccompiler filters have one match action, OCI profiles one action per
//! rule. The profile becomes a stack of filters, relying on the kernel taking
//! the most restrictive result of all installed filters:
//! - per non-allow action A, a filter "rules with action A -> A, else allow";
//! - if the default action is not allow, a filter "any rule matches ->
//!   allow, else default".
//!
//! A call that matches no rule gets the default; one that matches rules of
//! action A gets A (the strictest, if rules of several actions match).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{AgentError, Result};
use crate::oci;
use crate::syscall_table::syscall_number;

fn bad(msg: String) -> AgentError {
    AgentError::InvalidSpec(format!("seccomp: {msg}"))
}

fn action(name: &str, errno: Option<u32>) -> Result<SeccompAction> {
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno.unwrap_or(0)),
        other => return Err(bad(format!("unsupported action {other:?}"))),
    })
}

fn condition(a: &oci::SeccompArg) -> Result<SeccompCondition> {
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, a.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, a.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, a.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, a.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, a.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, a.value),
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        other => return Err(bad(format!("unsupported operator {other:?}"))),
    };
    let index = u8::try_from(a.index)
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| bad(format!("argument index {} out of range", a.index)))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| bad(e.to_string()))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Adds `rule` (None: unconditional) for `nr`; an unconditional rule wins.
fn add(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    match rule {
        None => {
            rules.insert(nr, Vec::new());
        }
        Some(r) => match rules.get_mut(&nr) {
            Some(v) if v.is_empty() => {}
            Some(v) => v.push(r),
            None => {
                rules.insert(nr, vec![r]);
            }
        },
    }
}

/// Compiles a profile into filters, to be installed in order.
pub fn compile(profile: &oci::Seccomp) -> Result<Vec<BpfProgram>> {
    if !profile.architectures.is_empty()
        && !profile
            .architectures
            .iter()
            .any(|a| a == "SCMP_ARCH_X86_64")
    {
        return Err(bad("no x86_64 in architectures".into()));
    }
    let default = action(&profile.default_action, profile.default_errno_ret)?;
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    let mut any_rule = Rules::new();
    for sc in &profile.syscalls {
        let act = action(&sc.action, sc.errno_ret)?;
        let rule = if sc.args.is_empty() {
            None
        } else {
            let conds = sc.args.iter().map(condition).collect::<Result<Vec<_>>>()?;
            Some(SeccompRule::new(conds).map_err(|e| bad(e.to_string()))?)
        };
        for name in &sc.names {
            // Profiles list calls of all kernels; unknown names are skipped
            // as libseccomp does.
            let Some(nr) = syscall_number(name) else {
                log::debug!("seccomp: skipping unknown syscall {name}");
                continue;
            };
            add(&mut any_rule, nr, rule.clone());
            if act == SeccompAction::Allow {
                continue;
            }
            let idx = match by_action.iter().position(|(a, _)| *a == act) {
                Some(i) => i,
                None => {
                    by_action.push((act.clone(), Rules::new()));
                    by_action.len() - 1
                }
            };
            add(&mut by_action[idx].1, nr, rule.clone());
        }
    }
    let mut programs = Vec::new();
    let arch = TargetArch::x86_64;
    if default != SeccompAction::Allow {
        let f = SeccompFilter::new(any_rule, default, SeccompAction::Allow, arch)
            .map_err(|e| bad(e.to_string()))?;
        programs.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| bad(e.to_string()))?,
        );
    }
    for (act, rules) in by_action {
        if act == SeccompAction::Allow || rules.is_empty() {
            continue;
        }
        let f = SeccompFilter::new(rules, SeccompAction::Allow, act, arch)
            .map_err(|e| bad(e.to_string()))?;
        programs.push(
            f.try_into()
                .map_err(|e: seccompiler::BackendError| bad(e.to_string()))?,
        );
    }
    Ok(programs)
}

/// The filter every workload gets, whatever its profile: `socket(AF_VSOCK,
/// ...)` and `io_uring_setup` fail with EACCES. Only the host has business
/// with vsock; the agent's ports must not be reachable from the containers
/// it runs. io_uring goes too because its socket operation makes sockets
/// without the `socket` system call, out of this filter's sight.
pub fn workload_floor() -> Result<BpfProgram> {
    let is_vsock = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_VSOCK as u64,
    )
    .map_err(|e| bad(e.to_string()))?;
    let rule = SeccompRule::new(vec![is_vsock]).map_err(|e| bad(e.to_string()))?;
    let rules = Rules::from([
        (libc::SYS_socket, vec![rule]),
        (libc::SYS_io_uring_setup, vec![]),
    ]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| bad(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| bad(e.to_string()))
}

/// Installs one filter on the calling thread without forcing
/// no_new_privs (the OCI spec decides that; root may install without it).
pub fn install(program: &BpfProgram) -> std::io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const seccompiler::sock_filter,
    }
    let prog = SockFprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_ptr(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel
    // copies the filter.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const SockFprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> oci::Seccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allowlist_compiles_to_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["read","write","no_such_call"],"action":"SCMP_ACT_ALLOW"},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW",
             "args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 1);
    }

    #[test]
    fn blocklist_with_two_actions_compiles_to_two_filters() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["mkdirat","mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13},
            {"names":["reboot"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        );
        assert_eq!(compile(&p).unwrap().len(), 2);
    }

    /// Runs `f` in a forked child with `program` installed (no_new_privs
    /// set, so it needs no privilege); returns the child's exit code.
    fn in_child_with(program: &BpfProgram, f: fn() -> i32) -> i32 {
        // SAFETY: the child only calls async-signal-safe functions (prctl,
        // seccomp, socket, close, _exit) before it exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: prctl with integer arguments only.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = if install(program).is_ok() { f() } else { 99 };
                // SAFETY: ends the forked child without running destructors.
                unsafe { libc::_exit(code) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for the child forked above.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                libc::WEXITSTATUS(status)
            }
        }
    }

    fn socket_errno(domain: i32) -> i32 {
        // SAFETY: plain socket(2); a descriptor it returns is closed.
        let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closes the descriptor just opened.
            unsafe { libc::close(fd) };
            return 0;
        }
        std::io::Error::last_os_error().raw_os_error().unwrap_or(1)
    }

    #[test]
    fn vsock_sockets_are_denied_and_others_are_not() {
        let p = workload_floor().unwrap();
        assert_eq!(
            in_child_with(&p, || socket_errno(libc::AF_VSOCK)),
            libc::EACCES
        );
        assert_eq!(in_child_with(&p, || socket_errno(libc::AF_UNIX)), 0);
    }

    #[test]
    fn io_uring_is_denied() {
        let p = workload_floor().unwrap();
        let setup = || {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup with a zeroed params block it may write;
            // a ring it returns is closed.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_mut_ptr()) };
            if fd >= 0 {
                // SAFETY: closes the ring just made.
                unsafe { libc::close(fd as i32) };
                return 0;
            }
            std::io::Error::last_os_error().raw_os_error().unwrap_or(1)
        };
        assert_eq!(in_child_with(&p, setup), libc::EACCES);
    }

    #[test]
    fn bad_profiles_are_refused() {
        for j in [
            r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":9,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_WHAT"}]}]}"#,
        ] {
            assert!(compile(&profile(j)).is_err(), "{j}");
        }
    }
}
