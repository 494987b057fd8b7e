//! `moat-vmm`: boots one microVM (see API.md for flags, config and exit codes).

use std::time::Instant;

use moat_vmm::vstate::ExitCode;

const USAGE: &str = "usage: moat-vmm --config vm.json | --kernel PATH [--initramfs PATH] [--cmdline STR] \
[--vcpus N] [--memory-mib N] [--serial stdout|off|file:PATH|fd:N] [--block id=ID[,path=P][,ro][,serial=S]]... \
[--net id=ID,tap=NAME|tap_fd=N[,mac=MAC]]... [--vsock cid=N,uds=PATH] [--rng] [--api-socket PATH] [--no-seccomp] [--log-max-bytes N] [--jail UID:GID [--jail-rw PATH]... [--jail-ro PATH]... [--jail-no-landlock]]";

fn main() {
    let start = Instant::now();
    // stderr is the VMM's log (the shim's vmm.log).
    moat_crash::install("moat-vmm");
    // glibc reads /sys/devices/system/cpu/online the first time a thread
    // needs a malloc arena beyond the eighth, which the seccomp filters of
    // device threads forbid. A fixed arena limit skips that look-up, and few
    // arenas also keep the VMM's RSS down.
    // SAFETY: mallopt only changes allocator tuning; called before any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    moat_vmm::logger::init(start);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let code = match moat_vmm_api::VmConfig::from_args(args)
        .map_err(moat_vmm::vmm::VmmError::from)
        .and_then(|cfg| moat_vmm::vmm::run(cfg, start))
    {
        Ok(code) => code,
        Err(e) => {
            eprintln!("moat-vmm: error: {}", moat_crash::error_chain(&e));
            ExitCode::SetupError
        }
    };
    std::process::exit(code as i32);
}
