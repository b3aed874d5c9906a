//! `DaemonInfo`: the seed's high-level view of a daemon's files, for tools
//! that inspect or clean up after a daemon rather than run it.

use std::path::{Path, PathBuf};

use crate::error::{LifecycleError, Result};
use crate::paths::{lstat_opt, parent_dir, remove_if_same};
use crate::pidfile::{claim, read_pid_file, running_pid};
use crate::probe::{
    clear_stale_socket, probe, probe_socket, try_check_singleton, SingletonCheck, SocketState,
};

/// A daemon's socket and PID file paths, with the PID last read from disk.
///
/// ```
/// use historia_lifecycle::DaemonInfo;
/// let dir = tempfile::tempdir()?;
/// let mut info = DaemonInfo::new(dir.path().join("d.sock"), dir.path().join("d.pid"));
/// assert_eq!(info.load_pid()?, None);
/// assert!(!info.is_running());
/// info.cleanup()?; // nothing there: fine
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// The PID read by the last [`load_pid`](Self::load_pid); `None` before
    /// it, or when the file was missing.
    pub pid: Option<u32>,
    /// The daemon's Unix socket.
    pub socket_path: PathBuf,
    /// The daemon's PID file.
    pub pid_path: PathBuf,
}

impl DaemonInfo {
    /// Describes a daemon by its socket and PID file paths. Touches nothing.
    pub fn new(socket_path: PathBuf, pid_path: PathBuf) -> Self {
        DaemonInfo {
            pid: None,
            socket_path,
            pid_path,
        }
    }

    /// Reads the PID file into [`pid`](Self::pid) and returns it.
    ///
    /// The number is whatever the file says; it may name a dead or recycled
    /// process. To know which live process holds the claim, use
    /// [`running_pid`](crate::running_pid).
    ///
    /// # Errors
    /// As [`read_pid_file`]: [`LifecycleError::PidFile`] for content that is
    /// not a PID, [`LifecycleError::UnexpectedFileType`] for a non-regular
    /// file, [`LifecycleError::Io`] when it cannot be read. `pid` is left
    /// unchanged on error.
    pub fn load_pid(&mut self) -> Result<Option<u32>> {
        self.pid = read_pid_file(&self.pid_path)?;
        Ok(self.pid)
    }

    /// Whether the daemon is running: a live process holds the PID file's
    /// claim, or a listener answers on the socket.
    ///
    /// A read-only query: it removes nothing, even a stale socket. Errors
    /// while probing (permission denied, a non-socket at the path) count as
    /// not running.
    pub fn is_running(&self) -> bool {
        matches!(
            running_pid(&self.pid_path),
            Ok(Some(_)) | Err(LifecycleError::HolderUnknown { .. })
        ) || probe_socket(&self.socket_path).is_ok_and(SocketState::is_live)
    }

    /// Removes the daemon's leftover socket and PID file, after a crash.
    /// Idempotent: missing files are fine.
    ///
    /// It refuses while the daemon runs, and takes the PID file's claim
    /// itself while removing (for that moment the PID file names this
    /// process), so a daemon starting at the same moment either gets
    /// [`LifecycleError::AlreadyRunning`] or starts after it, and never loses
    /// its fresh files. The socket is removed only when provably stale: under
    /// that claim when the PID file's directory exists; when it does not, no
    /// claim is taken (nothing is created) and, as with [`check_singleton`], a
    /// refused socket on macOS and the BSDs is left, reported as
    /// [`LifecycleError::AlreadyRunning`].
    ///
    /// [`check_singleton`]: crate::check_singleton
    ///
    /// # Errors
    /// - [`LifecycleError::AlreadyRunning`] when a process holds the claim or
    ///   a listener answers on the socket; nothing is removed.
    /// - [`LifecycleError::UnexpectedFileType`] when something other than a
    ///   socket or regular file sits at the paths; it is left alone.
    /// - [`LifecycleError::Io`] when a file cannot be examined or removed.
    pub fn cleanup(&self) -> Result<()> {
        let exists = |p: &Path| lstat_opt(p).ok().flatten().is_some();
        // A read-only look first: refusals (a live daemon, something other
        // than a socket at the path) must not touch even the directory.
        let socket = probe(&self.socket_path)?.state;
        if socket.is_live() {
            return Err(LifecycleError::AlreadyRunning);
        }
        if socket == SocketState::Absent && !exists(&self.pid_path) {
            return Ok(()); // nothing left behind
        }
        let clear_socket = || clear_stale_socket(&self.socket_path);
        if !exists(parent_dir(&self.pid_path)) {
            // No PID file can exist, so no daemon using this path holds a
            // claim, and none is taken here (it would create the directory):
            // only a socket proven stale without the claim is removed. On
            // macOS and the BSDs a refusal is no such proof (a full backlog
            // is refused too), so there it is left, as AlreadyRunning.
            return match try_check_singleton(&self.socket_path)? {
                SingletonCheck::AlreadyRunning => Err(LifecycleError::AlreadyRunning),
                SingletonCheck::Available | SingletonCheck::StaleSocketCleaned => Ok(()),
            };
        }
        // Take the claim as a starting daemon would (a dead holder's PID
        // file is replaced by ours), clear the socket under it, then give
        // it back by removing our own file. A daemon starting meanwhile
        // gets AlreadyRunning or starts after us; it never loses a file.
        let claim = claim(
            &self.pid_path,
            std::process::id(),
            crate::PID_FILE_MODE,
            |_| clear_socket(),
        )?;
        let cleared = clear_socket();
        let removed = remove_if_same(&self.pid_path, claim.dev_ino, "remove PID file");
        drop(claim.file);
        cleared.and(removed).map(drop)
    }
}
