//! Every Unix but Linux and Android (macOS and the BSDs): no `O_TMPFILE`,
//! no pidfds, no `/proc`. Chosen by the one switch in `sys/mod.rs`; defines
//! the same items as `linux.rs`.

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::set_nonblocking;

/// A close-on-exec Unix stream socket, non-blocking if asked.
///
/// The BSDs set both flags atomically in `socket(2)`, so no concurrent
/// `fork`+`exec` can inherit the descriptor. macOS has no `SOCK_CLOEXEC`;
/// there the flags follow with `fcntl(2)`, as std does.
pub(crate) fn stream_socket(nonblocking: bool) -> nix::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblocking {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        socket(AddressFamily::Unix, SockType::Stream, flags, None)
    }
    #[cfg(target_vendor = "apple")]
    {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        set_cloexec(&fd)?;
        if nonblocking {
            set_nonblocking(&fd)?;
        }
        Ok(fd)
    }
}

/// A close-on-exec pipe whose write end is non-blocking: the self-pipe that a
/// signal handler writes to must never block it. `pipe2(2)` on the BSDs;
/// macOS has none, so there the flags follow with `fcntl(2)`.
pub(crate) fn signal_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = cloexec_pipe()?;
    set_nonblocking(&write)?;
    Ok((read, write))
}

/// A close-on-exec pipe: atomically with `pipe2(2)` on the BSDs; on macOS,
/// which has no `pipe2`, with `fcntl(2)` right after (as std does).
pub(crate) fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    return nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
    #[cfg(target_vendor = "apple")]
    {
        let (r, w) = nix::unistd::pipe()?;
        set_cloexec(&r)?;
        set_cloexec(&w)?;
        Ok((r, w))
    }
}

#[cfg(target_vendor = "apple")]
fn set_cloexec(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// No `O_TMPFILE` here: the caller writes a named temp file instead.
pub(crate) fn unnamed_file_in(_dir: &Path) -> std::io::Result<Option<File>> {
    Ok(None)
}

/// Never called: [`unnamed_file_in`] gives no unnamed files here.
pub(crate) fn link_unnamed(_file: &File, _path: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// No pidfds here: [`Process`](super::Process) falls back to `kill(2)`.
pub(crate) fn pidfd_open(_pid: u32) -> nix::Result<OwnedFd> {
    Err(nix::errno::Errno::ENOSYS)
}

/// Never called: [`pidfd_open`] never gives a pidfd here.
pub(crate) fn pidfd_send_signal(_fd: &OwnedFd, _signal: i32) -> nix::Result<()> {
    Err(nix::errno::Errno::ENOSYS)
}

/// Elsewhere there is no portable async-signal-safe way to list open
/// descriptors; std's and this crate's are close-on-exec already.
pub(crate) fn cloexec_from(_first: u32) {}

/// No `/proc/<pid>/fd` to look in: cannot tell.
pub(crate) fn process_has_open(_pid: u32, _dev_ino: (u64, u64)) -> Option<bool> {
    None
}

/// No `/proc/locks` here; the caller uses a trial lock.
pub(crate) fn flock_holder(_file: &File) -> Result<Option<u32>, ()> {
    Err(())
}

/// `dup2(2)`, then `FD_CLOEXEC` (macOS and the BSDs before dup3: a `fork`
/// plus `exec` in another thread in between could inherit `target`).
pub(crate) fn dup_cloexec_onto(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    use nix::libc;
    // SAFETY: dup2(2) and fcntl(2) on descriptors the caller vouches for.
    unsafe {
        if libc::dup2(fd, target) < 0 || libc::fcntl(target, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Swaps the files at `a` and `b` in one step where the platform can:
/// macOS and iOS `renamex_np(2)` with `RENAME_SWAP` (APFS and HFS+).
/// `Ok(false)` where it cannot (`ENOTSUP`, `EINVAL`: a filesystem without
/// it; the BSDs have no such call): the caller then checks the path and
/// `rename(2)`s over it.
pub(crate) fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            CString::new(p.as_os_str().as_bytes())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        };
        let (a, b) = (c(a)?, c(b)?);
        // SAFETY: two NUL-terminated paths that outlive the call.
        if unsafe { nix::libc::renamex_np(a.as_ptr(), b.as_ptr(), nix::libc::RENAME_SWAP) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(nix::libc::ENOTSUP | nix::libc::EINVAL) => Ok(false),
            _ => Err(e),
        }
    }
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// No portable way to list a process's threads: `None`, and daemonize's
/// "no other threads" rule is documented, not checked.
pub(crate) fn other_threads() -> Option<Vec<String>> {
    None
}

/// No `/proc/self/fd` here: the number of descriptors of a socket is
/// unknown.
pub(crate) fn descriptors_of_socket(_fd: std::os::fd::RawFd) -> Option<usize> {
    None
}
