//! `DaemonGuard`: a [`PidFileGuard`] plus the Unix socket it binds under the
//! claim.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::activation::{activated_listener, Activation};
use crate::cleanup::absolute;
use crate::daemonize::Daemonize;
use crate::error::Result;
use crate::listener::{bind_claimed, in_use_or, same_file_or, same_path_error, BindSpec};
use crate::notify::Notifier;
use crate::paths::{check_socket_path, parent_dir};
use crate::pid_guard::{acquire_with, claim_only, reporting_failure, PidFileGuard};
use crate::probe::clear_stale_socket;
use crate::rebind::SocketSlot;
use crate::reload::Reload;
use crate::shutdown::Shutdown;
use crate::signals::{SignalAction, SignalMode, SignalTable};

/// Default mode of the bound socket: owner only, for a per-user daemon.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default `listen(2)` backlog.
pub const DEFAULT_BACKLOG: i32 = 128;

/// Proof that this process is the one running instance: it holds the claim
/// on the PID file, the bound socket, and the duty to remove both.
///
/// It is a [`PidFileGuard`] plus a Unix socket bound under the claim; a
/// daemon that serves TCP, or nothing, uses [`PidFileGuard`] alone.
///
/// # Lifecycle
/// 1. **Acquire.** [`DaemonGuard::acquire`] creates the parent directories,
///    takes an exclusive `flock(2)` on the PID file (written atomically with
///    this PID, as FreeBSD pidfile(3) but never torn), then, under that lock,
///    removes a provably stale socket and binds a fresh one. A second instance
///    gets [`LifecycleError::AlreadyRunning`](crate::LifecycleError::AlreadyRunning) and changes nothing.
/// 2. **Serve.** Accept connections on [`listener`](Self::listener) (or
///    [`take_listener`](Self::take_listener) it into your runtime). The flock
///    stays held for the guard's whole life, so the claim cannot be stolen
///    however long the daemon runs.
/// 3. **End.** Drop (or [`close`](Self::close), which reports errors)
///    removes the socket, then the PID file, then releases the lock. On
///    SIGTERM/SIGINT the same cleanup runs from a helper thread and the
///    process ends with the signal's status ([`SignalMode::Exit`]), or the
///    daemon is asked to shut down ([`SignalMode::Graceful`]).
///
/// ```
/// use historia_lifecycle::{DaemonGuard, LifecycleError};
/// let dir = tempfile::tempdir()?;
/// let (sock, pid) = (dir.path().join("run/d.sock"), dir.path().join("run/d.pid"));
///
/// let guard = DaemonGuard::acquire(&sock, &pid)?;
/// assert!(matches!(DaemonGuard::acquire(&sock, &pid), Err(LifecycleError::AlreadyRunning)));
/// assert_eq!(historia_lifecycle::running_pid(&pid)?, Some(std::process::id()));
///
/// drop(guard);
/// assert!(!sock.exists() && !pid.exists());
/// # Ok::<(), LifecycleError>(())
/// ```
///
/// # What cleanup cannot cover
/// SIGKILL, `std::process::abort`, `std::process::exit`, `panic = "abort"`,
/// a power cut: no code runs, so the socket and PID file stay behind. That is
/// safe: the kernel drops the flock when the process dies, so the next
/// [`acquire`](Self::acquire) sees an unlocked PID file, replaces it, proves
/// the socket stale (`ECONNREFUSED` on a path `lstat` calls a socket),
/// removes it and binds anew, with no manual cleanup. The same holds for a
/// PID file that is empty, garbage, or names an unrelated live process: the
/// lock decides, not the PID. Drop runs on unwinding panics and normal
/// returns from `main`, but not for a guard kept in a `static`.
///
/// # Ownership rules
/// Cleanup removes a file only if both hold:
/// - it runs in the process that acquired the guard, or the `fork(2)`ed
///   child it was handed to ([`take_over_after_fork`](Self::take_over_after_fork)):
///   any other forked child that drops its copy removes nothing and keeps
///   the parent's claim;
/// - the path still names the inode the guard created (same device and
///   inode): if an operator deleted the files and a newer instance took the
///   paths, its files are left alone.
///
/// Both paths are made absolute at acquire, so a `chdir(2)` after it (a
/// daemon that moves to `/`) changes nothing about which files cleanup
/// removes; the socket is still bound with the path as given, so `sun_path`
/// holds exactly what you passed.
///
/// # Pitfalls
/// - **The PID path belongs to the daemon.** Any unlocked regular file there
///   is a stale PID file to this crate (the lock decides, not the content), so
///   it is replaced. Never point the PID path at a file you care about.
/// - **Daemonize with the builder, not by hand.** The claim's PID is the
///   acquiring process's: [`DaemonGuardBuilder::daemonize`] takes the claim
///   and binds before forking (so errors reach the terminal) and hands both
///   to the daemon; after a plain `fork(2)` of your own, call
///   [`take_over_after_fork`](Self::take_over_after_fork) in the child and
///   [`hand_over_to_child`](Self::hand_over_to_child) in the parent.
/// - **Inherited descriptors.** Every descriptor the guard holds is
///   close-on-exec, so programs the daemon spawns do not keep the claim
///   alive. A child made by a bare `fork` (no `exec`) shares the flock until
///   it exits; the claim outlives the parent that long.
/// - **Tokio.** Feature `tokio`: `take_tokio_listener()` converts the
///   listener inside the runtime (non-blocking first). By hand:
///   `listener.set_nonblocking(true)?; tokio::net::UnixListener::from_std(listener)?`.
/// - The socket file is removed at cleanup even if you took the listener and
///   still hold it; it is unreachable from then on.
#[must_use = "the claim is released, and the files removed, when the guard is dropped"]
#[derive(Debug)]
pub struct DaemonGuard {
    listener: Option<UnixListener>,
    /// The claim, the PID file, the cleanup list (socket included) and the
    /// signal registration.
    inner: PidFileGuard,
    socket_path: PathBuf,
    /// The socket file we bound (re-created by [`rebind`](Self::rebind) and
    /// by [`SignalAction::Rebind`]) and the descriptor the guard holds.
    slot: Arc<SocketSlot>,
    reclaimed_socket: bool,
    activated: bool,
}

