//! PID files: atomic `"<pid>\n"` writes with an exact mode that never follow
//! a symlink, strict bounded reads that never hang, and idempotent cleanup
//! that removes only regular files.
//!
//! Tests that spawn children or hold a guard are `#[serial]`: a child forked
//! by a parallel test holds a copy of every fd until it execs.

#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use historia_lifecycle::{
    cleanup_pid_file, read_pid_file, write_pid_file, DaemonGuard, FileKind, LifecycleError,
    SignalMode, PID_FILE_MODE,
};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::stat::Mode;
use serial_test::serial;

/// The unprivileged user the permission tests run as.
const NOBODY: u32 = 65534;

// ---------------------------------------------------------------------------
// Child roles. The test binary re-runs itself with HISTORIA_CHILD=<role>.
// ---------------------------------------------------------------------------

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // an ordinary test run: nothing to do
    };
    match role.as_str() {
        // Writes one PID file per umask in HISTORIA_UMASKS (octal, comma
        // separated) into HISTORIA_DIR, as pid-<umask>.
        "write_under_umasks" => {
            let dir = env_path("HISTORIA_DIR");
            for text in std::env::var("HISTORIA_UMASKS").unwrap().split(',') {
                let mask = u32::from_str_radix(text, 8).unwrap();
                nix::sys::stat::umask(Mode::from_bits_truncate(mask));
                let pid = write_pid_file(&dir.join(format!("pid-{text}"))).unwrap();
                assert_eq!(pid, std::process::id());
            }
        }
        // Rewrites the PID file until the parent closes stdin.
        "rewrite_loop" => {
            let path = env_path("HISTORIA_PATH");
            write_pid_file(&path).unwrap();
            fs::write(env_path("HISTORIA_READY"), b"").unwrap();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = std::sync::Arc::clone(&stop);
            thread::spawn(move || {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            let mut writes = 1u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                write_pid_file(&path).unwrap();
                writes += 1;
            }
            println!("writes={writes}");
        }
        "read_fifo" => {
            let path = env_path("HISTORIA_PATH");
            let e = read_pid_file(&path).unwrap_err();
            assert_wrong_type(&path, FileKind::Fifo, e);
        }
        // As 65534 in a sticky dir: the temp file is created, but the rename
        // over root's PID file is refused.
        "write_denied" => {
            assert_eq!(
                nix::unistd::geteuid().as_raw(),
                NOBODY,
                "must not run as root"
            );
            let path = env_path("HISTORIA_PATH");
            let e = write_pid_file(&path).unwrap_err();
            assert!(
                matches!(&e, LifecycleError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied),
                "expected Io(PermissionDenied), got {e:?}"
            );
            assert_eq!(e.path(), Some(path.as_path()));
            // Only a failure after the temp file exists tests its removal.
            assert!(e.to_string().starts_with("cannot rename"), "{e}");
        }
        // Prints where each inherited fd points.
        "list_fds" => {
            for entry in fs::read_dir("/proc/self/fd").unwrap() {
                let entry = entry.unwrap();
                if let Ok(target) = fs::read_link(entry.path()) {
                    println!(
                        "fd {} -> {}",
                        entry.file_name().to_string_lossy(),
                        target.display()
                    );
                }
            }
        }
        other => panic!("unknown child role {other:?}"),
    }
    println!("{CHILD_OK}");
}

// ---------------------------------------------------------------------------
// Point 4: write_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn write_pid_file_writes_pid_newline_and_replaces_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let me = std::process::id();

    assert_eq!(write_pid_file(&path).unwrap(), me);
    assert_eq!(fs::read(&path).unwrap(), format!("{me}\n").into_bytes());
    assert_eq!(read_pid_file(&path).unwrap(), Some(me));

    // Over an existing file: a new inode is renamed in; the old one is never
    // written in place (a hard link to it keeps the old bytes).
    fs::write(&path, b"garbage").unwrap();
    let old = dir.path().join("old-link");
    fs::hard_link(&path, &old).unwrap();
    let old_ino = fs::metadata(&old).unwrap().ino();
    write_pid_file(&path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), format!("{me}\n").into_bytes());
    assert_ne!(fs::metadata(&path).unwrap().ino(), old_ino);
    assert_eq!(fs::read(&old).unwrap(), b"garbage");
    assert_eq!(
        names(dir.path()),
        ["daemon.pid", "old-link"],
        "temp file left"
    );
}

