//! PID 1 duties: the basic mounts, loopback, and powering off.

use std::path::Path;

use moat_vmm_api::guest::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};
use nix::mount::MsFlags;

use crate::error::{IoContext, Result};
use crate::syscall::Syscall;

/// Moves PID 1 off the initramfs root onto a tmpfs, as switch_root does.
///
/// The kernel unpacks the initramfs into `rootfs`, which can never be
/// unmounted or moved, so pivot_root(2) fails with EINVAL in every mount
/// namespace whose root is still on it — and containers need pivot_root.
/// A tmpfs moved over `/` becomes the root mount instead. The agent's own
/// binary keeps running from its mapping; only what it opens later lives
/// in the new root.
pub fn leave_initramfs() -> Result<()> {
    let new_root = Path::new("/moat-root");
    std::fs::create_dir_all(new_root).ctx(|| "creating /moat-root".to_string())?;
    nix::mount::mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .ctx(|| "mounting the root tmpfs".to_string())?;
    std::env::set_current_dir(new_root).ctx(|| "entering /moat-root".to_string())?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .ctx(|| "moving the root tmpfs over /".to_string())?;
    nix::unistd::chroot(".").ctx(|| "chroot into the root tmpfs".to_string())?;
    std::env::set_current_dir("/").ctx(|| "entering the new root".to_string())?;
    Ok(())
}

/// Mounts proc, sysfs, devtmpfs (+ devpts, shm), cgroup2 and /run.
/// Already mounted file systems (EBUSY) are fine.
pub fn mount_basics(sys: &dyn Syscall) -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mounts: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        // The pod's shared /dev/shm (moat_protocol::GUEST_POD_SHM).
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            nosuid,
            Some("mode=1777,size=65536k"),
        ),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        match sys.mount(
            Some(Path::new(src)),
            Path::new(target),
            Some(fstype),
            *flags,
            *data,
        ) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(e) => return Err(e).ctx(|| format!("mounting {target}")),
        }
    }
    // openpty opens /dev/ptmx: point it at the devpts instance.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    Ok(())
}

/// Tells the VMM the guest is up and serving. Through /dev/port: guest user
/// space has no I/O permission bitmap (CONFIG_X86_IOPL_IOPERM is off), and
/// the kernel's own port write works in PVM's emulator too. A kernel
/// without /dev/port just leaves the boot time unreported.
pub fn report_booted() {
    use std::os::unix::fs::FileExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .and_then(|f| f.write_at(&[BOOT_TIMER_MAGIC], BOOT_TIMER_PORT));
    if let Err(e) = written {
        log::debug!("boot timer not written: /dev/port: {e}");
    }
}

/// Ends the VM: the VMM exits when the guest reboots (reboot=k), while a
/// poweroff without ACPI would only halt.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    eprintln!("moat-agent: reboot failed: {err:?}");
    loop {
        std::thread::park();
    }
}