/// Options for [`DaemonGuard`]; made by [`DaemonGuard::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .acquire() to take the claim"]
pub struct DaemonGuardBuilder {
    socket_path: PathBuf,
    pid_path: PathBuf,
    socket_mode: u32,
    pid_mode: u32,
    backlog: i32,
    signals: SignalTable,
    activation: Activation,
    fd_name: Option<String>,
}

impl DaemonGuard {
    /// Claims the single-instance right for `socket_path` and `pid_path`,
    /// with the defaults: socket mode 0600, backlog 128,
    /// [`SignalMode::Exit`]. See [`DaemonGuard::builder`] for options.
    ///
    /// # Errors
    /// - [`LifecycleError::AlreadyRunning`](crate::LifecycleError::AlreadyRunning) when another live process holds
    ///   the claim (or, outside the claim, a listener answers on the socket).
    ///   Its PID is [`running_pid`](crate::running_pid)`(pid_path)`.
    /// - [`LifecycleError::PathTooLong`](crate::LifecycleError::PathTooLong) when `socket_path` does not fit
    ///   `sun_path` (`unix(7)`); checked before anything on disk changes.
    /// - [`LifecycleError::UnexpectedFileType`](crate::LifecycleError::UnexpectedFileType) when something other than a
    ///   socket is at `socket_path`, or other than a regular file at
    ///   `pid_path`; it is left untouched.
    /// - [`LifecycleError::Io`](crate::LifecycleError::Io) when a directory cannot be created, the PID
    ///   file cannot be written, `bind(2)` fails, or a path is relative and
    ///   the current directory cannot be read.
    /// - [`LifecycleError::Signals`](crate::LifecycleError::Signals) when the signal handling cannot be
    ///   installed.
    /// - [`LifecycleError::SocketInUse`](crate::LifecycleError::SocketInUse)
    ///   when something holds the socket path that is neither a listener nor
    ///   provably stale (another user's socket, a datagram socket); it is
    ///   left untouched.
    /// - [`LifecycleError::InvalidArgument`](crate::LifecycleError::InvalidArgument) when both paths name the same
    ///   file (also when spelt differently: `./`, `..`, a symlinked
    ///   directory, a hard link to the PID file), or the socket path is
    ///   empty or holds a NUL byte.
    ///
    /// On every error, nothing this call created is left behind.
    pub fn acquire(socket_path: impl AsRef<Path>, pid_path: impl AsRef<Path>) -> Result<Self> {
        Self::builder(socket_path, pid_path).acquire()
    }

