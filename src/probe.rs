//! The socket liveness probe: `check_singleton`, its fallible forms, and
//! removal of a stale socket.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::socket::{connect, UnixAddr};

use crate::error::{errno_at, io_at, wrong_type, FileKind, Result};
use crate::paths::{check_socket_path, lstat_opt, remove_if_same};

/// What [`check_singleton`] concluded about a socket path.
///
/// The three outcomes of the seed API; the enum is exhaustive so a `match`
/// needs no wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SingletonCheck {
    /// Nothing is at the path: safe to start.
    Available,
    /// A stale socket (a socket file nobody listens on) was at the path and
    /// this call removed it: safe to start.
    StaleSocketCleaned,
    /// A daemon is listening, or the path could not be proven free. Do not
    /// start; [`try_check_singleton`] says which.
    AlreadyRunning,
}

/// What is at a socket path, found without changing anything; the result of
/// [`probe_socket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SocketState {
    /// Nothing is at the path.
    Absent,
    /// A process accepted the connection: a live daemon.
    Listening,
    /// The listener's backlog is full (`EAGAIN` from `connect(2)`): a live
    /// daemon that is busy. Counts as running.
    Busy,
    /// `lstat(2)` says it is a socket and `connect(2)` was refused
    /// (`ECONNREFUSED`), with the same inode before and after: nobody
    /// listens. This is the only proof of staleness this crate accepts, and
    /// only on Linux, where a full backlog answers `EAGAIN` instead.
    Stale,
    /// As [`Stale`](Self::Stale), on a platform where `ECONNREFUSED` does not
    /// prove it: macOS and the BSDs also refuse a connection when the
    /// listener's backlog is full, so a busy live daemon looks the same.
    /// The lockless [`check_singleton`] and [`try_check_singleton`] never
    /// remove such a socket (they answer `AlreadyRunning`); a guard, which
    /// holds the PID file's claim, does: a daemon that uses the claim cannot
    /// be listening while we hold it. Never reported on Linux.
    Refused,
}

impl SocketState {
    /// Whether a daemon is serving on the socket ([`Listening`](Self::Listening)
    /// or [`Busy`](Self::Busy)). [`Refused`](Self::Refused) is not known to
    /// be live, nor to be stale.
    pub fn is_live(self) -> bool {
        matches!(self, SocketState::Listening | SocketState::Busy)
    }
}

/// A probe's result with the inode it was about, so removal can check it is
/// still the same file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Probed {
    pub(crate) state: SocketState,
    pub(crate) dev_ino: Option<(u64, u64)>,
}

/// Probes a Unix socket path with `lstat(2)` and a non-blocking `connect(2)`;
/// reads only, never removes.
///
/// - nothing there → [`SocketState::Absent`];
/// - connection accepted → [`SocketState::Listening`];
/// - `EAGAIN` (backlog full) → [`SocketState::Busy`];
/// - `ECONNREFUSED` on a path that `lstat` says is a socket, with the same
///   device and inode before and after → [`SocketState::Stale`] on Linux,
///   [`SocketState::Refused`] elsewhere, where a full backlog is refused
///   too.
///
/// The connect never blocks: on Unix sockets a non-blocking connect answers at
/// once, so a daemon that never calls `accept` cannot hang the probe.
///
/// # Errors
/// - [`LifecycleError::PathTooLong`](crate::LifecycleError::PathTooLong) when the path does not fit `sun_path`
///   (`unix(7)`); the path is never truncated.
/// - [`LifecycleError::UnexpectedFileType`](crate::LifecycleError::UnexpectedFileType) when something other than a socket
///   is at the path (Linux answers `ECONNREFUSED` for those too, which is why
///   `lstat` decides).
/// - [`LifecycleError::Io`](crate::LifecycleError::Io) for every other failure: `EACCES`/`EPERM` on the
///   socket or a directory, a socket of another type (`EPROTOTYPE`), … None
///   of these proves anything, so nothing is concluded.
///
/// ```
/// use historia_lifecycle::{probe_socket, SocketState};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("d.sock");
/// assert_eq!(probe_socket(&path)?, SocketState::Absent);
/// let listener = std::os::unix::net::UnixListener::bind(&path)?;
/// assert_eq!(probe_socket(&path)?, SocketState::Listening);
/// drop(listener); // the file stays behind: a stale socket
/// assert_eq!(probe_socket(&path)?, SocketState::Stale);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn probe_socket(path: &Path) -> Result<SocketState> {
    probe(path).map(|p| p.state)
}

