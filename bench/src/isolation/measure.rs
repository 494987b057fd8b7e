//! The suite's steps on one runtime, in order: the boot storm (which also
//! starts the two long-lived containers every later part shares), cold
//! starts, idle memory, security, performance isolation, micro
//! workloads, I/O and network. A moat container is a VM booting a Linux
//! guest: sharing the two containers keeps the VM count small.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::classify;
use super::result::{RuntimeResult, Stats, StressResult, COST, STRESSORS, WORKLOAD};
use super::runtime::{Ctr, Pending, Runtime};
use super::{HostFacts, Params};
use crate::ctr;
use crate::proc;

/// What every step needs.
pub struct Ctx<'a> {
    pub ctr: &'a Ctr,
    pub params: &'a Params,
    pub host: &'a HostFacts,
    pub prefix: &'a str,
}

static EXEC_SEQ: AtomicUsize = AtomicUsize::new(0);

fn progress(rt: &Runtime, what: &str) {
    eprintln!(
        "[{}] {}: {what}",
        crate::timestamp::format_utc(crate::timestamp::nanos_of(std::time::SystemTime::now())),
        rt.name
    );
}

/// The JSON object on the last line of what `moat-probe` printed.
fn parse_last(out: &str) -> Result<Value, String> {
    let line = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| format!("probe output {line:?}: {e}"))
}

impl Ctx<'_> {
    fn id(&self, rt: &Runtime, what: &str) -> String {
        format!("{}-{}-{what}", self.prefix, rt.name)
    }

    /// Starts `moat-probe ARGS` in `id`; returns it and its exec id.
    fn exec(&self, id: &str, args: &[&str]) -> Result<(Pending, String), String> {
        let n = EXEC_SEQ.fetch_add(1, Ordering::SeqCst);
        let exec_id = format!("probe{n}");
        Ok((self.ctr.exec(id, &exec_id, args)?, exec_id))
    }

    /// Runs `moat-probe ARGS` in `id` and parses its result.
    fn probe(&self, id: &str, args: &[&str]) -> Result<Value, String> {
        let (out, _) = self.exec(id, args)?.0.finish(self.params.timeout)?;
        parse_last(&out)
    }
}

/// The two shared containers: `a` (well-behaved; volume at /vol) and `b`
/// (the neighbour; privileged where the runtime allows it).
pub struct Pair {
    pub a: String,
    pub b: String,
    pub b_privileged: bool,
}