#[test]
fn write_pid_file_never_follows_or_replaces_a_non_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    let link = dir.path().join("link.pid");
    symlink(&victim, &link).unwrap();
    let dangling = dir.path().join("dangling.pid");
    symlink(dir.path().join("created-through-link"), &dangling).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let fifo = dir.path().join("fifo.pid");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    let before = tree(dir.path());

    for (path, kind) in [
        (&link, FileKind::Symlink),
        (&dangling, FileKind::Symlink),
        (&sub, FileKind::Directory),
        (&fifo, FileKind::Fifo),
    ] {
        assert_wrong_type(path, kind, write_pid_file(path).unwrap_err());
    }
    // Victim byte-identical, links still links, no temp files, nothing made
    // at the dangling link's target.
    assert_eq!(tree(dir.path()), before);
}

#[test]
#[serial]
fn pid_file_mode_is_exactly_0644_under_any_umask() {
    let dir = tempfile::tempdir().unwrap();
    // A pre-existing world-writable file must not pass its mode on.
    let loose = dir.path().join("pid-077");
    fs::write(&loose, b"1\n").unwrap();
    chmod(&loose, 0o666);

    // umask is process-wide, so a child sets it.
    let umasks = ["077", "000", "022", "777"];
    let mut cmd = child("write_under_umasks");
    cmd.env("HISTORIA_DIR", dir.path())
        .env("HISTORIA_UMASKS", umasks.join(","));
    let (out, child_pid) = run_with_pid(cmd);
    out.assert_ok();

    for mask in umasks {
        let path = dir.path().join(format!("pid-{mask}"));
        let mode = fs::metadata(&path).unwrap().mode() & 0o7777;
        assert_eq!(mode, PID_FILE_MODE, "umask {mask}: mode {mode:04o}");
        assert_eq!(mode & 0o022, 0, "group/world-writable under umask {mask}");
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{child_pid}\n"));
    }
    assert_eq!(PID_FILE_MODE, 0o644);
    let mut expected: Vec<String> = umasks.iter().map(|m| format!("pid-{m}")).collect();
    expected.sort();
    assert_eq!(names(dir.path()), expected, "temp files left behind");
}

#[test]
#[serial]
fn failed_write_after_the_temp_file_leaves_no_temp_file() {
    // A sticky, world-writable dir: 65534 may create its temp file there but
    // may not rename it over root's PID file.
    let base = tempfile::Builder::new()
        .prefix("historia-pid-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(base.path(), 0o1777);
    let path = base.path().join("daemon.pid");
    fs::write(&path, b"1\n").unwrap();
    // The dir's own times change (the temp file came and went); its
    // contents must not.
    let before = tree_below(base.path());

    let mut cmd = child("write_denied");
    cmd.env("HISTORIA_PATH", &path)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY);
    run(cmd).assert_ok();

    assert_eq!(
        tree_below(base.path()),
        before,
        "temp file left or PID file changed"
    );
}

#[test]
#[serial]
fn guard_descriptors_are_close_on_exec() {
    let dir = tempfile::tempdir().unwrap();
    let pid_path = dir.path().join("daemon.pid");
    let guard = DaemonGuard::builder(dir.path().join("d.sock"), &pid_path)
        .signals(SignalMode::Off)
        .acquire()
        .unwrap();

    // The claim's fd: find it through /proc, then ask fcntl.
    let mut pid_fds = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").unwrap() {
        let entry = entry.unwrap();
        if fs::read_link(entry.path()).ok().as_deref() == Some(pid_path.as_path()) {
            pid_fds.push(entry.file_name().to_str().unwrap().parse::<i32>().unwrap());
        }
    }
    assert!(!pid_fds.is_empty(), "the guard holds no fd on its PID file");
    let listener_fd = guard.listener().unwrap().as_raw_fd();
    for fd in pid_fds.iter().copied().chain([listener_fd]) {
        // SAFETY: the fd stays open for this borrow: the guard owns it.
        let flags = fcntl(unsafe { BorrowedFd::borrow_raw(fd) }, FcntlArg::F_GETFD).unwrap();
        assert!(
            FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC),
            "fd {fd} lacks FD_CLOEXEC"
        );
    }

    // And after an exec, a child holds neither.
    let socket_ino = fs::metadata(format!("/proc/self/fd/{listener_fd}"))
        .unwrap()
        .ino();
    let out = run(child("list_fds"));
    out.assert_ok();
    let pid_text = pid_path.display().to_string();
    let socket_text = format!("socket:[{socket_ino}]");
    for line in out.stdout.lines().filter(|l| l.starts_with("fd ")) {
        assert!(
            !line.ends_with(&pid_text) && !line.ends_with(&socket_text),
            "a child inherited the guard's fd: {line}"
        );
    }
    guard.close().unwrap();
}