/// Whether `ECONNREFUSED` from `connect(2)` on a Unix stream socket proves
/// that nobody listens. Linux answers a full backlog with `EAGAIN`, so a
/// refusal means no listener (`unix(7)`). macOS and the BSDs answer a full
/// backlog with `ECONNREFUSED` too (`so_qlen > so_qlimit` in
/// `uipc_usrreq.c`), so there a refusal proves nothing without the claim.
const REFUSAL_PROVES_STALE: bool = cfg!(any(target_os = "linux", target_os = "android"));

pub(crate) fn probe(path: &Path) -> Result<Probed> {
    probe_with(path, REFUSAL_PROVES_STALE)
}

/// [`probe`] with the platform's answer to "does a refusal prove
/// staleness?" given, so the other platforms' rule is tested on Linux too.
pub(crate) fn probe_with(path: &Path, refusal_proves_stale: bool) -> Result<Probed> {
    check_socket_path(path)?;
    // A path that is swapped between our lstat and connect is looked at
    // again; one that keeps changing is someone fighting us, and an error.
    for _ in 0..8 {
        if let Some(found) = probe_once(path, refusal_proves_stale)? {
            return Ok(found);
        }
    }
    Err(io_at(
        "probe socket",
        path,
        io::Error::other("the path kept changing while it was probed"),
    ))
}

/// One lstat-connect-lstat round; `None` when the path changed under it.
fn probe_once(path: &Path, refusal_proves_stale: bool) -> Result<Option<Probed>> {
    let Some(before) = lstat_opt(path).map_err(|e| io_at("examine socket", path, e))? else {
        return Ok(Some(Probed {
            state: SocketState::Absent,
            dev_ino: None,
        }));
    };
    if !before.file_type().is_socket() {
        return Err(wrong_type(
            path,
            FileKind::Socket,
            FileKind::of(before.file_type()),
        ));
    }
    let id = (before.dev(), before.ino());
    let state = match try_connect(path)? {
        Connect::Accepted => SocketState::Listening,
        Connect::Busy => SocketState::Busy,
        Connect::Gone => return Ok(None),
        Connect::Refused => {
            // The path may have been swapped for a non-socket (which also
            // answers ECONNREFUSED) between the lstat and the connect.
            match lstat_opt(path).map_err(|e| io_at("examine socket", path, e))? {
                Some(after) if !after.file_type().is_socket() => {
                    return Err(wrong_type(
                        path,
                        FileKind::Socket,
                        FileKind::of(after.file_type()),
                    ))
                }
                Some(after) if (after.dev(), after.ino()) == id => {
                    if refusal_proves_stale {
                        SocketState::Stale
                    } else {
                        SocketState::Refused
                    }
                }
                // Replaced by another socket, or removed: look again.
                _ => return Ok(None),
            }
        }
    };
    Ok(Some(Probed {
        state,
        dev_ino: Some(id),
    }))
}

enum Connect {
    Accepted,
    Busy,
    Refused,
    Gone,
}

fn try_connect(path: &Path) -> Result<Connect> {
    let addr = UnixAddr::new(path).map_err(|e| errno_at("address socket", path, e))?;
    let fd = crate::sys::stream_socket(true)
        .map_err(|e| errno_at("create a socket to probe", path, e))?;
    match connect(fd.as_raw_fd(), &addr) {
        // EINPROGRESS is not used by AF_UNIX on Linux, but a BSD may report
        // it for an accepted-later connection: someone is listening.
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(Connect::Accepted),
        Err(Errno::EAGAIN) => Ok(Connect::Busy),
        Err(Errno::ECONNREFUSED) => Ok(Connect::Refused),
        Err(Errno::ENOENT) => Ok(Connect::Gone),
        Err(e) => Err(errno_at("connect to socket", path, e)),
    }
}