/// Starts a, b and the storm's other members all at once; keeps a and b.
fn storm(cx: &Ctx, rt: &Runtime, res: &mut RuntimeResult) -> Option<Pair> {
    let p = cx.params;
    let limits = p.limits;
    let (a, b) = (cx.id(rt, "a"), cx.id(rt, "b"));
    let vol = cx.host.volume_dir(&rt.name);
    let _ = std::fs::create_dir_all(&vol);
    let a_flags = vec![
        "--mount".to_string(),
        format!("type=bind,src={},dst=/vol,options=rbind:rw", vol.display()),
    ];
    let marker = classify::neighbour_marker(cx.prefix);
    progress(
        rt,
        &format!("boot storm: {} containers at once", p.storm.max(2)),
    );
    let t0 = Instant::now();
    let mut pending = vec![
        (
            a.clone(),
            cx.ctr.start_detached(
                rt,
                limits,
                &a,
                &a_flags,
                &["/bin/moat-probe", "idle", "well-behaved"],
            ),
        ),
        (
            b.clone(),
            cx.ctr.start_detached(
                rt,
                limits,
                &b,
                &["--privileged".into()],
                &["/bin/moat-probe", "idle", &marker],
            ),
        ),
    ];
    for i in 2..p.storm.max(2) {
        let id = cx.id(rt, &format!("s{i}"));
        let started =
            cx.ctr
                .start_detached(rt, limits, &id, &[], &["/bin/moat-probe", "idle", "storm"]);
        pending.push((id, started));
    }
    let mut done: BTreeMap<String, Result<f64, String>> = BTreeMap::new();
    for (id, pend) in pending {
        let r = pend
            .and_then(|x| x.finish(p.timeout))
            .map(|(_, t)| t.as_secs_f64() * 1e3);
        done.insert(id, r);
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let ok: Vec<f64> = done
        .values()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    res.cost.insert("storm_wall_ms".into(), Stats::of(&[wall]));
    res.cost.insert("storm_start_ms".into(), Stats::of(&ok));
    if p.cold_runs == 0 {
        res.cost.insert("start_ms".into(), Stats::of(&ok));
        res.notes.push(
            "cold start: no sequential runs (--cold 0); the figures are the boot storm's starts"
                .into(),
        );
    }
    res.storm_size = done.len();
    res.storm_failed = done.values().filter(|r| r.is_err()).count();
    for (id, r) in &done {
        if id != &a && id != &b {
            res.errors.extend(cx.ctr.remove(id));
        }
        if let Err(e) = r {
            res.errors.push(format!("start {id}: {e}"));
        }
    }
    if let Err(e) = &done[&a] {
        res.reason = Some(format!("the well-behaved container did not start: {e}"));
        res.errors.extend(cx.ctr.remove(&a));
        res.errors.extend(cx.ctr.remove(&b));
        return None;
    }
    let mut b_privileged = true;
    if let Err(e) = &done[&b] {
        // A privileged container may be refused where a plain one starts.
        res.security.privileged_unavailable =
            Some(format!("a privileged container did not start: {e}"));
        res.errors.extend(cx.ctr.remove(&b));
        b_privileged = false;
        progress(rt, "privileged neighbour refused; starting it unprivileged");
        let r = cx
            .ctr
            .start_detached(rt, limits, &b, &[], &["/bin/moat-probe", "idle", &marker])
            .and_then(|x| x.finish(p.timeout));
        if let Err(e) = r {
            res.reason = Some(format!("the neighbour container did not start: {e}"));
            res.errors.extend(cx.ctr.remove(&a));
            res.errors.extend(cx.ctr.remove(&b));
            return None;
        }
    }
    Some(Pair { a, b, b_privileged })
}

fn cold_starts(cx: &Ctx, rt: &Runtime, res: &mut RuntimeResult) {
    if cx.params.cold_runs == 0 {
        return;
    }
    let mut v = Vec::new();
    for i in 0..cx.params.cold_runs {
        progress(rt, &format!("cold start {}/{}", i + 1, cx.params.cold_runs));
        let id = cx.id(rt, &format!("c{i}"));
        match cx
            .ctr
            .run_once(rt, cx.params.limits, &id, cx.params.timeout)
        {
            Ok(t) => v.push(t.as_secs_f64() * 1e3),
            Err(e) => {
                res.errors.push(format!("cold start {i}: {e}"));
                res.errors.extend(cx.ctr.remove(&id));
                break;
            }
        }
    }
    res.cost.insert("start_ms".into(), Stats::of(&v));
}

fn idle_memory(cx: &Ctx, rt: &Runtime, id: &str, res: &mut RuntimeResult) {
    progress(rt, "idle memory (PSS of the shim's process tree)");
    match ctr::shim_tree_mem(&cx.ctr.sock, &rt.shim, id) {
        Ok(m) => {
            let mib = m.iter().map(|p| p.pss_kib).sum::<u64>() as f64 / 1024.0;
            res.cost.insert("idle_pss_mib".into(), Stats::of(&[mib]));
            let fit = (cx.params.density_budget_mib as f64 / mib).floor();
            res.cost.insert("density".into(), Stats::of(&[fit]));
            res.idle_processes = m
                .iter()
                .map(|p| format!("{} {:.1} MiB", p.name, p.pss_kib as f64 / 1024.0))
                .collect();
        }
        Err(e) => res.errors.push(format!("idle memory: {e}")),
    }
}

fn security(cx: &Ctx, rt: &Runtime, pair: &Pair, res: &mut RuntimeResult) {
    progress(rt, "security probes");
    let marker = classify::neighbour_marker(cx.prefix);
    let host_path = cx.host.dir.display().to_string();
    let plain = cx.probe(
        &pair.a,
        &["security", &marker, &host_path, &cx.host.root_disk],
    );
    let privileged = if pair.b_privileged {
        let args = [
            "security",
            "-",
            &host_path,
            &cx.host.root_disk,
            "--privileged",
        ];
        Some(cx.probe(&pair.b, &args))
    } else {
        None
    };
    progress(rt, "AVX register survival under contention");
    let secs = cx.params.avx_seconds.to_string();
    let avx = cx.probe(&pair.a, &["avx", "4", &secs]);
    let spec = cx.ctr.bundle_spec(rt, &pair.a);
    classify::security(rt, cx.host, plain, privileged, avx, spec, res);
}

/// The workload's figures from one probe run: metric -> values.
fn workload_values(v: &Value) -> BTreeMap<String, Vec<f64>> {
    WORKLOAD
        .iter()
        .map(|(k, _, _)| {
            let vals = v[*k]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            (k.to_string(), vals)
        })
        .collect()
}

fn one_stressor(cx: &Ctx, pair: &Pair, kind: &str, base: &BTreeMap<String, Stats>) -> StressResult {
    let p = cx.params;
    // It runs until killed once the workload is done; the bound only
    // stops it should the kill be lost.
    let bound = (p.workload_timeout() + p.timeout).as_secs_f64().to_string();
    let mut r = StressResult::default();
    let (mut stress, exec_id) = match cx.exec(&pair.b, &["stress", kind, &bound]) {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("stressor: {e}"));
            return r;
        }
    };
    if let Err(e) = stress.wait_line(p.timeout) {
        let end = stress
            .finish(Duration::from_secs(5))
            .err()
            .unwrap_or_default();
        r.error = Some(format!("stressor did not start: {e} {end}"));
        return r;
    }
    proc::sleep(Duration::from_secs_f64(p.stress_seconds));
    let (reps, scale) = (p.reps.to_string(), p.scale.to_string());
    let work = cx
        .exec(&pair.a, &["workload", &reps, &scale])
        .and_then(|(w, _)| w.finish(p.workload_timeout()));
    r.stressor_outlived_workload = stress.running();
    cx.ctr.kill_exec(&pair.b, &exec_id);
    if let Err(e) = stress.finish(p.timeout) {
        if !r.stressor_outlived_workload {
            // An OOM-killed memory bomb is the runtime containing it.
            r.stressor_note = Some(format!("the stressor ended before the workload did: {e}"));
        }
    }
    match work.and_then(|(out, _)| parse_last(&out)) {
        Err(e) => {
            r.dnr = true;
            r.error = Some(format!("well-behaved workload: {e}"));
        }
        Ok(v) => {
            for (k, vals) in workload_values(&v) {
                let Some(s) = Stats::of(&vals) else { continue };
                if let Some(b) = base.get(&k) {
                    r.degradation_pct
                        .insert(k.clone(), (s.median / b.median - 1.0) * 100.0);
                }
                r.metrics.insert(k, s);
            }
        }
    }
    r
}

