//! What the suite records per runtime (serialized into results.json; the
//! schema is bench/isolation.schema.json, described in bench/README.md).

use std::collections::BTreeMap;

use serde::Serialize;

use super::runtime::Runtime;
use crate::stats::percentile;

/// The well-behaved workload's metrics: (key, label, unit). Lower is better.
pub const WORKLOAD: &[(&str, &str, &str)] = &[
    ("cpu_ms", "CPU (integer loop)", "ms"),
    ("mem_ms", "memory (32 MiB streaming)", "ms"),
    ("disk_fsync_ms", "disk (4 KiB writes + fdatasync)", "ms"),
    (
        "net_rtt_p50_us",
        "request latency (TCP loopback, p50)",
        "µs",
    ),
];

/// The neighbour's stressors: (key, label).
pub const STRESSORS: &[(&str, &str)] = &[
    ("memory", "memory bomb"),
    ("fork", "fork bomb"),
    ("cpu", "CPU hog"),
    ("disk", "disk hog"),
    ("net-send", "network sender"),
    ("net-recv", "network receiver"),
];

/// Cost figures: (key, label, unit, higher is better).
pub const COST: &[(&str, &str, &str, bool)] = &[
    (
        "start_ms",
        "cold start (`ctr run --rm … true`)",
        "ms",
        false,
    ),
    ("storm_start_ms", "start within a boot storm", "ms", false),
    ("storm_wall_ms", "boot storm, all started", "ms", false),
    ("idle_pss_mib", "host PSS per idle container", "MiB", false),
    (
        "density",
        "idle containers per memory budget",
        "count",
        true,
    ),
    ("getpid_ns", "getpid loop", "ns/call", false),
    (
        "file_create_delete_us",
        "file create+delete",
        "µs/op",
        false,
    ),
    ("fork_exec_us", "fork+exec /bin/true", "µs/op", false),
    ("int_loop_ms", "pure integer loop", "ms", false),
    ("rootfs_write_mb_s", "rootfs write+fsync", "MB/s", true),
    ("rootfs_read_mb_s", "rootfs read (cached)", "MB/s", true),
    ("volume_write_mb_s", "volume write+fsync", "MB/s", true),
    ("volume_read_mb_s", "volume read (cached)", "MB/s", true),
    (
        "net_loopback_mb_s",
        "TCP loopback in a container",
        "MB/s",
        true,
    ),
];

/// Security probes in report order: (key, label, needs a privileged container).
pub const PROBES: &[(&str, &str, bool)] = &[
    ("kernel", "kernel: the host's, or another", false),
    ("kcore", "/proc/kcore", false),
    ("kmsg", "/dev/kmsg", false),
    ("dev_mem", "/dev/mem", false),
    ("debugfs", "debugfs", false),
    ("sysrq", "/proc/sysrq-trigger", false),
    ("host_processes", "host processes", false),
    ("neighbour_processes", "neighbour's processes", false),
    ("host_mounts", "host mounts", false),
    ("vsock", "AF_VSOCK to the host", false),
    ("netlink", "netlink (route)", false),
    ("raw_socket", "raw socket", false),
    ("avx_state", "AVX register state under contention", false),
    ("host_disk", "mknod + read the host disk", true),
    ("core_pattern", "write kernel.core_pattern", true),
    ("host_sysctl", "write vm.swappiness", true),
];

/// Median, min, max (and p95, nearest rank) of repetitions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p95: f64,
    pub values: Vec<f64>,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            n,
            median,
            min: v[0],
            max: v[n - 1],
            p95: percentile(&v, 95.0)?,
            values: values.to_vec(),
        })
    }
}

/// The workload beside one stressor.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StressResult {
    /// The well-behaved workload did not finish (in time).
    pub dnr: bool,
    pub error: Option<String>,
    /// Whether the stressor still ran, and ended cleanly, after the workload.
    pub stressor_outlived_workload: bool,
    /// How the stressor ended if not cleanly (e.g. killed for memory).
    pub stressor_note: Option<String>,
    pub metrics: BTreeMap<String, Stats>,
    /// Median beside the stressor against the median alone, in %.
    pub degradation_pct: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Performance {
    pub baseline: BTreeMap<String, Stats>,
    pub stressors: BTreeMap<String, StressResult>,
}

/// One cell of the security matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// "blocked", "visible", "escaped" or "n/a".
    pub result: &'static str,
    pub detail: String,
}

/// The host system calls a container can reach.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Surface {
    pub count: Option<usize>,
    pub source: String,
    pub syscalls: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Security {
    pub probes: BTreeMap<String, Cell>,
    pub privileged_unavailable: Option<String>,
    pub attack_surface: Surface,
    /// The probes' raw observations.
    pub raw: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RuntimeResult {
    pub name: String,
    pub available: bool,
    /// Why it could not run (not installed, did not start).
    pub reason: Option<String>,
    pub ctr_args: Vec<String>,
    pub storm_size: usize,
    pub storm_failed: usize,
    pub idle_processes: Vec<String>,
    pub performance: Performance,
    pub security: Security,
    /// See [`COST`]; null where not measured.
    pub cost: BTreeMap<String, Option<Stats>>,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

impl RuntimeResult {
    pub fn new(rt: &Runtime) -> RuntimeResult {
        RuntimeResult {
            name: rt.name.clone(),
            ctr_args: rt.ctr_args.clone(),
            ..Default::default()
        }
    }

    pub fn median(&self, key: &str) -> Option<f64> {
        self.cost.get(key)?.as_ref().map(|s| s.median)
    }

    /// The worst degradation over every stressor and metric, and where.
    pub fn worst_degradation(&self) -> Option<(f64, String)> {
        let mut worst: Option<(f64, String)> = None;
        for (kind, r) in &self.performance.stressors {
            for (m, d) in &r.degradation_pct {
                if worst.as_ref().is_none_or(|w| *d > w.0) {
                    worst = Some((*d, format!("{m} beside {kind}")));
                }
            }
        }
        worst
    }

    pub fn dnr_count(&self) -> usize {
        self.performance
            .stressors
            .values()
            .filter(|r| r.dnr)
            .count()
    }
}
