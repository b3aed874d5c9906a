//! `DaemonGuard`: the claim, the bound socket, and owned cleanup.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{bind, listen, Backlog, UnixAddr};
use nix::sys::stat::{fchmod, Mode};

use crate::error::{errno_at, io_at, LifecycleError, Result};
use crate::paths::{check_socket_path, ensure_dir, parent_dir, remove_if_same};
use crate::pidfile::claim;
use crate::probe::clear_stale_socket;
use crate::signals::{register, Registration, Shutdown, SignalMode};

/// Default mode of the bound socket: owner only, for a per-user daemon.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;
/// Default `listen(2)` backlog.
pub const DEFAULT_BACKLOG: i32 = 128;

/// Proof that this process is the one running instance: it holds the claim
/// on the PID file, the bound socket, and the duty to remove both.
///
/// # Lifecycle
/// 1. **Acquire.** [`DaemonGuard::acquire`] creates the parent directories,
///    takes an exclusive `flock(2)` on the PID file (written atomically with
///    this PID, as FreeBSD pidfile(3) but never torn), then, under that lock,
///    removes a provably stale socket and binds a fresh one. A second instance
///    gets [`LifecycleError::AlreadyRunning`] and changes nothing.
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
/// - it runs in the process that acquired the guard: a `fork(2)`ed child
///   that drops its copy removes nothing and keeps the parent's claim;
/// - the path still names the inode the guard created (same device and
///   inode): if an operator deleted the files and a newer instance took the
///   paths, its files are left alone.
///
/// # Pitfalls
/// - **The PID path belongs to the daemon.** Any unlocked regular file there
///   is a stale PID file to this crate (the lock decides, not the content), so
///   it is replaced. Never point the PID path at a file you care about.
/// - **Acquire after daemonizing.** The claim's PID is the acquiring
///   process's. Fork or double-fork first, then acquire.
/// - **Inherited descriptors.** Every descriptor the guard holds is
///   close-on-exec, so programs the daemon spawns do not keep the claim
///   alive. A child made by a bare `fork` (no `exec`) shares the flock until
///   it exits; the claim outlives the parent that long.
/// - **Tokio.** Convert the listener after acquiring:
///   `listener.set_nonblocking(true)?; tokio::net::UnixListener::from_std(listener)?`.
/// - The socket file is removed at cleanup even if you took the listener and
///   still hold it; it is unreachable from then on.
#[must_use = "the claim is released, and the files removed, when the guard is dropped"]
#[derive(Debug)]
pub struct DaemonGuard {
    files: Arc<OwnedFiles>,
    pid: u32,
    listener: Option<UnixListener>,
    /// The flocked PID file: the claim itself. Closed last.
    lock: Option<File>,
    registration: Option<Registration>,
    shutdown: Shutdown,
    reclaimed_socket: bool,
    reclaimed_pid_file: bool,
}

/// Options for [`DaemonGuard`]; made by [`DaemonGuard::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .acquire() to take the claim"]
pub struct DaemonGuardBuilder {
    socket_path: PathBuf,
    pid_path: PathBuf,
    socket_mode: u32,
    backlog: i32,
    signals: SignalMode,
}

