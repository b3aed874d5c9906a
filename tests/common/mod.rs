//! Child processes for multi-process tests, each watched by a watchdog.
//!
//! Anything about processes, races, signals or crashes must run in real
//! processes, not threads: a flock, a signal disposition or a `fork(2)` is
//! per process. These helpers re-run the current test binary as a child that
//! plays one *role*, and let the parent talk to it over stdin/stdout.
//!
//! # Parent side
//! ```ignore
//! let mut child = ChildSpec::new("child_process_entry", "hold")
//!     .env("HISTORIA_SOCK", &sock)
//!     .spawn();
//! let line = child.expect_line();          // e.g. "READY 1234"
//! child.send_line("drop");                 // its stdin
//! let status = child.wait();               // reaped, with a deadline
//! ```
//!
//! # Child side
//! Each test file has one dispatcher test that does nothing unless the marker
//! variable [`CHILD_ENV`] is set:
//! ```ignore
//! #[test]
//! fn child_process_entry() {
//!     common::child_main(|role| match role {
//!         "hold" => { /* ... */ common::report("READY 42"); }
//!         other => panic!("unknown role {other}"),
//!     });
//! }
//! ```
//! The child is run as `<test binary> --exact child_process_entry
//! --nocapture --test-threads=1`, so only that test runs and its stdout goes
//! straight to the pipe.
//!
//! # Protocol
//! libtest writes its own chatter to stdout ("running 1 test", "test x ... "
//! without a newline). [`report`] therefore writes each message on a line of
//! its own, starting with [`MARKER`]; the parent keeps only such lines.
//! Everything else the child writes (libtest output, stderr with panic
//! messages) is kept and shown when a parent-side expectation fails.
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

// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The marker environment variable: set to the role a child plays.
pub const CHILD_ENV: &str = "HISTORIA_CHILD";
/// Prefix of every line a child reports to its parent.
pub const MARKER: &str = "@@historia-child@@ ";
/// How long a child may live before the watchdog kills it.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Child side
// ---------------------------------------------------------------------------

/// The role this process plays, if it was started as a child.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Body of the dispatcher test: runs `dispatch(role)` when this process is a
/// child, and does nothing in a normal test run.
pub fn child_main(dispatch: impl FnOnce(&str)) {
    if let Some(role) = child_role() {
        dispatch(&role);
    }
}

/// Sends one message line to the parent (flushed at once, so the parent sees
/// it before the child blocks or dies).
pub fn report(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    // The leading newline ends whatever libtest left unterminated.
    let _ = write!(out, "\n{MARKER}{}\n", msg.as_ref());
    let _ = out.flush();
}

/// Reads an environment variable the parent must have set.
pub fn env_required(key: &str) -> OsString {
    std::env::var_os(key).unwrap_or_else(|| panic!("child needs ${key}"))
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

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// How to start a child: the dispatcher test's name, the role, its
/// environment and stdin.
#[must_use = "call .spawn() to start the child"]
pub struct ChildSpec {
    entry: String,
    role: String,
    envs: Vec<(OsString, OsString)>,
    stdin: Option<Stdio>,
    deadline: Duration,
}

impl ChildSpec {
    /// A child that runs the test `entry` (the dispatcher) with role `role`.
    pub fn new(entry: &str, role: &str) -> Self {
        ChildSpec {
            entry: entry.to_string(),
            role: role.to_string(),
            envs: Vec::new(),
            stdin: None,
            deadline: DEFAULT_DEADLINE,
        }
    }

    /// Sets an environment variable in the child.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
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
        let mut cmd = Command::new(exe);
        cmd.args(["--exact", &self.entry, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &self.role)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
/// a rewrite or a chmod shows up in one of the fields.
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
    /// The content, for regular files.
    pub bytes: Option<Vec<u8>>,
}

/// Snapshots the file at `path` without following a symlink.
///
/// # Panics
/// When nothing is at `path`.
pub fn snapshot(path: &Path) -> FileSnapshot {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    FileSnapshot {
        dev_ino: (m.dev(), m.ino()),
        mode: m.mode(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        nlink: m.nlink(),
        bytes: m.is_file().then(|| fs::read(path).expect("read file")),
    }
}

/// Device and inode of `path` (not following a symlink), if anything is there.
pub fn dev_ino(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
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
