//! moat-probe: runs inside a container for `moat-bench isolation`.
//!
//! Built static (musl) and placed in the benchmark's image as
//! `/bin/moat-probe`. Every subcommand prints one JSON object on stdout:
//! raw observations, which the bench classifies (it knows the host).
//!
//!     moat-probe idle MARKER                 sleeps; MARKER is in its argv
//!     moat-probe security NEIGHBOUR HOSTPATH MAJ:MIN [--privileged]
//!     moat-probe avx PROCS SECONDS
//!     moat-probe workload REPS SCALE
//!     moat-probe stress KIND SECONDS         memory|fork|cpu|disk|net-send|net-recv
//!     moat-probe micro REPS SCALE
//!     moat-probe io DIR MIB
//!     moat-probe net SECONDS

mod avx;
mod security;
mod stress;
mod work;

use serde_json::Value;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    let v = args.get(i).ok_or_else(|| format!("missing {what}"))?;
    v.parse().map_err(|_| format!("bad {what}: {v:?}"))
}

/// The workloads' size, argument 2: a positive factor of the unit size.
fn scale(args: &[String]) -> Result<f64, String> {
    let s: f64 = arg(args, 2, "scale")?;
    if s.is_finite() && s > 0.0 {
        Ok(s)
    } else {
        Err(format!("scale {s}: not a positive number"))
    }
}

fn run(args: &[String]) -> Result<Value, String> {
    let sub = args.first().map(String::as_str).unwrap_or("");
    match sub {
        "idle" => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
        "security" => Ok(security::probe(
            &arg::<String>(args, 1, "neighbour marker")?,
            &arg::<String>(args, 2, "host path")?,
            &arg::<String>(args, 3, "disk MAJ:MIN")?,
            args.iter().any(|a| a == "--privileged"),
        )),
        "avx" => Ok(avx::check(arg(args, 1, "procs")?, arg(args, 2, "seconds")?)),
        "workload" => Ok(work::workload(arg(args, 1, "reps")?, scale(args)?)),
        "stress" => stress::run(&arg::<String>(args, 1, "kind")?, arg(args, 2, "seconds")?),
        "micro" => Ok(work::micro(arg(args, 1, "reps")?, scale(args)?)),
        "io" => work::io(&arg::<String>(args, 1, "dir")?, arg(args, 2, "MiB")?),
        "net" => work::net(arg(args, 1, "seconds")?),
        _ => Err(format!(
            "unknown subcommand {sub:?} (see the source's header)"
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("moat-probe: {e}");
            std::process::exit(2);
        }
    }
}
