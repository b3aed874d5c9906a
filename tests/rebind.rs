//! `DaemonGuard::rebind`: a socket deleted while the daemon runs is
//! re-created under the claim, and connecting works again; anything someone
//! else put at the path is never replaced; cleanup (Drop, SIGTERM) removes
//! the new socket file and nothing else.
//!
//! The daemon is a real process (this test binary re-run with a role, see
//! `common`) that the parent drives over stdin; the parent deletes the file
//! and connects for real.

#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};

use common::{
    assert_absent, builder_from_env, child_main, paths, read_stdin_line, report, snapshot,
    ChildProc,
};
use historia_lifecycle::{DaemonGuard, LifecycleError, PidFileGuard, SignalAction, SignalMode};
use nix::sys::signal::Signal;
use serial_test::serial;

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "serve" => role_serve(),
        "serve-loop" => role_serve_loop(),
        "taken" => role_taken(),
        "clone" => role_clone(),
        other => panic!("unknown child role {other:?}"),
    });
}

/// Holds a `DaemonGuard` (default signals) and obeys stdin: `accept` serves
/// one connection with "pong", `rebind` reports what `rebind()` returned.
fn role_serve() {
    let mut guard = builder_from_env().acquire().expect("acquire");
    report("READY");
    while let Some(cmd) = read_stdin_line() {
        match cmd.as_str() {
            "accept" => {
                let (mut s, _) = guard.listener().unwrap().accept().expect("accept");
                writeln!(s, "pong").unwrap();
                report("SERVED");
            }
            "rebind" => report(format!("REBIND {}", outcome(guard.rebind()))),
            other => panic!("unknown command {other:?}"),
        }
    }
    drop(guard);
}

/// `on_signal(SIGUSR1, Rebind)`, then a plain accept loop on
/// `guard.listener()` in the main thread that answers every connection with
/// "hello <pid>" and goes on after an error (as the docs say to write it).
fn role_serve_loop() {
    let guard = builder_from_env()
        .on_signal(nix::libc::SIGUSR1, SignalAction::Rebind)
        .acquire()
        .expect("acquire");
    report("READY");
    let me = std::process::id();
    for stream in guard.listener().unwrap().incoming() {
        let Ok(mut s) = stream else { continue };
        let _ = writeln!(s, "hello {me}");
    }
}

/// `on_signal(SIGUSR1, Rebind)` with the listener taken out of the guard:
/// `take` reports whether `take_listener()` gives one (and serves one
/// connection on it).
fn role_taken() {
    let mut guard = builder_from_env()
        .on_signal(nix::libc::SIGUSR1, SignalAction::Rebind)
        .acquire()
        .expect("acquire");
    let first = guard.take_listener().expect("the bound listener");
    report("READY");
    while let Some(cmd) = read_stdin_line() {
        assert_eq!(cmd, "take");
        match guard.take_listener() {
            Some(l) => {
                report("TAKEN");
                let (mut s, _) = l.accept().expect("accept");
                writeln!(s, "pong").unwrap();
            }
            None => report("NONE"),
        }
    }
    drop(first);
}

