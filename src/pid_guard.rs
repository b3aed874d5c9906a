//! `PidFileGuard`: the claim on a PID file, with owned cleanup and signal
//! handling, and no socket. `DaemonGuard` is this plus a listener.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cleanup::{absolute, Cleanup};
use crate::error::{FileKind, LifecycleError, Result};
use crate::notify::{Message, Notifier};
use crate::pidfile::{claim, Claim, PID_FILE_MODE};
use crate::readiness::ReadyPipe;
use crate::rebind::SocketSlot;
use crate::reload::Reload;
use crate::shutdown::Shutdown;
use crate::signal_thread::{register, Handles, Registration};
use crate::signals::{SignalAction, SignalMode, SignalTable};

/// Proof that this process is the one running instance, for a daemon that
/// needs no Unix socket: it holds the claim on the PID file and the duty to
/// remove it.
///
/// Use it for TCP or HTTP servers, workers that serve nothing, or units with
/// systemd's `PIDFile=`: the same guarantees as [`DaemonGuard`] (exactly one
/// winner among racers, a PID file that always names the live holder,
/// recovery after SIGKILL, cleanup on Drop, SIGTERM and SIGINT), without
/// binding anything. It is what the `pidlock`, `pidfile-rs` and
/// `single-instance` crates offer, plus the lock that makes it safe.
///
/// # Lifecycle
/// 1. **Acquire.** [`PidFileGuard::acquire`] takes an exclusive `flock(2)` on
///    the PID file, written atomically with this PID (as FreeBSD
///    pidfile(3), but never torn), replacing a stale one left by a dead
///    holder. A second instance gets [`LifecycleError::AlreadyRunning`] and
///    changes nothing; [`running_pid`](crate::running_pid) names the holder.
/// 2. **Serve.** The flock stays held for the guard's whole life.
/// 3. **End.** Drop (or [`close`](Self::close), which reports errors)
///    removes the PID file, then releases the lock. SIGTERM/SIGINT do the
///    same from a helper thread ([`SignalMode`]).
///
/// ```
/// use historia_lifecycle::{running_pid, LifecycleError, PidFileGuard};
/// let dir = tempfile::tempdir()?;
/// let pid = dir.path().join("run/server.pid");
///
/// let guard = PidFileGuard::acquire(&pid)?;
/// assert!(matches!(PidFileGuard::acquire(&pid), Err(LifecycleError::AlreadyRunning)));
/// assert_eq!(running_pid(&pid)?, Some(std::process::id()));
/// // ... bind a TCP listener and serve ...
/// guard.close()?;
/// assert!(!pid.exists());
/// # Ok::<(), LifecycleError>(())
/// ```
///
/// # Ownership rules
/// Cleanup removes the PID file only in the process that acquired the guard
/// (a `fork(2)`ed child that drops its copy removes nothing) and only while
/// the path still names the inode the guard created (a newer instance's
/// file is left alone). The path is made absolute at acquire, so a later
/// `chdir(2)` does not change which file cleanup looks at.
///
/// # What cleanup cannot cover
/// SIGKILL, `std::process::abort`, `std::process::exit`, `panic = "abort"`
/// and power loss run no code, so the PID file stays. The kernel drops the
/// flock with the process, so the next acquire replaces the file by itself.
///
/// [`DaemonGuard`]: crate::DaemonGuard
/// [`LifecycleError::AlreadyRunning`]: crate::LifecycleError::AlreadyRunning
#[must_use = "the claim is released, and the PID file removed, when the guard is dropped"]
#[derive(Debug)]
pub struct PidFileGuard {
    cleanup: Arc<Cleanup>,
    pid_path: PathBuf,
    /// The flocked PID file: the claim itself. `None` once released.
    lock: Option<File>,
    registration: Option<Registration>,
    shutdown: Shutdown,
    reload: Reload,
    reclaimed_pid_file: bool,
    /// The pipe an [`ensure_running`](crate::ensure_running) spawner waits
    /// on; written once by [`ready`](Self::ready).
    ready_pipe: std::sync::Mutex<Option<ReadyPipe>>,
    replaced_pid: Option<u32>,
}

/// Options for [`PidFileGuard`]; made by [`PidFileGuard::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .acquire() to take the claim"]
pub struct PidFileGuardBuilder {
    pid_path: PathBuf,
    pid_mode: u32,
    signals: SignalTable,
}

