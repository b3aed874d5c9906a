//! The client side: connect to the daemon or start it (exactly one, however
//! many clients race), and stop it with deadlines.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::libc;

use crate::error::{io_at, LifecycleError, Result};
use crate::paths::{ensure_dir, parent_dir};
use crate::pidfile::running_pid;
use crate::readiness::{parse_report, LineReader, Polled, Report, READY_FD_ENV};
use crate::sys::Process;

/// How much of a log file's end a start-up error quotes.
const OUTPUT_TAIL: u64 = 2048;
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(20);

/// A connection to the daemon, and how it came about; made by
/// [`ensure_running`] or [`Launcher::connect_or_spawn`].
#[derive(Debug)]
pub struct Connection {
    /// Connected to the daemon's socket.
    pub stream: UnixStream,
    /// Whether the daemon was found running or started by this call.
    pub started: Started,
}

/// How [`ensure_running`] reached the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Started {
    /// It was running already (or another client started it meanwhile, or
    /// the daemon this call spawned found another instance running).
    Found,
    /// This call spawned it; it is ready and serving.
    Spawned {
        /// The daemon's PID.
        pid: u32,
    },
}

/// Connects to the daemon on `socket_path`, starting it with `command`
/// first if nothing answers, and waits at most `timeout` in all. The
/// defaults of [`Launcher`]; see there for the details and options.
///
/// # Errors
/// As [`Launcher::connect_or_spawn`].
pub fn ensure_running(
    socket_path: impl AsRef<Path>,
    pid_path: impl AsRef<Path>,
    command: &mut Command,
    timeout: Duration,
) -> Result<Connection> {
    Launcher::new(socket_path, pid_path)
        .timeout(timeout)
        .connect_or_spawn(command)
}

/// Connect-or-spawn for a daemon's command-line client, with options.
///
/// ```no_run
/// // no_run: it starts a daemon program.
/// use historia_lifecycle::{Launcher, Started};
/// use std::process::Command;
/// let conn = Launcher::new("/run/user/1000/app/daemon.sock", "/run/user/1000/app/daemon.pid")
///     .timeout(std::time::Duration::from_secs(5))
///     .log_file("/run/user/1000/app/daemon.log")
///     .connect_or_spawn(Command::new("app-daemon").arg("--serve"))?;
/// if let Started::Spawned { pid } = conn.started {
///     eprintln!("started the daemon, pid {pid}");
/// }
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
///
/// # How exactly one daemon starts
/// As tmux (`<socket>.lock`) and gnupg do: a client that cannot connect
/// takes an exclusive `flock(2)` on `<socket path>.lock`, connects again
/// under it (another client may have started the daemon meanwhile), and
/// only then spawns. While the daemon's claim is held but its socket does
/// not answer, the daemon is starting (or stopping): the client waits, it
/// never spawns a second one, and looks at the claim between its connects.
/// If the holder lets the claim go without ever answering (a daemon that
/// was stopping: it closed its listener, finished its work, exited), the
/// client spawns a new one then, within the same timeout. The lock file
/// stays on disk, as tmux's does; it holds nothing.
///
/// # Readiness
/// The spawned daemon gets a pipe, named in `HISTORIA_READY_FD`, and its
/// guard reports through it: [`DaemonGuard::ready`](crate::DaemonGuard::ready)
/// writes `ready`, a failed acquire writes its reason. A daemon that never
/// calls `ready` still works: the client keeps trying to connect, backing
/// off from 1 ms to 20 ms, until the deadline. A daemon that finds another
/// instance running reports so, and the client connects to that one.
///
/// # The spawned process
/// It runs in a session of its own (`setsid(2)`), with stdin from
/// `/dev/null`, stdout and stderr to `/dev/null` or the
/// [`log_file`](Self::log_file), and no inherited descriptor but the
/// readiness pipe (on Linux 5.11+ every other descriptor above 2 is made
/// close-on-exec before `exec`). It is a child of the calling process: a
/// daemon that dies while the client still runs stays a zombie until the
/// client exits. A command that double-forks (a daemonizing program) works
/// too, if it keeps the readiness descriptor open: the client then waits
/// for the grandchild's report, not the first child's exit.
#[derive(Debug, Clone)]
#[must_use = "call .connect_or_spawn() to connect"]
pub struct Launcher {
    socket_path: PathBuf,
    pid_path: PathBuf,
    timeout: Duration,
    log_file: Option<PathBuf>,
}