#[test]
#[serial]
fn concurrent_reader_never_sees_a_torn_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let mut cmd = child("rewrite_loop");
    cmd.env("HISTORIA_PATH", &path);
    let writer = Server::start(cmd, dir.path());
    let expected = format!("{}\n", writer.id());

    for i in 0..3000 {
        let raw = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {i}: the PID file vanished: {e}"));
        assert_eq!(raw, expected, "read {i} saw a torn or empty PID file");
        assert_eq!(read_pid_file(&path).unwrap(), Some(writer.id()), "read {i}");
    }
    let (status, stdout) = writer.stop_with_output();
    assert!(status.success(), "writer failed: {status}\n{stdout}");
    // The harness may print the report on its "test child_entry ..." line.
    let writes: u64 = stdout
        .split("writes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("writer did not report: {stdout}"))
        .parse()
        .unwrap();
    // The reads overlapped real rewrites, not just the first write.
    assert!(writes > 1, "writer wrote only {writes} times");
    assert_eq!(names(dir.path()), ["daemon.pid"], "temp files left behind");
}

// ---------------------------------------------------------------------------
// Point 5: read_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn read_pid_file_accepts_exactly_one_decimal_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    for (content, pid) in [
        (&b"1"[..], 1),
        (b"42\n", 42),
        (b"  42 \n", 42),
        (b"2147483647", 2147483647),
    ] {
        fs::write(&path, content).unwrap();
        assert_eq!(
            read_pid_file(&path).unwrap(),
            Some(pid),
            "{:?}",
            String::from_utf8_lossy(content)
        );
    }
}

#[test]
fn read_pid_file_rejects_everything_else_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let huge = vec![b'7'; 10 * 1024 * 1024];
    // A valid PID padded past the 64-byte bound: only the bound rejects it.
    let mut padded = b"42".to_vec();
    padded.resize(10 * 1024 * 1024, b' ');
    let cases: [&[u8]; 17] = [
        b"",
        b" \n",
        b"0",
        b"-1",
        b"2147483648",
        b"4294967295",
        b"0x1f",
        b"12 34",
        b"1\n2",
        b"42\0",
        b"\0",
        b"\xff\xfe42",
        b"+5",
        &huge,
        &huge[..65],
        &padded,
        &padded[..65],
    ];
    for content in cases {
        fs::write(&path, content).unwrap();
        let shown = String::from_utf8_lossy(&content[..content.len().min(16)]).into_owned();
        match read_pid_file(&path) {
            Err(LifecycleError::PidFile(msg)) => assert!(
                msg.contains(&path.display().to_string()),
                "{shown:?}: message does not name the path: {msg}"
            ),
            other => panic!(
                "{shown:?} ({} bytes): expected PidFile, got {other:?}",
                content.len()
            ),
        }
        // Reading never changes the file.
        assert_eq!(fs::metadata(&path).unwrap().len(), content.len() as u64);
    }
}

#[test]
fn read_pid_file_of_a_missing_file_is_none() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(read_pid_file(&dir.path().join("daemon.pid")).unwrap(), None);
    assert_eq!(
        read_pid_file(&dir.path().join("no/such/daemon.pid")).unwrap(),
        None
    );
}

