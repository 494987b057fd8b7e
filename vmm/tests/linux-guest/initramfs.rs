//! The initramfs of the Linux guest tests: busybox, guest_tool and one of
//! this folder's init scripts as /init. Included by each test that boots
//! Linux (`#[path]`), so it is not a test target of its own.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Builds an uncompressed newc initramfs in `dir` whose /init is
/// `tests/linux-guest/<init>`.
pub fn build(dir: &Path, init: &str) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/linux-guest");
    run(Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(root.join("bin/guest_tool"))
        .arg(src.join("guest_tool.c")));
    std::fs::copy(src.join(init), root.join("init")).unwrap();
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cpio = dir.join("initramfs.cpio");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | sort | cpio -o -H newc --quiet > {}",
        root.display(),
        cpio.display()
    )));
    cpio
}
