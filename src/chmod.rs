//! Setting the mode of a socket file we just bound, by path, without ever
//! following a symlink, on every C library.
//!
//! The first try is `fchmodat(2)` with `AT_SYMLINK_NOFOLLOW`. glibc before
//! 2.32 answers that flag with `ENOTSUP` whatever the file (the kernel's
//! `fchmodat` had no flags argument until `fchmodat2` in Linux 6.6). There the
//! mode is set through a descriptor instead: `open(2)` the path
//! `O_PATH|O_NOFOLLOW|O_CLOEXEC` (which pins the inode and never follows a
//! link), check with `fstat(2)` that it is the socket we bound (same device
//! and inode), then `chmod(2)` `/proc/self/fd/N`, which the kernel resolves to
//! that pinned inode, not to whatever the path names by then. `fchmod(2)` on
//! an `O_PATH` descriptor is `EBADF`, and on the socket's own descriptor it
//! changes the socket inode, not the file, so neither can do it.
//!
//! The fallback is Linux's (it needs `O_PATH` and `/proc`); it belongs with
//! the other platform code in `sys` once that is split per platform.

use std::path::Path;

use nix::errno::Errno;

use crate::error::{errno_at, Result};

/// Sets the permission bits of the socket file at `path` to `mode`, without
/// following a symlink; `bound` is the device and inode `bind(2)` gave it.
pub(crate) fn set_socket_mode(path: &Path, bound: (u64, u64), mode: u32) -> Result<()> {
    set_socket_mode_with(path, bound, mode, || {
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            nix::sys::stat::Mode::from_bits_truncate(mode as nix::libc::mode_t),
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
    })
}

/// [`set_socket_mode`] with the first try given, so a test can make it
/// answer as an old glibc does.
fn set_socket_mode_with(
    path: &Path,
    bound: (u64, u64),
    mode: u32,
    first_try: impl FnOnce() -> nix::Result<()>,
) -> Result<()> {
    match first_try() {
        Ok(()) => Ok(()),
        // EOPNOTSUPP is ENOTSUP on Linux; both spellings for other systems.
        Err(Errno::ENOTSUP | Errno::EOPNOTSUPP) if cfg!(target_os = "linux") => {
            chmod_through_proc_fd(path, bound, mode)
        }
        Err(e) => Err(errno_at("set mode of socket", path, e)),
    }
}

/// The fallback: `chmod(2)` of `/proc/self/fd/N` for an
/// `O_PATH|O_NOFOLLOW` descriptor of `path`, after checking it is the socket
/// `bound` (device and inode). A symlink, a non-socket or another inode at
/// the path is refused and left as it is.
#[cfg(target_os = "linux")]
pub(crate) fn chmod_through_proc_fd(path: &Path, bound: (u64, u64), mode: u32) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};

    use crate::error::{io_at, wrong_type, FileKind};

    let pinned = std::fs::OpenOptions::new()
        .read(true) // ignored with O_PATH, but std wants an access mode
        .custom_flags(nix::libc::O_PATH | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_at("open socket to set its mode", path, e))?;
    let meta = pinned
        .metadata()
        .map_err(|e| io_at("examine socket", path, e))?;
    if !meta.file_type().is_socket() {
        return Err(wrong_type(
            path,
            FileKind::Socket,
            FileKind::of(meta.file_type()),
        ));
    }
    if (meta.dev(), meta.ino()) != bound {
        return Err(io_at(
            "set mode of socket",
            path,
            std::io::Error::other("the path names another socket than the one bound"),
        ));
    }
    let by_fd = format!("/proc/self/fd/{}", pinned.as_raw_fd());
    std::fs::set_permissions(&by_fd, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_at("set mode of socket (through /proc/self/fd)", path, e))
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn chmod_through_proc_fd(path: &Path, _bound: (u64, u64), _mode: u32) -> Result<()> {
    Err(errno_at("set mode of socket", path, Errno::ENOTSUP))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::error::FileKind;
    use crate::LifecycleError;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixListener;

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    fn id(path: &Path) -> (u64, u64) {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn an_old_glibcs_enotsup_takes_the_proc_fd_path_and_sets_the_exact_mode() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        for mode in [0o600, 0o660, 0o640, 0o777, 0o000] {
            let mut tried = false;
            set_socket_mode_with(&sock, id(&sock), mode, || {
                tried = true;
                Err(Errno::ENOTSUP) // what glibc < 2.32 answers
            })
            .unwrap();
            assert!(tried);
            assert_eq!(mode_of(&sock), mode, "{mode:04o}");
        }
        // Any other failure of the first try is reported, naming the path.
        let e = set_socket_mode_with(&sock, id(&sock), 0o600, || Err(Errno::EPERM)).unwrap_err();
        assert_eq!(e.path(), Some(sock.as_path()));
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPERM));
    }

    #[test]
    fn the_fallback_never_follows_a_symlink_or_touches_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bound = id(&sock);

        // A symlink to our very socket: refused, the socket's mode stays.
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        match chmod_through_proc_fd(&link, bound, 0o600) {
            Err(LifecycleError::UnexpectedFileType { found, .. }) => {
                assert_eq!(found, FileKind::Symlink)
            }
            other => panic!("expected UnexpectedFileType, got {other:?}"),
        }
        assert_eq!(mode_of(&sock), 0o755);

        // A regular file at the path: refused, untouched.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            chmod_through_proc_fd(&file, bound, 0o600),
            Err(LifecycleError::UnexpectedFileType { .. })
        ));
        assert_eq!(mode_of(&file), 0o644);

        // Another socket than the one bound (the path was swapped): refused.
        let other = dir.path().join("other.sock");
        let _o = UnixListener::bind(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = chmod_through_proc_fd(&other, bound, 0o600).unwrap_err();
        assert!(e.to_string().contains("another socket"), "{e}");
        assert_eq!(mode_of(&other), 0o755);

        // The socket itself: done.
        chmod_through_proc_fd(&sock, bound, 0o600).unwrap();
        assert_eq!(mode_of(&sock), 0o600);
    }
}
