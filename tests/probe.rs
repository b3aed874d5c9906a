//! The socket liveness probe, against real listeners in other processes.
//!
//! Only `ECONNREFUSED` on a path that `lstat(2)` calls a socket proves a
//! socket stale. Everything else (a live listener, a full backlog, permission
//! denied, something that is not a socket, a path too long for `sun_path`)
//! must leave the path exactly as it was.
//!
//! Tests that drop an in-process listener and then probe, or that spawn
//! children, are `#[serial]`: a child forked by a parallel test holds a copy of
//! every fd until it execs, which would keep a "dropped" listener alive.

#![cfg(target_os = "linux")]

mod common;

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use common::{
    assert_wrong_type, child_main, chmod, env_path, is_socket, report, serve_bare_listener,
    snapshot, tree_snapshot, wait_for_stdin_eof, ChildSpec, NOBODY, SOCK_ENV,
};
use historia_lifecycle::{
    check_singleton, cleanup_socket_file, probe_socket, try_check_singleton, DaemonGuard,
    DaemonInfo, FileKind, LifecycleError, SignalMode, SingletonCheck, SocketState,
};
use nix::errno::Errno;
use nix::sys::socket::{
    bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::sys::stat::Mode;
use serial_test::serial;

/// `sun_path` is 108 bytes on Linux, one of them the NUL.
const LINUX_SUN_PATH_MAX: usize = 107;
/// For the `unprivileged` role: the three socket paths it is denied on.
const NO_SEARCH_ENV: &str = "HISTORIA_NO_SEARCH";
const NO_CONNECT_ENV: &str = "HISTORIA_NO_CONNECT";
const NO_UNLINK_ENV: &str = "HISTORIA_NO_UNLINK";

// ---------------------------------------------------------------------------
// Child roles (see `common`).
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        // A daemon that listens and never accepts.
        "listen" => serve_bare_listener(&env_path(SOCK_ENV)),
        // A daemon whose backlog holds a single pending connection.
        "listen_backlog0" => {
            let path = env_path(SOCK_ENV);
            let fd = unix_socket(SockFlag::SOCK_CLOEXEC);
            bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
            listen(&fd, Backlog::new(0).unwrap()).unwrap();
            report("LISTENING");
            wait_for_stdin_eof();
        }
        "check_busy" => {
            let path = env_path(SOCK_ENV);
            assert_eq!(check_singleton(&path), SingletonCheck::AlreadyRunning);
            assert_eq!(probe_socket(&path).unwrap(), SocketState::Busy);
            assert_eq!(
                try_check_singleton(&path).unwrap(),
                SingletonCheck::AlreadyRunning
            );
        }
        "unprivileged" => unprivileged_checks(),
        other => panic!("unknown child role {other:?}"),
    });
}

/// Starts a listener child playing `role` at `path`; returns once it
/// listens.
fn start_listener(role: &str, path: &Path) -> common::ChildProc {
    let server = ChildSpec::new(role).env(SOCK_ENV, path).spawn();
    assert_eq!(server.expect_line(), "LISTENING");
    server
}

/// Runs as uid 65534: every way the probe can be denied.
fn unprivileged_checks() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        NOBODY,
        "must not run as root"
    );
    let denied = |path: &Path, e: LifecycleError| {
        assert!(
            matches!(&e, LifecycleError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied),
            "{}: expected Io(PermissionDenied), got {e:?}",
            path.display()
        );
        assert_eq!(e.path(), Some(path), "{e:?}");
    };
    // lstat itself is denied (a parent dir we may not search), and connect is
    // denied (a socket of mode 0000): nothing proves anything.
    for var in [NO_SEARCH_ENV, NO_CONNECT_ENV] {
        let path = env_path(var);
        assert_eq!(
            check_singleton(&path),
            SingletonCheck::AlreadyRunning,
            "{var}"
        );
        denied(&path, try_check_singleton(&path).unwrap_err());
        denied(&path, probe_socket(&path).unwrap_err());
    }
    // Stale, but its directory is not ours to write: the removal fails, so
    // StaleSocketCleaned must not be claimed.
    let path = env_path(NO_UNLINK_ENV);
    assert_eq!(probe_socket(&path).unwrap(), SocketState::Stale);
    assert_eq!(check_singleton(&path), SingletonCheck::AlreadyRunning);
    denied(&path, try_check_singleton(&path).unwrap_err());
}

