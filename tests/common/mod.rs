//! Child processes for multi-process tests, each watched by a watchdog, and
//! the file and `/proc` helpers those tests assert with.
//!
//! Anything about processes, races, signals or crashes must run in real
//! processes, not threads: a flock, a signal disposition, a umask or a
//! `fork(2)` is per process. These helpers re-run the current test binary as
//! a child that plays one *role*, and let the parent talk to it over
//! stdin/stdout. This is the one way the tests start children of their own
//! (only `e2e` also runs the example programs, which speak no protocol).
//!
//! # Parent side
//! ```ignore
//! let p = paths();                          // tempdir with daemon.sock/.pid
//! let mut child = p.child("hold")           // role "hold", paths in its env
//!     .env("HISTORIA_TEST_MODE", "660")
//!     .spawn();
//! let line = child.expect_line();           // e.g. "READY 1234 false false"
//! child.send_line("drop");                  // its stdin
//! child.stop();                             // end of file on stdin, exit 0
//! ```
//! A child that only checks something and ends is run with
//! [`ChildSpec::run`], which returns what it reported; [`ChildSpec::user`]
//! runs it as another user (root bypasses permissions, so the permission
//! tests use [`NOBODY`]).
//!
//! # Child side
//! Each test file has one dispatcher test, named [`ENTRY`], that does nothing
//! unless the marker variable [`CHILD_ENV`] is set:
//! ```ignore
//! #[test]
//! fn child_process_entry() {
//!     common::child_main(|role| match role {
//!         "hold" => common::role_hold(),
//!         other => panic!("unknown role {other}"),
//!     });
//! }
//! ```
//! The child is run as `<test binary> --exact child_process_entry
//! --nocapture --test-threads=1`, so only that test runs and its stdout goes
//! straight to the pipe.
//!
//! # Protocol
//! - A child tells its parent things with [`report`]: one line each.
//!   libtest writes its own chatter to stdout ("running 1 test", "test x ... "
//!   without a newline), so each message starts with [`MARKER`] on a line of
//!   its own and the parent keeps only such lines. Everything else the child
//!   writes (libtest output, stderr with panic messages) is kept and shown
//!   when a parent-side expectation fails.
//! - A child that is ready (listening, holding a guard, ...) reports so; the
//!   parent waits for that line ([`ChildProc::expect_line`]).
//! - A child that must stay alive until the parent is done blocks in
//!   [`wait_for_stdin_eof`]; the parent releases it by closing its stdin
//!   ([`ChildProc::close_stdin`], [`ChildProc::stop`]).
//! - When the role returns, [`child_main`] reports [`DONE`]. The parent's
//!   [`ChildProc::finish`] requires it, so a child that ran no test at all (a
//!   misspelt dispatcher name also exits 0) cannot pass for one whose checks
//!   all held.
//!
//! # Watchdog
//! Every child gets a deadline (default [`DEFAULT_DEADLINE`]). A watchdog
//! thread kills it with SIGKILL when the deadline passes, and every blocking
//! call here ([`ChildProc::expect_line`], [`ChildProc::wait`]) gives up at the
//! deadline with a panic that shows the child's output. Dropping a
//! [`ChildProc`] (also while a failing test unwinds) kills and reaps the child,
//! so no test leaves processes behind. The child is only ever reaped while a
//! lock is held, so signals are never sent to a recycled PID.
//!
//! Children are also started with `PR_SET_PDEATHSIG` = SIGKILL: the kernel
//! kills them when the thread that spawned them ends, even if the whole test
//! binary crashes. Spawn them from the test's own thread, which lives as long
//! as the test. (Grandchildren a role spawns are not covered.)

// Every test binary compiles its own copy of this module and uses a
// different part of it (e2e only the paths, probe no guard roles, ...);
// marking each item for the binaries that skip it would be noise.
#![allow(dead_code)]