fn performance(cx: &Ctx, rt: &Runtime, pair: &Pair, res: &mut RuntimeResult) {
    let p = cx.params;
    progress(rt, "performance isolation: workload alone");
    let (reps, scale) = (p.reps.to_string(), p.scale.to_string());
    match cx.probe(&pair.a, &["workload", &reps, &scale]) {
        Ok(v) => {
            for (k, vals) in workload_values(&v) {
                if let Some(s) = Stats::of(&vals) {
                    res.performance.baseline.insert(k, s);
                }
            }
        }
        Err(e) => {
            res.errors.push(format!("workload alone: {e}"));
            return;
        }
    }
    let base = res.performance.baseline.clone();
    for (kind, _) in STRESSORS {
        if proc::interrupted() {
            return;
        }
        progress(rt, &format!("performance isolation: beside {kind}"));
        let r = one_stressor(cx, pair, kind, &base);
        res.performance.stressors.insert(kind.to_string(), r);
    }
}

fn put_series(res: &mut RuntimeResult, v: &Value, pairs: &[(&str, &str)]) {
    for (src, key) in pairs {
        let vals: Vec<f64> = match &v[*src] {
            Value::Array(a) => a.iter().filter_map(Value::as_f64).collect(),
            x => x.as_f64().into_iter().collect(),
        };
        res.cost.insert(key.to_string(), Stats::of(&vals));
    }
}

