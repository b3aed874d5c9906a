//! [`Reload`]: a daemon's reload request (SIGHUP with
//! [`SignalAction::Reload`](crate::SignalAction::Reload), or
//! [`Reload::request`]), taken by the daemon's main loop and acknowledged to
//! the service manager.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::error::Result;
use crate::notify::Notifier;
use crate::waiters::{WaitSlot, Watch};

/// A reload request for a daemon: set by a signal whose action is
/// [`SignalAction::Reload`](crate::SignalAction::Reload) (SIGHUP by
/// convention), or by [`Reload::request`] (a `reload` command on the
/// daemon's socket, say); taken by the daemon with [`wait`](Self::wait),
/// [`take`](Self::take) or the future [`requested`](Self::requested).
///
/// Requests that arrive before one is taken count once: three SIGHUPs
/// while the daemon is busy mean one reload, as for most daemons (the
/// configuration is read once, after the last change). A request that
/// arrives *during* a reload is a new one.
///
/// Cheap to clone and `Send + Sync`.
///
/// # Telling the service manager
/// Under systemd's `Type=notify-reload` (or any manager speaking
/// `sd_notify(3)`), wrap the reload in [`begin`](Self::begin) and
/// [`Reloading::done`]: they send `RELOADING=1` with `MONOTONIC_USEC=`, then
/// `READY=1`, so `systemctl reload` returns when the reload is done. Without
/// a manager (`NOTIFY_SOCKET` unset) they send nothing.
///
/// ```
/// use historia_lifecycle::{PidFileGuard, SignalAction};
/// use nix::libc::SIGHUP;
/// let dir = tempfile::tempdir()?;
/// let guard = PidFileGuard::builder(dir.path().join("d.pid"))
///     .on_signal(SIGHUP, SignalAction::Reload)
///     .acquire()?;
/// let reload = guard.reload().clone();
/// std::thread::spawn(move || reload.request()); // or `kill -HUP <pid>`
///
/// guard.reload().wait();
/// let reloading = guard.reload().begin()?; // RELOADING=1 to a manager
/// // ... re-read the configuration, reopen the log file ...
/// reloading.done()?; // READY=1
/// assert!(!guard.reload().take(), "the request was taken by wait()");
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Reload {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Threads and futures wait on it.
    state: Watch<State>,
    /// The service manager told about reloads; set once at acquire.
    notifier: Option<Notifier>,
}

#[derive(Debug, Default)]
struct State {
    /// A request not yet taken.
    pending: bool,
    /// Requests received, taken or not (`SIGHUP`s and `request()`s).
    received: u64,
    /// The signal behind the last request, 0 for `request()`.
    last: i32,
}

/// Takes the waiting request: the condition every waiter checks.
fn take_pending(state: &mut State) -> Option<()> {
    std::mem::take(&mut state.pending).then_some(())
}

impl Reload {
    /// A handle that reports reloads to `notifier`.
    pub(crate) fn new(notifier: Option<Notifier>) -> Self {
        Reload {
            inner: Arc::new(Inner {
                notifier,
                ..Inner::default()
            }),
        }
    }

    /// Asks for a reload, waking a [`wait`](Self::wait)er or a
    /// [`requested`](Self::requested) future.
    pub fn request(&self) {
        self.set(0);
    }

    /// Records a request with reason `why` (0, or a signal number).
    pub(crate) fn set(&self, why: i32) {
        self.inner.state.update(|state| {
            state.pending = true;
            state.received += 1;
            state.last = why;
        });
    }

    /// Whether a request is waiting to be taken.
    pub fn is_pending(&self) -> bool {
        self.inner.state.read(|state| state.pending)
    }

    /// Takes the waiting request, if there is one: `true` means "reload now".
    /// Never blocks; for a loop that polls between other work.
    pub fn take(&self) -> bool {
        self.inner
            .state
            .wait_until(Some(Duration::ZERO), take_pending)
            .is_some()
    }

    /// Blocks until a request is waiting, and takes it.
    pub fn wait(&self) {
        self.inner.state.wait_until(None, take_pending);
    }