pub mod examples;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use historia_lifecycle::{DaemonGuard, DaemonGuardBuilder, FileKind, LifecycleError, SignalMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The marker environment variable: set to the role a child plays.
pub const CHILD_ENV: &str = "HISTORIA_CHILD";
/// The name of the dispatcher test in every test file that has child roles.
pub const ENTRY: &str = "child_process_entry";
/// Prefix of every line a child reports to its parent.
pub const MARKER: &str = "@@historia-child@@ ";
/// The last report line of a child whose role returned.
pub const DONE: &str = "DONE";
/// How long a child may live before the watchdog kills it.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);
/// uid and gid of the unprivileged user ("nobody") permission tests run as.
pub const NOBODY: u32 = 65534;
/// The socket path a [`Paths::child`] gets.
pub const SOCK_ENV: &str = "HISTORIA_TEST_SOCK";
/// The PID file path a [`Paths::child`] gets.
pub const PID_ENV: &str = "HISTORIA_TEST_PID";
/// Optional, for [`role_hold`]: socket mode in octal, e.g. "660".
pub const MODE_ENV: &str = "HISTORIA_TEST_MODE";
/// Optional, for [`role_hold`]: umask in octal, set before acquiring.
pub const UMASK_ENV: &str = "HISTORIA_TEST_UMASK";

// ---------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------

/// The role this process plays, if it was started as a child.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Body of the dispatcher test: runs `dispatch(role)` when this process is a
/// child, then reports [`DONE`]; does nothing in a normal test run.
pub fn child_main(dispatch: impl FnOnce(&str)) {
    if let Some(role) = child_role() {
        dispatch(&role);
        report(DONE);
    }
}

/// Sends one message line to the parent (flushed at once, so the parent sees
/// it before the child blocks or dies).
pub fn report(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = out.flush();
    // One write(2) (atomic on a pipe up to PIPE_BUF): forked children share
    // the pipe with a harness that writes its summary in unterminated
    // pieces ("test result: ", "ok", …). The leading newline ends whatever
    // piece came before; written separately, a piece could land between it
    // and the marker and hide the line.
    let line = format!("\n{MARKER}{}\n", msg.as_ref());
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        match nix::unistd::write(&out, rest) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
}

/// Reads an environment variable the parent must have set.
pub fn env_required(key: &str) -> OsString {
    std::env::var_os(key).unwrap_or_else(|| panic!("child needs ${key}"))
}

/// Reads a path from an environment variable the parent must have set.
pub fn env_path(key: &str) -> PathBuf {
    PathBuf::from(env_required(key))
}

/// Reads an optional octal number (a mode, a umask) from the environment.
pub fn env_octal(key: &str) -> Option<u32> {
    let v = std::env::var(key).ok()?;
    Some(u32::from_str_radix(&v, 8).unwrap_or_else(|_| panic!("${key}={v:?} is not octal")))
}

/// The socket and PID file paths a [`Paths::child`] was given.
pub fn child_paths() -> (PathBuf, PathBuf) {
    (env_path(SOCK_ENV), env_path(PID_ENV))
}

/// Reads one line from stdin without its newline; `None` at end of file.
/// The parent uses this to pace a child; closing stdin releases it.
pub fn read_stdin_line() -> Option<String> {
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches('\n').to_string()),
    }
}

/// Blocks until stdin reaches end of file (the parent closed it or died).
/// Bounded by the parent's watchdog, which kills this process at its deadline.
pub fn wait_for_stdin_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
}

/// A bare daemon: a plain listener at `path` (no guard, no PID file, no
/// lock) that never accepts. Reports `LISTENING`, then holds the listener
/// until end of file on stdin.
pub fn serve_bare_listener(path: &Path) {
    let listener = UnixListener::bind(path)
        .unwrap_or_else(|e| panic!("bind a bare listener at {}: {e}", path.display()));
    report("LISTENING");
    wait_for_stdin_eof();
    drop(listener);
}

/// The line a child reports once it holds a guard: "READY <pid> <reclaimed
/// stale socket> <reclaimed stale PID file>"; see [`parse_ready`].
pub fn ready_line(g: &DaemonGuard) -> String {
    format!(
        "READY {} {} {}",
        g.pid(),
        g.reclaimed_stale_socket(),
        g.reclaimed_stale_pid_file()
    )
}

