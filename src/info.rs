//! `DaemonInfo`: the seed's high-level view of a daemon's files, for tools
//! that inspect or clean up after a daemon rather than run it.

use std::path::PathBuf;

use crate::error::{LifecycleError, Result};
use crate::paths::lstat_opt;
use crate::paths::remove_if_same;
use crate::pidfile::{lock_existing, read_pid_file, running_pid};
use crate::probe::{probe, probe_socket, SocketState};

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
    /// itself while removing, so a daemon starting at the same moment either
    /// waits for it (and gets [`LifecycleError::AlreadyRunning`]) or starts
    /// after it, never loses its fresh files. The socket is removed only when
    /// provably stale.
    ///
    /// # Errors
    /// - [`LifecycleError::AlreadyRunning`] when a process holds the claim or
    ///   a listener answers on the socket; nothing is removed.
    /// - [`LifecycleError::UnexpectedFileType`] when something other than a
    ///   socket or regular file sits at the paths; it is left alone.
    /// - [`LifecycleError::Io`] when a file cannot be examined or removed.
    pub fn cleanup(&self) -> Result<()> {
        // Hold the claim on the PID file, if there is one, for the whole
        // cleanup, so a daemon starting meanwhile cannot lose its fresh files.
        let mut claim = None;
        for _ in 0..8 {
            claim = lock_existing(&self.pid_path)?;
            if claim.is_some() || lstat_opt(&self.pid_path).ok().flatten().is_none() {
                break;
            }
        }
        let p = probe(&self.socket_path)?;
        match p.state {
            SocketState::Listening | SocketState::Busy => {
                return Err(LifecycleError::AlreadyRunning)
            }
            SocketState::Stale => {
                if let Some(id) = p.dev_ino {
                    remove_if_same(&self.socket_path, id, "remove stale socket")?;
                }
            }
            SocketState::Absent => {}
        }
        // Only the file we locked is removed; one that appeared after we
        // looked belongs to a daemon that just started.
        if let Some((file, id)) = claim {
            remove_if_same(&self.pid_path, id, "remove PID file")?;
            drop(file);
        }
        Ok(())
    }
}
