//! Daemonizing with the claim held: daemon(7)'s SysV steps around a guard
//! that was acquired first, and the original process waiting for the
//! daemon's readiness report.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::FdFlag;
use nix::libc;
use nix::unistd::{fork, ForkResult};

use crate::error::{errno_at, io_at, LifecycleError, Result};
use crate::pid_guard::PidFileGuard;
use crate::readiness::{parse_report, LineReader, Polled, ReadyPipe, Report};

/// The `umask(2)` a daemon gets unless told otherwise: systemd's default
/// `UMask=` for services (files 0644, directories 0755 from the usual 0666
/// and 0777 requests).
pub const DEFAULT_UMASK: u32 = 0o022;
/// How long the original process waits for the daemon's readiness report
/// unless told otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The exit status of the original process when the daemon could not start,
/// did not report in time, or ended before it was ready.
pub const EXIT_START_FAILED: i32 = 1;

/// How to become a daemon: the options of
/// [`PidFileGuardBuilder::daemonize`](crate::PidFileGuardBuilder::daemonize)
/// and [`DaemonGuardBuilder::daemonize`](crate::DaemonGuardBuilder::daemonize).
///
/// # When to daemonize
/// Under a service manager, don't: systemd (`Type=notify` or
/// `Type=simple`), runit, s6, launchd and `start-stop-daemon --background`
/// start the program in the background themselves, with a clean
/// environment, and track it by its PID; a daemon that forks away only
/// makes them guess (systemd's `Type=forking` and `PIDFile=` exist for such
/// programs). Run in the foreground there, and call `ready()`.
///
/// Daemonize when the program is started by hand or from a script and must
/// detach from it, or under a supervisor that expects a forking daemon
/// (`Type=forking`, `start-stop-daemon --start` without `--background`,
/// SysV init scripts). That is what this does, as daemon(7)'s "SysV
/// daemons" section asks, with the claim taken *before* anything forks (as
/// FreeBSD pidfile(3) recommends), so "already running (pid N)" and every
/// start-up error reach the terminal that started it:
///
/// 1. In the original process: refuse if other threads run (Linux); open
///    `/dev/null` and the [log file](Self::log_file); take the claim (and,
///    for a [`DaemonGuard`](crate::DaemonGuard), bind the socket). Any
///    error here returns to the caller, nothing forked.
/// 2. `fork(2)`; the child calls `setsid(2)` (a new session, no controlling
///    terminal) and forks again, so the daemon is not a session leader and
///    can never acquire a terminal; that middle child exits at once.
/// 3. The daemon: `chdir("/")` (so it keeps no file system busy; the
///    guard's paths were made absolute at acquire), [`umask`](Self::umask),
///    stdin from `/dev/null`, stdout and stderr to the log file or
///    `/dev/null`, and every descriptor above 2 that is not close-on-exec
///    closed unless [kept](Self::keep_fd): those were inherited through
///    `exec` from whoever started the program (a shell's `3>file`, a pipe)
///    and belong to nothing in this process. Descriptors the program opened
///    itself through std are close-on-exec, owned by Rust values, and stay
///    (no program the daemon executes inherits them).
/// 4. The daemon takes the claim over
///    ([`PidFileGuard::take_over_after_fork`]): the PID file names it, and
///    its signal handling starts. The builder's `daemonize` returns the
///    guard, in the daemon only.
/// 5. The original process waits until the daemon calls `ready()` and
///    exits with status 0; by then the PID file names the daemon, which is
///    what `Type=forking` and `start-stop-daemon --start` read once it
///    exits. If the daemon reports a failure
///    ([`PidFileGuard::start_failed`], or a failed step above), ends before
///    it was ready, or stays silent for [`timeout`](Self::timeout), the
///    original process prints why to its stderr (`<program>: <reason>`)
///    and exits with [`EXIT_START_FAILED`].
///
/// ```no_run
/// // no_run: the original process exits inside `daemonize`, and the daemon
/// // serves until it is stopped.
/// use historia_lifecycle::{running_pid, Daemonize, DaemonGuard, LifecycleError};
/// let guard = match DaemonGuard::builder("/run/app/app.sock", "/run/app/app.pid")
///     .daemonize(&Daemonize::new().log_file("/var/log/app.log"))
/// {
///     Ok(guard) => guard, // in the daemon
///     Err(LifecycleError::AlreadyRunning) => {
///         let pid = running_pid("/run/app/app.pid".as_ref()).ok().flatten();
///         eprintln!("app: already running (pid {pid:?})");
///         std::process::exit(3);
///     }
///     Err(e) => {
///         eprintln!("app: {e}");
///         std::process::exit(1);
///     }
/// };
/// // ... start serving on guard.listener() ...
/// guard.ready()?; // now the original process exits 0
/// # Ok::<(), LifecycleError>(())
/// ```
///
/// # Threads
/// `fork(2)` copies only the calling thread; a lock another thread held at
/// that moment (the allocator's, stdout's, an async runtime's) stays locked
/// forever in the child. So daemonize first thing in `main`, before any
/// thread starts: before building a tokio runtime (use
/// `#[tokio::main]`'s body only after daemonizing, or build the runtime by
/// hand afterwards), before a logger's thread. On Linux the call counts
/// `/proc/self/task` and refuses with
/// [`LifecycleError::InvalidArgument`] when any thread but the caller runs
/// (this crate's own idle `historia-signal` thread, left by an earlier
/// guard, excepted); elsewhere this is up to you. The guard's own signal
/// thread starts in the daemon, after the forks.
#[derive(Debug, Clone)]
#[must_use = "pass it to a builder's .daemonize()"]
pub struct Daemonize {
    umask: u32,
    log_file: Option<PathBuf>,
    timeout: Duration,
    keep_fds: Vec<RawFd>,
}