fn micro_io_net(cx: &Ctx, rt: &Runtime, a: &str, res: &mut RuntimeResult) {
    let p = cx.params;
    progress(rt, "micro workloads");
    let (reps, scale) = (p.reps.to_string(), p.scale.to_string());
    match cx.probe(a, &["micro", &reps, &scale]) {
        Ok(v) => put_series(
            res,
            &v,
            &[
                ("getpid_ns", "getpid_ns"),
                ("file_create_delete_us", "file_create_delete_us"),
                ("fork_exec_us", "fork_exec_us"),
                ("int_loop_ms", "int_loop_ms"),
            ],
        ),
        Err(e) => res.errors.push(format!("micro: {e}")),
    }
    let mib = p.io_mib.to_string();
    for (dir, what) in [("/tmp", "rootfs"), ("/vol", "volume")] {
        progress(rt, &format!("{what} I/O"));
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..p.reps {
            match cx.probe(a, &["io", dir, &mib]) {
                Ok(v) => {
                    writes.extend(v["write_fsync_mb_s"].as_f64());
                    reads.extend(v["read_mb_s"].as_f64());
                }
                Err(e) => {
                    res.errors.push(format!("{what} I/O: {e}"));
                    break;
                }
            }
        }
        res.cost
            .insert(format!("{what}_write_mb_s"), Stats::of(&writes));
        res.cost
            .insert(format!("{what}_read_mb_s"), Stats::of(&reads));
    }
    progress(rt, "loopback network throughput");
    let mut net = Vec::new();
    for _ in 0..p.reps {
        match cx.probe(a, &["net", &p.net_seconds.to_string()]) {
            Ok(v) => net.extend(v["mb_s"].as_f64()),
            Err(e) => {
                res.errors.push(format!("network: {e}"));
                break;
            }
        }
    }
    res.cost.insert("net_loopback_mb_s".into(), Stats::of(&net));
}

/// Every part on runtime `rt`.
pub fn runtime(cx: &Ctx, rt: &Runtime) -> RuntimeResult {
    let mut res = RuntimeResult::new(rt);
    for (k, _, _, _) in COST {
        res.cost.insert(k.to_string(), None);
    }
    if let Some(why) = &rt.missing {
        progress(rt, &format!("NOT RUNNABLE: {why}"));
        res.reason = Some(why.clone());
        return res;
    }
    let Some(pair) = storm(cx, rt, &mut res) else {
        progress(
            rt,
            &format!("NOT RUNNABLE: {}", res.reason.as_deref().unwrap_or("?")),
        );
        return res;
    };
    res.available = true;
    let steps: [&dyn Fn(&mut RuntimeResult); 5] = [
        &|r| idle_memory(cx, rt, &pair.a, r),
        &|r| security(cx, rt, &pair, r),
        &|r| performance(cx, rt, &pair, r),
        &|r| micro_io_net(cx, rt, &pair.a, r),
        &|r| cold_starts(cx, rt, r),
    ];
    for step in steps {
        if !proc::interrupted() {
            step(&mut res);
        }
    }
    progress(rt, "removing its containers");
    res.errors.extend(cx.ctr.remove(&pair.a));
    res.errors.extend(cx.ctr.remove(&pair.b));
    res
}
