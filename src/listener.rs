//! The socket a [`DaemonGuard`](crate::DaemonGuard) binds under its claim:
//! a provably stale socket is reclaimed, then a fresh one is bound with an
//! exact mode and listened on at once.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{bind, listen, Backlog, UnixAddr};
use nix::sys::stat::{fchmod, Mode};

use crate::cleanup::Cleanup;
use crate::error::{errno_at, io_at, FileKind, LifecycleError, Result};
use crate::paths::{dev_ino, ensure_dir, parent_dir};
use crate::probe::clear_stale_socket;

/// How to bind: the path as given (it goes into `sun_path` unchanged), the
/// same path made absolute (for cleanup), the mode and the backlog.
pub(crate) struct BindSpec<'a> {
    pub(crate) path: &'a Path,
    pub(crate) absolute: PathBuf,
    pub(crate) mode: u32,
    pub(crate) backlog: i32,
}

/// Under the claim: binds the socket, listing it in `cleanup`, and says
/// whether a stale socket had to be removed first.
///
/// Binding comes first: on the common start nothing is at the path, and a
/// successful `bind(2)` proves it without a probe. Only `EADDRINUSE` leads to
/// the probe, which removes a provably stale socket (then bind again) or
/// refuses: [`LifecycleError::AlreadyRunning`] for a listener that does not
/// use the claim, [`LifecycleError::UnexpectedFileType`] for a non-socket.
/// `pid_id` is the claim's PID file, to tell "the socket path names the PID
/// file" from any other regular file in the way.
pub(crate) fn bind_claimed(
    spec: BindSpec<'_>,
    pid_path: &Path,
    pid_id: (u64, u64),
    cleanup: &mut Cleanup,
) -> Result<(UnixListener, (u64, u64), bool)> {
    let path = spec.path;
    let mut reclaimed = false;
    let mut created_dir = false;
    // Each round binds, or clears what was in the way; another process
    // re-creating the path over and over is fighting us, and an error.
    for _ in 0..8 {
        match bind_socket(path, spec.mode, spec.backlog) {
            Ok((listener, id)) => {
                cleanup.push(spec.absolute, id, "remove socket");
                return Ok((listener, id, reclaimed));
            }
            Err(Bind::InUse) => {
                reclaimed |= clear_stale_socket(path)
                    .map_err(|e| in_use_or(same_file_or(e, path, pid_path, pid_id), path))?;
            }
            Err(Bind::NoDir) if !created_dir => {
                ensure_dir(parent_dir(path))?;
                created_dir = true;
            }
            Err(Bind::NoDir) => {
                return Err(errno_at("bind socket", path, Errno::ENOENT));
            }
            Err(Bind::Failed(e)) => return Err(e),
        }
    }
    Err(in_use(
        path,
        "another process keeps putting a socket there again while we bind".into(),
    ))
}

/// Re-creates our socket at `path` (absolute), where nothing is: binds with
/// `mode` and `backlog`, creating the directory (0700) if it is gone too.
/// Something appearing there meanwhile is someone else's:
/// [`LifecycleError::SocketInUse`], untouched.
pub(crate) fn bind_again(
    path: &Path,
    mode: u32,
    backlog: i32,
) -> Result<(UnixListener, (u64, u64))> {
    crate::paths::check_socket_path(path)?;
    let mut created_dir = false;
    loop {
        match bind_socket(path, mode, backlog) {
            Ok(bound) => return Ok(bound),
            Err(Bind::InUse) => {
                return Err(in_use(
                    path,
                    "another process put something there first; left it untouched".into(),
                ))
            }
            Err(Bind::NoDir) if !created_dir => {
                ensure_dir(parent_dir(path))?;
                created_dir = true;
            }
            Err(Bind::NoDir) => return Err(errno_at("bind socket", path, Errno::ENOENT)),
            Err(Bind::Failed(e)) => return Err(e),
        }
    }
}

/// Turns what the probe could not settle, after `bind(2)` said
/// `EADDRINUSE`, into [`LifecycleError::SocketInUse`]: a socket we may not
/// connect to (another user's), one of another type, a path that keeps
/// changing. The clear outcomes pass through unchanged: a listener
/// ([`LifecycleError::AlreadyRunning`]), a non-socket
/// ([`LifecycleError::UnexpectedFileType`]), failures of our own (a
/// directory we may not search, no descriptors left).
pub(crate) fn in_use_or(e: LifecycleError, path: &Path) -> LifecycleError {
    let reason = match (crate::error::op_of(&e), e.raw_os_error()) {
        (Some("connect to socket"), Some(nix::libc::EACCES | nix::libc::EPERM)) => {
            "a socket there refuses us permission to connect (another user's, or a mode \
             that shuts us out)"
                .to_string()
        }
        (Some("connect to socket"), Some(nix::libc::EPROTOTYPE)) => {
            "a socket of another type (datagram or seqpacket) is bound there".to_string()
        }
        (Some("connect to socket"), Some(n)) => format!(
            "connect(2) to the socket there failed: {}",
            io::Error::from_raw_os_error(n)
        ),
        (Some("probe socket"), _) => "another process keeps replacing it".to_string(),
        _ => return e,
    };
    in_use(path, reason)
}

