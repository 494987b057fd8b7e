//! results.json (checked against bench/isolation.schema.json before it is
//! written), the PNG plots and report.md.

use std::fs;
use std::path::Path;
use std::time::SystemTime;

use serde_json::{json, Value};

use super::plot;
use super::result::{RuntimeResult, COST, PROBES, STRESSORS, WORKLOAD};
use super::schema;
use super::Params;
use crate::ctr::{host_json, kvm_kind};
use crate::timestamp;

pub const PLOTS: [(&str, &str); 3] = [
    ("performance", "performance.png"),
    ("security", "security.png"),
    ("cost", "cost.png"),
];

/// A runtime's median for `key` against runc's from the same run.
fn ratio(rts: &[RuntimeResult], r: &RuntimeResult, key: &str) -> Option<f64> {
    let runc = rts.iter().find(|x| x.name == "runc" && x.available)?;
    let (a, b) = (r.median(key)?, runc.median(key)?);
    (b != 0.0).then(|| a / b)
}

fn host() -> Value {
    let mut h = host_json();
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    h["cpu_model"] = json!(cpu_model);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    h["mem_total_mib"] = json!(mem / 1024);
    h
}

pub fn results_json(p: &Params, rts: &[RuntimeResult], notes: &[String]) -> Value {
    let ratios: serde_json::Map<String, Value> = rts
        .iter()
        .map(|r| {
            let m: serde_json::Map<String, Value> = COST
                .iter()
                .map(|(k, _, _, _)| (k.to_string(), json!(ratio(rts, r, k))))
                .collect();
            (r.name.clone(), Value::Object(m))
        })
        .collect();
    json!({
        "schema_version": 1,
        "benchmark": "moat-bench isolation",
        "date": timestamp::format_utc(timestamp::nanos_of(SystemTime::now())),
        "mode": if p.quick { "quick" } else { "full" },
        "host": host(),
        "guest_kernel_emulated": kvm_kind() == "pvm",
        "params": {
            "reps": p.reps, "scale": p.scale, "stress_seconds": p.stress_seconds,
            "cold_runs": p.cold_runs, "storm": p.storm.max(2), "avx_seconds": p.avx_seconds,
            "io_mib": p.io_mib, "net_seconds": p.net_seconds,
            "limits": {"cpus": p.limits.cpus, "memory_bytes": p.limits.memory_bytes},
            "density_budget_mib": p.density_budget_mib,
            "workload_timeout_s": p.workload_timeout().as_secs_f64(),
        },
        "workload_metrics": WORKLOAD.iter().map(|(k, l, u)| json!({"key": k, "label": l, "unit": u})).collect::<Vec<_>>(),
        "stressors": STRESSORS.iter().map(|(k, l)| json!({"key": k, "label": l})).collect::<Vec<_>>(),
        "cost_figures": COST.iter().map(|(k, l, u, h)| json!({"key": k, "label": l, "unit": u, "higher_is_better": h})).collect::<Vec<_>>(),
        "probes": PROBES.iter().map(|(k, l, pr)| json!({"key": k, "label": l, "privileged": pr})).collect::<Vec<_>>(),
        "runtimes": rts,
        "ratios_vs_runc": ratios,
        "plots": PLOTS.iter().map(|(k, f)| (k.to_string(), json!(f))).collect::<serde_json::Map<_, _>>(),
        "notes": notes,
    })
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn summary_table(rts: &[RuntimeResult]) -> String {
    let mut o = String::from(
        "| runtime | status | cold start p50 (ms) | × runc | idle PSS (MiB) | idle containers per budget | worst degradation beside a stressor | DNR | security: blocked / visible / escaped | host syscalls reachable |\n\
         | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |\n",
    );
    for r in rts {
        if !r.available {
            o += &format!(
                "| {} | **not run**: {} | | | | | | | | |\n",
                r.name,
                r.reason.as_deref().unwrap_or("?").replace('|', "/")
            );
            continue;
        }
        let m = |k: &str| r.median(k).map_or("–".into(), num);
        let x = ratio(rts, r, "start_ms").map_or("–".into(), |v| format!("{}×", num(v)));
        let worst = r
            .worst_degradation()
            .map_or("–".into(), |(d, w)| format!("{d:+.0} % ({w})"));
        let count = |res: &str| {
            r.security
                .probes
                .values()
                .filter(|c| c.result == res)
                .count()
        };
        let surface = r
            .security
            .attack_surface
            .count
            .map_or("–".into(), |n| n.to_string());
        o += &format!(
            "| {} | ran{} | {} | {x} | {} | {} | {worst} | {} | {} / {} / {} | {surface} |\n",
            r.name,
            if r.errors.is_empty() {
                String::new()
            } else {
                format!(" ({} errors)", r.errors.len())
            },
            m("start_ms"),
            m("idle_pss_mib"),
            m("density"),
            r.dnr_count(),
            count("blocked"),
            count("visible"),
            count("escaped"),
        );
    }
    o
}

fn emulation_note(emulated: bool) -> String {
    if !emulated {
        return String::new();
    }
    "> **Guest-kernel work is emulated on this host.** /dev/kvm here is PVM: a moat guest's kernel \
     code runs in the host's instruction emulator (20–65 s per Linux boot). Every moat figure that \
     enters the guest kernel is dominated by that emulation and says nothing about hardware KVM: \
     cold start and boot storm, getpid, file create/delete, fork+exec, rootfs and volume I/O, \
     loopback network, the disk and request-latency workloads (alone and beside stressors), and \
     the AVX check (the guest kernel switches the contexts). The integer loop and memory streaming \
     run in guest user mode and are the least affected; host PSS and the attack surface are not \
     affected. runc, crun and runsc run on the host kernel and are not emulated.\n\n"
        .into()
}

fn performance_details(rts: &[&RuntimeResult]) -> String {
    let mut o = String::new();
    for (key, label, unit) in WORKLOAD {
        o += &format!(
            "#### {label}\n\n| | {} |\n| --- |{}\n",
            rts.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
            " ---: |".repeat(rts.len())
        );
        o += &format!("| alone ({unit}, median [min–max]) |");
        for r in rts {
            o += &match r.performance.baseline.get(*key) {
                Some(s) => format!(" {} [{}–{}] |", num(s.median), num(s.min), num(s.max)),
                None => " – |".into(),
            };
        }
        o += "\n";
        for (s, sl) in STRESSORS {
            o += &format!("| beside {sl} |");
            for r in rts {
                o += &match r.performance.stressors.get(*s) {
                    Some(x) if x.dnr => " **DNR** |".into(),
                    Some(x) => x
                        .degradation_pct
                        .get(*key)
                        .map_or(" – |".into(), |d| format!(" {d:+.1} % |")),
                    None => " – |".into(),
                };
            }
            o += "\n";
        }
        o += "\n";
    }
    for r in rts {
        for (s, x) in &r.performance.stressors {
            if let Some(e) = x.error.as_ref().or(x.stressor_note.as_ref()) {
                o += &format!("- {} beside {s}: {}\n", r.name, e.replace('\n', " "));
            }
        }
    }
    o
}

fn security_details(rts: &[&RuntimeResult]) -> String {
    let mut o = format!(
        "| probe | {} |\n| --- |{}\n",
        rts.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " --- |".repeat(rts.len())
    );
    for (key, label, privileged) in PROBES {
        o += &format!(
            "| {label}{} |",
            if *privileged { " (privileged)" } else { "" }
        );
        for r in rts {
            o += &match r.security.probes.get(*key) {
                Some(c) => format!(" **{}**: {} |", c.result, c.detail.replace('|', "/")),
                None => " – |".into(),
            };
        }
        o += "\n";
    }
    o += "| host syscalls reachable |";
    for r in rts {
        let s = &r.security.attack_surface;
        o += &format!(
            " **{}**: {} |",
            s.count.map_or("–".into(), |n| n.to_string()),
            s.source.replace('|', "/")
        );
    }
    o + "\n"
}

fn cost_details(rts: &[&RuntimeResult], all: &[RuntimeResult]) -> String {
    let mut o = format!(
        "| figure | {} |\n| --- |{}\n",
        rts.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        " ---: |".repeat(rts.len())
    );
    for (key, label, unit, higher) in COST {
        o += &format!(
            "| {label} ({unit}{}) |",
            if *higher { ", higher is better" } else { "" }
        );
        for r in rts {
            o += &match r.cost.get(*key).and_then(Option::as_ref) {
                Some(s) => {
                    let x = ratio(all, r, key)
                        .filter(|_| r.name != "runc")
                        .map_or(String::new(), |v| format!(" = {}× runc", num(v)));
                    let p95 = if *key == "start_ms" {
                        format!(", p95 {}", num(s.p95))
                    } else {
                        String::new()
                    };
                    format!(
                        " {} [{}–{}]{p95}, n={}{x} |",
                        num(s.median),
                        num(s.min),
                        num(s.max),
                        s.n
                    )
                }
                None => " – |".into(),
            };
        }
        o += "\n";
    }
    o
}

pub fn markdown(p: &Params, rts: &[RuntimeResult], j: &Value) -> String {
    let ran: Vec<&RuntimeResult> = rts.iter().filter(|r| r.available).collect();
    let h = &j["host"];
    let mut o = format!(
        "# Isolation benchmark: {}\n\n{} · {} mode · {} ({} CPUs, {} MiB), kernel {}, /dev/kvm: {} · load average at the end: {} · every container: {} CPU, {} MiB\n\n",
        rts.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
        j["date"].as_str().unwrap_or(""),
        j["mode"].as_str().unwrap_or(""),
        h["cpu_model"].as_str().unwrap_or(""),
        h["cpus"],
        h["mem_total_mib"],
        h["kernel"].as_str().unwrap_or(""),
        h["kvm"].as_str().unwrap_or(""),
        h["load_avg"].as_str().unwrap_or(""),
        p.limits.cpus,
        p.limits.memory_bytes >> 20,
    );
    o += &emulation_note(j["guest_kernel_emulated"].as_bool() == Some(true));
    o += "## Summary\n\n";
    o += &summary_table(rts);
    o += &format!(
        "\nRatios are medians against runc's from the same run. Density: idle containers that fit in {} MiB (this host's memory) at the idle PSS measured. The security columns count the probes of the matrix below.\n\n",
        p.density_budget_mib
    );
    o += "## Plots\n\n### Performance isolation\n\n![performance isolation](performance.png)\n\n";
    o += "### Security isolation\n\n![security isolation](security.png)\n\n";
    o += "### Cost of isolation\n\n![cost of isolation](cost.png)\n\n";
    o += "## Details\n\n### Performance isolation\n\n";
    o += &format!(
        "The well-behaved container runs its workload alone, then beside a neighbour running one stressor (started {} s before the workload and killed after it; bounded: see bench/README.md). Degradation: median beside the stressor against the median alone; DNR: the workload failed or did not finish within {} s.\n\n",
        p.stress_seconds,
        p.workload_timeout().as_secs()
    );
    o += &performance_details(&ran);
    o += "\n### Security isolation\n\n";
    o += &security_details(&ran);
    o += "\n### Cost of isolation\n\nmedian [min–max] over repetitions.\n\n";
    o += &cost_details(&ran, rts);
    o += "\n### Runtimes, errors and notes\n\n";
    for r in rts {
        o += &format!("- **{}** (`ctr run {}`)", r.name, r.ctr_args.join(" "));
        match &r.reason {
            Some(why) => o += &format!(": not run: {why}\n"),
            None => o += &format!(": idle processes {}\n", r.idle_processes.join(", ")),
        }
        for e in r.errors.iter().chain(&r.notes) {
            o += &format!("  - {}\n", e.replace('\n', " "));
        }
        if let Some(why) = &r.security.privileged_unavailable {
            o += &format!("  - privileged probes: {}\n", why.replace('\n', " "));
        }
    }
    for n in j["notes"].as_array().into_iter().flatten() {
        o += &format!("- {}\n", n.as_str().unwrap_or("").replace('\n', " "));
    }
    o
}

/// Writes results.json, the plots and report.md into `out`.
pub fn write(
    out: &Path,
    p: &Params,
    rts: &[RuntimeResult],
    notes: &[String],
) -> Result<(), String> {
    let j = results_json(p, rts, notes);
    let s: Value =
        serde_json::from_str(schema::SCHEMA).map_err(|e| format!("isolation.schema.json: {e}"))?;
    let errs = schema::validate(&s, &j);
    let text = serde_json::to_string_pretty(&j).map_err(|e| e.to_string())? + "\n";
    let path = out.join("results.json");
    fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    if !errs.is_empty() {
        return Err(format!(
            "results.json does not match its schema: {}",
            errs.join("; ")
        ));
    }
    let ran: Vec<&RuntimeResult> = rts.iter().filter(|r| r.available).collect();
    plot::performance(&out.join(PLOTS[0].1), &ran)?;
    plot::security(&out.join(PLOTS[1].1), &rts.iter().collect::<Vec<_>>())?;
    plot::cost(&out.join(PLOTS[2].1), &ran, |r, k| ratio(rts, r, k))?;
    let path = out.join("report.md");
    fs::write(&path, markdown(p, rts, &j)).map_err(|e| format!("write {}: {e}", path.display()))
}