impl Launcher {
    /// A launcher for the daemon on `socket_path` whose claim is `pid_path`;
    /// timeout 5 s, output to `/dev/null`.
    pub fn new(socket_path: impl AsRef<Path>, pid_path: impl AsRef<Path>) -> Self {
        Launcher {
            socket_path: socket_path.as_ref().to_path_buf(),
            pid_path: pid_path.as_ref().to_path_buf(),
            timeout: Duration::from_secs(5),
            log_file: None,
        }
    }

    /// The whole time [`connect_or_spawn`](Self::connect_or_spawn) may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Appends the spawned daemon's stdout and stderr to `path` (created
    /// 0600 if missing). A start-up error then quotes the end of what the
    /// daemon wrote during this start.
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Self {
        self.log_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Connects to the daemon, spawning it with `command` if nothing
    /// answers; see [`Launcher`] for how.
    ///
    /// # Errors
    /// - [`LifecycleError::StartFailed`] when the spawned daemon reported
    ///   that it cannot start, with its reason.
    /// - [`LifecycleError::DaemonExited`] when it exited or was killed
    ///   before it was ready, with its status (and the end of its log).
    /// - [`LifecycleError::Timeout`] when it (or a daemon another client
    ///   started) did not answer within the timeout; the daemon is left
    ///   running, and the error names its PID.
    /// - [`LifecycleError::Io`] when the lock file cannot be opened, the
    ///   command cannot be spawned, or the pipe fails.
    /// - As [`running_pid`]: [`LifecycleError::PidFile`],
    ///   [`LifecycleError::UnexpectedFileType`] for a PID path that is not a
    ///   regular file.
    pub fn connect_or_spawn(&self, command: &mut Command) -> Result<Connection> {
        let deadline = Instant::now() + self.timeout;
        if let Ok(stream) = UnixStream::connect(&self.socket_path) {
            return Ok(found(stream));
        }
        let _lock = self.spawn_lock(deadline)?;
        // Under the lock: whoever held it before us may have started it.
        if let Ok(stream) = UnixStream::connect(&self.socket_path) {
            return Ok(found(stream));
        }
        match running_pid(&self.pid_path) {
            // Held but not answering: starting, or stopping. Wait, never
            // spawn twice.
            Ok(Some(pid)) => self.wait_for_holder(command, deadline, Some(pid)),
            Err(LifecycleError::HolderUnknown { .. }) => {
                self.wait_for_holder(command, deadline, None)
            }
            Ok(None) => self.spawn_and_wait(command, deadline),
            Err(e) => Err(e),
        }
    }

    /// The claim is held but nothing answers: a daemon starting (it answers
    /// soon), or one stopping (it closed its listener and lets the claim go
    /// once its last work is done), or one just killed (the kernel releases
    /// its flock a moment after). Connects with backoff until `deadline`,
    /// looking at the claim between tries: once nobody holds it, nobody is
    /// going to answer, and a new daemon is spawned (still under the spawn
    /// lock, so other clients wait for this one).
    fn wait_for_holder(
        &self,
        command: &mut Command,
        deadline: Instant,
        mut pid: Option<u32>,
    ) -> Result<Connection> {
        let mut nap = Duration::from_millis(1);
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket_path) {
                return Ok(found(stream));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error("daemon start", pid));
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(MAX_BACKOFF);
            match running_pid(&self.pid_path) {
                Ok(Some(holder)) => pid = Some(holder),
                Err(LifecycleError::HolderUnknown { .. }) => pid = None,
                Ok(None) => {
                    // It may have answered just before letting go.
                    if let Ok(stream) = UnixStream::connect(&self.socket_path) {
                        return Ok(found(stream));
                    }
                    return self.spawn_and_wait(command, deadline);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the exclusive flock on `<socket path>.lock`, polling without
    /// blocking until `deadline` (a blocking `flock(2)` cannot time out).
    fn spawn_lock(&self, deadline: Instant) -> Result<File> {
        let mut path = self.socket_path.clone().into_os_string();
        path.push(".lock");
        let path = PathBuf::from(path);
        ensure_dir(parent_dir(&path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| io_at("open spawn lock", &path, e))?;
        let mut nap = Duration::from_millis(1);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(io_at("lock spawn lock", &path, e))
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error("spawn lock", None));
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(MAX_BACKOFF);
        }
    }

    fn spawn_and_wait(&self, command: &mut Command, deadline: Instant) -> Result<Connection> {
        let (read, write) = crate::sys::cloexec_pipe()
            .map_err(|e| io_at("create readiness pipe for", &self.socket_path, e.into()))?;
        let ino = nix::sys::stat::fstat(write.as_fd())
            .map_err(|e| io_at("examine readiness pipe for", &self.socket_path, e.into()))?
            .st_ino;
        let write_fd = write.as_raw_fd();
        command
            .env(READY_FD_ENV, format!("{write_fd}:{ino}"))
            .stdin(Stdio::null());
        let log_start = match &self.log_file {
            Some(path) => {
                let (log, start) = crate::daemonize::open_log(path)?;
                let err = log
                    .try_clone()
                    .map_err(|e| io_at("open log file", path, e))?;
                command.stdout(log).stderr(err);
                start
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
                0
            }
        };
        // SAFETY: the hook calls only async-signal-safe functions (setsid,
        // the close_range syscall, fcntl) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                crate::sys::cloexec_from(3);
                // The one descriptor the daemon is meant to get.
                if libc::fcntl(write_fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| io_at("spawn the daemon for", &self.socket_path, e))?;
        // Only the daemon holds the write end now: EOF means it is gone or
        // gave the pipe up.
        drop(write);
        let pid = child.id();
        let spawned = |stream| Connection {
            stream,
            started: Started::Spawned { pid },
        };
        let mut pipe = LineReader::new(File::from(read));
        let mut nap = Duration::from_millis(1);
        let mut exited: Option<ExitStatus> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error("daemon start", Some(pid)));
            }
            let slice = nap.min(left);
            match pipe.next(slice)? {
                Polled::Line(text) => {
                    return match parse_report(&text) {
                        Report::Ready => self.wait_connect(deadline, Some(pid)).map(spawned),
                        Report::AlreadyRunning => self.wait_connect(deadline, None).map(found),
                        Report::Failed(reason) => Err(LifecycleError::StartFailed {
                            socket: self.socket_path.clone(),
                            pid,
                            reason,
                        }),
                    };
                }
                Polled::Eof => {
                    // Every holder of the write end is gone.
                    let status = match exited {
                        Some(s) => Some(s),
                        None => wait_briefly(&mut child),
                    };
                    return match status {
                        Some(status) => Err(self.exited_error(pid, status, log_start)),
                        // Alive but closed the pipe: it never reports;
                        // fall back to connecting.
                        None => self.wait_connect(deadline, Some(pid)).map(spawned),
                    };
                }
                Polled::Nothing => {}
            }
            if let Ok(stream) = UnixStream::connect(&self.socket_path) {
                return Ok(spawned(stream));
            }
            if exited.is_none() {
                if let Ok(Some(status)) = child.try_wait() {
                    if !status.success() {
                        return Err(self.exited_error(pid, status, log_start));
                    }
                    // Exit 0 with the pipe still open elsewhere: a
                    // double-forking daemon; its grandchild reports.
                    exited = Some(status);
                }
            }
            nap = (nap * 2).min(MAX_BACKOFF);
        }
    }

    /// Connects with backoff until `deadline`.
    fn wait_connect(&self, deadline: Instant, pid: Option<u32>) -> Result<UnixStream> {
        let mut nap = Duration::from_millis(1);
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket_path) {
                return Ok(stream);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error("daemon start", pid));
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(MAX_BACKOFF);
        }
    }

    fn timeout_error(&self, what: &'static str, pid: Option<u32>) -> LifecycleError {
        LifecycleError::Timeout {
            what,
            path: self.socket_path.clone(),
            pid,
            waited: self.timeout,
        }
    }

    fn exited_error(&self, pid: u32, status: ExitStatus, log_start: u64) -> LifecycleError {
        LifecycleError::DaemonExited {
            socket: self.socket_path.clone(),
            pid,
            status: describe(status),
            output: self
                .log_file
                .as_deref()
                .map(|p| log_tail(p, log_start))
                .unwrap_or_default(),
        }
    }
}

