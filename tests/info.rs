//! `DaemonInfo`, the tools' view of a daemon: `is_running` only looks,
//! `cleanup` removes what a dead daemon left and refuses while one lives,
//! `load_pid` reads the number.
//!
//! Live and dead daemons are real child processes (the test binary re-run
//! with a role); a "crash" is SIGKILL, which runs no cleanup. Tests that spawn
//! are `#[serial]`: a child forked by a parallel test holds a copy of every fd
//! until it execs.

#![cfg(target_os = "linux")]

mod common;

use std::fs;
use std::os::unix::fs::symlink;

use common::{
    assert_wrong_type, builder_from_env, child_main, child_paths, dir_names, paths, ready_line,
    report, serve_bare_listener, wait_for_stdin_eof, ChildProc, Paths,
};
use historia_lifecycle::{
    probe_socket, write_pid_file, DaemonInfo, FileKind, LifecycleError, SignalMode, SocketState,
};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use serial_test::serial;

// ---------------------------------------------------------------------------
// Child roles (see `common`).
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        // A plain listener, no PID file, no lock.
        "listen" => serve_bare_listener(&child_paths().0),
        // A daemon holding the claim.
        "guard" => {
            let guard = builder_from_env()
                .signals(SignalMode::Off)
                .acquire()
                .unwrap();
            report(ready_line(&guard));
            wait_for_stdin_eof();
            guard.close().unwrap();
        }
        other => panic!("unknown child role {other:?}"),
    });
}

fn daemon_info(p: &Paths) -> DaemonInfo {
    DaemonInfo::new(p.sock.clone(), p.pid.clone())
}

/// A bare listener at the socket path; returns once it listens.
fn start_listener(p: &Paths) -> ChildProc {
    let child = p.child("listen").spawn();
    assert_eq!(child.expect_line(), "LISTENING");
    child
}

/// A daemon holding the claim; returns once it holds it.
fn start_daemon(p: &Paths) -> ChildProc {
    let child = p.child("guard").spawn();
    assert_eq!(common::parse_ready(&child), (false, false));
    child
}

/// A daemon that died by SIGKILL: its socket and PID file stay, with no
/// listener and no lock. Returns its PID.
fn crashed_daemon(p: &Paths) -> u32 {
    let mut daemon = start_daemon(p);
    daemon.signal(Signal::SIGKILL);
    daemon.wait_signaled(Signal::SIGKILL);
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Stale);
    assert!(p.pid.is_file());
    daemon.pid()
}

// ---------------------------------------------------------------------------
// Point 8: load_pid.
// ---------------------------------------------------------------------------

#[test]
fn load_pid_reads_the_number_and_keeps_it_on_error() {
    let p = paths();
    let mut info = daemon_info(&p);
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
    let p = paths();
    let dead = crashed_daemon(&p);
    let mut info = daemon_info(&p);
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
    let p = paths();
    let info = daemon_info(&p);

    // A bare listener, no PID file: the socket answers.
    let mut listener = start_listener(&p);
    let before = p.tree();
    assert!(info.is_running());
    assert_eq!(p.tree(), before, "is_running touched a live socket");
    listener.stop();
    fs::remove_file(&p.sock).unwrap();

    // A guard: running, and still running when an operator deleted its
    // socket, because the claim's flock lives as long as the daemon.
    let mut daemon = start_daemon(&p);
    let before = p.tree();
    assert!(info.is_running());
    assert_eq!(p.tree(), before);
    fs::remove_file(&p.sock).unwrap();
    assert!(info.is_running());
    daemon.stop();
    assert!(!info.is_running());
}

// ---------------------------------------------------------------------------
// Point 8: cleanup.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn cleanup_removes_what_a_crashed_daemon_left_and_is_idempotent() {
    let p = paths();
    crashed_daemon(&p);
    let info = daemon_info(&p);

    info.cleanup().unwrap();
    assert!(fs::symlink_metadata(&p.sock).is_err(), "stale socket kept");
    assert!(fs::symlink_metadata(&p.pid).is_err(), "stale PID file kept");
    info.cleanup().unwrap();
    info.cleanup().unwrap();
    assert!(!info.is_running());
    assert_eq!(dir_names(p.dir.path()), Vec::<String>::new());
}

#[test]
#[serial]
fn cleanup_refuses_while_a_daemon_in_a_child_runs() {
    let p = paths();
    let info = daemon_info(&p);

    // A guard holds the claim: nothing of its may go.
    let mut daemon = start_daemon(&p);
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
    daemon.stop();

    // A listener without any lock, beside an unlocked PID file: the socket
    // answers, so nothing is removed, not even the PID file.
    let mut listener = start_listener(&p);
    write_pid_file(&p.pid).unwrap();
    let before = p.tree();
    assert!(matches!(
        info.cleanup(),
        Err(LifecycleError::AlreadyRunning)
    ));
    assert_eq!(p.tree(), before);
    listener.stop();
}

#[test]
fn cleanup_never_removes_what_is_not_a_socket_or_a_pid_file() {
    let p = paths();
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
        assert_wrong_type(sock, FileKind::Socket, kind, info.cleanup().unwrap_err());
        assert!(!info.is_running(), "{kind:?} counted as a live daemon");
    }
    assert_eq!(p.tree(), before);

    // A symlink as the PID file: refused, neither it nor its target removed.
    let pid_link = p.dir.path().join("link.pid");
    symlink(&victim, &pid_link).unwrap();
    let before = p.tree();
    let info = DaemonInfo::new(p.sock.clone(), pid_link.clone());
    assert_wrong_type(
        &pid_link,
        FileKind::Regular,
        FileKind::Symlink,
        info.cleanup().unwrap_err(),
    );
    assert!(!info.is_running());
    assert_eq!(p.tree(), before);
}
