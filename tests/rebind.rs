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
use historia_lifecycle::{DaemonGuard, LifecycleError, SignalMode};
use nix::sys::signal::Signal;
use serial_test::serial;

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "serve" => role_serve(),
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
