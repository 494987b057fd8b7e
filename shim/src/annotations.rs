//! VM sizing from the container's annotations.
//!
//! Precedence: moat's own `io.moat.vcpus` / `io.moat.memory_mib` win; else
//! the pod's resources that containerd's CRI passes (`io.kubernetes.cri.*`)
//! are added on top of the configured base size (the guest kernel and agent
//! need that base themselves); else the configured size.

use std::collections::HashMap;

use thiserror::Error;

use crate::config::{Config, MIN_MEMORY_MIB};

pub(crate) const VCPUS: &str = "io.moat.vcpus";
pub(crate) const MEMORY_MIB: &str = "io.moat.memory_mib";
pub(crate) const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub(crate) const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub(crate) const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub(crate) const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

const MIB: u64 = 1 << 20;

/// An annotation moat reads whose value it cannot use.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid annotation {key}={value:?}: {reason}")]
pub struct AnnotationError {
    /// The annotation's key.
    pub key: String,
    /// Its value, as given.
    pub value: String,
    /// Why the value is refused.
    pub reason: String,
}

/// The guest's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u32,
}

fn bad(key: &str, value: &str, reason: impl Into<String>) -> AnnotationError {
    AnnotationError {
        key: key.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_u64(a: &HashMap<String, String>, key: &str) -> Result<Option<u64>, AnnotationError> {
    let Some(v) = a.get(key) else { return Ok(None) };
    v.trim()
        .parse::<u64>()
        .map(Some)
        .map_err(|_| bad(key, v, "expected a non-negative integer"))
}

/// CRI writes -1 or 0 for "no limit"; anything else must be an integer.
fn parse_limit(a: &HashMap<String, String>, key: &str) -> Result<Option<u64>, AnnotationError> {
    let Some(v) = a.get(key) else { return Ok(None) };
    let n = v
        .trim()
        .parse::<i64>()
        .map_err(|_| bad(key, v, "expected an integer"))?;
    match n {
        ..=-2 => Err(bad(
            key,
            v,
            "expected -1 (unlimited) or a non-negative integer",
        )),
        -1 | 0 => Ok(None),
        n => Ok(Some(n as u64)),
    }
}

/// A value above its configured cap (`max_vcpus`, `max_memory_mib`),
/// refused with the cap named.
fn over_cap(
    key: &str,
    value: &str,
    min: u32,
    cap_name: &str,
    cap: u32,
    unit: &str,
) -> AnnotationError {
    bad(
        key,
        value,
        format!("expected {min} to {cap}{unit} ({cap_name} in the moat config)"),
    )
}

/// The VM's memory once CRI's pod memory limit is added to the base.
fn cri_memory(
    cfg: &Config,
    a: &HashMap<String, String>,
    base: u32,
) -> Result<u32, AnnotationError> {
    let Some(bytes) = parse_limit(a, SANDBOX_MEMORY)? else {
        return Ok(base);
    };
    let cap = cfg.max_memory_mib;
    u32::try_from(u64::from(base) + bytes.div_ceil(MIB))
        .ok()
        .filter(|m| *m <= cap)
        .ok_or_else(|| {
            let v = &a[SANDBOX_MEMORY];
            over_cap(SANDBOX_MEMORY, v, 0, "max_memory_mib", cap, " MiB")
        })
}

/// The VM's vCPUs once CRI's pod CPU quota is added to the base: a
/// quota above `max_vcpus` gets that many (fewer CPUs bypass nothing).
fn cri_vcpus(cfg: &Config, a: &HashMap<String, String>, base: u32) -> Result<u32, AnnotationError> {
    let quota = parse_limit(a, SANDBOX_CPU_QUOTA)?;
    let period = parse_limit(a, SANDBOX_CPU_PERIOD)?;
    let Some(quota) = quota else { return Ok(base) };
    let extra = u32::try_from(quota.div_ceil(period.unwrap_or(100_000))).unwrap_or(u32::MAX);
    Ok(base.saturating_add(extra).min(cfg.max_vcpus))
}

/// Computes the VM size for a sandbox whose first container carries `a`.
/// Nothing may exceed the config's `max_vcpus` and `max_memory_mib`.
pub fn vm_size(cfg: &Config, a: &HashMap<String, String>) -> Result<VmSize, AnnotationError> {
    let mut size = VmSize {
        vcpus: cri_vcpus(cfg, a, cfg.vcpus)?,
        memory_mib: cri_memory(cfg, a, cfg.memory_mib)?,
    };
    if let Some(v) = parse_u64(a, VCPUS)? {
        if v == 0 {
            return Err(bad(VCPUS, &a[VCPUS], "expected at least 1"));
        }
        if v > u64::from(cfg.max_vcpus) {
            return Err(over_cap(
                VCPUS,
                &a[VCPUS],
                1,
                "max_vcpus",
                cfg.max_vcpus,
                "",
            ));
        }
        size.vcpus = v as u32;
    }
    if let Some(v) = parse_u64(a, MEMORY_MIB)? {
        if v < u64::from(MIN_MEMORY_MIB) {
            let reason = format!("expected at least {MIN_MEMORY_MIB} MiB");
            return Err(bad(MEMORY_MIB, &a[MEMORY_MIB], reason));
        }
        if v > u64::from(cfg.max_memory_mib) {
            let cap = cfg.max_memory_mib;
            let min = MIN_MEMORY_MIB;
            return Err(over_cap(
                MEMORY_MIB,
                &a[MEMORY_MIB],
                min,
                "max_memory_mib",
                cap,
                " MiB",
            ));
        }
        size.memory_mib = v as u32;
    }
    Ok(size)
}

/// Checks every `io.moat.*` annotation, so a misspelt one is not silently ignored.
pub fn check_known(a: &HashMap<String, String>) -> Result<(), AnnotationError> {
    for (k, v) in a {
        if k.starts_with("io.moat.") && k != VCPUS && k != MEMORY_MIB {
            return Err(bad(
                k,
                v,
                format!("unknown moat annotation (known: {VCPUS}, {MEMORY_MIB})"),
            ));
        }
    }
    Ok(())
}

/// The pod a container belongs to: CRI's sandbox id, else the container itself.
pub fn grouping(a: &HashMap<String, String>, container_id: &str) -> String {
    match a.get(SANDBOX_ID) {
        Some(s) if !s.is_empty() => s.clone(),
        _ => container_id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_vmm_api::limits::MAX_VCPUS;

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn size(kv: &[(&str, &str)]) -> Result<VmSize, AnnotationError> {
        vm_size(&Config::default(), &ann(kv))
    }

    #[test]
    fn defaults_without_annotations() {
        assert_eq!(
            size(&[]).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
    }

    #[test]
    fn moat_annotations_override() {
        let s = size(&[(VCPUS, "2"), (MEMORY_MIB, "1024")]).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (2, 1024));
    }

    #[test]
    fn cri_resources_add_to_the_base() {
        let s = size(&[
            (SANDBOX_MEMORY, "134217728"),
            (SANDBOX_CPU_QUOTA, "150000"),
            (SANDBOX_CPU_PERIOD, "100000"),
        ])
        .unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (3, 256 + 128));
        // Unlimited values leave the base alone.
        let s = size(&[(SANDBOX_MEMORY, "0"), (SANDBOX_CPU_QUOTA, "-1")]).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (1, 256));
        // moat's own annotations still win.
        let s = size(&[(SANDBOX_MEMORY, "134217728"), (MEMORY_MIB, "300")]).unwrap();
        assert_eq!(s.memory_mib, 300);
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        for (k, v) in [
            (VCPUS, "two"),
            (VCPUS, "0"),
            (VCPUS, "1000"),
            (MEMORY_MIB, "12"),
            (MEMORY_MIB, "-5"),
            (SANDBOX_MEMORY, "lots"),
            (SANDBOX_CPU_QUOTA, "-7"),
        ] {
            let e = size(&[(k, v)]).unwrap_err();
            assert_eq!((e.key.as_str(), e.value.as_str()), (k, v));
            let msg = e.to_string();
            assert!(msg.contains(k) && msg.contains(v), "{msg}");
        }
    }

    /// moat-vmm refuses more than its maximum; the pod is refused here,
    /// at sizing time, with the limit named.
    #[test]
    fn more_vcpus_than_the_vmm_takes_are_refused_with_the_limit() {
        let over = (u32::from(MAX_VCPUS) + 1).to_string();
        let e = size(&[(VCPUS, &over)]).unwrap_err().to_string();
        assert!(e.contains(&format!("1 to {MAX_VCPUS}")), "{e}");
        assert_eq!(
            size(&[(VCPUS, &MAX_VCPUS.to_string())]).unwrap().vcpus,
            u32::from(MAX_VCPUS)
        );
        // A CRI quota above it gets the most the VMM takes.
        let s = size(&[
            (SANDBOX_CPU_QUOTA, "6400000"),
            (SANDBOX_CPU_PERIOD, "100000"),
        ])
        .unwrap();
        assert_eq!(s.vcpus, u32::from(MAX_VCPUS));
    }

    #[test]
    fn requests_above_the_configured_caps_are_refused_naming_the_cap() {
        let cfg = Config {
            max_vcpus: 4,
            max_memory_mib: 2048,
            ..Config::default()
        };
        let refused = |kv: &[(&str, &str)], cap: &str| {
            let e = vm_size(&cfg, &ann(kv)).unwrap_err().to_string();
            assert!(e.contains(cap), "{e}");
        };
        refused(&[(VCPUS, "5")], "1 to 4 (max_vcpus in the moat config)");
        refused(
            &[(MEMORY_MIB, "1048576")],
            "64 to 2048 MiB (max_memory_mib in the moat config)",
        );
        // CRI's pod memory is capped too (256 MiB base + 2 GiB).
        refused(
            &[(SANDBOX_MEMORY, "2147483648")],
            "2048 MiB (max_memory_mib",
        );
        // A CRI CPU quota above the cap gets the cap.
        let s = vm_size(&cfg, &ann(&[(SANDBOX_CPU_QUOTA, "400000")])).unwrap();
        assert_eq!(s.vcpus, 4);
        let s = vm_size(&cfg, &ann(&[(VCPUS, "4"), (MEMORY_MIB, "2048")])).unwrap();
        assert_eq!((s.vcpus, s.memory_mib), (4, 2048));
    }

    #[test]
    fn unknown_moat_annotation_is_refused() {
        let e = check_known(&ann(&[("io.moat.vcpu", "2")])).unwrap_err();
        assert!(e.to_string().contains("unknown moat annotation"), "{e}");
        check_known(&ann(&[(VCPUS, "2"), ("other.thing", "x")])).unwrap();
    }

    #[test]
    fn grouping_uses_the_sandbox_id() {
        assert_eq!(grouping(&ann(&[(SANDBOX_ID, "pod1")]), "c1"), "pod1");
        assert_eq!(grouping(&ann(&[]), "c1"), "c1");
    }
}
