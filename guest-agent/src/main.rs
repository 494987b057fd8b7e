//! moat-agent entry point. As PID 1 it prepares the guest and reads its
//! settings from the kernel command line; otherwise (host tests) from flags.

use std::os::unix::process::CommandExt;

use moat_agent::config::{Config, GLIBC_TUNABLES};
use moat_agent::syscall::LinuxSyscall;
use moat_agent::{init, logger, reaper, server};

fn main() {
    // As PID 1, stderr is the console (the VM's console.log).
    moat_crash::install("moat-agent");
    let is_init = std::process::id() == 1;
    let mut config = Config {
        init: is_init,
        ..Config::default()
    };
    // The GLIBC_TUNABLES re-exec below starts PID 1 again, already moved.
    if is_init && std::env::var_os("GLIBC_TUNABLES").is_none() {
        if let Err(e) = init::leave_initramfs() {
            eprintln!("moat-agent: {e}");
            init::power_off();
        }
    }
    if is_init {
        if let Err(e) = init::mount_basics(&LinuxSyscall) {
            eprintln!("moat-agent: {e}");
            init::power_off();
        }
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Err(e) = config.apply_cmdline(&cmdline) {
            eprintln!("moat-agent: {e}");
        }
        // glibc picks its AVX string functions at startup: re-exec once with
        // the tunables set so the agent itself avoids them too.
        if config.emul_compat && std::env::var_os("GLIBC_TUNABLES").is_none() {
            let err = std::process::Command::new("/proc/self/exe")
                .env("GLIBC_TUNABLES", GLIBC_TUNABLES)
                .exec();
            eprintln!("moat-agent: re-exec failed: {err}");
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = config.apply_args(&args) {
        eprintln!("moat-agent: {e}");
        std::process::exit(2);
    }
    logger::init(config.verbose);
    moat_crash::crash_point("agent-start");
    // Before any thread exists, so only the reaper thread receives SIGCHLD.
    if let Err(e) = reaper::block_sigchld() {
        eprintln!("moat-agent: blocking SIGCHLD: {e}");
    }
    if is_init {
        if let Err(e) = moat_agent::network::link_up("lo") {
            log::warn!("{e}");
        }
    }
    let err = match server::serve(config) {
        Ok(()) => return,
        Err(e) => e,
    };
    eprintln!("moat-agent: cannot serve: {err}");
    if is_init {
        init::power_off();
    }
    std::process::exit(1);
}