// ---------------------------------------------------------------------------
// Point 1: liveness.
// ---------------------------------------------------------------------------

#[test]
fn nothing_at_the_path_is_available() {
    let dir = tempfile::tempdir().unwrap();
    for path in [dir.path().join("d.sock"), dir.path().join("missing/d.sock")] {
        assert_eq!(probe_socket(&path).unwrap(), SocketState::Absent);
        assert_eq!(
            try_check_singleton(&path).unwrap(),
            SingletonCheck::Available
        );
        assert_eq!(check_singleton(&path), SingletonCheck::Available);
        assert!(!path.exists());
    }
    assert!(
        !dir.path().join("missing").exists(),
        "the probe created a dir"
    );
}

#[test]
#[serial]
fn stale_socket_is_cleaned_once_then_available() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    make_stale_socket(&path);
    let before = snapshot(&path);

    // The probe is read-only: it says stale and leaves the file.
    assert_eq!(probe_socket(&path).unwrap(), SocketState::Stale);
    assert_eq!(snapshot(&path), before);

    assert_eq!(check_singleton(&path), SingletonCheck::StaleSocketCleaned);
    assert!(
        fs::symlink_metadata(&path).is_err(),
        "stale socket not removed"
    );
    assert_eq!(check_singleton(&path), SingletonCheck::Available);

    // The fallible form reports the same facts.
    make_stale_socket(&path);
    assert_eq!(
        try_check_singleton(&path).unwrap(),
        SingletonCheck::StaleSocketCleaned
    );
    assert!(fs::symlink_metadata(&path).is_err());
    assert_eq!(
        try_check_singleton(&path).unwrap(),
        SingletonCheck::Available
    );
}

#[test]
#[serial]
fn live_listener_in_a_child_is_already_running_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let mut server = start_listener("listen", &path);
    let before = snapshot(&path);

    assert_eq!(probe_socket(&path).unwrap(), SocketState::Listening);
    assert_eq!(check_singleton(&path), SingletonCheck::AlreadyRunning);
    assert_eq!(
        try_check_singleton(&path).unwrap(),
        SingletonCheck::AlreadyRunning
    );
    assert_eq!(
        snapshot(&path),
        before,
        "a live daemon's socket was touched"
    );

    // Once the daemon is gone (its file left behind), the same path is stale.
    server.stop();
    assert_eq!(snapshot(&path), before);
    assert_eq!(check_singleton(&path), SingletonCheck::StaleSocketCleaned);
    assert!(fs::symlink_metadata(&path).is_err());
}

#[test]
#[serial]
fn full_backlog_is_busy_and_the_check_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let mut server = start_listener("listen_backlog0", &path);
    let before = snapshot(&path);

    // Fill the backlog of the listener that never accepts until the kernel
    // answers EAGAIN, keeping every pending connection open.
    let addr = UnixAddr::new(&path).unwrap();
    let mut pending: Vec<OwnedFd> = Vec::new();
    let mut saw_eagain = false;
    for _ in 0..1000 {
        let fd = unix_socket(SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK);
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => pending.push(fd),
            Err(Errno::EAGAIN) => {
                saw_eagain = true;
                break;
            }
            Err(e) => panic!("unexpected connect error {e}"),
        }
    }
    assert!(
        saw_eagain,
        "backlog never filled after {} connects",
        pending.len()
    );

    // A blocking connect would hang here forever; the check must return, so
    // run it first in a child under the watchdog.
    ChildSpec::new("check_busy").env(SOCK_ENV, &path).run();

    assert_eq!(probe_socket(&path).unwrap(), SocketState::Busy);
    assert!(SocketState::Busy.is_live());
    assert_eq!(check_singleton(&path), SingletonCheck::AlreadyRunning);
    assert_eq!(
        try_check_singleton(&path).unwrap(),
        SingletonCheck::AlreadyRunning
    );
    assert_eq!(
        snapshot(&path),
        before,
        "a busy daemon's socket was touched"
    );
    drop(pending);
    server.stop();
}

