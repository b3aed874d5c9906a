//! [`Watch`]: a value under a mutex, and everyone waiting for it to change:
//! threads (a condvar) and futures (a list of wakers). The one primitive
//! behind [`Shutdown`](crate::Shutdown)'s `wait` and `requested().await`,
//! and any other handle that is "wait until the state says so" (a reload
//! request not yet taken, say).
//!
//! The rule that makes it correct: a future checks its condition and
//! registers its waker under the same lock that [`Watch::update`] holds
//! while it changes the value, so an update either happens before the check
//! (the future sees it) or after the registration (the update wakes it).
//! No wake-up is lost, whatever the executor.
//!
//! Every update wakes every waiter, and each re-checks its own condition:
//! waiters for different conditions on one value need no bookkeeping here,
//! and updates are rare (a signal, a request), so the extra polls cost
//! nothing that matters.

use std::fmt;
use std::sync::{Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// A value of type `T` that threads and futures wait on.
pub(crate) struct Watch<T> {
    inner: Mutex<Inner<T>>,
    /// Threads blocked in [`Watch::wait_until`].
    cv: Condvar,
}

struct Inner<T> {
    value: T,
    /// One entry per waiting future that has been polled once, indexed by
    /// its [`WaitSlot`]; `None` while its waker is taken by an update and
    /// not yet renewed by a poll.
    wakers: Vec<Option<Option<Waker>>>,
    /// Vacant indices in `wakers`, reused before the list grows: a daemon
    /// that creates and drops waiters in a loop keeps a list as long as the
    /// most waiters it ever had at once.
    vacant: Vec<usize>,
}

/// A waiting future's place in a [`Watch`]'s waker list: empty until its
/// first `Pending` poll. The future must hand it back with
/// [`Watch::cancel`] when dropped.
#[derive(Debug, Default)]
pub(crate) struct WaitSlot(Option<usize>);

impl<T: Default> Default for Watch<T> {
    fn default() -> Self {
        Watch::new(T::default())
    }
}

impl<T: fmt::Debug> fmt::Debug for Watch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("Watch")
            .field("value", &inner.value)
            .field(
                "waiting_futures",
                &(inner.wakers.len() - inner.vacant.len()),
            )
            .finish()
    }
}