#[test]
fn read_pid_file_refuses_non_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.pid");
    fs::write(&real, b"42\n").unwrap();
    let link = dir.path().join("link.pid");
    symlink(&real, &link).unwrap();
    let dangling = dir.path().join("dangling.pid");
    symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let sock = dir.path().join("sock.pid");
    drop(UnixListener::bind(&sock).unwrap());
    let before = tree(dir.path());

    for (path, kind) in [
        (&link, FileKind::Symlink),
        (&dangling, FileKind::Symlink),
        (&sub, FileKind::Directory),
        (&sock, FileKind::Socket),
    ] {
        assert_wrong_type(path, kind, read_pid_file(path).unwrap_err());
    }
    assert_eq!(tree(dir.path()), before);
}

#[test]
#[serial]
fn read_pid_file_of_a_fifo_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("daemon.pid");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    // A blocking open would wait forever for a writer: the watchdog catches it.
    let mut cmd = child("read_fifo");
    cmd.env("HISTORIA_PATH", &fifo);
    run(cmd).assert_ok();
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

// ---------------------------------------------------------------------------
// Point 6 (PID half): cleanup_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn cleanup_pid_file_is_idempotent_and_removes_only_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    cleanup_pid_file(&path).unwrap();
    cleanup_pid_file(&path).unwrap();

    write_pid_file(&path).unwrap();
    cleanup_pid_file(&path).unwrap();
    assert!(fs::symlink_metadata(&path).is_err(), "PID file not removed");
    cleanup_pid_file(&path).unwrap();

    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    symlink(&victim, &path).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let before = tree(dir.path());
    assert_wrong_type(
        &path,
        FileKind::Symlink,
        cleanup_pid_file(&path).unwrap_err(),
    );
    assert_wrong_type(
        &sub,
        FileKind::Directory,
        cleanup_pid_file(&sub).unwrap_err(),
    );
    assert_eq!(tree(dir.path()), before);
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

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Env var naming the role a re-executed test binary plays.
const ROLE: &str = "HISTORIA_CHILD";
/// Printed by a child that ran its role to the end, so a child that ran no
/// test at all (exit 0) cannot pass for one that succeeded.
const CHILD_OK: &str = "historia-child-ok";
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
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

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn assert_ok(&self) {
        assert!(
            self.status.success() && self.stdout.contains(CHILD_OK),
            "child failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

fn collect(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Runs `cmd` to completion under the watchdog.
fn run(cmd: Command) -> Finished {
    run_with_pid(cmd).0
}

/// [`run`], also returning the child's PID.
fn run_with_pid(mut cmd: Command) -> (Finished, u32) {
    let mut c = cmd.spawn().unwrap();
    let pid = c.id();
    drop(c.stdin.take());
    let out = collect(c.stdout.take().unwrap());
    let err = collect(c.stderr.take().unwrap());
    let status = wait_or_kill(&mut c);
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let status = status
        .unwrap_or_else(|| panic!("watchdog: child hung for {WATCHDOG:?}\n{stdout}\n{stderr}"));
    let finished = Finished {
        status,
        stdout,
        stderr,
    };
    (finished, pid)
}

/// A long-running child; stopped (stdin closed, then killed if need be) on
/// drop so no test leaves one behind.
struct Server {
    child: Option<Child>,
    stdout: Option<thread::JoinHandle<String>>,
}

impl Server {
    /// Starts `cmd` and waits until it has created its ready file in `dir`.
    fn start(mut cmd: Command, dir: &Path) -> Server {
        let ready = dir.join(".ready");
        cmd.env("HISTORIA_READY", &ready).stderr(Stdio::inherit());
        let mut c = cmd.spawn().unwrap();
        let stdout = Some(collect(c.stdout.take().unwrap()));
        let mut server = Server {
            child: Some(c),
            stdout,
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

    /// Asks the child to finish; returns how it ended and what it printed.
    fn stop_with_output(mut self) -> (ExitStatus, String) {
        let mut c = self.child.take().unwrap();
        drop(c.stdin.take());
        let status = wait_or_kill(&mut c).expect("watchdog: server child did not stop");
        (status, self.stdout.take().unwrap().join().unwrap())
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

/// [`tree`] without `root`'s own entry.
fn tree_below(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut t = tree(root);
    t.remove(root);
    t
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