impl PidFileGuard {
    /// Claims the single-instance right for `pid_path`, with
    /// [`SignalMode::Exit`]. See [`PidFileGuard::builder`] for options.
    ///
    /// # Errors
    /// - [`LifecycleError::AlreadyRunning`] when another live process holds
    ///   the claim. Its PID is [`running_pid`](crate::running_pid)`(pid_path)`.
    /// - [`LifecycleError::UnexpectedFileType`] when something other than a
    ///   regular file is at `pid_path` (or a non-directory is in the way of
    ///   its directory); it is left untouched.
    /// - [`LifecycleError::Io`] when the directory cannot be created, the PID
    ///   file cannot be written, or the path is relative and the current
    ///   directory cannot be read.
    /// - [`LifecycleError::Signals`] when the signal handling cannot be
    ///   installed.
    ///
    /// On every error, nothing this call created is left behind.
    ///
    /// [`LifecycleError::AlreadyRunning`]: crate::LifecycleError::AlreadyRunning
    /// [`LifecycleError::UnexpectedFileType`]: crate::LifecycleError::UnexpectedFileType
    /// [`LifecycleError::Io`]: crate::LifecycleError::Io
    /// [`LifecycleError::Signals`]: crate::LifecycleError::Signals
    pub fn acquire(pid_path: impl AsRef<Path>) -> Result<Self> {
        Self::builder(pid_path).acquire()
    }

    /// Starts a [`PidFileGuardBuilder`] for `pid_path`.
    pub fn builder(pid_path: impl AsRef<Path>) -> PidFileGuardBuilder {
        PidFileGuardBuilder {
            pid_path: pid_path.as_ref().to_path_buf(),
            pid_mode: PID_FILE_MODE,
            signals: SignalTable::default(),
        }
    }

    /// The PID written to the PID file: this process's.
    pub fn pid(&self) -> u32 {
        self.cleanup.owner()
    }

    /// The PID file path, as given to the builder.
    pub fn pid_path(&self) -> &Path {
        &self.pid_path
    }

    /// Whether acquiring replaced a stale PID file: one nobody held the lock
    /// on, left by a dead instance or by another tool (`flock(1)` leaves an
    /// empty one). [`replaced_pid`](Self::replaced_pid) tells which.
    pub fn reclaimed_stale_pid_file(&self) -> bool {
        self.reclaimed_pid_file
    }

    /// The PID named in the stale PID file that acquiring replaced, if it
    /// named one; that process no longer held the lock. `None` when nothing
    /// was replaced, or the file held no PID (empty, as `flock(1)` creates a
    /// missing file, or garbage), so no dead instance can be blamed.
    pub fn replaced_pid(&self) -> Option<u32> {
        self.replaced_pid
    }

    /// The guard's shutdown handle. In [`SignalMode::Graceful`] SIGTERM and
    /// SIGINT set it; in every mode [`Shutdown::request`] does.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// The guard's reload handle: set by a signal whose action is
    /// [`SignalAction::Reload`] (see [`PidFileGuardBuilder::on_signal`]), and
    /// by [`Reload::request`]; acknowledged to a service manager with
    /// [`Reload::begin`].
    pub fn reload(&self) -> &Reload {
        &self.reload
    }

    /// Tells whoever waits for this daemon to start that it is ready to
    /// serve, with one call for every waiting party, each read from the
    /// environment once at acquire:
    /// - `READY=1` to a service manager on `NOTIFY_SOCKET` (systemd's
    ///   `Type=notify`, `start-stop-daemon --notify-await`);
    /// - `ready` down the readiness pipe of the client that spawned it
    ///   ([`ensure_running`](crate::ensure_running)).
    ///
    /// Call it once the daemon serves; a no-op where nobody waits. A daemon
    /// that never calls it still works: clients fall back to connecting.
    ///
    /// # Errors
    /// [`LifecycleError::Io`] when the notification cannot be sent (the
    /// manager's socket is gone). The daemon may go on serving.
    pub fn ready(&self) -> Result<()> {
        if let Some(pipe) = crate::sync::lock(&self.ready_pipe).take() {
            pipe.ready();
        }
        match self.cleanup.notifier() {
            Some(n) => n.ready(),
            None => Ok(()),
        }
    }

    /// The service manager waiting on `NOTIFY_SOCKET`, if any, for the
    /// other sd_notify messages (`STATUS=`, `WATCHDOG=1`, …). The guard
    /// itself sends `READY=1` ([`ready`](Self::ready)), `STOPPING=1` (first
    /// thing at cleanup) and `ERRNO=` (a failed acquire).
    pub fn notifier(&self) -> Option<&Notifier> {
        self.cleanup.notifier()
    }