impl Default for Daemonize {
    fn default() -> Self {
        Daemonize {
            umask: DEFAULT_UMASK,
            log_file: None,
            timeout: DEFAULT_START_TIMEOUT,
            keep_fds: Vec::new(),
        }
    }
}

impl Daemonize {
    /// The defaults: umask [`DEFAULT_UMASK`], stdout and stderr to
    /// `/dev/null`, [`DEFAULT_START_TIMEOUT`], no descriptors kept.
    pub fn new() -> Self {
        Self::default()
    }

    /// The daemon's `umask(2)`; default [`DEFAULT_UMASK`] (0022). daemon(7)
    /// suggests 0, so that the modes passed to `open(2)` and `mkdir(2)`
    /// decide alone. The guard's own files get their modes exactly either
    /// way.
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = mask & 0o777;
        self
    }

    /// Appends the daemon's stdout and stderr to the file at `path` instead
    /// of discarding them (created mode 0600 if missing, never through a
    /// symlink). It is opened before the claim is taken, so an error
    /// reaches the caller; the end of what the daemon wrote there is quoted
    /// when it exits before it was ready.
    pub fn log_file(mut self, path: impl AsRef<Path>) -> Self {
        self.log_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// How long the original process waits for the daemon's report;
    /// default [`DEFAULT_START_TIMEOUT`] (30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Keeps descriptor `fd` (above 2) open in the daemon although it is not
    /// close-on-exec: a descriptor passed on purpose by whoever started the
    /// program. It must be open when daemonizing.
    pub fn keep_fd(mut self, fd: RawFd) -> Self {
        self.keep_fds.push(fd);
        self
    }
}