/// Under a claim: removes a provably stale socket at `path` and says whether
/// it did; [`LifecycleError::AlreadyRunning`](crate::LifecycleError::AlreadyRunning)
/// when a listener answers there (one that does not use the claim).
///
/// Holding the claim is what lets a refusal count as staleness on every
/// platform ([`SocketState::Refused`]): a daemon that uses the claim cannot
/// be listening, busy or not, while we hold it.
pub(crate) fn clear_stale_socket(path: &Path) -> Result<bool> {
    clear_stale_socket_with(path, REFUSAL_PROVES_STALE)
}

fn clear_stale_socket_with(path: &Path, refusal_proves_stale: bool) -> Result<bool> {
    let probed = probe_with(path, refusal_proves_stale)?;
    match (probed.state, probed.dev_ino) {
        (SocketState::Listening | SocketState::Busy, _) => {
            Err(crate::LifecycleError::AlreadyRunning)
        }
        (SocketState::Stale | SocketState::Refused, Some(id)) => {
            remove_if_same(path, id, "remove stale socket")
        }
        _ => Ok(false),
    }
}

/// Checks whether a daemon is serving on `socket_path`, removing the socket
/// file if it is provably stale. Fallible form of [`check_singleton`].
///
/// Returns [`SingletonCheck::StaleSocketCleaned`] only when this call really
/// removed a stale socket, and [`SingletonCheck::AlreadyRunning`] only when a
/// listener answered.
///
/// This probes and removes without a lock, so two processes starting at once
/// can both see `Available`. For exactly-one-instance, use
/// [`DaemonGuard::acquire`](crate::DaemonGuard::acquire), which does the same
/// under a flock.
///
/// # Platform difference
/// On macOS and the BSDs a listener whose backlog is full refuses
/// connections with `ECONNREFUSED`, the answer a stale socket gives. Without
/// the claim nothing tells them apart, so there a refused socket
/// ([`SocketState::Refused`]) is never removed: the answer is
/// [`SingletonCheck::AlreadyRunning`], also after a crash. A guard (or
/// [`DaemonInfo::cleanup`](crate::DaemonInfo::cleanup)), which holds the
/// claim, reclaims it. On Linux a full backlog answers `EAGAIN`
/// ([`SocketState::Busy`]) and a refusal is proof.
///
/// # Errors
/// As [`probe_socket`], plus [`LifecycleError::Io`](crate::LifecycleError::Io) when the stale socket
/// cannot be removed. On every error nothing was removed.
pub fn try_check_singleton(socket_path: &Path) -> Result<SingletonCheck> {
    try_check_singleton_with(socket_path, REFUSAL_PROVES_STALE)
}

fn try_check_singleton_with(
    socket_path: &Path,
    refusal_proves_stale: bool,
) -> Result<SingletonCheck> {
    // A removal can race with another process re-creating the path; a few
    // rounds settle it, and more would mean something is fighting us.
    for _ in 0..8 {
        let p = probe_with(socket_path, refusal_proves_stale)?;
        match p.state {
            SocketState::Absent => return Ok(SingletonCheck::Available),
            // Refused: maybe a busy live daemon (macOS, BSD); no lock held
            // here to tell, so never removed.
            SocketState::Listening | SocketState::Busy | SocketState::Refused => {
                return Ok(SingletonCheck::AlreadyRunning)
            }
            SocketState::Stale => {
                if let Some(id) = p.dev_ino {
                    if remove_if_same(socket_path, id, "remove stale socket")? {
                        return Ok(SingletonCheck::StaleSocketCleaned);
                    }
                }
            }
        }
    }
    Ok(SingletonCheck::AlreadyRunning)
}

