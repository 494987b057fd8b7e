//! `moat-bench start`: how a moat VM starts, cold (a boot) against a
//! template restore, with runc measured beside each, in one run.
//!
//! It runs `moat-bench ctr` twice through its own private containerd:
//! once with `templates = false` (every VM boots) and once with templates
//! in a fresh directory. There the first moat run boots the VM and saves
//! the template ("template made"); every later VM restores it. Each half
//! also reads the host memory (PSS) of one idle container and of `--pods`
//! idle containers started together: pages of a template that no VM has
//! written are shared, so the template's figure for many pods grows less
//! than the cold one.
//!
//! There is no warm pool in moat: the pool's row of issue 13 has no
//! figure, and the report says so.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::args;
use crate::ctr::{self, Report, Runtime};
use crate::proc::ProcMem;
use crate::stats::{percentile, ratio};
use crate::timestamp;

const USAGE: &str = "usage: moat-bench start [--runs N] [--pods N] [--json OUT] [--plot OUT.png]
         [--moat-bin DIR] [--moat-config FILE] [--timeout SECS] [--idle SECS] [--repo DIR]";

#[derive(Debug, Clone, PartialEq)]
struct Opts {
    runs: usize,
    pods: usize,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    moat_bin: Option<PathBuf>,
    moat_config: Option<PathBuf>,
    timeout: Duration,
    idle: Duration,
    repo: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 3,
        pods: 10,
        json: None,
        plot: None,
        moat_bin: None,
        moat_config: None,
        timeout: Duration::from_secs(600),
        idle: Duration::from_secs(10),
        repo: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || args::value(&mut it, a);
        match a.as_str() {
            "--runs" => o.runs = args::runs(&val()?)?,
            "--pods" => o.pods = args::runs(&val()?)?,
            "--json" => o.json = Some(val()?.into()),
            "--plot" => o.plot = Some(val()?.into()),
            "--moat-bin" => o.moat_bin = Some(val()?.into()),
            "--moat-config" => o.moat_config = Some(val()?.into()),
            "--timeout" => o.timeout = args::seconds(a, &val()?, false)?,
            "--idle" => o.idle = args::seconds(a, &val()?, true)?,
            "--repo" => o.repo = Some(val()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.runs < 2 {
        return Err("--runs must be at least 2: the first template run makes the template".into());
    }
    Ok(o)
}

/// The moat config the bench starts from, without the template keys it sets.
fn base_config(opts: &Opts) -> String {
    let path = opts
        .moat_config
        .clone()
        .or_else(|| std::env::var_os("MOAT_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| "/etc/moat/config.toml".into());
    strip_template_keys(&fs::read_to_string(path).unwrap_or_default())
}

fn strip_template_keys(config: &str) -> String {
    config
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            key != "templates" && key != "template_dir"
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// One half of the bench: moat's VMs started `mode`.
struct Half {
    mode: &'static str,
    report: Report,
}

fn run_half(opts: &Opts, dir: &Path, mode: &'static str, extra: &str) -> Result<Half, String> {
    let config = dir.join(format!("{mode}.toml"));
    fs::write(&config, format!("{}{extra}\n", base_config(opts)))
        .map_err(|e| format!("write {}: {e}", config.display()))?;
    eprintln!("--- moat VMs {mode} ---");
    let report = ctr::run(ctr::Opts {
        runs: opts.runs,
        skip_moat: false,
        skip_pss: false,
        json: None,
        dir: Some(dir.join(mode)),
        repo: opts.repo.clone(),
        timeout: opts.timeout,
        idle: opts.idle,
        moat_bin: opts.moat_bin.clone(),
        moat_config: Some(config),
        keep_logs: None,
        pods: opts.pods,
    })?;
    Ok(Half { mode, report })
}

/// Totals (ms) of the successful runs of `rt` in `report` whose index
/// `keep` accepts.
fn totals(report: &Report, rt: Runtime, keep: impl Fn(usize) -> bool) -> Vec<f64> {
    report
        .runs
        .iter()
        .filter(|r| r.ok && r.runtime == rt.name() && keep(r.index))
        .filter_map(|r| r.parts_ms.get("total").copied())
        .collect()
}

fn pss_kib(m: Option<&Result<Vec<ProcMem>, String>>) -> Option<u64> {
    match m? {
        Ok(p) => Some(p.iter().map(|m| m.pss_kib).sum()),
        Err(_) => None,
    }
}

/// p50, p95, min and max of a sample, and its ratio to runc's p50.
fn row(name: &str, v: &[f64], runc_p50: Option<f64>) -> Value {
    let p50 = percentile(v, 50.0);
    json!({
        "what": name,
        "n": v.len(),
        "p50_ms": p50,
        "p95_ms": percentile(v, 95.0),
        "min_ms": v.iter().copied().reduce(f64::min),
        "max_ms": v.iter().copied().reduce(f64::max),
        "ratio_p50_to_runc": ratio(p50, runc_p50),
    })
}

/// The start rows and the memory rows, from both halves.
fn combine(cold: &Half, template: &Half, pods: usize) -> Value {
    let mut runc = totals(&cold.report, Runtime::Runc, |_| true);
    runc.extend(totals(&template.report, Runtime::Runc, |_| true));
    let runc_p50 = percentile(&runc, 50.0);
    let start = vec![
        row("runc", &runc, runc_p50),
        row(
            "moat, cold boot",
            &totals(&cold.report, Runtime::Moat, |_| true),
            runc_p50,
        ),
        row(
            "moat, template made (boot + save + restore)",
            &totals(&template.report, Runtime::Moat, |i| i == 0),
            runc_p50,
        ),
        row(
            "moat, template restore",
            &totals(&template.report, Runtime::Moat, |i| i > 0),
            runc_p50,
        ),
    ];
    let memory = |h: &Half, rt: Runtime| {
        let one = pss_kib(h.report.idle.get(rt.name()));
        let all = pss_kib(h.report.density.get(rt.name()));
        json!({
            "runtime": rt.name(),
            "moat_vms": if rt == Runtime::Moat { h.mode } else { "–" },
            "pss_kib_one": one,
            "pss_kib_all": all,
            "pods": pods,
            "all_over_one": ratio(all.map(|v| v as f64), one.map(|v| v as f64)),
        })
    };
    // Each part of moat's start, cold against restored (`moat-bench ctr`'s
    // parts; the template run that boots is left out of both).
    let part = |h: &Half, key: &str, keep: &dyn Fn(usize) -> bool| {
        let v: Vec<f64> = h
            .report
            .runs
            .iter()
            .filter(|r| r.ok && r.runtime == "moat" && keep(r.index))
            .filter_map(|r| r.parts_ms.get(key).copied())
            .collect();
        percentile(&v, 50.0)
    };
    let parts: Vec<Value> = ctr::PARTS
        .iter()
        .map(|(key, what, _)| {
            let cold_p50 = part(cold, key, &|_| true);
            let restore_p50 = part(template, key, &|i| i > 0);
            json!({
                "key": key,
                "what": what,
                "cold_p50_ms": cold_p50,
                "restore_p50_ms": restore_p50,
                "restore_over_cold": ratio(restore_p50, cold_p50),
            })
        })
        .filter(|p| !p["cold_p50_ms"].is_null() || !p["restore_p50_ms"].is_null())
        .collect();
    json!({
        "start": start,
        "moat_parts": parts,
        "runs": { "cold": cold.report.runs, "template": template.report.runs },
        "memory": [
            memory(cold, Runtime::Runc),
            memory(cold, Runtime::Moat),
            memory(template, Runtime::Moat),
        ],
        "pool": "moat has no warm pool: no figure",
    })
}

fn markdown(result: &Value, runs: usize) -> String {
    let ms = |v: &Value| v.as_f64().map_or("–".into(), |v| format!("{v:.0}"));
    let x = |v: &Value| v.as_f64().map_or("–".into(), |v| format!("{v:.1}×"));
    let mut out = format!(
        "### Start: `ctr run --rm busybox true`, {runs} runs per runtime and mode (ms)\n\n\
         | runtime | n | p50 | p95 | min | max | p50 / runc |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for r in result["start"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r["what"].as_str().unwrap_or(""),
            r["n"],
            ms(&r["p50_ms"]),
            ms(&r["p95_ms"]),
            ms(&r["min_ms"]),
            ms(&r["max_ms"]),
            x(&r["ratio_p50_to_runc"]),
        );
    }
    out += "| moat, warm pool | – | – | – | – | – | no pool in moat |\n";
    out += "\n### moat's parts, cold boot against template restore (p50, ms)\n\n\
            | part | cold | restore | restore / cold |\n| --- | ---: | ---: | ---: |\n";
    for p in result["moat_parts"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {} | {} |\n",
            p["what"].as_str().unwrap_or(""),
            ms(&p["cold_p50_ms"]),
            ms(&p["restore_p50_ms"]),
            x(&p["restore_over_cold"]),
        );
    }
    let mib = |v: &Value| {
        v.as_f64()
            .map_or("–".into(), |v| format!("{:.1}", v / 1024.0))
    };
    let pods = result["memory"][0]["pods"].as_u64().unwrap_or(0);
    out += &format!(
        "\n### Host memory (PSS, MiB) of idle containers (`sleep 3600`)\n\n\
         | runtime | moat VMs | one | {pods} together | {pods} / one |\n| --- | --- | ---: | ---: | ---: |\n"
    );
    for m in result["memory"].as_array().into_iter().flatten() {
        out += &format!(
            "| {} | {} | {} | {} | {} |\n",
            m["runtime"].as_str().unwrap_or(""),
            m["moat_vms"].as_str().unwrap_or(""),
            mib(&m["pss_kib_one"]),
            mib(&m["pss_kib_all"]),
            x(&m["all_over_one"]),
        );
    }
    out
}

/// Bars of the start p50s as ratios to runc (log scale), and of the PSS.
fn plot(path: &Path, result: &Value) -> Result<(), String> {
    use crate::isolation::plot::{bar_chart, BarChart};
    let start: Vec<&Value> = result["start"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(1)
        .collect();
    let memory: Vec<&Value> = result["memory"].as_array().into_iter().flatten().collect();
    let log_ratio = |r: &Value| {
        r["ratio_p50_to_runc"]
            .as_f64()
            .filter(|v| *v > 0.0)
            .map(f64::log10)
    };
    let mib = |v: &Value| v.as_f64().map(|v| v / 1024.0);
    bar_chart(
        path,
        &[
            BarChart {
                title: "Start (p50) against runc",
                y_desc: "× runc (log)",
                categories: start
                    .iter()
                    .map(|r| r["what"].as_str().unwrap_or("").replace("moat, ", ""))
                    .collect(),
                series: vec![("moat".into(), start.iter().map(|r| log_ratio(r)).collect())],
                log_ratio: true,
            },
            BarChart {
                title: "Host memory of idle containers",
                y_desc: "PSS (MiB)",
                categories: memory
                    .iter()
                    .map(|m| match m["runtime"].as_str() {
                        Some("moat") => format!("moat, {}", m["moat_vms"].as_str().unwrap_or("")),
                        other => other.unwrap_or("").to_string(),
                    })
                    .collect(),
                series: vec![
                    (
                        "one".into(),
                        memory.iter().map(|m| mib(&m["pss_kib_one"])).collect(),
                    ),
                    (
                        format!(
                            "{} together",
                            memory
                                .first()
                                .map_or(0, |m| m["pods"].as_u64().unwrap_or(0))
                        ),
                        memory.iter().map(|m| mib(&m["pss_kib_all"])).collect(),
                    ),
                ],
                log_ratio: false,
            },
        ],
    )
}

pub fn main(args: &[String]) {
    let opts = ctr::begin("start", USAGE, parse_args(args));
    let dir = std::env::temp_dir().join(format!("moat-bench-start-{}", std::process::id()));
    let result = fs::create_dir_all(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))
        .and_then(|()| measure(&opts, &dir));
    // The templates made here go with the rest.
    let _ = fs::remove_dir_all(&dir);
    match result {
        Ok(result) => {
            print!("{}", markdown(&result, opts.runs));
            if let Some(path) = &opts.json {
                let text =
                    serde_json::to_string_pretty(&result).expect("a JSON value always serializes");
                if let Err(e) = fs::write(path, text + "\n") {
                    eprintln!("moat-bench start: write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            if let Some(path) = &opts.plot {
                if let Err(e) = plot(path, &result) {
                    eprintln!("moat-bench start: {e}");
                    std::process::exit(1);
                }
            }
        }
        Err(e) => {
            eprintln!("moat-bench start: {e}");
            std::process::exit(1);
        }
    }
}

fn measure(opts: &Opts, dir: &Path) -> Result<Value, String> {
    let cold = run_half(opts, dir, "cold", "templates = false")?;
    let templates = dir.join("templates");
    let template = run_half(
        opts,
        dir,
        "template",
        &format!(
            "templates = true\ntemplate_dir = \"{}\"",
            templates.display()
        ),
    )?;
    let mut notes: Vec<String> = cold.report.notes.clone();
    notes.extend(template.report.notes.iter().cloned());
    let failed: Vec<String> = [&cold, &template]
        .iter()
        .flat_map(|h| {
            h.report.runs.iter().filter(|r| !r.ok).map(move |r| {
                format!(
                    "{} {} run {}: {}",
                    h.mode,
                    r.runtime,
                    r.index,
                    r.error.as_deref().unwrap_or("?")
                )
            })
        })
        .collect();
    notes.extend(failed);
    let mut result = combine(&cold, &template, opts.pods);
    result["benchmark"] =
        json!("moat-bench start: ctr run --rm busybox true, cold and from a template, beside runc");
    result["date"] = json!(timestamp::format_utc(
        timestamp::nanos_of(SystemTime::now())
    ));
    result["host"] = ctr::host_json();
    result["runs_per_runtime_and_mode"] = json!(opts.runs);
    result["notes"] = json!(notes);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_config() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&[]).unwrap();
        assert_eq!((o.runs, o.pods), (3, 10));
        assert!(a(&["--runs", "1"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert_eq!(a(&["--pods", "4"]).unwrap().pods, 4);
        assert_eq!(
            strip_template_keys(
                "kernel = \"/k\"\ntemplates = true\ntemplate_dir=\"/t\"\nvcpus = 1\n"
            ),
            "kernel = \"/k\"\nvcpus = 1\n"
        );
    }

    #[test]
    fn rows_have_ratios_to_runc() {
        let r = row("moat", &[2000.0, 4000.0], Some(100.0));
        assert_eq!(r["n"], 2);
        assert_eq!(
            r["ratio_p50_to_runc"].as_f64().unwrap(),
            r["p50_ms"].as_f64().unwrap() / 100.0
        );
        let empty = row("x", &[], Some(100.0));
        assert!(empty["p50_ms"].is_null() && empty["ratio_p50_to_runc"].is_null());
        let text = markdown(&json!({"start": [r], "memory": []}), 3);
        assert!(
            text.contains("| moat | 2 |") && text.contains("no pool in moat"),
            "{text}"
        );
    }
}