    /// Removes the PID file, then releases the claim, reporting what went
    /// wrong. Drop does the same but has to stay silent.
    ///
    /// Never cleans up twice: after a signal already did, in a forked child,
    /// or with cleanup disabled, it removes nothing and returns `Ok(())`.
    ///
    /// # Errors
    /// [`LifecycleError::Io`](crate::LifecycleError::Io) when the PID file is
    /// still ours but cannot be removed. The claim is released anyway.
    pub fn close(mut self) -> Result<()> {
        self.release(|| ())
    }

    /// Turns cleanup off (`true`) or back on (`false`) without giving up the
    /// guard, as tempfile's `disable_cleanup`: while it is off, Drop,
    /// [`close`](Self::close) and the signal handling leave the PID file in
    /// place. The claim itself still ends when the guard is dropped; the file
    /// left behind is then a stale PID file that the next acquire replaces.
    /// To keep the claim too, use [`keep`](Self::keep).
    pub fn disable_cleanup(&mut self, disable: bool) {
        self.cleanup.set_disabled(disable);
    }

    /// Escape hatch: disarms cleanup and signal handling and hands back the
    /// flocked PID file, for example to pass it to a re-`exec`ed new version
    /// of the daemon. The file stays on disk, and the claim lasts as long as
    /// the returned [`File`] (and its duplicates) stay open. The descriptor
    /// is close-on-exec; clear `FD_CLOEXEC` to pass it on.
    pub fn keep(mut self) -> File {
        self.keep_in_place()
    }

    /// The cleanup list, for a front door that re-creates one of its files.
    pub(crate) fn cleanup(&self) -> &Cleanup {
        &self.cleanup
    }

    /// [`keep`](Self::keep) for a guard that is a field of another: leaves
    /// it released, so its Drop does nothing.
    pub(crate) fn keep_in_place(&mut self) -> File {
        self.cleanup.disarm();
        self.registration = None;
        self.lock.take().expect("a live guard holds its lock")
    }

    /// Removes the files, runs `before_unlock` (the socket guard closes its
    /// listener there), then leaves the signal registry and releases the
    /// claim. Runs once; later calls do nothing.
    pub(crate) fn release(&mut self, before_unlock: impl FnOnce()) -> Result<()> {
        if self.lock.is_none() {
            return Ok(()); // released already (or kept)
        }
        // One getpid(2) answers both "may we remove?" and "may we edit the
        // registry?": a forked child's copy may do neither.
        let is_owner = std::process::id() == self.cleanup.owner();
        // Remove before leaving the signal registry: a signal arriving now
        // makes the helper thread wait for us to finish, instead of ending
        // the process half-way through.
        let removed = self.cleanup.run(is_owner);
        if let Some(r) = self.registration.take() {
            r.unregister(is_owner);
        }
        before_unlock();
        self.lock = None; // releases the claim, after the files are gone
        removed
    }
}

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        // Best effort: errors are reported by `close()`, never by a panic.
        let _ = self.release(|| ());
    }
}

impl PidFileGuardBuilder {
    /// What SIGTERM and SIGINT do; default [`SignalMode::Exit`]. Replaces
    /// what an earlier [`on_signal`](Self::on_signal) set for those two.
    pub fn signals(mut self, mode: SignalMode) -> Self {
        self.signals.set_mode(mode);
        self
    }

    /// What `signal` does to this guard: one of SIGTERM, SIGINT, SIGHUP,
    /// SIGQUIT, SIGUSR1, SIGUSR2 (`nix::libc::SIGHUP`, …). By default SIGTERM
    /// and SIGINT [`Terminate`](SignalAction::Terminate) and the others are
    /// left alone; see [`SignalAction`] for what each does and how guards
    /// asking for different actions combine.
    ///
    /// Unlike the [`signals`](Self::signals) shorthand, a signal set here is
    /// handled even if the process inherited it as ignored (`SIG_IGN`).
    ///
    /// ```
    /// use historia_lifecycle::{PidFileGuard, SignalAction, SignalMode};
    /// use nix::libc::{SIGHUP, SIGQUIT};
    /// let dir = tempfile::tempdir()?;
    /// let guard = PidFileGuard::builder(dir.path().join("d.pid"))
    ///     .signals(SignalMode::Graceful) // SIGTERM, SIGINT: a shutdown request
    ///     .on_signal(SIGHUP, SignalAction::Reload)
    ///     .on_signal(SIGQUIT, SignalAction::Terminate) // files removed, then core
    ///     .acquire()?;
    /// # drop(guard);
    /// # Ok::<(), historia_lifecycle::LifecycleError>(())
    /// ```
    ///
    /// A signal a guard cannot act on (SIGKILL, SIGSEGV, SIGPIPE, …) is
    /// refused by `acquire` with
    /// [`LifecycleError::InvalidArgument`](crate::LifecycleError::InvalidArgument),
    /// before anything on disk changes.
    pub fn on_signal(mut self, signal: i32, action: SignalAction) -> Self {
        self.signals.set(signal, action);
        self
    }

