//! Owned cleanup: the files a guard created, removed at most once, by Drop,
//! `close()` or the signal thread, whichever comes first.
//!
//! Each entry is the file's absolute path, made so at acquire, so a later
//! `chdir(2)` (daemonizing does `chdir("/")`) cannot send the removal to
//! another file, and the device and inode it had when it was created. A file
//! is removed only in the process that owns it (the acquiring process, or
//! the forked child it was handed to), and only while the path still names
//! that inode: a forked child, or an operator who replaced the files, never
//! loses anything.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::notify::Notifier;
use crate::paths::remove_if_same;
use crate::sync::lock;

/// One file to remove at cleanup.
#[derive(Debug)]
struct Owned {
    /// Absolute, so the working directory at cleanup time does not matter.
    path: PathBuf,
    dev_ino: (u64, u64),
    /// The operation named in an error ("remove socket").
    op: &'static str,
}

/// Where cleanup stands; guarded by one mutex so the signal thread waits for
/// a Drop that is half-way through, instead of ending the process mid-way.
#[derive(Debug, Default)]
struct State {
    /// Someone ran the cleanup (or `keep()` disarmed it for good).
    done: bool,
    /// `STOPPING=1` went to the service manager.
    stopping_sent: bool,
    /// `disable_cleanup(true)`: leave the files, but can be turned back on.
    disabled: bool,
    /// The files, in the order they were added. Under the same lock as the
    /// flags, so a file re-created under the claim (`rebind`) is either
    /// listed before a cleanup starts or made after it finished.
    entries: Vec<Owned>,
}

impl State {
    /// Finds the entry for the file `old` (by device and inode) and lets
    /// `make` put a file at its path; lists the new device and inode when
    /// `make` made one. `Ok(None)` when no entry names `old`, else what
    /// `make` returned (`Some(None)`: nothing was made).
    fn replace_entry<T>(
        &mut self,
        old: (u64, u64),
        make: impl FnOnce(&Path) -> Result<Option<((u64, u64), T)>>,
    ) -> Result<Option<Option<T>>> {
        let Some(entry) = self.entries.iter_mut().find(|e| e.dev_ino == old) else {
            return Ok(None);
        };
        Ok(Some(make(&entry.path)?.map(|(id, made)| {
            entry.dev_ino = id;
            made
        })))
    }
}

/// The files a guard owns, removed in the reverse order they were added (the
/// socket before the PID file whose claim covers it).
#[derive(Debug)]
pub(crate) struct Cleanup {
    /// The acquiring process, or the forked child that took the claim over
    /// ([`take_over`](Self::take_over)); any other process removes nothing.
    owner: AtomicU32,
    /// The service manager waiting on `NOTIFY_SOCKET`, told `STOPPING=1`
    /// before anything is removed.
    notifier: Option<Notifier>,
    state: Mutex<State>,
}

impl Cleanup {
    /// An empty list owned by process `owner`.
    pub(crate) fn new(owner: u32) -> Self {
        Cleanup {
            owner: AtomicU32::new(owner),
            notifier: None,
            state: Mutex::new(State::default()),
        }
    }

    /// Adds a file that this process just created at `path` (absolute), with
    /// its device and inode.
    pub(crate) fn push(&mut self, path: PathBuf, dev_ino: (u64, u64), op: &'static str) {
        debug_assert!(path.is_absolute(), "{} must be absolute", path.display());
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        state.entries.push(Owned { path, dev_ino, op });
    }

    /// Under the cleanup's lock: finds the entry for the file `old` (its
    /// absolute path and device and inode), lets `remake` re-create it, and
    /// lists the new inode instead. `remake` gets the path and returns the
    /// new device and inode, or `None` when nothing was made. Refused once
    /// cleanup has run or was disarmed, or in a forked child.
    pub(crate) fn remake<T>(
        &self,
        old: (u64, u64),
        remake: impl FnOnce(&Path) -> Result<Option<((u64, u64), T)>>,
    ) -> Result<Option<T>> {
        let mut state = lock(&self.state);
        if state.done || std::process::id() != self.owner() {
            return Err(crate::LifecycleError::InvalidArgument {
                what: "guard",
                reason: "its cleanup already ran (or it was kept, or this is a forked child)"
                    .into(),
            });
        }
        Ok(state.replace_entry(old, remake)?.flatten())
    }

