//! Every Unix but Linux and Android (macOS and the BSDs): no `O_TMPFILE`,
//! no pidfds, no `/proc`. Chosen by the one switch in `sys/mod.rs`; defines
//! the same items as `linux.rs`.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::{kill_if, set_nonblocking, SignalError};

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
    #[cfg(not(target_vendor = "apple"))]
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    #[cfg(target_vendor = "apple")]
    let (read, write) = {
        let (r, w) = nix::unistd::pipe()?;
        set_cloexec(&r)?;
        set_cloexec(&w)?;
        (r, w)
    };
    set_nonblocking(&write)?;
    Ok((read, write))
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

/// Sends `signal` to `pid` if `still_ours()` confirms it, returning whether it
/// was sent (`false`: the check failed or the process is gone). No pidfds
/// here: check, then `kill(2)`, with the usual tiny window for PID reuse.
pub(crate) fn signal_if(
    pid: u32,
    signal: i32,
    still_ours: impl FnOnce() -> Result<bool, crate::LifecycleError>,
) -> Result<bool, SignalError> {
    kill_if(pid, signal, still_ours)
}

/// No `/proc/<pid>/fd` to look in: cannot tell.
pub(crate) fn process_has_open(_pid: u32, _dev_ino: (u64, u64)) -> Option<bool> {
    None
}

/// No `/proc/locks` here; the caller uses a trial lock.
pub(crate) fn flock_holder(_file: &File) -> Result<Option<u32>, ()> {
    Err(())
}
