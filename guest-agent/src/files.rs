//! CopyFile: files the host copies into the guest (Kubernetes volumes),
//! under the shared directory only.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use moat_protocol::agent::CopyFileRequest;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::unistd::{fchownat, Gid, Uid};

use crate::error::{AgentError, IoContext, Result};
use crate::mount::{check_no_dotdot, create_beneath};

/// Removes `name` in `parent` (relative to `root`, symlinks never
/// followed): a file or link, or a directory with everything below it.
fn remove_beneath(root: &OwnedFd, parent: &Path, name: &std::ffi::OsStr, what: &str) -> Result<()> {
    let dir = if parent.as_os_str().is_empty() {
        root.try_clone().ctx(|| "dup".into())?
    } else {
        match openat2(
            root.as_fd(),
            parent,
            OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
        ) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(nix::errno::Errno::ELOOP | nix::errno::Errno::EXDEV) => {
                return Err(AgentError::PathEscape(what.to_owned()))
            }
            Err(e) => return Err(e).ctx(|| format!("opening the parent of {what:?}")),
        }
    };
    match nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EISDIR) => {
            // std's remove_dir_all does not follow symlinks below the top;
            // the top is reached through our own directory fd.
            let path = crate::mount::fd_path(&dir).join(name);
            std::fs::remove_dir_all(&path).ctx(|| format!("removing {what:?}"))
        }
        Err(e) => Err(e).ctx(|| format!("removing {what:?}")),
    }
}