/// The engine behind both builders' `daemonize`: `acquire` takes the claim
/// (with the signal handling deferred, so no thread runs while forking),
/// `inner` reaches the claim-holding guard inside what it returns, and
/// `about` is the path the original process's messages name.
pub(crate) fn daemonize<G>(
    options: &Daemonize,
    about: &Path,
    acquire: impl FnOnce() -> Result<G>,
    inner: impl Fn(&mut G) -> &mut PidFileGuard,
) -> Result<G> {
    for &fd in &options.keep_fds {
        if fd <= 2 || crate::sys::fd_flags(fd).is_none() {
            return Err(LifecycleError::InvalidArgument {
                what: "daemonize",
                reason: format!(
                    "keep_fd({fd}): {}",
                    if fd <= 2 {
                        "0, 1 and 2 are always redirected"
                    } else {
                        "not an open descriptor"
                    }
                ),
            });
        }
    }
    refuse_other_threads()?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| io_at("open", Path::new("/dev/null"), e))?;
    let log = match &options.log_file {
        Some(path) => Some(open_log(path)?),
        None => None,
    };
    let mut guard = acquire()?;
    let (read, write) = crate::sys::cloexec_pipe()
        .map_err(|e| io_at("create readiness pipe for", about, e.into()))?;
    // Whatever sits in std's buffers would otherwise be written twice.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: no thread but ours runs (checked above on Linux, documented
    // elsewhere, and the guard's signal thread is not started yet), so the
    // child is an ordinary single-threaded copy of this process.
    match unsafe { fork() } {
        // The guard drops with the error: we still own the files, and they go.
        Err(e) => Err(errno_at("fork(2) to daemonize for", about, e)),
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            // From here the files are the daemon's: this process must not
            // remove them, whatever happens to it (a Ctrl-C while it waits).
            inner(&mut guard).leave_to_child();
            // The middle child exits at once; reap it.
            let _ = nix::sys::wait::waitpid(child, None);
            let log_start = log.as_ref().map_or(0, |(_, start)| *start);
            let outcome = wait_for_report(options, about, read, child.as_raw() as u32, log_start);
            let code = match outcome {
                Ok(()) => 0,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "{}: {e}", program_name());
                    EXIT_START_FAILED
                }
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Child) => {
            drop(read);
            let pipe = ReadyPipe::from_fd(write);
            if let Err(e) = nix::unistd::setsid() {
                abandon(inner(&mut guard), pipe, errno_at("setsid(2) for", about, e));
            }
            // SAFETY: still single-threaded, as above.
            match unsafe { fork() } {
                Err(e) => abandon(
                    inner(&mut guard),
                    pipe,
                    errno_at("fork(2) to daemonize for", about, e),
                ),
                // The middle child: done. `_exit`, so nothing of the
                // original's (buffers, atexit handlers) runs twice.
                // SAFETY: _exit(2) ends the process at once.
                Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
                Ok(ForkResult::Child) => {}
            }
            // The daemon. Its first line names it, for the original's
            // messages.
            pipe.note(&format!("pid {}", std::process::id()));
            let detached = detach(options, &null, log.as_ref().map(|(f, _)| f));
            drop((null, log));
            if let Err(e) = detached.map_err(|e| io_at("detach the daemon for", about, e)) {
                abandon(inner(&mut guard), pipe, e);
            }
            if let Err(e) = inner(&mut guard).take_over_after_fork() {
                abandon(inner(&mut guard), pipe, e);
            }
            inner(&mut guard).add_ready_pipe(pipe);
            Ok(guard)
        }
    }
}

/// daemon(7)'s steps in the daemon itself: `chdir("/")`, the umask, the
/// standard descriptors, and no inherited descriptors but those kept.
fn detach(options: &Daemonize, null: &File, log: Option<&File>) -> std::io::Result<()> {
    nix::unistd::chdir("/")?;
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        options.umask as libc::mode_t,
    ));
    let out = log.unwrap_or(null);
    nix::unistd::dup2_stdin(null)?;
    nix::unistd::dup2_stdout(out)?;
    nix::unistd::dup2_stderr(out)?;
    for fd in crate::sys::open_fds() {
        let inherited = crate::sys::fd_flags(fd).is_some_and(|f| !f.contains(FdFlag::FD_CLOEXEC));
        if fd > 2 && inherited && !options.keep_fds.contains(&fd) {
            // SAFETY: a descriptor without FD_CLOEXEC was not opened by std
            // (which sets it on every descriptor it makes), so no Rust value
            // owns it and none will close it again; it came through exec.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// In a forked process that still shares the claim: removes the files
/// (still the claim's), tells the original process why, and exits.
fn abandon(guard: &mut PidFileGuard, pipe: ReadyPipe, e: LifecycleError) -> ! {
    guard.abandon_start();
    pipe.note(&format!("pid {}", std::process::id()));
    pipe.failed(&e);
    // SAFETY: _exit(2) ends the process at once; the original's buffers and
    // handlers are not ours to run.
    unsafe { libc::_exit(EXIT_START_FAILED) }
}

/// The original process's wait: `Ok` once the daemon said `ready`, else
/// what to print.
fn wait_for_report(
    options: &Daemonize,
    about: &Path,
    read: OwnedFd,
    first_child: u32,
    log_start: u64,
) -> Result<()> {
    let deadline = Instant::now() + options.timeout;
    let mut reader = LineReader::new(File::from(read));
    let mut daemon = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LifecycleError::Timeout {
                what: "daemon start",
                path: about.to_path_buf(),
                pid: daemon,
                waited: options.timeout,
            });
        }
        match reader.next(left)? {
            Polled::Line(line) => {
                if let Some(pid) = line.strip_prefix("pid ") {
                    daemon = pid.parse().ok();
                    continue;
                }
                let reason = match parse_report(&line) {
                    Report::Ready => return Ok(()),
                    // Cannot happen (the claim is ours), but say it as is.
                    Report::AlreadyRunning => line,
                    Report::Failed(reason) => reason,
                };
                return Err(LifecycleError::StartFailed {
                    socket: about.to_path_buf(),
                    pid: daemon.unwrap_or(first_child),
                    reason,
                });
            }
            Polled::Eof => {
                return Err(LifecycleError::DaemonExited {
                    socket: about.to_path_buf(),
                    pid: daemon.unwrap_or(first_child),
                    status: "exited".into(),
                    output: options
                        .log_file
                        .as_deref()
                        .map(|p| crate::client::log_tail(p, log_start))
                        .unwrap_or_default(),
                })
            }
            Polled::Nothing => {}
        }
    }
}