impl DaemonGuard {
    /// Claims the single-instance right for `socket_path` and `pid_path`,
    /// with the defaults: socket mode 0600, backlog 128,
    /// [`SignalMode::Exit`]. See [`DaemonGuard::builder`] for options.
    ///
    /// # Errors
    /// - [`LifecycleError::AlreadyRunning`] when another live process holds
    ///   the claim (or, outside the claim, a listener answers on the socket).
    ///   Its PID is [`running_pid`](crate::running_pid)`(pid_path)`.
    /// - [`LifecycleError::PathTooLong`] when `socket_path` does not fit
    ///   `sun_path` (`unix(7)`); checked before anything on disk changes.
    /// - [`LifecycleError::UnexpectedFileType`] when something other than a
    ///   socket is at `socket_path`, or other than a regular file at
    ///   `pid_path`; it is left untouched.
    /// - [`LifecycleError::Io`] when a directory cannot be created, the PID
    ///   file cannot be written, or `bind(2)` fails.
    /// - [`LifecycleError::Signals`] when the signal handling cannot be
    ///   installed.
    /// - [`LifecycleError::InvalidArgument`] when both paths are the same, or
    ///   the socket path is empty or holds a NUL byte.
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
            backlog: DEFAULT_BACKLOG,
            signals: SignalMode::Exit,
        }
    }

    /// The bound listener, while the guard still has it.
    pub fn listener(&self) -> Option<&UnixListener> {
        self.listener.as_ref()
    }

    /// Takes the bound listener out of the guard, to move it into a server
    /// loop or an async runtime. The guard still removes the socket file.
    pub fn take_listener(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }

    /// The PID written to the PID file: this process's.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.files.socket_path
    }

    /// The PID file path.
    pub fn pid_path(&self) -> &Path {
        &self.files.pid_path
    }

    /// Whether acquiring removed a stale socket left by a dead instance.
    pub fn reclaimed_stale_socket(&self) -> bool {
        self.reclaimed_socket
    }

    /// Whether acquiring replaced a stale PID file left by a dead instance.
    pub fn reclaimed_stale_pid_file(&self) -> bool {
        self.reclaimed_pid_file
    }

    /// The guard's shutdown handle. In [`SignalMode::Graceful`] SIGTERM and
    /// SIGINT set it; in every mode [`Shutdown::request`] does.
    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Removes the socket and the PID file, then releases the claim,
    /// reporting what went wrong. Drop does the same but has to stay silent.
    ///
    /// Never cleans up twice: after a signal already did, or in a forked
    /// child, it removes nothing and returns `Ok(())`.
    ///
    /// # Errors
    /// [`LifecycleError::Io`] when a file that is still ours cannot be
    /// removed. The claim is released anyway.
    pub fn close(mut self) -> Result<()> {
        self.release()
    }

    /// Escape hatch: disarms cleanup and signal handling and hands back the
    /// flocked PID file and the listener, for example to pass them to a
    /// re-`exec`ed new version of the daemon. The files stay on disk, and the
    /// claim lasts as long as the returned [`File`] (and its duplicates) stay
    /// open. Both descriptors are close-on-exec; clear `FD_CLOEXEC` to pass
    /// them on.
    pub fn keep(mut self) -> (File, Option<UnixListener>) {
        self.registration = None;
        *self.files.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let lock = self.lock.take().expect("a live guard holds its lock");
        (lock, self.listener.take())
    }

    fn release(&mut self) -> Result<()> {
        // Remove before leaving the signal registry: a signal arriving now
        // makes the helper thread wait on `done` until we finish, instead of
        // ending the process half-way through.
        let removed = self.files.remove();
        self.registration = None;
        self.listener = None;
        self.lock = None; // releases the claim, after the files are gone
        removed
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

    /// `listen(2)` backlog; default [`DEFAULT_BACKLOG`] (128). A negative value,
    /// or one above the system's `SOMAXCONN`, means `SOMAXCONN`.
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// What SIGTERM and SIGINT do; default [`SignalMode::Exit`].
    pub fn signals(mut self, mode: SignalMode) -> Self {
        self.signals = mode;
        self
    }

    /// Takes the claim, binds the socket and installs the signal handling.
    ///
    /// # Errors
    /// As [`DaemonGuard::acquire`].
    #[must_use = "the claim is released as soon as the guard is dropped"]
    pub fn acquire(self) -> Result<DaemonGuard> {
        let (socket_path, pid_path) = (self.socket_path, self.pid_path);
        check_socket_path(&socket_path)?;
        if socket_path == pid_path {
            return Err(LifecycleError::InvalidArgument {
                what: "paths",
                reason: format!(
                    "the socket and the PID file are both {}",
                    socket_path.display()
                ),
            });
        }
        let (pid_dir, socket_dir) = (parent_dir(&pid_path), parent_dir(&socket_path));
        ensure_dir(pid_dir)?;
        if socket_dir != pid_dir {
            ensure_dir(socket_dir)?;
        }

        let pid = std::process::id();
        // Under the claim, before a stale PID file goes: clear a provably
        // stale socket; refuse if someone serves there without our lock (an
        // older version, an unrelated program), touching nothing of theirs.
        let (claim, reclaimed_socket) = claim(&pid_path, pid, || clear_stale_socket(&socket_path))?;
        // Until the guard exists, undo what we placed if a later step fails.
        let undo_pid = scopeguard::guard((), |()| {
            let _ = remove_if_same(&pid_path, claim.dev_ino, "remove PID file");
        });

        let (listener, socket_id) = bind_socket(&socket_path, self.socket_mode, self.backlog)?;
        let undo_socket = scopeguard::guard((), |()| {
            let _ = remove_if_same(&socket_path, socket_id, "remove socket");
        });

        let files = Arc::new(OwnedFiles {
            socket_path: socket_path.clone(),
            socket_id,
            pid_path: pid_path.clone(),
            pid_id: claim.dev_ino,
            owner: pid,
            done: Mutex::new(false),
        });
        let shutdown = Shutdown::default();
        let registration = register(self.signals, Arc::clone(&files), shutdown.clone(), pid)?;

        scopeguard::ScopeGuard::into_inner(undo_socket);
        scopeguard::ScopeGuard::into_inner(undo_pid);
        Ok(DaemonGuard {
            files,
            pid,
            listener: Some(listener),
            lock: Some(claim.file),
            registration,
            shutdown,
            reclaimed_socket,
            reclaimed_pid_file: claim.reclaimed,
        })
    }
}