    /// The process that owns the files.
    pub(crate) fn owner(&self) -> u32 {
        self.owner.load(Ordering::Acquire)
    }

    /// In a forked child, under the cleanup's lock: finds the entry for the
    /// file `old` (the PID file the parent wrote), lets `swap` put the
    /// child's own file at its path (it returns the new device and inode),
    /// lists the new inode instead, and makes this process the owner of
    /// every entry. Refused once cleanup has run or was disarmed, in the
    /// owner itself, and when no entry names `old`.
    pub(crate) fn take_over<T>(
        &self,
        old: (u64, u64),
        swap: impl FnOnce(&Path) -> Result<((u64, u64), T)>,
    ) -> Result<T> {
        let me = std::process::id();
        let mut state = lock(&self.state);
        let refuse = |reason: &str| crate::LifecycleError::InvalidArgument {
            what: "take-over after fork",
            reason: reason.into(),
        };
        if me == self.owner() {
            return Err(refuse(
                "this process already owns the claim (call it in the forked child)",
            ));
        }
        if state.done {
            return Err(refuse("the guard's cleanup already ran, or it was kept"));
        }
        let made = state
            .replace_entry(old, |path| swap(path).map(Some))?
            .flatten()
            .ok_or_else(|| refuse("the guard lists no PID file of its own"))?;
        self.owner.store(me, Ordering::Release);
        Ok(made)
    }

    /// Reports `STOPPING=1` to `notifier` at cleanup from now on (set once
    /// acquiring succeeded: a start that fails reports `ERRNO=` instead).
    pub(crate) fn set_notifier(&mut self, notifier: Option<Notifier>) {
        self.notifier = notifier;
    }

    /// The service manager to report to, if one waits.
    pub(crate) fn notifier(&self) -> Option<&Notifier> {
        self.notifier.as_ref()
    }

    /// Tells the service manager `STOPPING=1` (once), then removes every
    /// entry still naming its inode, newest first; runs at most once, and
    /// only in the owner process (`is_owner` is the caller's `getpid(2)`
    /// answer, so one syscall serves cleanup and unregistering). Every entry
    /// is tried; the first error is returned.
    pub(crate) fn run(&self, is_owner: bool) -> Result<()> {
        if !is_owner {
            return Ok(());
        }
        let mut state = lock(&self.state);
        if state.done {
            return Ok(());
        }
        if let Some(n) = &self.notifier {
            if !std::mem::replace(&mut state.stopping_sent, true) {
                // Best effort: a manager that went away must not keep the
                // files on disk.
                let _ = n.stopping();
            }
        }
        if state.disabled {
            return Ok(());
        }
        state.done = true;
        let mut first_error = Ok(());
        for e in state.entries.iter().rev() {
            if let Err(err) = remove_if_same(&e.path, e.dev_ino, e.op) {
                if first_error.is_ok() {
                    first_error = Err(err);
                }
            }
        }
        first_error
    }

    /// Disarms the cleanup for good (`keep()`).
    pub(crate) fn disarm(&self) {
        lock(&self.state).done = true;
    }

    /// Turns the cleanup off or back on (`disable_cleanup`).
    pub(crate) fn set_disabled(&self, disabled: bool) {
        lock(&self.state).disabled = disabled;
    }
}

/// `path` made absolute against the current directory, without touching the
/// file system beyond `getcwd(2)` (and not even that for an absolute path),
/// as tempfile does for the paths it must delete later.
pub(crate) fn absolute(path: &Path, what: &'static str) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| crate::error::io_at(what, path, e))
}