/// Checks whether a daemon is serving on `socket_path`, as the seed API
/// describes: connect to it, and clean up the socket file if it is stale.
///
/// Safer than the seed's wording: only `ECONNREFUSED` on a path that `lstat`
/// says is a socket counts as stale, and only on Linux (macOS and the BSDs
/// refuse connections to a busy listener too; see [`try_check_singleton`]). When the probe fails for any other reason
/// (permission denied, a regular file or directory at the path, a path longer
/// than `sun_path`) nothing is removed and the answer is
/// [`SingletonCheck::AlreadyRunning`], the answer that cannot lead a caller to
/// destroy anything. Call [`try_check_singleton`] to get the reason.
///
/// The check is synchronous and never blocks on a listener that does not
/// accept, so it can run before an async runtime starts.
///
/// ```
/// use historia_lifecycle::{check_singleton, SingletonCheck};
/// let dir = tempfile::tempdir()?;
/// let sock = dir.path().join("daemon.sock");
/// assert_eq!(check_singleton(&sock), SingletonCheck::Available);
/// drop(std::os::unix::net::UnixListener::bind(&sock)?); // crash leftovers
/// assert_eq!(check_singleton(&sock), SingletonCheck::StaleSocketCleaned);
/// assert!(!sock.exists());
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn check_singleton(socket_path: &Path) -> SingletonCheck {
    try_check_singleton(socket_path).unwrap_or(SingletonCheck::AlreadyRunning)
}

/// Removes the socket file at `socket_path`, for the daemon that owns it at
/// shutdown. Idempotent: a missing file is success.
///
/// Removes only a socket: a regular file, directory, FIFO or symlink at the
/// path is left alone and reported. It does not check whether someone listens
/// (the owner calls it while its own listener is open); to remove a socket
/// only when it is stale, use [`check_singleton`].
///
/// # Errors
/// - [`LifecycleError::UnexpectedFileType`](crate::LifecycleError::UnexpectedFileType) when the path is not a socket.
/// - [`LifecycleError::Io`](crate::LifecycleError::Io) when `lstat(2)` or `unlink(2)` fails for a reason
///   other than `ENOENT`.
pub fn cleanup_socket_file(socket_path: &Path) -> Result<()> {
    let Some(meta) = lstat_opt(socket_path).map_err(|e| io_at("examine socket", socket_path, e))?
    else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(wrong_type(
            socket_path,
            FileKind::Socket,
            FileKind::of(meta.file_type()),
        ));
    }
    remove_if_same(socket_path, (meta.dev(), meta.ino()), "remove socket").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn id(path: &Path) -> (u64, u64) {
        let m = std::fs::symlink_metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    /// The macOS/BSD rule, run on Linux: a refusal is no proof without the
    /// claim, so the lockless check keeps the socket; under the claim it goes.
    #[test]
    fn where_a_full_backlog_is_refused_only_the_claim_may_remove_a_refused_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        drop(UnixListener::bind(&sock).unwrap()); // a socket nobody listens on
        let before = id(&sock);

        assert_eq!(
            probe_with(&sock, false).unwrap().state,
            SocketState::Refused
        );
        assert!(!SocketState::Refused.is_live());
        for _ in 0..2 {
            assert_eq!(
                try_check_singleton_with(&sock, false).unwrap(),
                SingletonCheck::AlreadyRunning
            );
            assert_eq!(id(&sock), before, "the lockless check removed it");
        }
        // The Linux rule: the same refusal is proof.
        assert_eq!(probe_with(&sock, true).unwrap().state, SocketState::Stale);
        assert_eq!(REFUSAL_PROVES_STALE, cfg!(target_os = "linux"));
        // Under the claim (the guards' path), it is reclaimed.
        assert!(clear_stale_socket_with(&sock, false).unwrap());
        assert!(std::fs::symlink_metadata(&sock).is_err());
        assert_eq!(
            try_check_singleton_with(&sock, false).unwrap(),
            SingletonCheck::Available
        );
    }

    #[test]
    fn a_listener_is_live_under_either_rule_and_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("d.sock");
        let _l = UnixListener::bind(&sock).unwrap();
        for proves in [true, false] {
            assert_eq!(
                probe_with(&sock, proves).unwrap().state,
                SocketState::Listening
            );
            assert!(matches!(
                clear_stale_socket_with(&sock, proves),
                Err(crate::LifecycleError::AlreadyRunning)
            ));
            assert_eq!(
                try_check_singleton_with(&sock, proves).unwrap(),
                SingletonCheck::AlreadyRunning
            );
        }
        assert!(std::fs::symlink_metadata(&sock).is_ok());
    }
}
