//! [`Shutdown`]: a daemon's shutdown request, set by a signal in
//! [`SignalMode::Graceful`](crate::SignalMode::Graceful) or by
//! [`Shutdown::request`], and waited for by the daemon's main loop.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// A shutdown request for a daemon: set by SIGTERM/SIGINT in
/// [`SignalMode::Graceful`](crate::SignalMode::Graceful), or by [`Shutdown::request`] (a `stop` command on
/// the daemon's socket, say).
///
/// Cheap to clone and `Send + Sync`: hand a clone to the threads that must
/// notice the request.
///
/// ```
/// use historia_lifecycle::{DaemonGuard, SignalMode};
/// let dir = tempfile::tempdir()?;
/// let guard = DaemonGuard::builder(dir.path().join("d.sock"), dir.path().join("d.pid"))
///     .signals(SignalMode::Graceful)
///     .acquire()?;
/// let shutdown = guard.shutdown().clone();
/// std::thread::spawn(move || shutdown.request()); // e.g. a `stop` command
/// guard.shutdown().wait();
/// assert_eq!(guard.shutdown().exit_code(), 0);
/// guard.close()?; // files removed here
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug, Default)]
struct ShutdownInner {
    /// `None` until requested; then `Some(0)` for [`Shutdown::request`] or
    /// `Some(signal number)`.
    state: Mutex<Option<i32>>,
    cv: Condvar,
}

impl Shutdown {
    /// Asks for a shutdown, waking every [`wait`](Self::wait)er. Idempotent;
    /// the first reason is kept.
    pub fn request(&self) {
        self.set(0);
    }

    /// Records a request with reason `why` (0, or a signal number).
    pub(crate) fn set(&self, why: i32) {
        let mut state = lock(&self.inner.state);
        if state.is_none() {
            *state = Some(why);
        }
        self.inner.cv.notify_all();
    }

    /// Whether a shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        lock(&self.inner.state).is_some()
    }

    /// Blocks until a shutdown is requested.
    pub fn wait(&self) {
        let mut state = lock(&self.inner.state);
        while state.is_none() {
            state = self.inner.cv.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until a shutdown is requested or `timeout` passes; returns
    /// whether it was requested.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.inner.state);
        while state.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .inner
                .cv
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The signal that requested the shutdown (`libc::SIGTERM`, …), or `None`
    /// when none has, or when it came from [`request`](Self::request).
    pub fn signal(&self) -> Option<i32> {
        lock(&self.inner.state).filter(|&s| s != 0)
    }

    /// The conventional exit status for this shutdown: `128 + signal` after a
    /// signal (143 for SIGTERM, 130 for SIGINT), 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        self.signal().map_or(0, |s| 128 + s)
    }
}
