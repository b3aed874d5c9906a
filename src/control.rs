//! Controlling a running daemon from another process: signalling the process
//! that holds the claim, never a PID that may have been recycled.

use std::path::Path;

use crate::error::{io_at, Result};
use crate::pidfile::running_pid;

/// Sends `signal` (for example `libc::SIGTERM`, 15) to the live process that
/// holds the claim on `pid_path`, and returns its PID; `Ok(None)` when no
/// process holds it, so nothing was signalled.
///
/// This is how `stop` should reach a daemon whose socket does not answer. The
/// number in a PID file alone may name a recycled PID; here the target is the
/// holder of the PID file's flock, as [`running_pid`] reports it. On Linux
/// 5.3 and later the signal goes through a `pidfd_open(2)` descriptor opened
/// *before* the holder is checked, so the process that gets the signal is the
/// one that was checked (`pidfd_send_signal(2)`): no window for PID reuse.
/// Elsewhere `kill(2)` follows the check, with the usual tiny window.
///
/// # Errors
/// - [`LifecycleError::HolderUnknown`] when the claim is held but its holder
///   cannot be named; nothing is signalled.
/// - As [`running_pid`]: [`LifecycleError::UnexpectedFileType`],
///   [`LifecycleError::PidFile`], [`LifecycleError::Io`] when the PID file
///   cannot be read.
/// - [`LifecycleError::Io`] when the signal cannot be sent (`EPERM`: the
///   daemon belongs to another user; `EINVAL`: not a signal number).
///
/// [`LifecycleError::HolderUnknown`]: crate::LifecycleError::HolderUnknown
/// [`LifecycleError::UnexpectedFileType`]: crate::LifecycleError::UnexpectedFileType
/// [`LifecycleError::PidFile`]: crate::LifecycleError::PidFile
/// [`LifecycleError::Io`]: crate::LifecycleError::Io
///
/// ```
/// use historia_lifecycle::signal_daemon;
/// let dir = tempfile::tempdir()?;
/// // Nobody holds the claim: nothing is signalled.
/// assert_eq!(signal_daemon(&dir.path().join("d.pid"), 15)?, None);
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
pub fn signal_daemon(pid_path: &Path, signal: i32) -> Result<Option<u32>> {
    let Some(pid) = running_pid(pid_path)? else {
        return Ok(None);
    };
    let sent = crate::sys::signal_if(pid, signal, || Ok(running_pid(pid_path)? == Some(pid)))
        .map_err(|e| match e {
            crate::sys::SignalError::Check(e) => e,
            crate::sys::SignalError::Os(e) => io_at("signal the daemon holding", pid_path, e),
        })?;
    Ok(sent.then_some(pid))
}