    /// Mode of the PID file the guard creates (permission bits only); default
    /// [`PID_FILE_MODE`] (0644), set exactly whatever the umask, before the
    /// file has its name.
    ///
    /// # A local user can block a restart
    /// A flock needs only an open descriptor, and a 0644 file can be opened
    /// by anyone who can reach its directory. Another user may open the PID
    /// file while the daemon runs and wait in `flock -s` on it: when the
    /// daemon is SIGKILLed (no cleanup, the file stays) that user gets the
    /// shared lock, and every restart is refused with
    /// [`LifecycleError::AlreadyRunning`] for as long as they hold it. (A
    /// clean stop unlinks the file first, so a lock on it blocks nothing.)
    /// The remedy is a directory nobody else can enter, as
    /// [`runtime_dir`](crate::runtime_dir) makes (0700); where the
    /// directory must be shared (`/run` for a system daemon), use
    /// `.pid_file_mode(0o600)`: others cannot open the file (`EACCES`), so
    /// they cannot lock it. Tools that read the PID (`start-stop-daemon`,
    /// systemd's `PIDFile=`) then need to run as the owner or root.
    ///
    /// The mode applies to the file this guard creates; a stale file left by
    /// an older setting is replaced by it.
    ///
    /// [`LifecycleError::AlreadyRunning`]: crate::LifecycleError::AlreadyRunning
    pub fn pid_file_mode(mut self, mode: u32) -> Self {
        self.pid_mode = mode & 0o777;
        self
    }

    /// Takes the claim and installs the signal handling.
    ///
    /// # Errors
    /// As [`PidFileGuard::acquire`].
    #[must_use = "the claim is released as soon as the guard is dropped"]
    pub fn acquire(self) -> Result<PidFileGuard> {
        if self.signals.rebinds() {
            return Err(crate::signals::rebind_needs_a_socket());
        }
        reporting_failure(|notifier| {
            claim_only(&self.pid_path, self.pid_mode, self.signals, notifier, None)
        })
    }
}

/// [`acquire_with`] with nothing else under the claim: the PID-file-only
/// guard, and a socket guard whose socket was passed down.
pub(crate) fn claim_only(
    pid_path: &Path,
    pid_mode: u32,
    signals: SignalTable,
    notifier: Option<Notifier>,
    socket: Option<Arc<SocketSlot>>,
) -> Result<PidFileGuard> {
    acquire_with(
        pid_path,
        pid_mode,
        signals,
        notifier,
        |_| Ok(false),
        |_, _| Ok(()),
        |()| socket,
    )
    .map(|(g, ())| g)
}

