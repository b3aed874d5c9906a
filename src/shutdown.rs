//! [`Shutdown`]: a daemon's shutdown request, set by a signal in
//! [`SignalMode::Graceful`](crate::SignalMode::Graceful) or by
//! [`Shutdown::request`], and waited for by the daemon's main loop: a
//! blocking [`Shutdown::wait`], or the [`ShutdownRequested`] future.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::waiters::{WaitSlot, Watch};

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
    /// `Some(signal number)`. Threads and futures wait on it.
    state: Watch<Option<i32>>,
}

impl Shutdown {
    /// Asks for a shutdown, waking every [`wait`](Self::wait)er and every
    /// [`requested`](Self::requested) future. Idempotent; the first reason
    /// is kept.
    pub fn request(&self) {
        self.set(0);
    }

    /// Records a request with reason `why` (0, or a signal number), and
    /// wakes every waiting thread and future.
    pub(crate) fn set(&self, why: i32) {
        self.inner.state.update(|state| {
            if state.is_none() {
                *state = Some(why);
            }
        });
    }

    /// Whether a shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        self.inner.state.read(Option::is_some)
    }

    /// Blocks until a shutdown is requested. In async code, await
    /// [`requested`](Self::requested) instead.
    pub fn wait(&self) {
        self.inner.state.wait_until(None, |s| s.map(drop));
    }

    /// Blocks until a shutdown is requested or `timeout` passes; returns
    /// whether it was requested.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.inner
            .state
            .wait_until(Some(timeout), |s| s.map(drop))
            .is_some()
    }

    /// A future that resolves once a shutdown is requested: by a signal in
    /// [`SignalMode::Graceful`](crate::SignalMode::Graceful), or by
    /// [`request`](Self::request). At once if it already was, also before
    /// the first poll.
    ///
    /// It needs no runtime and no thread of its own: the crate's signal
    /// thread (or the caller of `request`) wakes it through its
    /// [`Waker`](std::task::Waker), so it works under tokio, async-std,
    /// smol or a hand-written executor alike. It owns a clone of this
    /// handle, so it is `'static`, `Send` and `Unpin`: move it into
    /// `tokio::spawn`, hand it to a server's graceful-shutdown hook
    /// (axum's `with_graceful_shutdown`, hyper-util's), or put it in a
    /// `select!`.
    ///
    /// Any number of futures may wait at once; each is woken. It is
    /// cancel-safe: dropping it (a `select!` that took another branch)
    /// removes its waker and loses no request, since the request is state,
    /// not an event: the next future sees it too.
    ///
    /// ```
    /// use std::future::Future;
    /// use std::pin::pin;
    /// use std::task::{Context, Poll, Waker};
    /// use historia_lifecycle::Shutdown;
    ///
    /// let shutdown = Shutdown::default(); // a guard's: guard.shutdown()
    /// let mut requested = pin!(shutdown.requested());
    /// let mut cx = Context::from_waker(Waker::noop());
    /// assert!(requested.as_mut().poll(&mut cx).is_pending());
    /// shutdown.request(); // or SIGTERM, in SignalMode::Graceful
    /// assert!(requested.as_mut().poll(&mut cx).is_ready());
    /// ```
    ///
    /// In a tokio daemon (see the crate docs' *tokio / async* section):
    ///
    /// ```text
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(guard.shutdown().requested())
    ///     .await?;
    /// ```
    pub fn requested(&self) -> ShutdownRequested {
        ShutdownRequested {
            shutdown: self.clone(),
            slot: WaitSlot::default(),
        }
    }

    /// The signal that requested the shutdown (`libc::SIGTERM`, …), or `None`
    /// when none has, or when it came from [`request`](Self::request).
    pub fn signal(&self) -> Option<i32> {
        self.inner.state.read(|s| s.filter(|&s| s != 0))
    }

    /// The conventional exit status for this shutdown: `128 + signal` after a
    /// signal (143 for SIGTERM, 130 for SIGINT), 0 otherwise.
    pub fn exit_code(&self) -> i32 {
        self.signal().map_or(0, |s| 128 + s)
    }
}