/// Reports the outcome of a failed acquire in a form the parent can count.
pub fn refusal_line(e: &LifecycleError) -> String {
    if matches!(e, LifecycleError::AlreadyRunning) {
        "REFUSED AlreadyRunning".into()
    } else {
        format!("ERROR {e:?}")
    }
}

/// A builder for [`child_paths`], with the socket mode from [`MODE_ENV`] if
/// set, and the default signal handling.
pub fn builder_from_env() -> DaemonGuardBuilder {
    let (sock, pid) = child_paths();
    let mut b = DaemonGuard::builder(sock, pid);
    if let Some(mode) = env_octal(MODE_ENV) {
        b = b.socket_mode(mode);
    }
    b
}

/// The `hold` role: acquires (mode and umask from the environment) and
/// reports [`ready_line`] or [`refusal_line`]; then obeys stdin: `drop`,
/// `close`, or end of file (return, dropping a guard still held).
pub fn role_hold() {
    if let Some(mask) = env_octal(UMASK_ENV) {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    let mut guard = match builder_from_env().acquire() {
        Ok(g) => {
            report(ready_line(&g));
            Some(g)
        }
        Err(e) => {
            report(refusal_line(&e));
            return;
        }
    };
    while let Some(cmd) = read_stdin_line() {
        match cmd.as_str() {
            "drop" => {
                drop(guard.take().expect("a guard to drop"));
                report("DROPPED");
            }
            "close" => {
                let r = guard.take().expect("a guard to close").close();
                report(format!("CLOSED {r:?}"));
            }
            other => panic!("unknown command {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// How to start a child: the role, its environment, user and stdin.
#[must_use = "call .spawn() or .run() to start the child"]
pub struct ChildSpec {
    role: String,
    /// `None` removes the variable.
    envs: Vec<(OsString, Option<OsString>)>,
    user: Option<u32>,
    stdin: Option<Stdio>,
    deadline: Duration,
    /// A program that runs the child, e.g. `unshare --pid --fork`.
    wrapper: Vec<OsString>,
}

impl ChildSpec {
    /// A child that runs the dispatcher test [`ENTRY`] with role `role`.
    pub fn new(role: &str) -> Self {
        ChildSpec {
            role: role.to_string(),
            envs: Vec::new(),
            user: None,
            stdin: None,
            deadline: DEFAULT_DEADLINE,
            wrapper: Vec::new(),
        }
    }

    /// Runs the child through `wrapper` (a program and its arguments, such
    /// as `unshare --pid --fork --kill-child`), which must end by running
    /// the command line it is given. [`ChildProc::pid`] is then the
    /// wrapper's PID; the watchdog and the parent-death signal reach the
    /// wrapper, so pick one that takes its child down with it.
    pub fn via<S: AsRef<OsStr>>(mut self, wrapper: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = wrapper.into_iter().map(|s| s.as_ref().to_owned()).collect();
        self
    }

    /// Sets an environment variable in the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable the child would inherit.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.envs.push((key.as_ref().to_owned(), None));
        self
    }

    /// Runs the child with this uid and the same gid (no supplementary
    /// groups), from `/` so that user can start it whatever our own working
    /// directory is. Only root can do this; paths the child uses must be
    /// reachable by that user (e.g. tempdirs in /tmp with mode 0755).
    pub fn user(mut self, uid: u32) -> Self {
        self.user = Some(uid);
        self
    }

    /// Gives the child this stdin instead of a pipe the parent writes to
    /// (for example one end of a pipe shared by many children, to release
    /// them all at once by closing the other end).
    pub fn stdin(mut self, stdin: Stdio) -> Self {
        self.stdin = Some(stdin);
        self
    }

    /// How long the child may live before the watchdog kills it.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Starts the child and arms its watchdog.
    ///
    /// # Panics
    /// When the test binary cannot be started.
    pub fn spawn(self) -> ChildProc {
        let exe = std::env::current_exe().expect("path of the test binary");
        let mut cmd = match self.wrapper.split_first() {
            None => Command::new(exe),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(exe);
                c
            }
        };
        cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &self.role)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.envs {
            match value {
                Some(v) => cmd.env(key, v),
                None => cmd.env_remove(key),
            };
        }
        if let Some(id) = self.user {
            // std switches the ids before it runs the pre_exec hook below, so
            // the parent-death signal (which a credential change would clear)
            // is set as the new user.
            cmd.uid(id).gid(id).current_dir("/");
        }
        let piped_stdin = self.stdin.is_none();
        cmd.stdin(self.stdin.unwrap_or_else(Stdio::piped));
        // A child must not outlive its test, even one that crashed or hung
        // past the harness: the kernel SIGKILLs it when the thread that
        // spawned it (the test's thread) ends. So spawn children from the
        // test's own thread, not from a short-lived helper thread.
        // SAFETY: prctl(2) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL);
                Ok(())
            });
        }
        default_signals(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn child role {}: {e}", self.role));
        let pid = child.id();
        let stdin = if piped_stdin {
            child.stdin.take()
        } else {
            None
        };
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");

        let transcript = Arc::new(Mutex::new(String::new()));
        let (line_tx, lines) = mpsc::channel();
        spawn_reader(out, Some(line_tx), Arc::clone(&transcript), "");
        spawn_reader(err, None, Arc::clone(&transcript), "[stderr] ");

        let shared = Arc::new(Watched {
            child: Mutex::new(child),
            fired: AtomicBool::new(false),
        });
        let deadline = Instant::now() + self.deadline;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        {
            let shared = Arc::clone(&shared);
            let timeout = self.deadline;
            thread::Builder::new()
                .name(format!("watchdog-{pid}"))
                .spawn(move || {
                    // Any message or a hang-up means the owner is done.
                    if let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(timeout) {
                        let mut child = lock(&shared.child);
                        if matches!(child.try_wait(), Ok(None)) {
                            shared.fired.store(true, Ordering::SeqCst);
                            let _ = child.kill();
                        }
                    }
                })
                .expect("spawn watchdog thread");
        }
        ChildProc {
            role: self.role,
            pid,
            shared,
            stdin,
            lines,
            transcript,
            deadline,
            _stop_watchdog: stop_tx,
            status: None,
        }
    }

    /// Runs a child that checks something and ends: spawns it with stdin
    /// closed (so it never waits for the parent), then [`ChildProc::finish`].
    /// Returns the lines it reported before [`DONE`].
    pub fn run(self) -> Vec<String> {
        let mut child = self.spawn();
        child.close_stdin();
        child.finish()
    }
}

