//! The claim against the real tools that lock PID files: libbsd's
//! `pidfile_open(3)` (a small C program compiled here with gcc and linked
//! with `-lbsd`), util-linux `flock(1)`, and the messages the example daemon
//! prints when one of them holds the lock.
//!
//! Every holder is a real process: our guards run in children of this test
//! binary (see `common`), the tools as themselves. A missing tool or header
//! fails the test naming the Debian package (`.ci/run` installs them).

#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};

use common::examples::{require_tool, run, WATCHDOG};
use common::{child_main, child_paths, paths, read_stdin_line, report, snapshot};
use historia_lifecycle::{running_pid, LifecycleError, PidFileGuard, SignalMode};
use serial_test::serial;

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "hold" => common::role_hold(),
        "hold-pid" => role_hold_pid(),
        "bare" => common::serve_bare_listener(&child_paths().0),
        other => panic!("unknown child role {other:?}"),
    });
}

/// Holds a `PidFileGuard` on the child's PID path until stdin says `drop` or
/// ends; reports `READY <pid>` or the refusal.
fn role_hold_pid() {
    let (_, pid) = child_paths();
    let mut guard = match PidFileGuard::acquire(&pid) {
        Ok(g) => {
            report(format!("READY {}", g.pid()));
            Some(g)
        }
        Err(e) => {
            report(common::refusal_line(&e));
            return;
        }
    };
    while let Some(cmd) = read_stdin_line() {
        match cmd.as_str() {
            "drop" => {
                drop(guard.take());
                report("DROPPED");
            }
            other => panic!("unknown command {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The libbsd program
// ---------------------------------------------------------------------------

/// `bsdpid PATH`: `pidfile_open(PATH, 0644, &otherpid)`, as a BSD daemon
/// starts. Refused: prints `REFUSED errno=<e> otherpid=<pid>`. Got it:
/// `pidfile_write`, prints `HELD <pid>`, holds until end of file on stdin,
/// then `pidfile_remove` and `REMOVED`.
const BSDPID_C: &str = r#"
#include <bsd/libutil.h>
#include <errno.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    pid_t other = -2;
    struct pidfh *pfh;
    char buf[64];
    if (argc != 2)
        return 2;
    pfh = pidfile_open(argv[1], 0644, &other);
    if (pfh == NULL) {
        printf("REFUSED errno=%d otherpid=%ld\n", errno, (long)other);
        return 0;
    }
    if (pidfile_write(pfh) != 0) {
        perror("pidfile_write");
        return 1;
    }
    printf("HELD %ld\n", (long)getpid());
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0)
        ;
    if (pidfile_remove(pfh) != 0) {
        perror("pidfile_remove");
        return 1;
    }
    printf("REMOVED\n");
    return 0;
}
"#;

/// Compiles [`BSDPID_C`] into `dir` and returns the program's path.
fn build_bsdpid(dir: &Path) -> PathBuf {
    let gcc = require_tool("gcc", "gcc");
    let header = Path::new("/usr/include/bsd/libutil.h");
    assert!(
        header.is_file(),
        "{} is missing: apt-get install libbsd-dev (.ci/run installs it)",
        header.display()
    );
    let src = dir.join("bsdpid.c");
    std::fs::write(&src, BSDPID_C).expect("write bsdpid.c");
    let exe = dir.join("bsdpid");
    let mut cmd = Command::new(gcc);
    cmd.arg("-Wall")
        .arg("-Werror")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .arg("-lbsd");
    let out = run(cmd);
    assert!(out.status.success(), "gcc bsdpid.c -lbsd failed: {out}");
    exe
}

/// A tool running in the background, its stdout read line by line under the
/// watchdog; killed and reaped on drop.
struct Tool {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Tool {
    fn spawn(mut cmd: Command) -> Tool {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Tool {
            child,
            stdin,
            lines,
        }
    }

    fn expect_line(&self) -> String {
        self.lines
            .recv_timeout(WATCHDOG)
            .unwrap_or_else(|e| panic!("tool {} said nothing: {e}", self.child.id()))
    }

    /// Closes stdin and waits for the tool to exit 0.
    fn finish(&mut self) {
        drop(self.stdin.take());
        let status = common::examples::wait_with_watchdog(&mut self.child, "tool");
        assert!(status.success(), "tool exited with {status}");
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bsdpid(exe: &Path, pid_path: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg(pid_path);
    cmd
}

// ---------------------------------------------------------------------------
// libbsd pidfile(3)
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn libbsd_pidfile_open_reads_our_pid_while_each_guard_holds_the_claim() {
    let p = paths();
    let exe = build_bsdpid(p.dir.path());
    for role in ["hold", "hold-pid"] {
        let mut holder = p.child(role).spawn();
        let line = holder.expect_line();
        assert!(line.starts_with("READY "), "{role}: {line}");
        // The file is the bare PID: what pidfile_read insists on.
        assert_eq!(
            std::fs::read(&p.pid).unwrap(),
            holder.pid().to_string().into_bytes(),
            "{role}: PID file content"
        );
        let before = snapshot(&p.pid);

        let out = run(bsdpid(&exe, &p.pid));
        assert!(out.status.success(), "{out}");
        assert_eq!(
            out.stdout.trim(),
            format!(
                "REFUSED errno={} otherpid={}",
                nix::libc::EEXIST,
                holder.pid()
            ),
            "{role}: pidfile_open must fail with EEXIST naming our holder"
        );
        // pidfile_open opened it O_WRONLY|O_CREAT but never got the lock, so
        // it truncated and wrote nothing.
        assert_eq!(snapshot(&p.pid), before, "{role}: libbsd changed our file");

        holder.send_line("drop");
        assert_eq!(holder.expect_line(), "DROPPED");
        holder.stop();
        p.assert_gone();
    }
}

/// Runs the libbsd holder until it holds `pid_path`, then SIGKILLs it and
/// reaps it: its PID file stays, its lock is gone. Returns its PID.
fn sigkilled_bsd_holder(exe: &Path, pid_path: &Path) -> u32 {
    let mut bsd = Tool::spawn(bsdpid(exe, pid_path));
    assert!(bsd.expect_line().starts_with("HELD "));
    let bsd_pid = bsd.child.id();
    bsd.child.kill().unwrap();
    bsd.child.wait().unwrap();
    bsd_pid
}

#[test]
#[serial]
fn a_libbsd_holder_refuses_our_guard_and_running_pid_names_it() {
    let p = paths();
    let exe = build_bsdpid(p.dir.path());
    let mut bsd = Tool::spawn(bsdpid(&exe, &p.pid));
    let held = bsd.expect_line();
    let bsd_pid: u32 = held
        .strip_prefix("HELD ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bsdpid said {held:?}"));
    assert_eq!(bsd_pid, bsd.child.id());
    let before = snapshot(&p.pid);

    let refused = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire();
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "expected AlreadyRunning, got {refused:?}"
    );
    assert_eq!(running_pid(&p.pid).unwrap(), Some(bsd_pid));
    assert_eq!(
        snapshot(&p.pid),
        before,
        "a refused acquire changed the file"
    );

    // A DaemonGuard is refused by the same lock and leaves no socket.
    let refused = p.acquire_here();
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "expected AlreadyRunning, got {refused:?}"
    );
    assert!(!p.sock.exists(), "a refused DaemonGuard left a socket");

    // pidfile_remove: then we win.
    bsd.finish();
    assert_eq!(bsd.expect_line(), "REMOVED");
    let guard = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire after pidfile_remove");
    assert!(!guard.reclaimed_stale_pid_file());
    guard.close().unwrap();
}

#[test]
#[serial]
fn a_sigkilled_libbsd_holder_leaves_a_pid_file_we_reclaim() {
    let p = paths();
    let exe = build_bsdpid(p.dir.path());
    let bsd_pid = sigkilled_bsd_holder(&exe, &p.pid);
    assert!(p.pid.exists(), "libbsd's file stays after SIGKILL");

    let guard = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire over a dead libbsd holder's file");
    assert!(guard.reclaimed_stale_pid_file());
    assert_eq!(guard.replaced_pid(), Some(bsd_pid));
    assert_eq!(running_pid(&p.pid).unwrap(), Some(std::process::id()));
    guard.close().unwrap();
    p.assert_gone();
}

// ---------------------------------------------------------------------------
// flock(1)
// ---------------------------------------------------------------------------

/// `flock -n <file> true`: exit 0 when it got the lock, 1 when it is held.
fn flock_n(pid_path: &Path, shared: bool) -> Option<i32> {
    let mut cmd = Command::new(require_tool("flock", "util-linux"));
    cmd.arg("-n");
    if shared {
        cmd.arg("-s");
    }
    cmd.arg(pid_path).arg("true");
    run(cmd).code()
}

#[test]
#[serial]
fn flock_tool_fails_while_we_hold_and_succeeds_after() {
    let p = paths();
    let mut holder = p.child("hold-pid").spawn();
    assert!(holder.expect_line().starts_with("READY "));
    let before = snapshot(&p.pid);
    assert_eq!(flock_n(&p.pid, false), Some(1), "flock -n got our lock");
    assert_eq!(flock_n(&p.pid, true), Some(1), "flock -n -s got our lock");
    assert_eq!(snapshot(&p.pid), before, "flock(1) changed the file");

    holder.send_line("drop");
    assert_eq!(holder.expect_line(), "DROPPED");
    holder.stop();
    p.assert_gone();
    // Nobody holds it now. flock(1) creates the missing file, empty.
    assert_eq!(flock_n(&p.pid, false), Some(0));
    assert_eq!(std::fs::read(&p.pid).unwrap(), b"");

    // That empty file blocks nothing: the lock decides.
    let guard = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire over flock(1)'s empty file");
    assert!(guard.reclaimed_stale_pid_file());
    assert_eq!(guard.replaced_pid(), None, "an empty file names nobody");
    guard.close().unwrap();
    p.assert_gone();
}

/// A `flock(1)` holding `pid_path` until killed: `flock <file> sleep 1000`
/// would need timing to know when it holds, so the shell says so itself.
fn flock_holder(pid_path: &Path) -> Tool {
    let mut cmd = Command::new(require_tool("flock", "util-linux"));
    cmd.arg(pid_path)
        .args(["sh", "-c", "echo LOCKED $$; exec cat >/dev/null"]);
    let tool = Tool::spawn(cmd);
    let line = tool.expect_line();
    assert!(line.starts_with("LOCKED "), "flock said {line:?}");
    tool
}

#[test]
#[serial]
fn a_flock_tool_holder_refuses_our_guard() {
    let p = paths();
    let mut flock = flock_holder(&p.pid);
    let refused = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire();
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "expected AlreadyRunning, got {refused:?}"
    );
    // The process that took the lock is flock(1) itself (the shell it runs
    // only shares the open file description).
    assert_eq!(running_pid(&p.pid).unwrap(), Some(flock.child.id()));
    flock.finish();
    let guard = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire after flock(1) ended");
    guard.close().unwrap();
}

// ---------------------------------------------------------------------------
// What the example daemon says
// ---------------------------------------------------------------------------

#[test]
fn daemon_start_error_names_the_path_and_the_os_error_once() {
    use std::os::unix::process::CommandExt;
    // A root-owned 0755 dir: the unprivileged user may enter it but not
    // create the PID file in it.
    let base = tempfile::Builder::new()
        .prefix("historia-msg-")
        .tempdir_in("/tmp")
        .unwrap();
    common::chmod(base.path(), 0o755);
    let p = common::Paths {
        sock: base.path().join("daemon.sock"),
        pid: base.path().join("daemon.pid"),
        dir: base,
    };
    let mut cmd = common::examples::daemon_cmd(&p);
    cmd.uid(common::NOBODY).gid(common::NOBODY).current_dir("/");
    let out = run(cmd);
    assert_eq!(out.code(), Some(1), "{out}");
    let expected = format!(
        "cannot create PID file {}: Permission denied (os error 13)",
        p.pid.display()
    );
    assert!(out.stderr.contains(&expected), "{out}");
    assert_eq!(
        out.stderr.matches("Permission denied").count(),
        1,
        "the OS error is printed more than once: {out}"
    );
    p.assert_gone();
}

/// The daemon example, refused: its exit status 3 and what it said.
fn refused_daemon(p: &common::Paths) -> String {
    let out = run(common::examples::daemon_cmd(p));
    assert_eq!(out.code(), Some(3), "{out}");
    out.stderr
}

#[test]
#[serial]
fn daemon_refused_by_another_tools_lock_says_so_and_that_no_socket_exists() {
    let p = paths();
    let exe = build_bsdpid(p.dir.path());
    let mut flock = flock_holder(&p.pid);
    let mut bsd = None;
    for tool in ["flock", "bsdpid"] {
        let (holder, name) = match tool {
            "flock" => (flock.child.id(), "flock"),
            _ => {
                flock.finish();
                let b = Tool::spawn(bsdpid(&exe, &p.pid));
                assert!(b.expect_line().starts_with("HELD "));
                let id = b.child.id();
                bsd = Some(b);
                (id, "bsdpid")
            }
        };
        let said = refused_daemon(&p);
        let expected = format!(
            "daemon: the PID file {} is locked by pid {holder} ({name}) (no socket at {}); \
             not starting a second instance",
            p.pid.display(),
            p.sock.display()
        );
        assert_eq!(said.trim_end(), expected, "{tool}");
        assert!(!said.contains("already running"), "{tool}: {said}");
        assert!(!p.sock.exists(), "{tool}: the refused daemon left a socket");
    }
    bsd.unwrap().finish();
}

#[test]
#[serial]
fn daemon_refused_by_a_lockless_listener_says_nobody_holds_the_lock() {
    let p = paths();
    let mut bare = p.child("bare").spawn();
    assert_eq!(bare.expect_line(), "LISTENING");
    let said = refused_daemon(&p);
    assert!(
        said.contains(&format!(
            "a process listens on {} but none holds the lock on {}",
            p.sock.display(),
            p.pid.display()
        )),
        "{said}"
    );
    assert!(!said.contains("already running"), "{said}");
    bare.stop();
}

#[test]
#[serial]
fn daemon_over_flocks_empty_file_or_a_dead_bsd_holders_file_says_what_it_replaced() {
    use common::examples::Daemon;
    let p = paths();
    let exe = build_bsdpid(p.dir.path());

    // flock(1) creates the missing file, empty, and lets go.
    assert_eq!(flock_n(&p.pid, false), Some(0));
    let d = Daemon::start(common::examples::daemon_cmd(&p));
    let out = d.output();
    assert!(
        out.contains("reclaimed an unlocked PID file that named no process"),
        "{out}"
    );
    assert!(
        !out.contains("dead instance") && !out.contains("naming pid"),
        "{out}"
    );
    drop(d); // SIGKILL: leaves the files
    std::fs::remove_file(&p.sock).unwrap();
    std::fs::remove_file(&p.pid).unwrap();

    // A SIGKILLed libbsd holder leaves its bare PID: named, and only that.
    let bsd_pid = sigkilled_bsd_holder(&exe, &p.pid);
    let d = Daemon::start(common::examples::daemon_cmd(&p));
    let out = d.output();
    assert!(
        out.lines().any(|l| l
            == format!(
                "reclaimed a stale PID file naming pid {bsd_pid}, which no longer held its lock"
            )),
        "{out}"
    );
}