fn in_use(path: &Path, reason: String) -> LifecycleError {
    LifecycleError::SocketInUse {
        path: path.to_path_buf(),
        reason,
    }
}

/// Turns "a regular file is at the socket path" into the clearer
/// [`LifecycleError::InvalidArgument`] when that file is the PID file itself
/// (two spellings of one path, or a hard link to it).
pub(crate) fn same_file_or(
    e: LifecycleError,
    socket_path: &Path,
    pid_path: &Path,
    pid_id: (u64, u64),
) -> LifecycleError {
    match e {
        LifecycleError::UnexpectedFileType {
            found: FileKind::Regular,
            ..
        } if dev_ino(socket_path) == Some(pid_id) => same_path_error(socket_path, pid_path),
        other => other,
    }
}

/// The error for a socket path and a PID path that name one file.
pub(crate) fn same_path_error(socket_path: &Path, pid_path: &Path) -> LifecycleError {
    LifecycleError::InvalidArgument {
        what: "paths",
        reason: format!(
            "the socket {} and the PID file {} are the same file",
            socket_path.display(),
            pid_path.display()
        ),
    }
}

/// Why [`bind_socket`] failed.
enum Bind {
    /// `EADDRINUSE`: something is at the path.
    InUse,
    /// `ENOENT`: the directory is missing.
    NoDir,
    Failed(LifecycleError),
}

/// Creates, binds and listens on a close-on-exec Unix stream socket with
/// the given mode; returns it with the socket file's device and inode.
fn bind_socket(
    path: &Path,
    mode: u32,
    backlog: i32,
) -> std::result::Result<(UnixListener, (u64, u64)), Bind> {
    let failed = |op, e| Bind::Failed(errno_at(op, path, e));
    let addr = UnixAddr::new(path).map_err(|e| failed("address socket", e))?;
    let fd = crate::sys::stream_socket(false).map_err(|e| failed("create socket", e))?;
    // On Linux bind(2) gives the new file the socket inode's mode less the
    // umask, so setting it first leaves no moment with a wider mode. A chmod
    // after bind makes the mode exact where the umask took bits away, and is
    // the only way on other platforms.
    let mode_t = Mode::from_bits_truncate(mode as nix::libc::mode_t);
    if cfg!(any(target_os = "linux", target_os = "android")) {
        let _ = fchmod(&fd, mode_t);
    }
    match bind(fd.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(Errno::EADDRINUSE) => return Err(Bind::InUse),
        Err(Errno::ENOENT) => return Err(Bind::NoDir),
        Err(e) => return Err(failed("bind socket", e)),
    }
    // On a failure below, remove what we bound: by device and inode once
    // they are known; before that, only a socket (the best proof there is).
    let mut undo = scopeguard::guard(None::<(u64, u64)>, |id| {
        let id = id.or_else(|| {
            crate::paths::lstat_opt(path)
                .ok()
                .flatten()
                .filter(|m| m.file_type().is_socket())
                .map(|m| (m.dev(), m.ino()))
        });
        if let Some(id) = id {
            let _ = crate::paths::remove_if_same(path, id, "remove socket");
        }
    });
    // Listen at once: a bound socket that does not listen yet refuses
    // connections, and would look stale to a prober for that moment.
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| failed("listen on socket", e))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Bind::Failed(io_at("examine socket", path, e)))?;
    if !meta.file_type().is_socket() {
        // Swapped between bind and here by someone who may write the dir:
        // not ours, so the undo leaves it alone.
        return Err(Bind::Failed(crate::error::wrong_type(
            path,
            FileKind::Socket,
            FileKind::of(meta.file_type()),
        )));
    }
    let id = (meta.dev(), meta.ino());
    *undo = Some(id);
    if meta.mode() & 0o777 != mode {
        // fchmodat(AT_SYMLINK_NOFOLLOW), or on glibc < 2.32 (ENOTSUP) the
        // same through an O_PATH descriptor checked to be this socket.
        crate::chmod::set_socket_mode(path, id, mode).map_err(Bind::Failed)?;
    }
    scopeguard::ScopeGuard::into_inner(undo);
    Ok((UnixListener::from(fd), id))
}