struct Watched {
    child: Mutex<Child>,
    /// Set when the watchdog killed the child.
    fired: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies a child's output into `transcript`, and sends each report line
/// (marker stripped) down `lines`.
fn spawn_reader(
    stream: impl Read + Send + 'static,
    lines: Option<Sender<String>>,
    transcript: Arc<Mutex<String>>,
    tag: &'static str,
) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            {
                let mut t = lock(&transcript);
                t.push_str(tag);
                t.push_str(&line);
                t.push('\n');
            }
            if let (Some(tx), Some(msg)) = (&lines, line.strip_prefix(MARKER)) {
                let _ = tx.send(msg.to_string());
            }
        }
    });
}

/// A running child playing one role; killed and reaped on drop.
pub struct ChildProc {
    role: String,
    pid: u32,
    shared: Arc<Watched>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Arc<Mutex<String>>,
    deadline: Instant,
    /// Dropping it stops the watchdog.
    _stop_watchdog: Sender<()>,
    status: Option<ExitStatus>,
}

impl ChildProc {
    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the child wrote so far (stdout and stderr), for messages.
    pub fn transcript(&self) -> String {
        lock(&self.transcript).clone()
    }

    fn fail(&self, what: &str) -> ! {
        let fired = if self.shared.fired.load(Ordering::SeqCst) {
            " (the watchdog killed it at its deadline)"
        } else {
            ""
        };
        // Let the readers catch up with what the child wrote before it died.
        thread::sleep(Duration::from_millis(50));
        panic!(
            "child {} (role {:?}): {what}{fired}\n--- child output ---\n{}--- end ---",
            self.pid,
            self.role,
            self.transcript()
        )
    }