/// The future [`Shutdown::requested`] returns: resolves once a shutdown is
/// requested.
///
/// `'static + Send + Sync + Unpin`, cancel-safe, and driven by any executor;
/// see [`Shutdown::requested`]. Polling it again after it resolved resolves
/// again at once.
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited or polled"]
pub struct ShutdownRequested {
    shutdown: Shutdown,
    /// Its place in the waker list, once polled.
    slot: WaitSlot,
}

impl Future for ShutdownRequested {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        this.shutdown
            .inner
            .state
            .poll_until(&mut this.slot, cx, |s| s.map(drop))
    }
}

impl Drop for ShutdownRequested {
    fn drop(&mut self) {
        // Cancel safety: a future dropped before it resolved leaves no waker.
        self.shutdown.inner.state.cancel(&mut self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::waiters::testing::Counter;
    use std::task::Waker;

    fn poll(f: &mut ShutdownRequested, counter: &Arc<Counter>) -> Poll<()> {
        let waker = Waker::from(Arc::clone(counter));
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    fn assert_owned_future<F: Future<Output = ()> + Send + Sync + Unpin + 'static>(_: &F) {}

    #[test]
    fn the_future_is_owned_send_and_unpin() {
        let f = Shutdown::default().requested();
        assert_owned_future(&f);
    }

    #[test]
    fn resolves_at_once_when_requested_before_the_first_poll() {
        let shutdown = Shutdown::default();
        let mut early = shutdown.requested();
        shutdown.request();
        let mut late = shutdown.requested();
        let counter = Arc::new(Counter::default());
        assert_eq!(poll(&mut early, &counter), Poll::Ready(()));
        assert_eq!(poll(&mut late, &counter), Poll::Ready(()));
        assert_eq!(
            poll(&mut late, &counter),
            Poll::Ready(()),
            "again after ready"
        );
        assert_eq!(counter.count(), 0);
    }

    #[test]
    fn a_request_or_a_signal_wakes_every_waiter_once() {
        for why in [0, nix::libc::SIGTERM] {
            let shutdown = Shutdown::default();
            let counters: Vec<_> = (0..3).map(|_| Arc::new(Counter::default())).collect();
            let mut futures: Vec<_> = (0..3).map(|_| shutdown.requested()).collect();
            for (f, c) in futures.iter_mut().zip(&counters) {
                assert_eq!(poll(f, c), Poll::Pending);
            }
            // From another handle, as the signal thread does.
            shutdown.clone().set(why);
            shutdown.set(why); // a second request wakes nobody twice
            for (f, c) in futures.iter_mut().zip(&counters) {
                assert_eq!(c.count(), 1);
                assert_eq!(poll(f, c), Poll::Ready(()));
            }
            assert_eq!(shutdown.exit_code(), if why == 0 { 0 } else { 143 });
        }
    }

    #[test]
    fn a_dropped_future_is_not_woken_and_loses_no_request() {
        let shutdown = Shutdown::default();
        let counter = Arc::new(Counter::default());
        let mut dropped = shutdown.requested();
        assert_eq!(poll(&mut dropped, &counter), Poll::Pending);
        drop(dropped);
        shutdown.request();
        assert_eq!(counter.count(), 0);
        assert_eq!(poll(&mut shutdown.requested(), &counter), Poll::Ready(()));
    }

    #[test]
    fn a_thread_blocked_in_wait_and_a_future_both_wake() {
        let shutdown = Shutdown::default();
        let waiter = {
            let s = shutdown.clone();
            std::thread::spawn(move || s.wait())
        };
        let counter = Arc::new(Counter::default());
        let mut f = shutdown.requested();
        assert_eq!(poll(&mut f, &counter), Poll::Pending);
        assert!(!shutdown.wait_timeout(Duration::from_millis(1)));
        shutdown.request();
        waiter.join().unwrap();
        assert!(shutdown.wait_timeout(Duration::ZERO));
        assert_eq!(poll(&mut f, &counter), Poll::Ready(()));
    }
}