/// Applies one CopyFile request below `shared`.
pub fn copy_file(shared: &Path, req: &CopyFileRequest) -> Result<()> {
    if req.data.len() > moat_protocol::MAX_COPY_CHUNK {
        return Err(AgentError::TooLarge(
            "CopyFile data",
            moat_protocol::MAX_COPY_CHUNK,
        ));
    }
    check_no_dotdot(&req.path)?;
    if req.path.starts_with('/') {
        return Err(AgentError::PathEscape(req.path.clone()));
    }
    std::fs::create_dir_all(shared).ctx(|| format!("creating {}", shared.display()))?;
    let root: OwnedFd = File::open(shared)
        .ctx(|| "opening the shared dir".into())?
        .into();
    let rel = Path::new(&req.path);
    let (parent, name) = match (rel.parent(), rel.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(AgentError::InvalidArgument(format!(
                "bad path {:?}",
                req.path
            )))
        }
    };
    if req.remove {
        if !req.data.is_empty() || req.directory || !req.symlink_target.is_empty() {
            return Err(AgentError::InvalidArgument(
                "a removal carries nothing else".into(),
            ));
        }
        return remove_beneath(&root, parent, name, &req.path);
    }
    let parent_fd = if parent.as_os_str().is_empty() {
        root.try_clone().ctx(|| "dup".into())?
    } else {
        create_beneath(&root, &parent.to_string_lossy(), true)?
    };
    let dir = openat2(
        parent_fd.as_fd(),
        ".",
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH),
    )
    .ctx(|| format!("opening the parent of {:?}", req.path))?;
    let mode = req.mode & 0o7777;

    if req.directory {
        if !req.data.is_empty() {
            return Err(AgentError::InvalidArgument(
                "a directory has no data".into(),
            ));
        }
        match nix::sys::stat::mkdirat(
            dir.as_fd(),
            name,
            nix::sys::stat::Mode::from_bits_truncate(mode),
        ) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e).ctx(|| format!("mkdir {:?}", req.path)),
        }
        // The exact mode, past the umask (a pod's emptyDir is 0777), on
        // the directory itself: never through a symlink put in its place.
        let made = openat2(
            dir.as_fd(),
            name,
            OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
        )
        .ctx(|| format!("opening {:?}", req.path))?;
        nix::sys::stat::fchmod(made.as_fd(), nix::sys::stat::Mode::from_bits_truncate(mode))
            .ctx(|| format!("chmod {:?}", req.path))?;
    } else if !req.symlink_target.is_empty() {
        // The link is created, never followed; its target is the
        // consumer's business (k8s volumes use ..data links).
        let _ = nix::unistd::unlinkat(dir.as_fd(), name, nix::unistd::UnlinkatFlags::NoRemoveDir);
        nix::unistd::symlinkat(req.symlink_target.as_str(), dir.as_fd(), name)
            .ctx(|| format!("symlink {:?}", req.path))?;
    } else {
        let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        if req.offset == 0 {
            flags |= OFlag::O_TRUNC;
        }
        let fd = openat2(
            dir.as_fd(),
            name,
            OpenHow::new()
                .flags(flags)
                .mode(nix::sys::stat::Mode::from_bits_truncate(mode))
                .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
        )
        .map_err(|e| match e {
            nix::errno::Errno::ELOOP | nix::errno::Errno::EXDEV => {
                AgentError::PathEscape(req.path.clone())
            }
            e => AgentError::Io {
                context: format!("opening {:?}", req.path),
                source: e.into(),
            },
        })?;
        let mut f = File::from(fd);
        f.seek(SeekFrom::Start(req.offset)).ctx(|| "seek".into())?;
        f.write_all(&req.data)
            .ctx(|| format!("writing {:?}", req.path))?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .ctx(|| format!("chmod {:?}", req.path))?;
    }
    fchownat(
        dir.as_fd(),
        name,
        Some(Uid::from_raw(req.uid)),
        Some(Gid::from_raw(req.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ctx(|| format!("chown {:?}", req.path))
}

#[cfg(test)]
mod tests {
    use moat_testutil::TempDir;

    use super::*;

    fn req(path: &str) -> CopyFileRequest {
        CopyFileRequest {
            path: path.into(),
            mode: 0o644,
            ..Default::default()
        }
    }

    #[test]
    fn copies_and_removals_stay_beneath_the_shared_dir() {
        let tmp = TempDir::new("files");
        let t = tmp.path();
        let shared = t.join("shared");
        let outside = t.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let mut file = req("c1/m0/sub/a");
        (file.uid, file.gid, file.data) = (uid, gid, b"A".to_vec());
        copy_file(&shared, &file).unwrap();
        let mut link = req("c1/m0/link");
        (link.uid, link.gid) = (uid, gid);
        link.symlink_target = outside.display().to_string();
        copy_file(&shared, &link).unwrap();
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/m0/sub/a")).unwrap(),
            "A"
        );

        // Removing through a symlinked parent is refused; the link itself goes.
        let mut bad = req("c1/m0/link/keep");
        bad.remove = true;
        assert!(matches!(
            copy_file(&shared, &bad),
            Err(AgentError::PathEscape(_))
        ));
        let mut rm = req("c1/m0/link");
        rm.remove = true;
        copy_file(&shared, &rm).unwrap();
        assert!(outside.join("keep").exists());
        // A directory goes with its contents; a missing path is no error.
        let mut rm = req("c1/m0/sub");
        rm.remove = true;
        copy_file(&shared, &rm).unwrap();
        assert!(!shared.join("c1/m0/sub").exists());
        copy_file(&shared, &rm).unwrap();
        let mut rm = req("c1/nothing/here");
        rm.remove = true;
        copy_file(&shared, &rm).unwrap();
        assert!(!shared.join("c1/nothing").exists(), "no parents created");
        let mut odd = req("c1/m0");
        (odd.remove, odd.directory) = (true, true);
        assert!(copy_file(&shared, &odd).is_err());
    }

    /// A directory gets its exact mode, past the umask, made or found; a
    /// symlink in its place is refused, its target untouched.
    #[test]
    fn directories_get_their_mode_and_symlinks_are_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("files-dir");
        let shared = tmp.path().join("shared");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let mut dir = req("pod/shared");
        (dir.uid, dir.gid, dir.mode, dir.directory) = (uid, gid, 0o777, true);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        copy_file(&shared, &dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&shared.join("pod/shared")), 0o777);
        std::fs::set_permissions(
            shared.join("pod/shared"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        copy_file(&shared, &dir).unwrap();
        assert_eq!(
            mode(&shared.join("pod/shared")),
            0o777,
            "an existing one too"
        );

        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&target, shared.join("pod/link")).unwrap();
        let mut link = req("pod/link");
        (link.uid, link.gid, link.mode, link.directory) = (uid, gid, 0o777, true);
        assert!(copy_file(&shared, &link).is_err());
        nix::sys::stat::umask(old);
        assert_eq!(mode(&target), 0o700);
    }
}