    /// Starts a [`DaemonGuardBuilder`] for the given paths.
    pub fn builder(
        socket_path: impl AsRef<Path>,
        pid_path: impl AsRef<Path>,
    ) -> DaemonGuardBuilder {
        DaemonGuardBuilder {
            socket_path: socket_path.as_ref().to_path_buf(),
            pid_path: pid_path.as_ref().to_path_buf(),
            socket_mode: DEFAULT_SOCKET_MODE,
            pid_mode: crate::PID_FILE_MODE,
            backlog: DEFAULT_BACKLOG,
            signals: SignalTable::default(),
            activation: Activation::Auto,
            fd_name: None,
        }
    }

    /// The bound listener, while the guard still has it.
    pub fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// Takes the bound listener out of the guard, to move it into a server
    /// loop or an async runtime. The guard still removes the socket file.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        let spare = self.slot.release_held();
        self.listener.take().or(spare)
    }

    /// Takes the bound listener out of the guard as a
    /// `tokio::net::UnixListener`, registered with the current tokio
    /// runtime, as [`take_listener`](Self::take_listener) does for the std
    /// one. Call it inside the runtime (in `#[tokio::main]`, a task, or
    /// after `Runtime::enter`).
    ///
    /// The socket is made non-blocking first (`O_NONBLOCK`, which tokio
    /// needs and, since 1.44, asserts in debug builds); it stays
    /// close-on-exec. `O_NONBLOCK` belongs to the open file description, so
    /// a [`try_clone`](UnixListener::try_clone) of the listener made before
    /// turns non-blocking too.
    ///
    /// # Taken, not duplicated
    /// The guard gives the listener up rather than keeping a `dup(2)` of it:
    /// a duplicate would share the non-blocking flag with the guard's copy
    /// (breaking a blocking `accept(2)` on [`listener`](Self::listener)), and
    /// would keep the socket open, queueing connections nobody accepts, after
    /// the server stopped. So the server's listener is the only one: when
    /// the server drops it (axum's graceful shutdown does, as soon as the
    /// shutdown is requested) new connections are refused at once, while
    /// requests in progress finish.
    ///
    /// - **Cleanup** still removes the socket file (then the PID file) on
    ///   Drop, [`close`](Self::close) or a signal, whoever holds the
    ///   listener. Stop the server (drop the listener) before closing the
    ///   guard; a listener that outlives the guard can no longer be reached
    ///   by path, and the next instance binds the path anew.
    /// - **[`rebind`](Self::rebind)** puts a fresh listener back in the
    ///   guard; the one taken before is bound to the deleted file and can
    ///   never be reached again. Take the new one with this method and
    ///   swap it into the accept loop.
    ///
    /// ```
    /// # #[cfg(feature = "tokio")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use historia_lifecycle::{DaemonGuard, LifecycleError};
    /// let dir = tempfile::tempdir()?;
    /// let sock = dir.path().join("d.sock");
    /// let mut guard = DaemonGuard::acquire(&sock, dir.path().join("d.pid"))?;
    ///
    /// // Outside a runtime: an error, and the listener stays in the guard.
    /// assert!(matches!(guard.take_tokio_listener(), Err(LifecycleError::NoRuntime)));
    ///
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    /// rt.block_on(async {
    ///     let listener = guard.take_tokio_listener()?;
    ///     let client = std::os::unix::net::UnixStream::connect(&sock)?;
    ///     let (_stream, _) = listener.accept().await?;
    ///     # drop(client);
    ///     Ok::<_, Box<dyn std::error::Error>>(())
    /// })?;
    /// guard.close()?; // removes the socket file and the PID file
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "tokio"))]
    /// # fn main() {}
    /// ```
    ///
    /// # Errors
    /// - [`LifecycleError::NoRuntime`](crate::LifecycleError::NoRuntime)
    ///   outside a tokio runtime; the listener stays in the guard.
    /// - [`LifecycleError::InvalidArgument`](crate::LifecycleError::InvalidArgument)
    ///   when the listener was already taken (by this method or
    ///   [`take_listener`](Self::take_listener)).
    /// - [`LifecycleError::Io`](crate::LifecycleError::Io) when `fcntl(2)`
    ///   cannot set `O_NONBLOCK` (the listener stays in the guard), or the
    ///   runtime cannot register it (`epoll_ctl(2)`, `kevent(2)`; the
    ///   listener is then closed, and the socket file stays until cleanup).
    ///
    /// # Panics
    /// In a runtime built without its I/O driver (a `Builder` without
    /// `enable_io()` or `enable_all()`), as tokio's `from_std` does: tokio
    /// offers no way to ask first.
    #[cfg(feature = "tokio")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tokio")))]
    pub fn take_tokio_listener(&mut self) -> Result<tokio::net::UnixListener> {
        // A signal must not move a socket onto a descriptor tokio owns; a
        // listener a signal re-created after an earlier take is the one to
        // hand out.
        let spare = self.slot.release_held();
        if self.listener.is_none() {
            self.listener = spare;
        }
        let taken = crate::tokio_listener::take(&mut self.listener, &self.socket_path);
        if let Some(still) = &self.listener {
            self.slot.hold(still.as_raw_fd());
        }
        taken
    }

    /// The PID written to the PID file: this process's.
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// The socket path, as given to the builder.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The PID file path, as given to the builder.
    pub fn pid_path(&self) -> &Path {
        self.inner.pid_path()
    }

    /// Whether the listener was passed down by a service manager (socket
    /// activation, see [`Activation`]) rather than bound by this guard.
    /// An adopted socket file is the manager's: cleanup leaves it alone.
    pub fn is_socket_activated(&self) -> bool {
        self.activated
    }

    /// Tells whoever waits for this daemon to start that it is ready to
    /// serve: `READY=1` to a service manager on `NOTIFY_SOCKET` (systemd's
    /// `Type=notify`, `start-stop-daemon --notify-await`). Call it once the
    /// daemon accepts connections; a no-op where nobody waits. See
    /// [`PidFileGuard::ready`].
    ///
    /// # Errors
    /// [`LifecycleError::Io`](crate::LifecycleError::Io) when the
    /// notification cannot be sent. The daemon may go on serving.
    pub fn ready(&self) -> Result<()> {
        self.inner.ready()
    }

    /// Tells whoever waits for this daemon to start that it cannot, and why;
    /// see [`PidFileGuard::start_failed`].
    pub fn start_failed(&self, error: &(dyn std::error::Error + 'static)) {
        self.inner.start_failed(error);
    }

    /// Takes the claim, the socket and the cleanup over in a child made by a
    /// plain `fork(2)`: the PID file names this process from now on, and its
    /// Drop, `close()` and signals remove both files. See
    /// [`PidFileGuard::take_over_after_fork`], whose rules and errors apply.
    ///
    /// # Errors
    /// As [`PidFileGuard::take_over_after_fork`].
    pub fn take_over_after_fork(&mut self) -> Result<()> {
        self.inner.take_over_after_fork()
    }

    /// In the parent after `fork(2)`: waits until `child` took the claim
    /// over, then disarms this copy and closes its listener and lock
    /// descriptors (the child's copies stay open and locked). See
    /// [`PidFileGuard::hand_over_to_child`].
    ///
    /// # Errors
    /// As [`PidFileGuard::hand_over_to_child`]; the guard stays this
    /// process's, listener included.
    pub fn hand_over_to_child(&mut self, child: u32, timeout: std::time::Duration) -> Result<()> {
        self.inner.hand_over_to_child(child, timeout)?;
        // The child accepts from now on; our copy must not take its clients.
        self.listener = None;
        Ok(())
    }

    /// The service manager waiting on `NOTIFY_SOCKET`, if any, for the other
    /// sd_notify messages (`STATUS=`, `WATCHDOG=1`, …).
    pub fn notifier(&self) -> Option<&Notifier> {
        self.inner.notifier()
    }

    /// Whether acquiring removed a stale socket: a socket file nobody
    /// listened on (`ECONNREFUSED`), as a dead instance leaves.
    pub fn reclaimed_stale_socket(&self) -> bool {
        self.reclaimed_socket
    }

    /// Whether acquiring replaced a stale PID file, as
    /// [`PidFileGuard::reclaimed_stale_pid_file`].
    pub fn reclaimed_stale_pid_file(&self) -> bool {
        self.inner.reclaimed_stale_pid_file()
    }

    /// The PID the replaced stale PID file named, as
    /// [`PidFileGuard::replaced_pid`].
    pub fn replaced_pid(&self) -> Option<u32> {
        self.inner.replaced_pid()
    }

    /// The guard's shutdown handle. In [`SignalMode::Graceful`] SIGTERM and
    /// SIGINT set it; in every mode [`Shutdown::request`] does.
    pub fn shutdown(&self) -> &Shutdown {
        self.inner.shutdown()
    }

    /// The guard's reload handle, as [`PidFileGuard::reload`]: set by a
    /// signal whose action is [`SignalAction::Reload`] (see
    /// [`DaemonGuardBuilder::on_signal`]) and by [`Reload::request`].
    pub fn reload(&self) -> &Reload {
        self.inner.reload()
    }

    /// Re-creates the socket if it was deleted while the daemon runs (a tmp
    /// cleaner, an operator's `rm`), under the claim this guard holds, and
    /// says whether it did. As tmux does on SIGUSR1: call it from a timer
    /// or a command, or let a signal do it with
    /// `.on_signal(SIGUSR1, SignalAction::Rebind)` (see
    /// [`SignalAction::Rebind`], which also moves the new socket onto the
    /// listener the guard holds).
    ///
    /// - The socket file this guard bound is still there: nothing to do,
    ///   `Ok(false)`.
    /// - Nothing is at the path: a fresh socket is bound there (the same
    ///   mode and backlog; its directory re-created, 0700, if it is gone
    ///   too) and listened on, `Ok(true)`. It replaces the guard's listener
    ///   (the old one, bound to the deleted file, can never be reached
    ///   again): take the new one with [`take_listener`](Self::take_listener)
    ///   if you took the first. Cleanup now removes the new file.
    /// - Anything else is at the path (another socket, a file, a symlink):
    ///   someone else put it there, and it is never replaced.
    ///
    /// The socket is bound at the path made absolute at acquire, so a
    /// `chdir(2)` since changes nothing; that absolute path must fit
    /// `sun_path`. Only the socket is re-created, not the PID file.
    ///
    /// # Errors
    /// - [`LifecycleError::SocketInUse`](crate::LifecycleError::SocketInUse)
    ///   when another socket is at the path (or appears there while binding);
    ///   [`LifecycleError::UnexpectedFileType`](crate::LifecycleError::UnexpectedFileType)
    ///   for anything else there. Both leave it untouched.
    /// - [`LifecycleError::InvalidArgument`](crate::LifecycleError::InvalidArgument)
    ///   for an adopted socket (socket activation: the service manager owns
    ///   it) and once cleanup has run, or in a forked child.
    /// - [`LifecycleError::PathTooLong`](crate::LifecycleError::PathTooLong)
    ///   when the absolute path does not fit `sun_path`;
    ///   [`LifecycleError::Io`](crate::LifecycleError::Io) when `bind(2)`,
    ///   `listen(2)` or the mode fail.
    pub fn rebind(&mut self) -> Result<bool> {
        match self.slot.rebind(self.inner.cleanup(), &self.socket_path)? {
            Some(listener) => {
                self.slot.hold(listener.as_raw_fd());
                // The old listener (bound to the deleted file) closes here.
                self.listener = Some(listener);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Removes the socket and the PID file, then releases the claim,
    /// reporting what went wrong. Drop does the same but has to stay silent.
    ///
    /// Never cleans up twice: after a signal already did, in a forked child,
    /// or with cleanup disabled, it removes nothing and returns `Ok(())`.
    ///
    /// # Errors
    /// [`LifecycleError::Io`](crate::LifecycleError::Io) when a file that is still ours cannot be
    /// removed. The claim is released anyway.
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    /// Turns cleanup off (`true`) or back on (`false`) without giving up the
    /// guard, as tempfile's `disable_cleanup`: while it is off, Drop,
    /// [`close`](Self::close) and the signal handling leave the socket and
    /// the PID file in place. The claim still ends when the guard is
    /// dropped; the next acquire then reclaims both as stale. To keep the
    /// claim too, use [`keep`](Self::keep).
    pub fn disable_cleanup(&mut self, disable: bool) {
        self.inner.disable_cleanup(disable);
    }

    /// Escape hatch: disarms cleanup and signal handling and hands back the
    /// flocked PID file and the listener, for example to pass them to a
    /// re-`exec`ed new version of the daemon. The files stay on disk, and the
    /// claim lasts as long as the returned [`File`] (and its duplicates) stay
    /// open. Both descriptors are close-on-exec; clear `FD_CLOEXEC` to pass
    /// them on.
    pub fn keep(mut self) -> (File, Option<UnixListener>) {
        let spare = self.slot.release_held();
        let listener = self.listener.take().or(spare);
        (self.inner.keep_in_place(), listener)
    }

    fn release(&mut self) -> Result<()> {
        // A signal must not move a socket onto a descriptor we close.
        drop(self.slot.release_held());
        let listener = &mut self.listener;
        // The listener closes after the files are gone and before the claim
        // is released.
        self.inner.release(|| *listener = None)
    }
}

impl AsRef<PidFileGuard> for DaemonGuard {
    fn as_ref(&self) -> &PidFileGuard {
        &self.inner
    }
}

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        // Best effort: errors are reported by `close()`, never by a panic.
        let _ = self.release();
    }
}

impl DaemonGuardBuilder {
    /// Mode of the socket file; default [`DEFAULT_SOCKET_MODE`] (0600).
    ///
    /// Connecting to a Unix socket needs write permission on it on Linux
    /// (`unix(7)`), so 0600 admits only the owner and 0660 the group too. Some
    /// BSDs ignore the socket's own mode; there only the directory's
    /// permissions protect it, which is why [`runtime_dir`](crate::runtime_dir)
    /// makes it 0700.
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = mode & 0o777;
        self
    }

    /// Mode of the PID file; default [`PID_FILE_MODE`](crate::PID_FILE_MODE)
    /// (0644). `0o600` keeps other users from opening it, and so from
    /// holding a lock on it that blocks a restart: see
    /// [`PidFileGuardBuilder::pid_file_mode`](crate::PidFileGuardBuilder::pid_file_mode).
    pub fn pid_file_mode(mut self, mode: u32) -> Self {
        self.pid_mode = mode & 0o777;
        self
    }

    /// `listen(2)` backlog; default [`DEFAULT_BACKLOG`] (128). A negative value,
    /// or one above the system's `SOMAXCONN`, means `SOMAXCONN`.
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// What SIGTERM and SIGINT do; default [`SignalMode::Exit`]. Replaces
    /// what an earlier [`on_signal`](Self::on_signal) set for those two.
    pub fn signals(mut self, mode: SignalMode) -> Self {
        self.signals.set_mode(mode);
        self
    }

    /// What `signal` does to this guard, as
    /// [`PidFileGuardBuilder::on_signal`](crate::PidFileGuardBuilder::on_signal): SIGTERM, SIGINT, SIGHUP, SIGQUIT,
    /// SIGUSR1 or SIGUSR2, each [`SignalAction::Terminate`],
    /// [`Shutdown`](SignalAction::Shutdown), [`Reload`](SignalAction::Reload),
    /// [`Rebind`](SignalAction::Rebind) (this guard's socket, re-created) or
    /// [`Leave`](SignalAction::Leave).
    ///
    /// A signal a guard cannot act on is refused by `acquire` with
    /// [`LifecycleError::InvalidArgument`](crate::LifecycleError::InvalidArgument),
    /// before anything on disk changes.
    pub fn on_signal(mut self, signal: i32, action: SignalAction) -> Self {
        self.signals.set(signal, action);
        self
    }

    /// Whether to adopt a socket a service manager passed down
    /// (`LISTEN_FDS`, `sd_listen_fds(3)`); default [`Activation::Auto`].
    pub fn socket_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Under socket activation, adopt the fd with this name in
    /// `LISTEN_FDNAMES` (`FileDescriptorName=` in the `.socket` unit)
    /// instead of the one bound to the socket path.
    pub fn activation_fd_name(mut self, name: impl Into<String>) -> Self {
        self.fd_name = Some(name.into());
        self
    }

    /// Takes the claim, binds the socket and installs the signal handling.
    ///
    /// # Errors
    /// As [`DaemonGuard::acquire`].
    #[must_use = "the claim is released as soon as the guard is dropped"]
    pub fn acquire(self) -> Result<DaemonGuard> {
        reporting_failure(|notifier| self.acquire_reporting_to(notifier))
    }

    /// Takes the claim and binds the socket, then becomes a daemon as
    /// daemon(7) describes, and returns only in the daemon; the original
    /// process exits with status 0 once the daemon calls
    /// [`DaemonGuard::ready`], or prints why it could not start and exits
    /// with status 1. See [`Daemonize`] for the steps, the options and when
    /// to daemonize at all.
    ///
    /// # Errors
    /// In the original process, before anything forks, so they reach the
    /// terminal: as [`acquire`](Self::acquire) (above all
    /// [`LifecycleError::AlreadyRunning`](crate::LifecycleError::AlreadyRunning),
    /// and a socket path that cannot be bound), and as
    /// [`PidFileGuardBuilder::daemonize`](crate::PidFileGuardBuilder::daemonize).
    pub fn daemonize(self, options: &Daemonize) -> Result<DaemonGuard> {
        let about = self.socket_path.clone();
        let table = self.signals;
        // Refused here, in the original process, not after the forks.
        table.validate()?;
        crate::daemonize::daemonize(
            options,
            &about,
            || {
                let mut guard = DaemonGuardBuilder {
                    signals: SignalTable::none(),
                    ..self
                }
                .acquire()?;
                guard.inner.defer_signals(table);
                Ok(guard)
            },
            |guard| &mut guard.inner,
        )
    }

    fn acquire_reporting_to(self, notifier: Option<Notifier>) -> Result<DaemonGuard> {
        let (socket_path, pid_path) = (&self.socket_path, &self.pid_path);
        check_socket_path(socket_path)?;
        let socket_abs = absolute(socket_path, "resolve socket path")?;
        check_distinct(socket_path, &socket_abs, pid_path)?;
        // Adopt before the claim: the inherited fds must become
        // close-on-exec early, and an adopted socket is never probed (under
        // a `.socket` unit a probe would only queue a connection to us).
        if let Some(listener) = self.adopt()? {
            // Never re-created: the service manager owns the socket.
            let slot = Arc::new(SocketSlot::new(
                self.socket_mode,
                self.backlog,
                None,
                listener.as_raw_fd(),
            ));
            let inner = claim_only(
                pid_path,
                self.pid_mode,
                self.signals,
                notifier,
                Some(Arc::clone(&slot)),
            )?;
            return Ok(DaemonGuard {
                listener: Some(listener),
                inner,
                socket_path: self.socket_path,
                slot,
                reclaimed_socket: false,
                activated: true,
            });
        }
        let spec = BindSpec {
            path: socket_path,
            absolute: socket_abs,
            mode: self.socket_mode,
            backlog: self.backlog,
        };
        // Under each dead holder's lock, before its PID file goes: clear a
        // provably stale socket, or refuse if someone serves there without
        // the lock (an older version, an unrelated program), touching
        // nothing of theirs. Then, under our own claim, bind.
        let (mode, backlog) = (self.socket_mode, self.backlog);
        let (inner, (listener, slot, reclaimed_socket)) = acquire_with(
            pid_path,
            self.pid_mode,
            self.signals,
            notifier,
            |stale_id| {
                clear_stale_socket(socket_path).map_err(|e| {
                    in_use_or(
                        same_file_or(e, socket_path, pid_path, stale_id),
                        socket_path,
                    )
                })
            },
            |cleanup, claim| {
                let (listener, id, reclaimed) =
                    bind_claimed(spec, pid_path, claim.dev_ino, cleanup)?;
                let slot = SocketSlot::new(mode, backlog, Some(id), listener.as_raw_fd());
                Ok((listener, Arc::new(slot), reclaimed || claim.stale_work))
            },
            |(_, slot, _)| Some(Arc::clone(slot)),
        )?;
        Ok(DaemonGuard {
            reclaimed_socket,
            listener: Some(listener),
            inner,
            socket_path: self.socket_path,
            slot,
            activated: false,
        })
    }

    /// The socket a service manager passed down, as [`Activation`] says.
    fn adopt(&self) -> Result<Option<UnixListener>> {
        let name = self.fd_name.as_deref();
        match self.activation {
            Activation::Never => Ok(None),
            Activation::Auto => activated_listener(&self.socket_path, name),
            Activation::Require => match activated_listener(&self.socket_path, name)? {
                Some(listener) => Ok(Some(listener)),
                None => Err(crate::LifecycleError::InvalidArgument {
                    what: "socket activation",
                    reason: format!(
                        "required for {}, but no socket was passed to this process \
                         (LISTEN_PID unset or another process's)",
                        self.socket_path.display()
                    ),
                }),
            },
        }
    }
}

/// Refuses a socket path and a PID path that name the same directory entry:
/// equal once made absolute (which folds `.` and repeated slashes), or the
/// same file name in directories that are one (`..`, a symlinked directory,
/// a bind mount), compared by device and inode. Only the rare equal-name
/// case costs a `stat(2)` of each directory.
fn check_distinct(socket_path: &Path, socket_abs: &Path, pid_path: &Path) -> Result<()> {
    let pid_abs = absolute(pid_path, "resolve PID file path")?;
    let same = socket_abs == pid_abs
        || (socket_abs.file_name().is_some()
            && socket_abs.file_name() == pid_abs.file_name()
            && same_dir(parent_dir(socket_abs), parent_dir(&pid_abs)));
    if same {
        return Err(same_path_error(socket_path, pid_path));
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => (x.dev(), x.ino()) == (y.dev(), y.ino()),
        _ => false,
    }
}