/// Creates, binds and listens on a close-on-exec Unix stream socket with
/// the given mode; returns it with the socket file's device and inode.
fn bind_socket(path: &Path, mode: u32, backlog: i32) -> Result<(UnixListener, (u64, u64))> {
    let addr = UnixAddr::new(path).map_err(|e| errno_at("address socket", path, e))?;
    let fd = crate::sys::stream_socket(false).map_err(|e| errno_at("create socket", path, e))?;
    // On Linux bind(2) gives the new file the socket inode's mode less the
    // umask, so setting it first leaves no moment with a wider mode. A chmod
    // after bind makes the mode exact where the umask took bits away, and is
    // the only way on other platforms.
    let mode_t = Mode::from_bits_truncate(mode as nix::libc::mode_t);
    if cfg!(any(target_os = "linux", target_os = "android")) {
        let _ = fchmod(&fd, mode_t);
    }
    bind(fd.as_raw_fd(), &addr).map_err(|e| errno_at("bind socket", path, e))?;
    let undo = scopeguard::guard((), |()| {
        let _ = std::fs::remove_file(path);
    });
    // Listen at once: a bound socket that does not listen yet refuses
    // connections, and would look stale to a prober for that moment.
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    listen(&fd, backlog).map_err(|e| errno_at("listen on socket", path, e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| io_at("examine socket", path, e))?;
    if meta.mode() & 0o777 != mode {
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            mode_t,
            nix::sys::stat::FchmodatFlags::NoFollowSymlink,
        )
        .map_err(|e| errno_at("set mode of socket", path, e))?;
    }
    scopeguard::ScopeGuard::into_inner(undo);
    Ok((UnixListener::from(fd), (meta.dev(), meta.ino())))
}

/// The files a guard created and must remove, shared with the signal
/// helper thread.
#[derive(Debug)]
pub(crate) struct OwnedFiles {
    pub(crate) socket_path: PathBuf,
    pub(crate) socket_id: (u64, u64),
    pub(crate) pid_path: PathBuf,
    pub(crate) pid_id: (u64, u64),
    /// The acquiring process; a forked child never removes anything.
    pub(crate) owner: u32,
    /// Set by whoever cleans up first (Drop, `close`, the signal thread).
    /// A mutex, not a flag: the signal thread must wait for a Drop that is
    /// half-way through removing before it ends the process.
    pub(crate) done: Mutex<bool>,
}

impl OwnedFiles {
    /// Removes the socket, then the PID file, each only if the path still
    /// names the inode this guard created. Runs at most once.
    pub(crate) fn remove(&self) -> Result<()> {
        if std::process::id() != self.owner {
            return Ok(());
        }
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::replace(&mut *done, true) {
            return Ok(());
        }
        let socket = remove_if_same(&self.socket_path, self.socket_id, "remove socket").map(drop);
        let pid = remove_if_same(&self.pid_path, self.pid_id, "remove PID file").map(drop);
        socket.and(pid)
    }
}