#[test]
#[serial]
fn permission_denied_is_never_proof_of_staleness() {
    // Root bypasses permissions, so the checks run as uid 65534 in a child;
    // the base must be traversable by that user.
    let base = tempfile::Builder::new()
        .prefix("historia-probe-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(base.path(), 0o755);

    // 1. A stale socket in a dir 65534 may not search: lstat says EACCES.
    let hidden = base.path().join("hidden");
    fs::create_dir(&hidden).unwrap();
    let no_search = hidden.join("d.sock");
    make_stale_socket(&no_search);
    chmod(&no_search, 0o777);
    chmod(&hidden, 0o700);

    // 2. A stale socket of mode 0000: connect says EACCES.
    let open = base.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o755);
    let no_connect = open.join("d.sock");
    make_stale_socket(&no_connect);
    chmod(&no_connect, 0o000);

    // 3. A provably stale socket in a dir 65534 may not write: unlink fails.
    let no_unlink = open.join("stale.sock");
    make_stale_socket(&no_unlink);
    chmod(&no_unlink, 0o777);

    // As root all three are plainly stale, so only permissions differ.
    for p in [&no_search, &no_connect, &no_unlink] {
        assert_eq!(
            probe_socket(p).unwrap(),
            SocketState::Stale,
            "{}",
            p.display()
        );
    }
    let before = tree_snapshot(base.path());

    ChildSpec::new("unprivileged")
        .env(NO_SEARCH_ENV, &no_search)
        .env(NO_CONNECT_ENV, &no_connect)
        .env(NO_UNLINK_ENV, &no_unlink)
        .user(NOBODY)
        .run();

    assert_eq!(
        tree_snapshot(base.path()),
        before,
        "a denied probe changed the disk"
    );
}

// ---------------------------------------------------------------------------
// Point 2: never remove what is not a socket.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn non_sockets_at_the_socket_path_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, b"precious\n").unwrap();
    let victim_socket = dir.path().join("victim.sock");
    make_stale_socket(&victim_socket);

    let cases = non_socket_cases(dir.path(), &victim, &victim_socket);
    let before = tree_snapshot(dir.path());
    for (path, found) in &cases {
        let what = format!("{found:?} at {}", path.display());
        assert_eq!(
            check_singleton(path),
            SingletonCheck::AlreadyRunning,
            "{what}"
        );
        assert_wrong_type(
            path,
            FileKind::Socket,
            *found,
            try_check_singleton(path).unwrap_err(),
        );
        assert_wrong_type(
            path,
            FileKind::Socket,
            *found,
            probe_socket(path).unwrap_err(),
        );
        assert_wrong_type(
            path,
            FileKind::Socket,
            *found,
            cleanup_socket_file(path).unwrap_err(),
        );
    }
    assert_eq!(
        tree_snapshot(dir.path()),
        before,
        "a non-socket or its target changed"
    );
    // The symlinked stale socket itself was never a candidate either.
    assert_eq!(probe_socket(&victim_socket).unwrap(), SocketState::Stale);
}

/// Every non-socket kind the tests put at a socket path, with what `lstat`
/// calls it.
fn non_socket_cases(dir: &Path, victim: &Path, victim_socket: &Path) -> Vec<(PathBuf, FileKind)> {
    let regular = dir.join("regular.sock");
    fs::write(&regular, b"not a socket").unwrap();
    let empty_dir = dir.join("empty-dir.sock");
    fs::create_dir(&empty_dir).unwrap();
    let full_dir = dir.join("full-dir.sock");
    fs::create_dir(&full_dir).unwrap();
    fs::write(full_dir.join("inside"), b"x").unwrap();
    let fifo = dir.join("fifo.sock");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let link_file = dir.join("link-to-file.sock");
    symlink(victim, &link_file).unwrap();
    let link_socket = dir.join("link-to-socket.sock");
    symlink(victim_socket, &link_socket).unwrap();
    let dangling = dir.join("dangling.sock");
    symlink(dir.join("nowhere"), &dangling).unwrap();
    vec![
        (regular, FileKind::Regular),
        (empty_dir, FileKind::Directory),
        (full_dir, FileKind::Directory),
        (fifo, FileKind::Fifo),
        (link_file, FileKind::Symlink),
        (link_socket, FileKind::Symlink),
        (dangling, FileKind::Symlink),
    ]
}

// ---------------------------------------------------------------------------
// Point 3: sun_path.
// ---------------------------------------------------------------------------