fn found(stream: UnixStream) -> Connection {
    Connection {
        stream,
        started: Started::Found,
    }
}

/// Reaps `child` if it exits within a moment (the pipe's EOF comes just
/// before the exit is visible).
fn wait_briefly(child: &mut Child) -> Option<ExitStatus> {
    for _ in 0..200 {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// "exited with status 1", "was killed by signal 11 (SIGSEGV)".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {sig} ({s})"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        _ => format!("ended ({status})"),
    }
}

/// The end of what was appended to the log at `path` after `start`.
pub(crate) fn log_tail(path: &Path, start: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = start.max(len.saturating_sub(OUTPUT_TAIL));
    let mut text = String::new();
    if f.seek(SeekFrom::Start(from)).is_ok() {
        let mut bytes = Vec::new();
        let _ = f.take(OUTPUT_TAIL).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

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
/// Elsewhere, and where `pidfd_open` is missing or refused (old kernels,
/// seccomp sandboxes), `kill(2)` follows the check, with the usual tiny
/// window.
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
    match holder(pid_path)? {
        Some(process) => {
            let sent = process
                .signal(signal)
                .map_err(|e| io_at("signal the daemon holding", pid_path, e))?;
            Ok(sent.then_some(process.pid()))
        }
        None => Ok(None),
    }
}

/// The live process holding the claim on `pid_path`, pinned (a pidfd on
/// Linux) *before* it is checked once more to be the holder, so whatever is
/// done to it reaches the process that was checked.
fn holder(pid_path: &Path) -> Result<Option<Process>> {
    // A restart between the look and the pin changes the holder: look again.
    for _ in 0..4 {
        let Some(pid) = running_pid(pid_path)? else {
            return Ok(None);
        };
        let Some(process) =
            Process::open(pid).map_err(|e| io_at("open the process holding", pid_path, e))?
        else {
            continue; // exited meanwhile
        };
        if running_pid(pid_path)? == Some(pid) {
            return Ok(Some(process));
        }
    }
    Ok(None)
}

/// Waits up to `timeout` for the daemon holding the claim on `pid_path` to
/// exit, without signalling it: for a client that asked it to stop in its
/// own protocol (a `stop` command on the socket). The process is pinned as
/// in [`stop`], so a daemon restarted meanwhile is not waited for.
///
/// # Errors
/// - [`LifecycleError::Timeout`] when it still runs after `timeout`.
/// - As [`stop`]: [`LifecycleError::HolderUnknown`], and the errors of
///   [`running_pid`].
pub fn wait_for_exit(pid_path: &Path, timeout: Duration) -> Result<Stopped> {
    let Some(process) = holder(pid_path)? else {
        return Ok(Stopped::NotRunning);
    };
    if process.wait_exit(timeout) {
        return Ok(Stopped::Stopped { pid: process.pid() });
    }
    Err(LifecycleError::Timeout {
        what: "daemon exit",
        path: pid_path.to_path_buf(),
        pid: Some(process.pid()),
        waited: timeout,
    })
}

/// How [`stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Nothing held the claim: nothing was signalled.
    NotRunning,
    /// The daemon exited after SIGTERM.
    Stopped {
        /// Its PID.
        pid: u32,
    },
    /// It outlived the graceful deadline and was killed with SIGKILL.
    Killed {
        /// Its PID.
        pid: u32,
    },
}