/// `on_signal(SIGUSR1, Rebind)` with a thread accepting on a `try_clone`
/// of the guard's listener; `errors` reports how many accepts failed so far.
fn role_clone() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let guard = builder_from_env()
        .on_signal(nix::libc::SIGUSR1, SignalAction::Rebind)
        .acquire()
        .expect("acquire");
    let copy = guard.listener().unwrap().try_clone().expect("try_clone");
    let errors = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&errors);
    std::thread::spawn(move || {
        for conn in copy.incoming() {
            match conn {
                Ok(mut s) => {
                    let _ = writeln!(s, "pong");
                }
                Err(_) => {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    });
    report("READY");
    while let Some(cmd) = read_stdin_line() {
        assert_eq!(cmd, "errors");
        report(format!("ERRORS {}", errors.load(Ordering::SeqCst)));
    }
    drop(guard);
}

fn outcome(r: Result<bool, LifecycleError>) -> String {
    match r {
        Ok(b) => format!("ok {b}"),
        Err(LifecycleError::SocketInUse { .. }) => "socket in use".into(),
        Err(LifecycleError::UnexpectedFileType { found, .. }) => format!("found {found}"),
        Err(e) => format!("error {e:?}"),
    }
}

fn rebind(d: &mut ChildProc) -> String {
    d.send_line("rebind");
    d.expect_prefixed("REBIND ")
}

/// Connects, lets the daemon accept, and reads its answer.
fn ping(d: &mut ChildProc, sock: &std::path::Path) {
    let stream = UnixStream::connect(sock).expect("connect");
    d.send_line("accept");
    assert_eq!(d.expect_line(), "SERVED");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    assert_eq!(line, "pong\n");
}

#[test]
#[serial]
fn a_deleted_socket_is_rebound_and_nothing_someone_else_put_there_is_replaced() {
    let p = paths();
    let mut d = p.child("serve").spawn();
    assert_eq!(d.expect_line(), "READY");
    ping(&mut d, &p.sock);
    assert_eq!(
        rebind(&mut d),
        "ok false",
        "nothing to do while it is there"
    );

    // Deleted: nobody can connect, until rebind.
    std::fs::remove_file(&p.sock).unwrap();
    let e = UnixStream::connect(&p.sock).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(rebind(&mut d), "ok true");
    ping(&mut d, &p.sock);
    assert_eq!(rebind(&mut d), "ok false");

    // Someone else's file at the path: reported, never replaced.
    std::fs::remove_file(&p.sock).unwrap();
    std::fs::write(&p.sock, b"not yours\n").unwrap();
    let before = snapshot(&p.sock);
    assert_eq!(rebind(&mut d), "found regular file");
    assert_eq!(snapshot(&p.sock), before);

    // Someone else's socket, live: the same.
    std::fs::remove_file(&p.sock).unwrap();
    let theirs = UnixListener::bind(&p.sock).unwrap();
    let before = snapshot(&p.sock);
    assert_eq!(rebind(&mut d), "socket in use");
    assert_eq!(snapshot(&p.sock), before);
    drop(UnixStream::connect(&p.sock).expect("their socket still answers"));
    drop(theirs);
    // ... and dead (stale, but not ours): still left alone.
    assert_eq!(rebind(&mut d), "socket in use");
    assert_eq!(snapshot(&p.sock), before);

    // Gone again: rebound; SIGTERM's cleanup removes the new file.
    std::fs::remove_file(&p.sock).unwrap();
    assert_eq!(rebind(&mut d), "ok true");
    ping(&mut d, &p.sock);
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

#[test]
#[serial]
fn a_socket_rebound_after_a_tmp_cleaner_emptied_the_dir_is_removed_at_drop() {
    let p = paths();
    let mut d = p.child("serve").spawn();
    assert_eq!(d.expect_line(), "READY");
    std::fs::remove_file(&p.sock).unwrap();
    // The whole directory's content goes, as a tmp cleaner does.
    std::fs::remove_file(&p.pid).unwrap();
    assert_eq!(rebind(&mut d), "ok true");
    ping(&mut d, &p.sock);
    d.stop(); // Drop: removes the socket it bound last
    assert_absent(&[&p.sock, &p.pid]);
}

#[test]
#[serial]
fn cleanup_after_rebind_removes_only_the_socket_it_bound_last() {
    // In this process: no signal handling, and no child is spawned here.
    let p = paths();
    let mut g = DaemonGuard::builder(&p.sock, &p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .unwrap();
    std::fs::remove_file(&p.sock).unwrap();
    assert!(g.rebind().unwrap());
    assert!(common::is_socket(&p.sock));
    // Someone replaces the rebound socket: close leaves theirs alone.
    std::fs::remove_file(&p.sock).unwrap();
    std::fs::write(&p.sock, b"theirs\n").unwrap();
    let before = snapshot(&p.sock);
    g.close().unwrap();
    assert_eq!(snapshot(&p.sock), before);
    assert_absent(&[&p.pid]);
}

/// Waits until the re-created socket listens (connect(2) neither finds
/// nothing nor is refused between bind(2) and listen(2)); a connection made
/// here only waits in the backlog and is answered or dropped.
///
/// Then [`hello`] connects and reads one line, with a bound: `None` when nothing answers
/// (connect refused or missing, or no reply within 2 s).
fn hello(sock: &std::path::Path) -> Option<String> {
    let stream = UnixStream::connect(sock).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    (!line.is_empty()).then_some(line)
}

/// tmux's SIGUSR1, opted in with `on_signal(SIGUSR1, SignalAction::Rebind)`:
/// after the socket file is deleted nobody can connect; SIGUSR1 re-creates
/// it and the daemon's unchanged accept loop (blocked in accept(2) on the
/// old socket when the signal came) answers on it. A file someone else put
/// there meanwhile is never replaced, and the daemon lives on. SIGTERM then
/// removes the new socket and the PID file.
#[test]
#[serial]
fn sigusr1_rebinds_a_deleted_socket_and_the_accept_loop_serves_it() {
    let p = paths();
    let mut d = p.child("serve-loop").spawn();
    assert_eq!(d.expect_line(), "READY");
    let want = format!("hello {}\n", d.pid());
    assert_eq!(hello(&p.sock).as_deref(), Some(want.as_str()));

    // A file in the way: left alone, the daemon unharmed.
    std::fs::remove_file(&p.sock).unwrap();
    std::fs::write(&p.sock, "not yours").unwrap();
    let before = snapshot(&p.sock);
    d.signal(Signal::SIGUSR1);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(snapshot(&p.sock), before);
    assert!(!d.has_exited());

    std::fs::remove_file(&p.sock).unwrap();
    assert_eq!(hello(&p.sock), None, "deleted: unreachable");
    d.signal(Signal::SIGUSR1);
    common::examples::wait_until(
        || UnixStream::connect(&p.sock).is_ok(),
        "the re-created socket listening",
    );
    assert_eq!(hello(&p.sock).as_deref(), Some(want.as_str()));
    // Again: the loop keeps serving across rebinds.
    std::fs::remove_file(&p.sock).unwrap();
    d.signal(Signal::SIGUSR1);
    common::examples::wait_until(
        || UnixStream::connect(&p.sock).is_ok(),
        "the re-created socket listening",
    );
    assert_eq!(hello(&p.sock).as_deref(), Some(want.as_str()));

    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    assert_absent(&[&p.sock, &p.pid]);
}

/// With the listener taken out of the guard, SIGUSR1 still re-creates the
/// file, and the next `take_listener()` hands out the new listener.
#[test]
#[serial]
fn sigusr1_after_take_listener_hands_the_new_listener_out() {
    let p = paths();
    let mut d = p.child("taken").spawn();
    assert_eq!(d.expect_line(), "READY");
    d.send_line("take");
    assert_eq!(d.expect_line(), "NONE");
    std::fs::remove_file(&p.sock).unwrap();
    d.signal(Signal::SIGUSR1);
    // One connection only: the daemon accepts exactly one on the new
    // listener. Retried while the socket is not there or not listening yet.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(&p.sock) {
            Ok(s) => break s,
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    d.send_line("take");
    assert_eq!(d.expect_line(), "TAKEN");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    assert_eq!(line, "pong\n");
    d.close_stdin();
    d.wait_success();
    assert_absent(&[&p.sock, &p.pid]);
}

/// `SignalAction::Rebind` needs a socket: a PID-file guard refuses it
/// before anything on disk changes.
#[test]
fn rebind_on_a_pid_file_guard_is_refused_before_anything_changes() {
    let p = paths();
    let e = PidFileGuard::builder(&p.pid)
        .on_signal(nix::libc::SIGUSR1, SignalAction::Rebind)
        .acquire()
        .unwrap_err();
    assert!(
        matches!(
            e,
            LifecycleError::InvalidArgument {
                what: "on_signal",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(std::fs::read_dir(p.dir.path()).unwrap().count(), 0);
}

/// A thread accepting on a `try_clone` of the listener is not turned into a
/// busy loop by SIGUSR1: with a copy around the old socket is not shut down
/// (every later accept on the copy would fail at once); the file is still
/// re-created.
#[test]
#[serial]
fn sigusr1_leaves_a_copy_of_the_listener_blocked_not_spinning() {
    let p = paths();
    let mut d = p.child("clone").spawn();
    assert_eq!(d.expect_line(), "READY");
    assert_eq!(hello_pong(&p.sock), "pong\n", "the copy serves");
    std::fs::remove_file(&p.sock).unwrap();
    d.signal(Signal::SIGUSR1);
    common::examples::wait_until(|| p.sock.exists(), "the socket file re-created");
    std::thread::sleep(std::time::Duration::from_millis(200));
    d.send_line("errors");
    assert_eq!(d.expect_line(), "ERRORS 0");
}

fn hello_pong(sock: &std::path::Path) -> String {
    let stream = UnixStream::connect(sock).expect("connect");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}