    /// Blocks until a request is waiting or `timeout` passes; takes it and
    /// returns `true`, or returns `false` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner
            .state
            .wait_until(Some(timeout), take_pending)
            .is_some()
    }

    /// A future that resolves once a request is waiting, and takes it: the
    /// async [`wait`](Self::wait), for any executor (no runtime needed),
    /// cancel-safe (a future dropped before it resolved takes nothing).
    /// With several waiting, one request wakes them all and one takes it;
    /// the others wait for the next.
    ///
    /// ```
    /// # use historia_lifecycle::Reload;
    /// # fn block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Wake, Waker};
    /// #     struct W(std::thread::Thread);
    /// #     impl Wake for W { fn wake(self: std::sync::Arc<Self>) { self.0.unpark() } }
    /// #     let waker = Waker::from(std::sync::Arc::new(W(std::thread::current())));
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(&waker)) { return v; }
    /// #         std::thread::park();
    /// #     }
    /// # }
    /// let reload = Reload::default();
    /// let other = reload.clone();
    /// std::thread::spawn(move || other.request()); // or SIGHUP
    /// block_on(reload.requested()); // e.g. in a tokio::select! loop
    /// assert!(!reload.is_pending());
    /// ```
    pub fn requested(&self) -> ReloadRequested {
        ReloadRequested {
            reload: self.clone(),
            slot: WaitSlot::default(),
        }
    }

    /// How many requests arrived so far, taken or not.
    pub fn count(&self) -> u64 {
        self.inner.state.read(|state| state.received)
    }

    /// The signal behind the latest request (`libc::SIGHUP`), or `None` when
    /// none came, or it came from [`request`](Self::request).
    pub fn signal(&self) -> Option<i32> {
        self.inner
            .state
            .read(|state| (state.received > 0 && state.last != 0).then_some(state.last))
    }

    /// Starts acknowledging a reload: tells the service manager
    /// `RELOADING=1` with `MONOTONIC_USEC=` (`CLOCK_MONOTONIC`, as
    /// `sd_notify(3)` asks for `Type=notify-reload`). Call
    /// [`Reloading::done`] once the new configuration is in use.
    ///
    /// # Errors
    /// [`LifecycleError::Io`](crate::LifecycleError::Io) naming the socket
    /// when the notification cannot be sent; nothing is sent without a
    /// manager, and then this never fails.
    pub fn begin(&self) -> Result<Reloading<'_>> {
        if let Some(n) = &self.inner.notifier {
            n.reloading()?;
        }
        Ok(Reloading {
            reload: self,
            done: false,
        })
    }
}

/// The future [`Reload::requested`] returns: resolves once a reload request
/// is waiting, and takes it.
///
/// `'static + Send + Sync + Unpin` and cancel-safe.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited or polled"]
pub struct ReloadRequested {
    reload: Reload,
    /// Its place in the waker list, once polled.
    slot: WaitSlot,
}

impl Future for ReloadRequested {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.reload
            .inner
            .state
            .poll_until(&mut this.slot, cx, take_pending)
    }
}

impl Drop for ReloadRequested {
    fn drop(&mut self) {
        // Cancel safety: a future dropped before it resolved leaves no waker
        // (and took nothing).
        self.reload.inner.state.cancel(&mut self.slot);
    }
}

/// A reload in progress, made by [`Reload::begin`]: [`done`](Self::done)
/// (or Drop, best effort) tells the service manager `READY=1`.
///
/// Send `READY=1` even when the reload failed (the daemon keeps serving with
/// the old configuration): systemd waits for it either way; say what went
/// wrong with [`Notifier::status`](crate::Notifier::status).
#[derive(Debug)]
#[must_use = "the service manager waits for `READY=1` after a reload: call .done()"]
pub struct Reloading<'a> {
    reload: &'a Reload,
    done: bool,
}

impl Reloading<'_> {
    /// Ends the reload: sends `READY=1` to the service manager, if one waits.
    ///
    /// # Errors
    /// [`LifecycleError::Io`](crate::LifecycleError::Io) naming the socket
    /// when the notification cannot be sent.
    pub fn done(mut self) -> Result<()> {
        self.done = true;
        self.send_ready()
    }

    fn send_ready(&self) -> Result<()> {
        match &self.reload.inner.notifier {
            Some(n) => n.ready(),
            None => Ok(()),
        }
    }
}

impl Drop for Reloading<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Best effort: `done()` reports errors; a manager left waiting
            // would time the reload out.
            let _ = self.send_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_before_a_take_count_once() {
        let r = Reload::default();
        assert!(!r.is_pending());
        assert!(!r.take());
        r.set(nix::libc::SIGHUP);
        r.request();
        r.set(nix::libc::SIGHUP);
        assert_eq!(r.count(), 3);
        assert_eq!(r.signal(), Some(nix::libc::SIGHUP));
        assert!(r.take());
        assert!(!r.take());
        assert!(!r.wait_timeout(Duration::from_millis(1)));
        r.request();
        assert_eq!(r.signal(), None);
        assert!(r.wait_timeout(Duration::from_secs(5)));
        assert!(!r.is_pending());
    }

    #[test]
    fn wait_wakes_on_a_request_from_another_thread() {
        let r = Reload::default();
        let other = r.clone();
        let t = std::thread::spawn(move || other.request());
        r.wait();
        t.join().unwrap();
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn the_future_takes_one_request_and_a_dropped_one_takes_nothing() {
        use crate::waiters::testing::Counter;
        let count = Arc::new(Counter::default());
        let waker = Counter::waker(&count);
        let mut cx = Context::from_waker(&waker);
        let r = Reload::default();
        let (mut a, mut b) = (r.requested(), r.requested());
        assert!(Pin::new(&mut a).poll(&mut cx).is_pending());
        assert!(Pin::new(&mut b).poll(&mut cx).is_pending());
        r.request();
        assert_eq!(count.count(), 2, "both woken");
        assert!(Pin::new(&mut a).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut b).poll(&mut cx).is_pending(), "a took it");
        drop(b);
        r.request();
        assert_eq!(count.count(), 2, "the dropped one is not woken");
        assert!(r.is_pending(), "and took nothing");
        let mut c = r.requested();
        assert!(Pin::new(&mut c).poll(&mut cx).is_ready(), "ready at once");
        assert!(!r.is_pending());
    }

    #[test]
    fn begin_and_done_without_a_manager_send_nothing_and_succeed() {
        let r = Reload::default();
        r.begin().unwrap().done().unwrap();
        drop(r.begin().unwrap());
    }
}