/// The log file, opened for appending (0600 if created, never through a
/// symlink, close-on-exec), and its length now; also the client's
/// [`Launcher::log_file`](crate::Launcher::log_file).
pub(crate) fn open_log(path: &Path) -> Result<(File, u64)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| io_at("open log file", path, e))?;
    let start = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((file, start))
}

/// Refuses to fork while other threads run, where the platform can tell.
fn refuse_other_threads() -> Result<()> {
    let Some(names) = crate::sys::other_threads() else {
        return Ok(());
    };
    // The crate's own signal thread (an earlier guard's) sleeps in read(2)
    // and holds nothing; a forked daemon starts its own.
    let others: Vec<String> = names
        .into_iter()
        .filter(|n| n != "historia-signal")
        .collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(LifecycleError::InvalidArgument {
        what: "daemonize",
        reason: format!(
            "{} other thread(s) run in this process ({}); fork(2) copies only the \
             calling thread, so daemonize before starting any (an async runtime, a logger)",
            others.len(),
            others.join(", ")
        ),
    })
}

/// The program's name for messages, as err(3) prints it: the file name of
/// `argv[0]`.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "daemon".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_keep_what_they_are_given() {
        let d = Daemonize::new()
            .umask(0o1027)
            .log_file("/var/log/x.log")
            .timeout(Duration::from_secs(3))
            .keep_fd(7);
        assert_eq!(d.umask, 0o027);
        assert_eq!(d.log_file.as_deref(), Some(Path::new("/var/log/x.log")));
        assert_eq!(d.timeout, Duration::from_secs(3));
        assert_eq!(d.keep_fds, [7]);
        let d = Daemonize::default();
        assert_eq!((d.umask, d.timeout), (DEFAULT_UMASK, DEFAULT_START_TIMEOUT));
    }

    #[test]
    fn a_closed_or_standard_keep_fd_is_refused_before_anything_happens() {
        // Not a number just closed: another test's thread may open a file
        // and get it back before `daemonize` looks (CI saw that). No process
        // can have this one open: Linux caps descriptors at fs.nr_open (2^20
        // by default) and the BSDs and macOS far below i32::MAX too.
        let closed = RawFd::MAX;
        assert!(crate::sys::fd_flags(closed).is_none());
        for fd in [closed, 1] {
            let reason = refusal_before_acquiring(&Daemonize::new().keep_fd(fd));
            assert!(reason.starts_with(&format!("keep_fd({fd})")), "{reason}");
        }
    }

    /// Runs `daemonize` with `options` and an acquire that must never run;
    /// returns the `InvalidArgument` reason it refused with.
    fn refusal_before_acquiring(options: &Daemonize) -> String {
        let acquired = std::cell::Cell::new(false);
        let e = daemonize(
            options,
            Path::new("/x"),
            || -> Result<PidFileGuard> {
                acquired.set(true);
                Err(LifecycleError::AlreadyRunning)
            },
            |g| g,
        )
        .unwrap_err();
        assert!(!acquired.get(), "the claim was attempted");
        match e {
            LifecycleError::InvalidArgument { reason, .. } => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn other_threads_are_refused_before_the_claim_is_taken() {
        // libtest runs this test on a thread of its own beside main.
        let reason = refusal_before_acquiring(&Daemonize::new());
        assert!(reason.contains("thread"), "{reason}");
    }
}
