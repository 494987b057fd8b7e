//! moat benchmarks (not tests): see bench/README.md.

mod args;
mod ctr;
mod isolation;
mod parse;
mod proc;
mod start;
mod stats;
mod timestamp;
mod vmm;

fn usage() -> ! {
    eprintln!(
        "usage: moat-bench vmm --kernel PATH [--initramfs PATH] [--cmdline STR] [--runs N] [--vmm PATH] [--json OUT] ...\n\
         \x20      moat-bench ctr [--runs N] [--skip-moat] [--skip-pss] [--json OUT] ...\n\
         \x20      moat-bench isolation --out DIR [--runtimes runc,crun,runsc,moat] [--quick] ...\n\
         \x20      moat-bench start [--runs N] [--pods N] [--json OUT] [--plot OUT.png] ...\n\
         see bench/README.md"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("vmm") => vmm::main(&args[1..]),
        Some("ctr") => ctr::main(&args[1..]),
        Some("isolation") => isolation::main(&args[1..]),
        Some("start") => start::main(&args[1..]),
        _ => usage(),
    }
}
