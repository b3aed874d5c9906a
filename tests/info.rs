//! `DaemonInfo`, the tools' view of a daemon: `is_running` only looks,
//! `cleanup` removes what a dead daemon left and refuses while one lives,
//! `load_pid` reads the number.
//!
//! Live and dead daemons are real child processes (the test binary re-run
//! with a role); a "crash" is SIGKILL, which runs no cleanup. Tests that spawn
//! are `#[serial]`: a child forked by a parallel test holds a copy of every fd
//! until it execs.

#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use historia_lifecycle::{
    probe_socket, write_pid_file, DaemonGuard, DaemonInfo, FileKind, LifecycleError, SignalMode,
    SocketState,
};
use nix::sys::stat::Mode;
use serial_test::serial;

// ---------------------------------------------------------------------------
// Child roles. The test binary re-runs itself with HISTORIA_CHILD=<role>.
// ---------------------------------------------------------------------------

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // an ordinary test run: nothing to do
    };
    match role.as_str() {
        // A plain listener, no PID file, no lock.
        "listen" => {
            let _listener = UnixListener::bind(env_path("HISTORIA_SOCK")).unwrap();
            serve_until_parent_says_stop();
        }
        // A daemon holding the claim.
        "guard" => {
            let guard = DaemonGuard::builder(env_path("HISTORIA_SOCK"), env_path("HISTORIA_PID"))
                .signals(SignalMode::Off)
                .acquire()
                .unwrap();
            serve_until_parent_says_stop();
            guard.close().unwrap();
        }
        other => panic!("unknown child role {other:?}"),
    }
}

struct Paths {
    dir: tempfile::TempDir,
    sock: PathBuf,
    pid: PathBuf,
}

impl Paths {
    fn new() -> Paths {
        let dir = tempfile::tempdir().unwrap();
        let (sock, pid) = (dir.path().join("d.sock"), dir.path().join("d.pid"));
        Paths { dir, sock, pid }
    }

    fn info(&self) -> DaemonInfo {
        DaemonInfo::new(self.sock.clone(), self.pid.clone())
    }

    fn start(&self, role: &str) -> Server {
        let mut cmd = child(role);
        cmd.env("HISTORIA_SOCK", &self.sock)
            .env("HISTORIA_PID", &self.pid);
        Server::start(cmd, self.dir.path())
    }

    /// A daemon that died by SIGKILL: its socket and PID file stay, with no
    /// listener and no lock. Returns its PID.
    fn crashed_daemon(&self) -> u32 {
        let daemon = self.start("guard");
        let pid = daemon.id();
        daemon.kill();
        assert_eq!(probe_socket(&self.sock).unwrap(), SocketState::Stale);
        assert!(self.pid.is_file());
        pid
    }

    fn tree(&self) -> BTreeMap<PathBuf, Node> {
        tree(self.dir.path())
    }
}

// ---------------------------------------------------------------------------
// Point 8: load_pid.
// ---------------------------------------------------------------------------

#[test]
fn load_pid_reads_the_number_and_keeps_it_on_error() {
    let p = Paths::new();
    let mut info = p.info();
    assert_eq!(info.pid, None);

    fs::write(&p.pid, b"4242\n").unwrap();
    assert_eq!(info.load_pid().unwrap(), Some(4242));
    assert_eq!(info.pid, Some(4242));

    fs::write(&p.pid, b"garbage").unwrap();
    let e = info.load_pid().unwrap_err();
    assert!(matches!(e, LifecycleError::PidFile(_)), "{e:?}");
    assert_eq!(info.pid, Some(4242), "pid changed on error");

    fs::remove_file(&p.pid).unwrap();
    assert_eq!(info.load_pid().unwrap(), None);
    assert_eq!(info.pid, None);
}

// ---------------------------------------------------------------------------
// Point 8: is_running only looks.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn is_running_is_false_and_read_only_with_stale_files() {
    let p = Paths::new();
    let dead = p.crashed_daemon();
    let mut info = p.info();
    assert_eq!(info.load_pid().unwrap(), Some(dead));
    let before = p.tree();

    assert!(!info.is_running());
    assert!(!info.is_running());
    assert_eq!(p.tree(), before, "is_running changed the stale files");

    // A PID file naming a live process (this one) but unlocked is stale too:
    // the lock decides, not the number.
    write_pid_file(&p.pid).unwrap();
    let before = p.tree();
    assert!(!info.is_running());
    assert_eq!(p.tree(), before);
}

#[test]
#[serial]
fn is_running_sees_a_live_daemon_in_a_child() {
    let p = Paths::new();
    let info = p.info();

    // A bare listener, no PID file: the socket answers.
    let listener = p.start("listen");
    let before = p.tree();
    assert!(info.is_running());
    assert_eq!(p.tree(), before, "is_running touched a live socket");
    assert!(listener.stop().success());
    fs::remove_file(&p.sock).unwrap();

    // A guard: running, and still running when an operator deleted its
    // socket, because the claim's flock lives as long as the daemon.
    let daemon = p.start("guard");
    let before = p.tree();
    assert!(info.is_running());
    assert_eq!(p.tree(), before);
    fs::remove_file(&p.sock).unwrap();
    assert!(info.is_running());
    assert!(daemon.stop().success());
    assert!(!info.is_running());
}

// ---------------------------------------------------------------------------
// Point 8: cleanup.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn cleanup_removes_what_a_crashed_daemon_left_and_is_idempotent() {
    let p = Paths::new();
    p.crashed_daemon();
    let info = p.info();

    info.cleanup().unwrap();
    assert!(fs::symlink_metadata(&p.sock).is_err(), "stale socket kept");
    assert!(fs::symlink_metadata(&p.pid).is_err(), "stale PID file kept");
    info.cleanup().unwrap();
    info.cleanup().unwrap();
    assert!(!info.is_running());
    assert_eq!(names(p.dir.path()), Vec::<String>::new());
}