impl<T> Watch<T> {
    /// A watch holding `value`, with no waiters.
    pub(crate) fn new(value: T) -> Self {
        Watch {
            inner: Mutex::new(Inner {
                value,
                wakers: Vec::new(),
                vacant: Vec::new(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Reads the value.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&lock(&self.inner).value)
    }

    /// Changes the value with `f`, then wakes every waiting thread and
    /// future so each re-checks its condition.
    ///
    /// The wakers are called after the lock is released, so a waker that
    /// polls its future on the spot (as a few minimal executors do) cannot
    /// deadlock on it; the caller's own locks are still held, which is why
    /// a waker must not run arbitrary code inline (none of the usual
    /// executors' do: they schedule the task).
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let (result, wake) = {
            let mut inner = lock(&self.inner);
            let result = f(&mut inner.value);
            let wake: Vec<Waker> = inner
                .wakers
                .iter_mut()
                .filter_map(|slot| slot.as_mut().and_then(Option::take))
                .collect();
            (result, wake)
        };
        self.cv.notify_all();
        wake.into_iter().for_each(Waker::wake);
        result
    }

    /// Blocks the calling thread until `cond` gives `Some`, or until
    /// `timeout` passes (`None`: no limit).
    ///
    /// `cond` runs under the lock with the value, and may change it (take a
    /// request, say); that is not an update and wakes nobody.
    pub(crate) fn wait_until<R>(
        &self,
        timeout: Option<Duration>,
        mut cond: impl FnMut(&mut T) -> Option<R>,
    ) -> Option<R> {
        let deadline = timeout.map(|t| Instant::now().checked_add(t));
        let mut inner = lock(&self.inner);
        loop {
            if let Some(r) = cond(&mut inner.value) {
                return Some(r);
            }
            inner = match deadline {
                None | Some(None) => self.cv.wait(inner).unwrap_or_else(|p| p.into_inner()),
                Some(Some(deadline)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.cv
                        .wait_timeout(inner, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// The body of a waiting future's `poll`: `Ready` with what `cond`
    /// gives once it gives `Some` (the slot is then handed back), else
    /// `Pending` with `cx`'s waker registered in `slot`, in the same
    /// critical section as the check.
    ///
    /// `cond` runs under the lock, as in [`Watch::wait_until`].
    pub(crate) fn poll_until<R>(
        &self,
        slot: &mut WaitSlot,
        cx: &mut Context<'_>,
        cond: impl FnOnce(&mut T) -> Option<R>,
    ) -> Poll<R> {
        let mut inner = lock(&self.inner);
        if let Some(r) = cond(&mut inner.value) {
            inner.release(slot);
            return Poll::Ready(r);
        }
        let index = match slot.0 {
            Some(index) => index,
            None => {
                let index = match inner.vacant.pop() {
                    Some(index) => index,
                    None => {
                        inner.wakers.push(None);
                        inner.wakers.len() - 1
                    }
                };
                slot.0 = Some(index);
                index
            }
        };
        let waker = &mut inner.wakers[index];
        match waker {
            // Polled again with the same task: keep the waker we have.
            Some(Some(w)) if w.will_wake(cx.waker()) => {}
            _ => *waker = Some(Some(cx.waker().clone())),
        }
        Poll::Pending
    }

    /// Hands back a waiting future's slot (from its `Drop`), so a dropped
    /// future leaves nothing behind: cancel safety.
    pub(crate) fn cancel(&self, slot: &mut WaitSlot) {
        if slot.0.is_some() {
            lock(&self.inner).release(slot);
        }
    }
}

impl<T> Inner<T> {
    fn release(&mut self, slot: &mut WaitSlot) {
        if let Some(index) = slot.0.take() {
            self.wakers[index] = None;
            self.vacant.push(index);
        }
    }
}

/// Test helpers shared by the futures built on [`Watch`].
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    pub(crate) struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Counter {
        /// Wake-ups so far.
        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }

        /// A waker counting into `this`.
        pub(crate) fn waker(this: &Arc<Counter>) -> Waker {
            Waker::from(Arc::clone(this))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Counter;
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;

    /// A future waiting for a `Watch<u32>` to reach `at_least`.
    struct AtLeast {
        watch: Arc<Watch<u32>>,
        at_least: u32,
        slot: WaitSlot,
    }

    impl Future for AtLeast {
        type Output = u32;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
            let this = &mut *self;
            let at_least = this.at_least;
            this.watch
                .poll_until(&mut this.slot, cx, |v| (*v >= at_least).then_some(*v))
        }
    }

    impl Drop for AtLeast {
        fn drop(&mut self) {
            self.watch.cancel(&mut self.slot);
        }
    }

    fn at_least(watch: &Arc<Watch<u32>>, at_least: u32) -> Pin<Box<AtLeast>> {
        Box::pin(AtLeast {
            watch: Arc::clone(watch),
            at_least,
            slot: WaitSlot::default(),
        })
    }

    fn poll(f: &mut Pin<Box<AtLeast>>, waker: &Arc<Counter>) -> Poll<u32> {
        let waker = Waker::from(Arc::clone(waker));
        f.as_mut().poll(&mut Context::from_waker(&waker))
    }

    fn registered(watch: &Watch<u32>) -> usize {
        let inner = lock(&watch.inner);
        inner.wakers.len() - inner.vacant.len()
    }

    #[test]
    fn ready_at_once_when_the_condition_already_holds() {
        let watch = Arc::new(Watch::new(5));
        let counter = Arc::new(Counter::default());
        let mut f = at_least(&watch, 3);
        assert_eq!(poll(&mut f, &counter), Poll::Ready(5));
        assert_eq!(registered(&watch), 0, "a ready future holds no slot");
    }

    #[test]
    fn an_update_wakes_every_waiter_and_each_rechecks_its_own_condition() {
        let watch = Arc::new(Watch::new(0));
        let (a, b) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let (mut one, mut two) = (at_least(&watch, 1), at_least(&watch, 2));
        assert!(poll(&mut one, &a).is_pending());
        assert!(poll(&mut two, &b).is_pending());
        assert_eq!(registered(&watch), 2);

        watch.update(|v| *v = 1);
        assert_eq!((a.count(), b.count()), (1, 1), "both woken");
        assert_eq!(poll(&mut one, &a), Poll::Ready(1));
        assert!(poll(&mut two, &b).is_pending(), "not its condition yet");
        assert_eq!(registered(&watch), 1);

        watch.update(|v| *v = 2);
        assert_eq!((a.count(), b.count()), (1, 2), "only the waiter left");
        assert_eq!(poll(&mut two, &b), Poll::Ready(2));
        assert_eq!(registered(&watch), 0);
    }

    #[test]
    fn a_waker_is_called_once_per_update_and_only_after_a_poll_renewed_it() {
        let watch = Arc::new(Watch::new(0));
        let counter = Arc::new(Counter::default());
        let mut f = at_least(&watch, 10);
        assert!(poll(&mut f, &counter).is_pending());
        watch.update(|v| *v = 1);
        watch.update(|v| *v = 2); // not polled in between: the waker was taken
        assert_eq!(counter.count(), 1);
        assert!(poll(&mut f, &counter).is_pending());
        assert!(poll(&mut f, &counter).is_pending()); // same task: kept, not doubled
        watch.update(|v| *v = 3);
        assert_eq!(counter.count(), 2);
    }

    #[test]
    fn a_repoll_with_another_task_wakes_the_new_one_not_the_old() {
        let watch = Arc::new(Watch::new(0));
        let (old, new) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let mut f = at_least(&watch, 1);
        assert!(poll(&mut f, &old).is_pending());
        assert!(poll(&mut f, &new).is_pending()); // moved to another task
        watch.update(|v| *v = 1);
        assert_eq!((old.count(), new.count()), (0, 1));
    }

    #[test]
    fn a_dropped_future_leaves_no_waker_and_its_slot_is_reused() {
        let watch = Arc::new(Watch::new(0));
        let counter = Arc::new(Counter::default());
        let mut kept = at_least(&watch, 1);
        assert!(poll(&mut kept, &counter).is_pending());
        for _ in 0..1000 {
            let mut f = at_least(&watch, 1);
            assert!(poll(&mut f, &counter).is_pending());
            drop(f);
        }
        assert_eq!(registered(&watch), 1, "only the live future is listed");
        assert!(lock(&watch.inner).wakers.len() <= 2, "slots are reused");
        watch.update(|v| *v = 1);
        assert_eq!(counter.count(), 1, "a dropped future is never woken");
        // Dropping one that was never polled, or one that completed, is fine.
        drop(at_least(&watch, 1));
        assert_eq!(poll(&mut kept, &counter), Poll::Ready(1));
        drop(kept);
        assert_eq!(registered(&watch), 0);
    }

    #[test]
    fn blocking_waiters_wake_on_update_and_time_out_without_one() {
        let watch = Arc::new(Watch::new(0u32));
        assert_eq!(
            watch.wait_until(Some(Duration::from_millis(20)), |v| (*v > 0).then_some(*v)),
            None
        );
        let updater = {
            let watch = Arc::clone(&watch);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                watch.update(|v| *v = 7);
            })
        };
        assert_eq!(watch.wait_until(None, |v| (*v > 0).then_some(*v)), Some(7));
        updater.join().unwrap();
        // A condition that takes what it waited for: the next wait finds it gone.
        assert_eq!(
            watch.wait_until(None, |v| (*v > 0).then(|| std::mem::take(v))),
            Some(7)
        );
        assert_eq!(watch.read(|v| *v), 0);
        // A timeout too large for `Instant` means no limit, not a panic.
        watch.update(|v| *v = 1);
        assert_eq!(
            watch.wait_until(Some(Duration::MAX), |v| (*v > 0).then_some(())),
            Some(())
        );
    }

    /// Futures on several threads wait while another thread updates, in
    /// every interleaving the scheduler picks over many rounds: each future
    /// is woken. A lost wake-up leaves a thread parked with its future
    /// ready; the watchdog in `block_on` turns that into a failure instead
    /// of a hang.
    #[test]
    fn no_wake_up_is_lost_between_a_check_and_an_update() {
        /// Polls `f` to completion on this thread, parking between polls.
        /// Panics when no wake-up comes for far longer than any update here
        /// takes (a watchdog, not a timing assertion).
        fn block_on<F: Future>(f: F) -> F::Output {
            const WATCHDOG: Duration = Duration::from_secs(10);
            struct Unpark(std::thread::Thread);
            impl std::task::Wake for Unpark {
                fn wake(self: Arc<Self>) {
                    self.0.unpark();
                }
            }
            let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
            let mut cx = Context::from_waker(&waker);
            let mut f = std::pin::pin!(f);
            loop {
                if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    return v;
                }
                let parked = Instant::now();
                std::thread::park_timeout(WATCHDOG);
                assert!(
                    parked.elapsed() < WATCHDOG,
                    "no wake-up within {WATCHDOG:?}: lost"
                );
            }
        }
        for round in 0..200 {
            let watch = Arc::new(Watch::new(0));
            let waiters: Vec<_> = (0..4)
                .map(|_| {
                    let f = at_least(&watch, 1);
                    std::thread::spawn(move || block_on(f))
                })
                .collect();
            if round % 2 == 0 {
                std::thread::yield_now();
            }
            watch.update(|v| *v = 1);
            for w in waiters {
                assert_eq!(w.join().unwrap(), 1);
            }
            assert_eq!(registered(&watch), 0);
        }
    }
}
