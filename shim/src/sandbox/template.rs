//! VM templates for pods (vmm/API.md, "Templates"). The first VM of a
//! shape boots, is saved the moment its agent answers, and then — like
//! every later VM of that shape — starts from the saved file instead of
//! booting: a restore takes well under a second where a boot takes a
//! minute on a PVM host.
//!
//! A template holds no pod's data: its block slots are empty (the pod's
//! disks are attached after the restore), its NICs have placeholder MACs
//! ([`template_mac`]; the agent gives each NIC its pod MAC), and the first
//! call in every restored VM reseeds the guest's RNG and sets its clock
//! ([`refresh_guest`]).
//!
//! Files: `<template_dir>/<shape>-<inputs>.template`, where `shape` hashes
//! the VM's configuration and `inputs` the identity (inode, size, mtime) of
//! the kernel, initramfs and moat-vmm. A rebuilt guest or VMM makes a new
//! file, and saving it removes the stale ones of its shape.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use moat_protocol::agent::RestoredRequest;
use moat_protocol::AgentClient;
use moat_vmm_api::{Shape, VmConfig};

use super::vmm::Vmm;
use super::{io_error, SandboxError};
use crate::rootfs::cache::fnv1a;

const SUFFIX: &str = ".template";
/// Bytes of host entropy each restored guest gets.
const ENTROPY_BYTES: usize = 64;

/// The MAC of a template's `index`-th NIC ("moat" in the middle).
pub fn template_mac(index: usize) -> String {
    format!("02:6d:6f:61:74:{:02x}", index & 0xff)
}

/// The VM's shape (moat-vmm's own check on restore) and its NICs' MACs,
/// which the guest keeps from the template's boot.
fn shape_key(config: &VmConfig) -> u64 {
    let mut text = serde_json::to_string(&Shape::of(config)).expect("a shape always serializes");
    for n in &config.net {
        text.push_str(&format!("\nmac {:?}", n.mac));
    }
    fnv1a(text.as_bytes())
}