#[test]
#[serial]
fn cleanup_refuses_while_a_daemon_in_a_child_runs() {
    let p = Paths::new();
    let info = p.info();

    // A guard holds the claim: nothing of its may go.
    let daemon = p.start("guard");
    let before = p.tree();
    assert!(matches!(
        info.cleanup(),
        Err(LifecycleError::AlreadyRunning)
    ));
    assert_eq!(p.tree(), before, "cleanup touched a running daemon's files");
    // Even with its socket gone, the lock still says running.
    fs::remove_file(&p.sock).unwrap();
    let before = p.tree();
    assert!(matches!(
        info.cleanup(),
        Err(LifecycleError::AlreadyRunning)
    ));
    assert_eq!(p.tree(), before);
    assert!(daemon.stop().success());

    // A listener without any lock, beside an unlocked PID file: the socket
    // answers, so nothing is removed, not even the PID file.
    let listener = p.start("listen");
    write_pid_file(&p.pid).unwrap();
    let before = p.tree();
    assert!(matches!(
        info.cleanup(),
        Err(LifecycleError::AlreadyRunning)
    ));
    assert_eq!(p.tree(), before);
    assert!(listener.stop().success());
}

#[test]
fn cleanup_never_removes_what_is_not_a_socket_or_a_pid_file() {
    let p = Paths::new();
    let victim = p.dir.path().join("victim");
    fs::write(&victim, b"1\n").unwrap();

    let regular = p.dir.path().join("regular.sock");
    fs::write(&regular, b"not a socket").unwrap();
    let sub = p.dir.path().join("dir.sock");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("inside"), b"x").unwrap();
    let fifo = p.dir.path().join("fifo.sock");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let link = p.dir.path().join("link.sock");
    symlink(&victim, &link).unwrap();
    let before = p.tree();

    for (sock, kind) in [
        (&regular, FileKind::Regular),
        (&sub, FileKind::Directory),
        (&fifo, FileKind::Fifo),
        (&link, FileKind::Symlink),
    ] {
        let info = DaemonInfo::new(sock.clone(), p.pid.clone());
        assert_wrong_type(sock, kind, info.cleanup().unwrap_err());
        assert!(!info.is_running(), "{kind:?} counted as a live daemon");
    }
    assert_eq!(p.tree(), before);

    // A symlink as the PID file: refused, neither it nor its target removed.
    let pid_link = p.dir.path().join("link.pid");
    symlink(&victim, &pid_link).unwrap();
    let before = p.tree();
    let info = DaemonInfo::new(p.sock.clone(), pid_link.clone());
    assert_wrong_type(&pid_link, FileKind::Symlink, info.cleanup().unwrap_err());
    assert!(!info.is_running());
    assert_eq!(p.tree(), before);
}

// ---------------------------------------------------------------------------
// Helpers (tests/common belongs to another file set; this file carries its own).
// ---------------------------------------------------------------------------

fn assert_wrong_type(path: &Path, kind: FileKind, e: LifecycleError) {
    match &e {
        LifecycleError::UnexpectedFileType { path: p, found, .. } => {
            assert_eq!(p, path);
            assert_eq!(*found, kind, "{e}");
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

/// Sorted file names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Env var naming the role a re-executed test binary plays.
const ROLE: &str = "HISTORIA_CHILD";
/// Longest any child may take; it is killed after that.
const WATCHDOG: Duration = Duration::from_secs(20);

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .unwrap_or_else(|| panic!("{name} is not set"))
        .into()
}

/// A command re-running this test binary as `role`.
fn child(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// Child side of [`Server`]: say ready, then hold everything until the
/// parent closes our stdin (or dies).
fn serve_until_parent_says_stop() {
    fs::write(env_path("HISTORIA_READY"), b"").unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// Waits for `child` until the watchdog expires; kills it then.
fn wait_or_kill(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A long-running child; stopped (stdin closed, then killed if need be) on
/// drop so no test leaves one behind.
struct Server {
    child: Option<Child>,
}

impl Server {
    /// Starts `cmd` and waits until it has created its ready file in `dir`.
    fn start(mut cmd: Command, dir: &Path) -> Server {
        let ready = dir.join(".ready");
        cmd.env("HISTORIA_READY", &ready);
        let mut server = Server {
            child: Some(cmd.spawn().unwrap()),
        };
        let deadline = Instant::now() + WATCHDOG;
        while !ready.exists() {
            let c = server.child.as_mut().unwrap();
            if let Some(status) = c.try_wait().unwrap() {
                panic!("server child exited before it was ready: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "watchdog: server child never got ready"
            );
            thread::sleep(Duration::from_millis(2));
        }
        fs::remove_file(&ready).unwrap();
        server
    }

    fn id(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Asks the child to finish and returns how it ended.
    fn stop(mut self) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        drop(c.stdin.take());
        wait_or_kill(&mut c).expect("watchdog: server child did not stop")
    }

    /// SIGKILL: the child runs no cleanup at all.
    fn kill(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            drop(c.stdin.take());
            wait_or_kill(&mut c);
        }
    }
}

/// What `lstat` and the content say about one path, to prove "untouched".
#[derive(Debug, PartialEq, Eq)]
struct Node {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    bytes: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

fn node(path: &Path) -> Node {
    let m = fs::symlink_metadata(path).unwrap();
    let ft = m.file_type();
    Node {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        nlink: m.nlink(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        bytes: ft.is_file().then(|| fs::read(path).unwrap()),
        link: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
    }
}

/// Every path under `root` (not following symlinks) with its [`Node`].
fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let n = node(&p);
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        out.insert(p, n);
    }
    out
}
