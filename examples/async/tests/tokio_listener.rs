//! `DaemonGuard::take_tokio_listener` (the root crate's feature `tokio`):
//! a clear error outside a runtime, a non-blocking close-on-exec listener
//! inside one, and the interplay with `rebind` and cleanup.
//!
//! In-process guards with `SignalMode::Off`, as the root crate's tests
//! acquire in the test process: nothing here is about signals.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use common::{is_cloexec, paths};
use historia_lifecycle::LifecycleError;

fn nonblocking(fd: i32) -> bool {
    // SAFETY: F_GETFL only reads the status flags of an open descriptor.
    let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
    flags & nix::libc::O_NONBLOCK != 0
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn outside_a_runtime_it_is_no_runtime_and_the_listener_stays_in_the_guard() {
    let p = paths();
    let mut guard = p.acquire_here().expect("acquire");
    let err = guard.take_tokio_listener().unwrap_err();
    assert!(matches!(err, LifecycleError::NoRuntime), "{err:?}");
    assert_eq!(err.path(), None);
    let listener = guard.listener().expect("still in the guard");
    assert!(
        !nonblocking(listener.as_raw_fd()),
        "left untouched: blocking"
    );
    guard.close().expect("close");
    p.assert_gone();
}

#[test]
fn inside_a_runtime_it_is_non_blocking_close_on_exec_and_accepts() {
    let p = paths();
    let mut guard = p.acquire_here().expect("acquire");
    let rt = runtime();
    rt.block_on(async {
        let listener = guard.take_tokio_listener().expect("take");
        let fd = listener.as_raw_fd();
        assert!(nonblocking(fd), "O_NONBLOCK set");
        assert!(is_cloexec(fd), "FD_CLOEXEC kept");
        assert!(guard.listener().is_none(), "taken, not duplicated");

        let client = UnixStream::connect(&p.sock).expect("connect by path");
        let (served, _) = listener.accept().await.expect("accept");
        let peer = served.peer_cred().expect("peer credentials");
        assert_eq!(peer.pid(), Some(std::process::id() as i32));
        drop(client);

        let again = guard.take_tokio_listener().unwrap_err();
        assert!(
            matches!(
                again,
                LifecycleError::InvalidArgument {
                    what: "listener",
                    ..
                }
            ),
            "{again:?}"
        );
        assert!(again.to_string().contains(&p.sock.display().to_string()));

        // Cleanup does not need the listener back: the socket file and the
        // PID file go while the server still holds it.
        drop(listener);
    });
    guard.close().expect("close");
    p.assert_gone();
}

#[test]
fn after_runtime_enter_it_works_outside_block_on() {
    let p = paths();
    let mut guard = p.acquire_here().expect("acquire");
    let rt = runtime();
    let listener = {
        let _entered = rt.enter();
        guard
            .take_tokio_listener()
            .expect("take inside Runtime::enter")
    };
    let client = UnixStream::connect(&p.sock).expect("connect");
    rt.block_on(listener.accept()).expect("accept");
    drop(client);
    drop(guard);
    p.assert_gone();
}

/// rebind() puts a fresh listener, on a fresh socket file, back in the
/// guard; taking it again gives a tokio listener clients reach by path,
/// and cleanup removes the new file.
#[test]
fn a_rebound_socket_is_taken_again_and_reached_by_path() {
    let p = paths();
    let mut guard = p.acquire_here().expect("acquire");
    let rt = runtime();
    rt.block_on(async {
        let first = guard.take_tokio_listener().expect("take");
        std::fs::remove_file(&p.sock).expect("an operator's rm");
        assert!(UnixStream::connect(&p.sock).is_err(), "unreachable by path");

        assert!(guard.rebind().expect("rebind"), "re-created");
        let second = guard.take_tokio_listener().expect("take the new one");
        let client = UnixStream::connect(&p.sock).expect("connect to the new socket");
        let (_served, _) = second.accept().await.expect("accept on the new listener");
        drop((client, first, second));
    });
    guard.close().expect("close");
    p.assert_gone();
}