/// The identity of the files that make the guest and its VMM: a rebuilt
/// one changes it.
fn inputs_key(files: &[&Path]) -> io::Result<u64> {
    let mut text = String::new();
    for f in files {
        let m = fs::metadata(f)?;
        text.push_str(&format!(
            "{} {} {} {} {}.{}\n",
            f.display(),
            m.dev(),
            m.ino(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ));
    }
    Ok(fnv1a(text.as_bytes()))
}

/// Where the template for VMs like `config`, run by `vmm_bin`, lives.
pub fn template_path(
    dir: &Path,
    config: &VmConfig,
    vmm_bin: &Path,
) -> Result<PathBuf, SandboxError> {
    let mut files = vec![config.kernel.as_path(), vmm_bin];
    files.extend(config.initramfs.as_deref());
    let inputs = inputs_key(&files).map_err(io_error("identify the guest's files"))?;
    Ok(dir.join(format!("{:016x}-{inputs:016x}{SUFFIX}", shape_key(config))))
}

/// Saves `vmm`'s VM (its agent answered; the shim's connection to it is
/// closed) as the template `path`. It is written beside it and renamed, so
/// no reader ever sees half a template; stale templates of its shape go.
/// The VM is spent afterwards, whatever the result.
pub fn save(vmm: &Vmm, path: &Path) -> Result<(), SandboxError> {
    let dir = path.parent().expect("a template path has a directory");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(format!("create {}", dir.display())))?;
    let name = path.file_name().expect("a template path has a name");
    let temp = dir.join(temp_name(&name.to_string_lossy(), std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error(format!("create {}", temp.display())))?;
    let saved = vmm.save_template(&file).and_then(|()| {
        fs::rename(&temp, path).map_err(io_error(format!("rename {}", temp.display())))
    });
    if saved.is_err() {
        let _ = fs::remove_file(&temp);
        return saved;
    }
    remove_stale(dir, path);
    Ok(())
}

/// The name a template is written under before its rename: `.<name>.<pid>`.
fn temp_name(name: &str, pid: u32) -> String {
    format!(".{name}.{pid}")
}

/// Whether `name` is a temporary file of a shim that is gone (killed
/// while it saved).
fn is_orphan_temp(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    rest.rsplit_once('.')
        .and_then(|(_, pid)| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes the templates of `current`'s shape other than it, and the
/// temporary files of shims that died while saving.
fn remove_stale(dir: &Path, current: &Path) {
    let Some(shape) = current
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split_once('-'))
        .map(|(shape, _)| format!("{shape}-"))
    else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let stale = name.starts_with(&shape) && name.ends_with(SUFFIX) && e.path() != current;
        if stale || is_orphan_temp(&name) {
            log::info!("removing stale template {}", e.path().display());
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes a template that could not be restored: the next VM of its
/// shape boots and saves a new one.
pub fn discard(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        log::warn!("cannot remove template {}: {e}", path.display());
    }
}

/// The first call in a restored VM: host entropy and time for the guest,
/// whose RNG and clock are otherwise the template's.
pub fn refresh_guest(
    agent: &AgentClient,
    timeout: std::time::Duration,
) -> Result<(), SandboxError> {
    let mut entropy = vec![0u8; ENTROPY_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut entropy))
        .map_err(io_error("read host entropy"))?;
    let realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let request = RestoredRequest {
        entropy,
        realtime_ns,
        ..Default::default()
    };
    agent
        .restored(agent.ctx_timeout(timeout), &request)
        .map(drop)
        .map_err(|e| SandboxError::Api(format!("Restored: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_testutil::TempDir;
    use moat_vmm_api::BlockConfig;

    fn config(dir: &Path) -> VmConfig {
        let mut c = VmConfig::new(dir.join("vmlinux"));
        c.initramfs = Some(dir.join("initramfs"));
        c.block = vec![BlockConfig {
            id: "b0".into(),
            path: None,
            read_only: false,
            serial: Some("b0".into()),
        }];
        c
    }

    #[test]
    fn the_path_follows_the_shape_and_the_files() {
        let t = TempDir::new("template-path");
        let dir = t.path();
        for f in ["vmlinux", "initramfs", "moat-vmm"] {
            fs::write(dir.join(f), f).unwrap();
        }
        let vmm = dir.join("moat-vmm");
        let c = config(dir);
        let p = template_path(dir, &c, &vmm).unwrap();
        assert_eq!(p, template_path(dir, &c, &vmm).unwrap());
        assert!(p.to_string_lossy().ends_with(".template"));
        // Per-pod paths (console, sockets) do not matter; the shape does.
        let mut same = c.clone();
        same.api_socket = Some(dir.join("other.sock"));
        assert_eq!(p, template_path(dir, &same, &vmm).unwrap());
        let mut bigger = c.clone();
        bigger.memory_mib *= 2;
        assert_ne!(p, template_path(dir, &bigger, &vmm).unwrap());
        // A rebuilt initramfs is another template, of the same shape.
        fs::remove_file(dir.join("initramfs")).unwrap();
        fs::write(dir.join("initramfs"), "rebuilt").unwrap();
        let rebuilt = template_path(dir, &c, &vmm).unwrap();
        assert_ne!(p, rebuilt);
        let shape = |p: &Path| p.file_name().unwrap().to_string_lossy()[..17].to_string();
        assert_eq!(shape(&p), shape(&rebuilt));
        // Stale templates of the shape go; others stay.
        fs::write(&p, "old").unwrap();
        let other = dir.join(format!("{:016x}-0000000000000000.template", 7));
        fs::write(&other, "other shape").unwrap();
        fs::write(&rebuilt, "new").unwrap();
        // A dead shim's half-written template goes too; a live one's stays.
        let name = rebuilt.file_name().unwrap().to_string_lossy().into_owned();
        let orphan = dir.join(temp_name(&name, u32::MAX));
        let ours = dir.join(temp_name(&name, std::process::id()));
        fs::write(&orphan, "half").unwrap();
        fs::write(&ours, "half").unwrap();
        remove_stale(dir, &rebuilt);
        assert!(!p.exists() && rebuilt.exists() && other.exists());
        assert!(!orphan.exists() && ours.exists());
        // A missing kernel is an error, not a template.
        fs::remove_file(dir.join("vmlinux")).unwrap();
        assert!(template_path(dir, &c, &vmm).is_err());
    }

    #[test]
    fn template_macs_are_local_and_distinct() {
        assert_eq!(template_mac(0), "02:6d:6f:61:74:00");
        assert_ne!(template_mac(1), template_mac(2));
    }
}
