//! The PID file's mode as a defence: a local user who can open the PID file
//! can hold a shared flock on it, and a SIGKILLed daemon's restart is then
//! refused for as long as they hold it. With `pid_file_mode(0o600)` they
//! cannot open it (`EACCES`), so they cannot lock it.
//!
//! Every party is a real process: the daemon (root) and the unprivileged
//! user (65534, in a tempdir under /tmp with mode 0755 so it can reach the
//! file) are children of this test binary (see `common`).

#![cfg(target_os = "linux")]

mod common;

use std::fs::{File, OpenOptions};

use common::{
    child_main, child_paths, chmod, env_octal, mode_of, read_stdin_line, report,
    wait_for_stdin_eof, ChildSpec, Paths, MODE_ENV, NOBODY, PID_ENV, SOCK_ENV,
};
use historia_lifecycle::{DaemonGuard, LifecycleError, PidFileGuard, SignalMode, PID_FILE_MODE};
use nix::sys::signal::Signal;
use serial_test::serial;

/// For `hold`: "pid" for a `PidFileGuard`, "socket" for a `DaemonGuard`.
const KIND_ENV: &str = "HISTORIA_TEST_KIND";

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "hold" => role_hold(),
        "share-lock" => role_share_lock(),
        other => panic!("unknown child role {other:?}"),
    });
}

/// Acquires with the PID file mode in `MODE_ENV` (default if unset),
/// reports `READY`, and holds until killed or stdin ends.
fn role_hold() {
    let (sock, pid) = child_paths();
    let mode = env_octal(MODE_ENV);
    let guard: Box<dyn std::any::Any> = match std::env::var(KIND_ENV).as_deref() {
        Ok("socket") => {
            let mut b = DaemonGuard::builder(&sock, &pid);
            if let Some(m) = mode {
                b = b.pid_file_mode(m);
            }
            Box::new(b.acquire().expect("acquire"))
        }
        _ => {
            let mut b = PidFileGuard::builder(&pid);
            if let Some(m) = mode {
                b = b.pid_file_mode(m);
            }
            Box::new(b.acquire().expect("acquire"))
        }
    };
    report("READY");
    wait_for_stdin_eof();
    drop(guard);
}

/// As another user: opens the PID file read-only (`OPEN-FAILED <errno>` if it
/// cannot), reports `OPENED`, then waits in a blocking shared flock, as
/// `flock -s` does, until the holder dies; reports `LOCKED` and keeps the
/// lock until stdin ends.
fn role_share_lock() {
    let (_, pid) = child_paths();
    let file: File = match OpenOptions::new().read(true).open(&pid) {
        Ok(f) => f,
        Err(e) => {
            report(format!("OPEN-FAILED {}", e.raw_os_error().unwrap_or(-1)));
            return;
        }
    };
    report("OPENED");
    file.lock_shared().expect("flock(LOCK_SH)");
    report("LOCKED");
    while read_stdin_line().is_some() {}
    drop(file);
}

/// Paths in a root-owned 0755 tempdir under /tmp: 65534 can reach the files.
fn reachable_paths() -> Paths {
    let dir = tempfile::Builder::new()
        .prefix("historia-mode-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(dir.path(), 0o755);
    Paths {
        sock: dir.path().join("daemon.sock"),
        pid: dir.path().join("daemon.pid"),
        dir,
    }
}

fn spec(p: &Paths, role: &str) -> ChildSpec {
    ChildSpec::new(role)
        .env(SOCK_ENV, &p.sock)
        .env(PID_ENV, &p.pid)
}

fn acquire_here(p: &Paths) -> Result<PidFileGuard, LifecycleError> {
    PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire()
}

#[test]
#[serial]
fn another_user_can_block_the_restart_of_a_daemon_whose_pid_file_is_0644() {
    let p = reachable_paths();
    let mut daemon = spec(&p, "hold").spawn();
    assert_eq!(daemon.expect_line(), "READY");
    assert_eq!(mode_of(&p.pid), PID_FILE_MODE);

    let mut user = spec(&p, "share-lock").user(NOBODY).spawn();
    assert_eq!(user.expect_line(), "OPENED");
    // The daemon crashes; its file stays, and the waiting user gets the lock.
    daemon.signal(Signal::SIGKILL);
    daemon.wait_signaled(Signal::SIGKILL);
    assert_eq!(user.expect_line(), "LOCKED");

    let refused = acquire_here(&p);
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "expected the restart to be blocked, got {refused:?}"
    );
    // Only while they hold it.
    user.stop();
    let guard = acquire_here(&p).expect("restart once the user let go");
    assert!(guard.reclaimed_stale_pid_file());
    guard.close().unwrap();
}

#[test]
#[serial]
fn another_user_cannot_lock_a_0600_pid_file_of_either_guard() {
    for kind in ["pid", "socket"] {
        let p = reachable_paths();
        let mut daemon = spec(&p, "hold")
            .env(KIND_ENV, kind)
            .env(MODE_ENV, "600")
            .spawn();
        assert_eq!(daemon.expect_line(), "READY", "{kind}");
        assert_eq!(mode_of(&p.pid), 0o600, "{kind}");

        let lines = spec(&p, "share-lock").user(NOBODY).run();
        assert_eq!(
            lines,
            [format!("OPEN-FAILED {}", nix::libc::EACCES)],
            "{kind}: 65534 opened a 0600 PID file"
        );

        // Crash, then restart: nobody could have locked it.
        daemon.signal(Signal::SIGKILL);
        daemon.wait_signaled(Signal::SIGKILL);
        let guard = acquire_here(&p).expect("restart after the crash");
        assert!(guard.reclaimed_stale_pid_file(), "{kind}");
        guard.close().unwrap();
    }
}