/// The one acquisition path for every guard: takes the claim on `pid_path`,
/// runs `under_stale` under each dead holder's lock (see
/// [`claim`]), then `then` under our own claim, which may add files to the
/// cleanup (the socket it binds) and returns what the front door needs (its
/// listener); `socket` names, from that, the socket a
/// [`SignalAction::Rebind`] re-creates. If `then` or the signal set-up fails, or anything panics,
/// every file listed so far is removed again before the error returns.
pub(crate) fn acquire_with<T>(
    pid_path: &Path,
    pid_mode: u32,
    signals: SignalTable,
    notifier: Option<Notifier>,
    under_stale: impl FnMut((u64, u64)) -> Result<bool>,
    then: impl FnOnce(&mut Cleanup, &Claim) -> Result<T>,
    socket: impl FnOnce(&T) -> Option<Arc<SocketSlot>>,
) -> Result<(PidFileGuard, T)> {
    // Before anything on disk changes.
    signals.validate()?;
    let pid = std::process::id();
    let abs_pid = absolute(pid_path, "resolve PID file path")?;
    let claim = claim(pid_path, pid, pid_mode, under_stale)?;
    let mut cleanup = Cleanup::new(pid);
    cleanup.push(abs_pid, claim.dev_ino, "remove PID file");
    // Until the guard exists, undo what we placed if a later step fails or
    // panics.
    let mut rollback = scopeguard::guard(cleanup, |c| {
        let _ = c.run(true);
    });
    let extra = then(&mut rollback, &claim)?;
    let mut cleanup = scopeguard::ScopeGuard::into_inner(rollback);
    let reload = Reload::new(notifier.clone());
    cleanup.set_notifier(notifier);
    let cleanup = Arc::new(cleanup);
    let shutdown = Shutdown::default();
    let handles = Handles {
        cleanup: Arc::clone(&cleanup),
        shutdown: shutdown.clone(),
        reload: reload.clone(),
        socket: socket(&extra),
    };
    let registration = match register(signals, handles) {
        Ok(r) => r,
        Err(e) => {
            drop(extra);
            // Not a stop: the caller reports the failed start instead.
            let mut cleanup = Arc::into_inner(cleanup).expect("not shared on failure");
            cleanup.set_notifier(None);
            let _ = cleanup.run(true);
            return Err(e);
        }
    };
    let guard = PidFileGuard {
        cleanup,
        pid_path: pid_path.to_path_buf(),
        lock: Some(claim.file),
        registration,
        shutdown,
        reload,
        reclaimed_pid_file: claim.reclaimed,
        ready_pipe: std::sync::Mutex::new(None),
        replaced_pid: claim.stale_pid,
    };
    Ok((guard, extra))
}

/// Reads `NOTIFY_SOCKET` and the readiness pipe once, runs the acquisition
/// with the manager's notifier, and then either hands the pipe to the new
/// guard (for [`PidFileGuard::ready`]) or, if acquiring failed, tells every
/// waiter why: `ERRNO=` and `STATUS=` to a manager, `failed: <kind>
/// <message>` down the pipe. So `systemctl status`, `start-stop-daemon
/// --notify-await` or the spawning client show the reason, not a timeout.
pub(crate) fn reporting_failure<T: AsRef<PidFileGuard>>(
    acquire: impl FnOnce(Option<Notifier>) -> Result<T>,
) -> Result<T> {
    let notifier = Notifier::from_env()?;
    let pipe = ReadyPipe::from_env();
    let report_to = notifier.clone();
    match acquire(notifier) {
        Ok(guard) => {
            *crate::sync::lock(&guard.as_ref().ready_pipe) = pipe;
            Ok(guard)
        }
        Err(e) => {
            if let Some(n) = report_to {
                let status = format!("cannot start: {}", crate::error::one_line(&e));
                // Best effort: the error itself goes back to the caller.
                let _ = n.send(&[Message::Status(&status), Message::Errno(errno_of(&e))]);
            }
            if let Some(pipe) = pipe {
                pipe.failed(&e);
            }
            Err(e)
        }
    }
}

impl AsRef<PidFileGuard> for PidFileGuard {
    fn as_ref(&self) -> &PidFileGuard {
        self
    }
}

/// The `errno` a failed start reports to a service manager: the OS error
/// where there is one, `EEXIST` for an instance that already runs (as
/// FreeBSD pidfile(3)'s `pidfile_open`), `EISDIR`/`ENOTSOCK`/`ENOTDIR` for
/// the wrong kind of file in the way, `ENAMETOOLONG` for a socket path that
/// does not fit `sun_path`, `EINVAL` for the rest.
fn errno_of(e: &LifecycleError) -> i32 {
    use nix::libc;
    match e {
        LifecycleError::AlreadyRunning => libc::EEXIST,
        LifecycleError::Io(io) | LifecycleError::Signals(io) => {
            crate::error::os_errno(io).unwrap_or(libc::EIO)
        }
        LifecycleError::PathTooLong { .. } => libc::ENAMETOOLONG,
        LifecycleError::SocketInUse { .. } => libc::EADDRINUSE,
        LifecycleError::UnexpectedFileType {
            expected, found, ..
        } => match (expected, found) {
            (_, FileKind::Directory) => libc::EISDIR,
            (FileKind::Socket, _) => libc::ENOTSOCK,
            (FileKind::Directory, _) => libc::ENOTDIR,
            _ => libc::EEXIST,
        },
        _ => libc::EINVAL,
    }
}