/// Stops the daemon holding the claim on `pid_path`: SIGTERM, a wait of up
/// to `graceful` for it to exit, then SIGKILL and a wait of up to `kill`.
///
/// Only the process that holds the claim is signalled, never the number a
/// PID file holds: on Linux through a pidfd opened before the identity
/// check (`pidfd_open(2)`, `pidfd_send_signal(2)`), so neither a recycled PID
/// nor a daemon restarted meanwhile (a new holder) can be hit, SIGKILL
/// included; the wait is a `poll(2)` on the same pidfd. Where pidfds are
/// missing or refused, `kill(2)` follows the check and the wait polls
/// `kill(pid, 0)`.
///
/// ```
/// use historia_lifecycle::{stop, Stopped};
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let pid = dir.path().join("d.pid");
/// assert_eq!(stop(&pid, Duration::from_secs(5), Duration::from_secs(1))?, Stopped::NotRunning);
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
///
/// # Errors
/// - [`LifecycleError::HolderUnknown`] when the claim is held but its holder
///   cannot be named (a forked child keeps the lock, another PID
///   namespace); nothing is signalled.
/// - [`LifecycleError::Io`] with kind `PermissionDenied` when the daemon is
///   alive but not ours to signal (`EPERM`): never reported as stopped.
/// - [`LifecycleError::Timeout`] when it survived SIGKILL for `kill`.
/// - As [`running_pid`]: [`LifecycleError::PidFile`],
///   [`LifecycleError::UnexpectedFileType`], [`LifecycleError::Io`].
pub fn stop(pid_path: &Path, graceful: Duration, kill: Duration) -> Result<Stopped> {
    let Some(process) = holder(pid_path)? else {
        return Ok(Stopped::NotRunning);
    };
    let pid = process.pid();
    let send = |sig| {
        process
            .signal(sig)
            .map_err(|e| io_at("signal the daemon holding", pid_path, e))
    };
    if !send(libc::SIGTERM)? || process.wait_exit(graceful) {
        return Ok(Stopped::Stopped { pid });
    }
    if !send(libc::SIGKILL)? || process.wait_exit(kill) {
        return Ok(Stopped::Killed { pid });
    }
    Err(LifecycleError::Timeout {
        what: "daemon stop",
        path: pid_path.to_path_buf(),
        pid: Some(pid),
        waited: graceful + kill,
    })
}
