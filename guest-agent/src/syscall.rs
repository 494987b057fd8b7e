//! The mount and namespace calls the agent makes, behind a trait so the
//! rootfs logic can be unit-tested without privileges (youki style).

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Mount and namespace system calls.
pub trait Syscall: Send + Sync {
    /// mount(2): `source` on `target`, of type `fstype`, with `flags` and
    /// filesystem-specific `data` (comma-separated options).
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    /// umount2(2) of `target` with `flags` (e.g. `MNT_DETACH`).
    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()>;
    /// pivot_root(2): `new_root` becomes `/`, the old root moves to `put_old`.
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()>;
    /// unshare(2): moves the calling thread into new namespaces (`CLONE_NEW*`).
    fn unshare(&self, flags: CloneFlags) -> nix::Result<()>;
    /// sethostname(2) in the caller's UTS namespace.
    fn sethostname(&self, name: &str) -> nix::Result<()>;
}

/// The real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)
    }

    fn umount(&self, target: &Path, flags: MntFlags) -> nix::Result<()> {
        nix::mount::umount2(target, flags)
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> nix::Result<()> {
        nix::unistd::pivot_root(new_root, put_old)
    }

    fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
        nix::sched::unshare(flags)
    }

    fn sethostname(&self, name: &str) -> nix::Result<()> {
        nix::unistd::sethostname(name)
    }
}

#[cfg(test)]
pub(crate) mod test {
    //! A recording fake for unit tests.
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Mount {
            source: Option<String>,
            target: String,
            fstype: Option<String>,
            flags: MsFlags,
            data: Option<String>,
        },
        Umount(String),
        PivotRoot(String),
        Unshare(CloneFlags),
        Hostname(String),
    }

    #[derive(Default)]
    pub struct RecordingSyscall {
        pub calls: Mutex<Vec<Call>>,
    }

    impl RecordingSyscall {
        pub fn take(&self) -> Vec<Call> {
            std::mem::take(&mut self.calls.lock().unwrap())
        }
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }

    impl Syscall for RecordingSyscall {
        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> nix::Result<()> {
            self.calls.lock().unwrap().push(Call::Mount {
                source: source.map(s),
                target: s(target),
                fstype: fstype.map(str::to_owned),
                flags,
                data: data.map(str::to_owned),
            });
            Ok(())
        }
        fn umount(&self, target: &Path, _flags: MntFlags) -> nix::Result<()> {
            self.calls.lock().unwrap().push(Call::Umount(s(target)));
            Ok(())
        }
        fn pivot_root(&self, new_root: &Path, _put_old: &Path) -> nix::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::PivotRoot(s(new_root)));
            Ok(())
        }
        fn unshare(&self, flags: CloneFlags) -> nix::Result<()> {
            self.calls.lock().unwrap().push(Call::Unshare(flags));
            Ok(())
        }
        fn sethostname(&self, name: &str) -> nix::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Hostname(name.to_owned()));
            Ok(())
        }
    }
}