    /// The next report line, waiting at most until the deadline.
    ///
    /// # Panics
    /// When the child exits or the deadline passes first.
    pub fn expect_line(&self) -> String {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => self.fail("no report line before the deadline"),
            Err(RecvTimeoutError::Disconnected) => {
                self.fail("exited without the expected report line")
            }
        }
    }

    /// The next report line, which must start with `prefix`; returns the rest
    /// with surrounding spaces trimmed.
    pub fn expect_prefixed(&self, prefix: &str) -> String {
        let line = self.expect_line();
        match line.strip_prefix(prefix) {
            Some(rest) => rest.trim().to_string(),
            None => self.fail(&format!(
                "expected a line starting {prefix:?}, got {line:?}"
            )),
        }
    }

    /// Writes one line to the child's stdin.
    ///
    /// # Panics
    /// When the child was given another stdin, or stdin was closed.
    pub fn send_line(&mut self, line: &str) {
        let result = match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}").and_then(|()| stdin.flush()),
            None => self.fail("has no stdin pipe to write to"),
        };
        if let Err(e) = result {
            self.fail(&format!("cannot write {line:?} to its stdin: {e}"));
        }
    }

    /// Closes the child's stdin: end of file for [`wait_for_stdin_eof`].
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends `signal` to the child, if it has not been reaped yet.
    pub fn signal(&self, signal: Signal) {
        let mut child = lock(&self.shared.child);
        // Only an unreaped child can be signalled: its PID cannot have been
        // recycled, and the lock stops anyone reaping it meanwhile.
        if matches!(child.try_wait(), Ok(None)) {
            kill(Pid::from_raw(self.pid as i32), signal)
                .unwrap_or_else(|e| panic!("kill({}, {signal}): {e}", self.pid));
        }
    }

    /// SIGKILLs the child (if still running) and reaps it.
    pub fn kill_and_wait(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait()
    }

    /// Whether the child has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        self.try_status().is_some()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = lock(&self.shared.child).try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the child to exit, at most until the deadline.
    ///
    /// # Panics
    /// When the deadline passes first (the watchdog kills the child then).
    pub fn wait(&mut self) -> ExitStatus {
        // Polling, not a blocking wait: the watchdog needs the lock to kill.
        let mut nap = Duration::from_micros(200);
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() > self.deadline + Duration::from_secs(2) {
                self.fail("did not exit before the deadline");
            }
            thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    }

    /// Waits for the child and asserts it exited with status 0.
    pub fn wait_success(&mut self) {
        let status = self.wait();
        if !status.success() {
            self.fail(&format!("exited with {status}, expected success"));
        }
    }

    /// Closes the child's stdin and asserts it then exits with status 0: the
    /// normal end of a child blocked in [`wait_for_stdin_eof`].
    pub fn stop(&mut self) {
        self.close_stdin();
        self.wait_success();
    }

    /// Reads the child's remaining report lines up to [`DONE`] and asserts it
    /// exits with status 0; returns the lines before [`DONE`].
    ///
    /// # Panics
    /// When the child ends without reporting [`DONE`] (its role panicked, or
    /// it never ran), fails, or outlives its deadline.
    pub fn finish(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.expect_line();
            if line == DONE {
                break;
            }
            lines.push(line);
        }
        self.wait_success();
        lines
    }

    /// Waits for the child and asserts it was killed by `signal`.
    pub fn wait_signaled(&mut self, signal: Signal) {
        let status = self.wait();
        if status.signal() != Some(signal as i32) {
            self.fail(&format!("exited with {status}, expected death by {signal}"));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let mut child = lock(&self.shared.child);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses [`ready_line`]: "READY <pid> <reclaimed socket> <reclaimed PID
/// file> ..."; checks the PID is the child's and returns the two flags.
pub fn parse_ready(child: &ChildProc) -> (bool, bool) {
    let rest = child.expect_prefixed("READY ");
    let f: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(
        f[0],
        child.pid().to_string(),
        "the guard reports the child's PID: {rest}"
    );
    (f[1] == "true", f[2] == "true")
}

// ---------------------------------------------------------------------------
// A test's socket and PID file
// ---------------------------------------------------------------------------

/// A fresh tempdir with a socket and a PID file path in it, named as the
/// crate's defaults.
pub struct Paths {
    /// Held so the directory lives as long as the test.
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub pid: PathBuf,
}

/// A fresh [`Paths`].
pub fn paths() -> Paths {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("daemon.sock");
    let pid = dir.path().join("daemon.pid");
    Paths { dir, sock, pid }
}

impl Paths {
    /// A child playing `role` with these paths in [`SOCK_ENV`] and
    /// [`PID_ENV`] (read back with [`child_paths`]).
    pub fn child(&self, role: &str) -> ChildSpec {
        ChildSpec::new(role)
            .env(SOCK_ENV, &self.sock)
            .env(PID_ENV, &self.pid)
    }

    /// Acquires in the test process itself, with `SignalMode::Off` so the
    /// harness never gets the crate's signal handlers.
    pub fn acquire_here(&self) -> Result<DaemonGuard, LifecycleError> {
        DaemonGuard::builder(&self.sock, &self.pid)
            .signals(SignalMode::Off)
            .acquire()
    }

    /// Asserts neither the socket nor the PID file exists.
    pub fn assert_gone(&self) {
        assert_absent(&[&self.sock, &self.pid]);
    }

    /// [`tree_snapshot`] of the whole directory.
    pub fn tree(&self) -> BTreeMap<PathBuf, FileSnapshot> {
        tree_snapshot(self.dir.path())
    }
}

// ---------------------------------------------------------------------------
// Process introspection (Linux /proc), usable on either side
// ---------------------------------------------------------------------------

/// The open descriptors of this process, without the one used to list them.
pub fn open_fds() -> BTreeSet<RawFd> {
    let dir = fs::read_dir("/proc/self/fd").expect("read /proc/self/fd");
    let mut fds: BTreeSet<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory handle itself was listed and is closed by now.
    fds.retain(|&fd| fd_flags(fd).is_ok());
    fds
}

/// `fcntl(fd, F_GETFD)`: the descriptor flags, or why there are none.
fn fd_flags(fd: RawFd) -> std::io::Result<i32> {
    // SAFETY: F_GETFD only reads the flags of a descriptor number; a closed
    // one gives EBADF.
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
    if flags < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(flags)
    }
}

/// Whether `fd` has `FD_CLOEXEC` set (`fcntl(2)` `F_GETFD`).
///
/// # Panics
/// When `fd` is not open.
pub fn is_cloexec(fd: RawFd) -> bool {
    let flags = fd_flags(fd).unwrap_or_else(|e| panic!("F_GETFD on fd {fd}: {e}"));
    flags & nix::libc::FD_CLOEXEC != 0
}

/// The names (`comm`) of this process's threads.
pub fn thread_names() -> Vec<String> {
    fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .filter_map(|e| {
            let path = e.ok()?.path().join("comm");
            Some(fs::read_to_string(path).ok()?.trim_end().to_string())
        })
        .collect()
}

/// The crate's signal helper thread as `/proc/<pid>/task/*/comm`, ps and
/// top show it: the kernel keeps 15 bytes of a thread name (TASK_COMM_LEN 16
/// with the NUL), and the crate names it with exactly those 15 bytes.
pub const SIGNAL_THREAD_COMM: &str = "historia-signal";

/// Whether a name from [`thread_names`] is the crate's signal helper thread.
pub fn is_signal_thread(comm: &str) -> bool {
    comm == SIGNAL_THREAD_COMM
}

/// The descriptors of this process that are pipe ends (`/proc/self/fd`
/// links read "pipe:[inode]").
pub fn pipe_fds() -> BTreeSet<RawFd> {
    open_fds()
        .into_iter()
        .filter(|fd| {
            fs::read_link(format!("/proc/self/fd/{fd}"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
        })
        .collect()
}

/// Whether a process with this PID exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------
// File snapshots
// ---------------------------------------------------------------------------

/// What identifies a file's state on disk: a changed byte, a rename over it,
/// a rewrite, a chmod, a chown or a retargeted symlink shows up in one of
/// the fields. Nothing in it moves when the file is only read or probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSnapshot {
    /// Device and inode.
    pub dev_ino: (u64, u64),
    /// Permission bits and type.
    pub mode: u32,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Status change time (seconds, nanoseconds): moves with link, rename,
    /// chmod and writes.
    pub ctime: (i64, i64),
    /// Hard link count.
    pub nlink: u64,
    /// Owner.
    pub uid: u32,
    /// The content, for regular files.
    pub bytes: Option<Vec<u8>>,
    /// The target, for symlinks.
    pub link: Option<PathBuf>,
}

/// Snapshots the file at `path` without following a symlink.
///
/// # Panics
/// When nothing is at `path`.
pub fn snapshot(path: &Path) -> FileSnapshot {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let kind = m.file_type();
    FileSnapshot {
        dev_ino: (m.dev(), m.ino()),
        mode: m.mode(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        nlink: m.nlink(),
        uid: m.uid(),
        bytes: kind.is_file().then(|| fs::read(path).expect("read file")),
        link: kind
            .is_symlink()
            .then(|| fs::read_link(path).expect("read symlink")),
    }
}

/// A [`snapshot`] of `root` and of every path below it (not following
/// symlinks): proves a whole directory untouched.
pub fn tree_snapshot(root: &Path) -> BTreeMap<PathBuf, FileSnapshot> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let snap = snapshot(&path);
        if fs::symlink_metadata(&path).expect("lstat").is_dir() {
            for entry in fs::read_dir(&path).expect("read_dir") {
                todo.push(entry.expect("dir entry").path());
            }
        }
        out.insert(path, snap);
    }
    out
}

/// Device and inode of `path` (not following a symlink), if anything is there.
pub fn dev_ino(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Asserts nothing at all (not even a dangling symlink) is at any of `paths`.
pub fn assert_absent(paths: &[&Path]) {
    for path in paths {
        assert!(dev_ino(path).is_none(), "{} is still there", path.display());
    }
}

/// Whether `path` (not followed) is a socket file.
pub fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Sets the permission bits of `path` (following a symlink).
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A tempdir that passes as a private runtime dir (`$XDG_RUNTIME_DIR`,
/// `$TMPDIR`): mode 0700 and ours. (tempfile leaves the mode to the umask.)
pub fn private_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    chmod(dir.path(), 0o700);
    dir
}

/// Asserts `e` is `UnexpectedFileType` for exactly `path`, expecting
/// `expected` and finding `found`, with a message that names the path.
pub fn assert_wrong_type(path: &Path, expected: FileKind, found: FileKind, e: LifecycleError) {
    match &e {
        LifecycleError::UnexpectedFileType {
            path: p,
            expected: exp,
            found: got,
        } => {
            assert_eq!(p, path, "{e}");
            assert_eq!((*exp, *got), (expected, found), "{e}");
        }
        other => panic!(
            "{}: expected UnexpectedFileType, got {other:?}",
            path.display()
        ),
    }
    assert_eq!(e.path(), Some(path));
    assert!(
        e.to_string().contains(&path.display().to_string()),
        "message does not name the path: {e}"
    );
}

/// Permission bits of `path` (not following a symlink).
pub fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The names in directory `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A small deterministic pseudo-random generator (xorshift64*), so tests
/// need no extra crate and a failing run can be replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A seed from the clock, printed by the caller so a failure can be
    /// replayed.
    pub fn clock_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The signals a guard can act on, as the tests send them.
pub const GUARD_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// Starts `cmd` with [`GUARD_SIGNALS`] at their default action, whatever
/// the test binary inherited.
///
/// `exec(2)` keeps an ignored signal ignored, and a shell running `cargo
/// test &` from a script (or a CI runner started that way) ignores SIGINT
/// and SIGQUIT; the crate rightly keeps such a signal ignored (nohup), so
/// every test that expects a SIGINT to act would hang to its watchdog. A
/// test about an inherited SIG_IGN sets it itself (`nohup`, `trap ''`), after
/// this hook.
pub fn default_signals(cmd: &mut Command) {
    // SAFETY: sigaction(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            for sig in GUARD_SIGNALS {
                nix::libc::signal(sig as nix::libc::c_int, nix::libc::SIG_DFL);
            }
            Ok(())
        });
    }
}
