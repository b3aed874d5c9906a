//! The self-healing socket: re-creating a socket file deleted while the
//! daemon runs (a tmp cleaner, an operator's `rm`), under the claim, from
//! [`DaemonGuard::rebind`](crate::DaemonGuard::rebind) or from the signal
//! thread on a signal whose action is
//! [`SignalAction::Rebind`](crate::SignalAction::Rebind), as tmux does on
//! SIGUSR1.

use std::os::fd::{AsFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;

use crate::cleanup::Cleanup;
use crate::error::{LifecycleError, Result};
use crate::sync::lock;

/// What a socket guard shares with the signal thread so a signal can
/// re-create its socket: the socket file's identity, and the descriptor
/// number of the listener the guard still holds.
#[derive(Debug)]
pub(crate) struct SocketSlot {
    mode: u32,
    backlog: i32,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    /// Device and inode of the socket file we bound last; `None` for an
    /// adopted socket (the service manager owns it).
    id: Option<(u64, u64)>,
    /// The descriptor of the listener inside the guard, while the guard
    /// holds it: a signal's rebind moves the new socket onto this number.
    held: Option<RawFd>,
    /// A listener a signal bound while the guard held none (it was taken):
    /// handed out by the next `take_listener`.
    spare: Option<UnixListener>,
}

impl SocketSlot {
    /// The slot of a guard that bound the socket `id` with `mode` and
    /// `backlog` and holds its listener as descriptor `held`.
    pub(crate) fn new(mode: u32, backlog: i32, id: Option<(u64, u64)>, held: RawFd) -> Self {
        SocketSlot {
            mode,
            backlog,
            state: Mutex::new(SlotState {
                id,
                held: Some(held),
                spare: None,
            }),
        }
    }

    /// The guard no longer holds its listener (taken, kept or closing):
    /// a signal must not touch that descriptor number again. Returns a
    /// listener a signal bound meanwhile, if any.
    pub(crate) fn release_held(&self) -> Option<UnixListener> {
        let mut state = lock(&self.state);
        state.held = None;
        state.spare.take()
    }

    /// [`DaemonGuard::rebind`](crate::DaemonGuard::rebind): re-creates the
    /// socket if it is gone and returns the new listener, which the guard
    /// then holds (and says so with [`hold`](Self::hold)).
    pub(crate) fn rebind(&self, cleanup: &Cleanup, path: &Path) -> Result<Option<UnixListener>> {
        let mut state = lock(&self.state);
        let Some(old) = state.id else {
            return Err(adopted(path));
        };
        let made = remake(cleanup, old, self.mode, self.backlog)?;
        Ok(made.map(|(listener, id)| {
            state.id = Some(id);
            listener
        }))
    }

    /// The guard now holds the listener with descriptor `fd`.
    pub(crate) fn hold(&self, fd: RawFd) {
        lock(&self.state).held = Some(fd);
    }

    /// The signal thread's rebind: re-creates the socket if it is gone and
    /// makes the guard's own listener descriptor refer to the new socket,
    /// so an accept loop on it serves the new socket without knowing (see
    /// `sys::replace_listener` for when the old socket is shut down to wake
    /// an `accept(2)` blocked on it). Errors are dropped: a signal has no
    /// one to report to (the method reports them).
    pub(crate) fn rebind_from_signal(&self, cleanup: &Cleanup) {
        let mut state = lock(&self.state);
        let Some(old) = state.id else { return };
        let Ok(Some((listener, id))) = remake(cleanup, old, self.mode, self.backlog) else {
            return;
        };
        state.id = Some(id);
        match state.held {
            // Under the slot's lock the guard cannot let go of `fd`: every
            // path that closes or hands out its listener calls
            // `release_held` first.
            Some(fd) => {
                if crate::sys::replace_listener(listener.as_fd(), fd).is_err() {
                    // The new socket file exists but the descriptor could
                    // not be moved: keep it for `take_listener`.
                    state.spare = Some(listener);
                }
            }
            None => state.spare = Some(listener),
        }
    }
}

fn adopted(path: &Path) -> LifecycleError {
    LifecycleError::InvalidArgument {
        what: "rebind",
        reason: format!(
            "the socket {} was passed down by the service manager, which owns it",
            path.display()
        ),
    }
}

/// Under the cleanup's lock, re-creates the socket file `old` if nothing is
/// at its path: `Ok(None)` when our socket is still there.
fn remake(
    cleanup: &Cleanup,
    old: (u64, u64),
    mode: u32,
    backlog: i32,
) -> Result<Option<(UnixListener, (u64, u64))>> {
    cleanup.remake(old, |abs: &Path| {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        match crate::paths::lstat_opt(abs) {
            Err(e) => Err(crate::error::io_at("examine socket", abs, e)),
            Ok(Some(m)) if (m.dev(), m.ino()) == old => Ok(None), // still ours
            Ok(Some(m)) if m.file_type().is_socket() => Err(LifecycleError::SocketInUse {
                path: abs.to_path_buf(),
                reason: "another socket was put there; left it untouched".into(),
            }),
            Ok(Some(m)) => Err(crate::error::wrong_type(
                abs,
                crate::FileKind::Socket,
                crate::FileKind::of(m.file_type()),
            )),
            Ok(None) => {
                let (listener, id) = crate::listener::bind_again(abs, mode, backlog)?;
                Ok(Some((id, (listener, id))))
            }
        }
    })
}