#[test]
fn socket_path_longer_than_sun_path_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let base_len = dir.path().as_os_str().len();

    // A 200-byte path in a subdirectory that does not exist yet…
    let missing = dir.path().join("sub").join("x".repeat(200 - base_len - 5));
    // …and one naming an existing regular file.
    let existing = dir.path().join("y".repeat(200 - base_len - 1));
    fs::write(&existing, b"keep me").unwrap();
    let pid = dir.path().join("d.pid");
    let before = tree_snapshot(dir.path());

    for path in [&missing, &existing] {
        assert_eq!(path.as_os_str().len(), 200);
        let too_long = |e: LifecycleError| {
            assert!(
                matches!(&e, LifecycleError::PathTooLong { len: 200, max: LINUX_SUN_PATH_MAX, path: p } if p == path),
                "expected PathTooLong(200, {LINUX_SUN_PATH_MAX}), got {e:?}"
            );
            assert_eq!(e.path(), Some(path.as_path()));
        };
        assert_eq!(check_singleton(path), SingletonCheck::AlreadyRunning);
        too_long(try_check_singleton(path).unwrap_err());
        too_long(probe_socket(path).unwrap_err());
        too_long(
            DaemonGuard::builder(path, &pid)
                .signals(SignalMode::Off)
                .acquire()
                .unwrap_err(),
        );
        too_long(
            DaemonInfo::new(path.clone(), pid.clone())
                .cleanup()
                .unwrap_err(),
        );
    }
    assert_eq!(
        tree_snapshot(dir.path()),
        before,
        "a refused path changed the disk"
    );
}

#[test]
#[serial]
fn socket_path_of_exactly_107_bytes_works_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let name_len = LINUX_SUN_PATH_MAX - dir.path().as_os_str().len() - 1;
    let path = dir.path().join("s".repeat(name_len));
    assert_eq!(path.as_os_str().len(), LINUX_SUN_PATH_MAX);

    assert_eq!(probe_socket(&path).unwrap(), SocketState::Absent);
    let listener = UnixListener::bind(&path).unwrap();
    assert_eq!(probe_socket(&path).unwrap(), SocketState::Listening);
    assert_eq!(check_singleton(&path), SingletonCheck::AlreadyRunning);
    drop(listener);
    assert_eq!(probe_socket(&path).unwrap(), SocketState::Stale);
    assert_eq!(check_singleton(&path), SingletonCheck::StaleSocketCleaned);
    assert_eq!(check_singleton(&path), SingletonCheck::Available);

    // The guard binds it too, at exactly that path (no truncation).
    let guard = DaemonGuard::builder(&path, dir.path().join("d.pid"))
        .signals(SignalMode::Off)
        .acquire()
        .unwrap();
    let bound = guard.listener().unwrap().local_addr().unwrap();
    assert_eq!(bound.as_pathname(), Some(path.as_path()));
    assert_eq!(probe_socket(&path).unwrap(), SocketState::Listening);
    guard.close().unwrap();
    assert!(fs::symlink_metadata(&path).is_err());

    // One byte more no longer fits.
    let longer = dir.path().join("s".repeat(name_len + 1));
    assert!(matches!(
        probe_socket(&longer),
        Err(LifecycleError::PathTooLong {
            len: 108,
            max: LINUX_SUN_PATH_MAX,
            ..
        })
    ));
}

// ---------------------------------------------------------------------------
// Point 6 (socket half): cleanup_socket_file.
// ---------------------------------------------------------------------------

#[test]
fn cleanup_socket_file_is_idempotent_and_removes_only_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    cleanup_socket_file(&path).unwrap();
    cleanup_socket_file(&path).unwrap();

    make_stale_socket(&path);
    cleanup_socket_file(&path).unwrap();
    assert!(fs::symlink_metadata(&path).is_err(), "socket not removed");
    cleanup_socket_file(&path).unwrap();

    fs::write(&path, b"a regular file").unwrap();
    let before = snapshot(&path);
    assert_wrong_type(
        &path,
        FileKind::Socket,
        FileKind::Regular,
        cleanup_socket_file(&path).unwrap_err(),
    );
    assert_eq!(snapshot(&path), before, "a regular file was touched");
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn unix_socket(flags: SockFlag) -> OwnedFd {
    socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap()
}

/// Leaves a socket file nobody listens on, as a crashed daemon does.
fn make_stale_socket(path: &Path) {
    drop(UnixListener::bind(path).unwrap());
    assert!(is_socket(path));
}
