//! `bind(2)` answering `EADDRINUSE` under the claim: every outcome of the
//! probe that follows is a clear error naming the path, and nothing that is
//! not provably ours is removed. A listener is `AlreadyRunning` (tested in
//! `guard.rs`); a socket we may not probe, or of another type, is
//! `SocketInUse`.
//!
//! The other party is always a real process (this test binary re-run with a
//! role, see `common`); the unprivileged acquirer runs as 65534.

#![cfg(target_os = "linux")]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;

use common::{
    child_main, child_paths, chmod, paths, report, snapshot, tree_snapshot, wait_for_stdin_eof,
    ChildSpec, NOBODY, PID_ENV, SOCK_ENV,
};
use historia_lifecycle::{DaemonGuard, LifecycleError, SignalMode};
use serial_test::serial;

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "dgram" => {
            let (sock, _) = child_paths();
            let d = UnixDatagram::bind(&sock).expect("bind a datagram socket");
            report("BOUND");
            wait_for_stdin_eof();
            drop(d);
        }
        "listen-0600" => {
            let (sock, _) = child_paths();
            let l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
            chmod(&sock, 0o600);
            report("LISTENING");
            wait_for_stdin_eof();
            drop(l);
        }
        "acquire-in-use" => {
            let (sock, pid) = child_paths();
            let r = DaemonGuard::builder(&sock, &pid)
                .signals(SignalMode::Off)
                .acquire();
            let e = r.expect_err("the socket path is someone else's");
            assert_in_use(&e, &sock);
            report(e.to_string());
        }
        other => panic!("unknown child role {other:?}"),
    });
}

fn assert_in_use(e: &LifecycleError, sock: &Path) {
    match e {
        LifecycleError::SocketInUse { path, .. } => assert_eq!(path, sock, "{e}"),
        other => panic!("expected SocketInUse, got {other:?}"),
    }
    assert_eq!(e.path(), Some(sock));
    let m = e.to_string();
    assert!(m.contains(&sock.display().to_string()), "{m}");
    assert!(m.contains("in use by someone else"), "{m}");
}

#[test]
#[serial]
fn a_datagram_socket_at_the_path_is_socket_in_use_and_left_alone() {
    let p = paths();
    let mut dgram = p.child("dgram").spawn();
    assert_eq!(dgram.expect_line(), "BOUND");
    let before = snapshot(&p.sock);

    let e = p
        .acquire_here()
        .expect_err("a datagram socket holds the path");
    assert_in_use(&e, &p.sock);
    assert!(e.to_string().contains("another type"), "{e}");
    assert_eq!(snapshot(&p.sock), before, "the datagram socket was touched");
    assert!(!p.pid.exists(), "the failed acquire left its PID file");

    // Once its owner is gone it is provably stale, and reclaimed.
    dgram.stop();
    let guard = p
        .acquire_here()
        .expect("acquire over a dead datagram socket");
    assert!(guard.reclaimed_stale_socket());
    guard.close().unwrap();
    p.assert_gone();
}

#[test]
#[serial]
fn another_users_socket_is_socket_in_use_live_or_dead_and_never_removed() {
    // A sticky world-writable dir (as /tmp): 65534 may create its PID file
    // there, but root's 0600 socket refuses it permission to connect, so
    // nothing about that socket can be proven.
    let base = tempfile::Builder::new()
        .prefix("historia-inuse-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(base.path(), 0o1777);
    let sock = base.path().join("daemon.sock");
    let pid = base.path().join("daemon.pid");
    // The dir's own times move (the PID file came and went); its entries
    // must not.
    let below = || {
        let mut t = tree_snapshot(base.path());
        t.remove(base.path());
        t
    };
    let spec = |role: &str| ChildSpec::new(role).env(SOCK_ENV, &sock).env(PID_ENV, &pid);

    let mut root = spec("listen-0600").spawn();
    assert_eq!(root.expect_line(), "LISTENING");
    let before = below();
    let said = spec("acquire-in-use").user(NOBODY).run();
    assert!(said[0].contains("refuses us permission"), "{said:?}");
    assert_eq!(below(), before, "live: something changed");

    // Root's listener is gone; the socket file stays. 65534 still cannot
    // connect, so it cannot tell stale from live: it must not remove it.
    root.stop();
    let before = below();
    let said = spec("acquire-in-use").user(NOBODY).run();
    assert!(said[0].contains("refuses us permission"), "{said:?}");
    assert_eq!(below(), before, "dead: something changed");
}
