//! Readiness notification and socket activation, in real processes: a child
//! started with `NOTIFY_SOCKET` reports to a datagram socket the test binds,
//! and a child started with a listening socket as fd 3 and `LISTEN_PID` set
//! to its own PID (as `systemd-socket-activate` does) adopts it.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    child_main, env_path, is_cloexec, paths, report, ChildSpec, CHILD_ENV, DEFAULT_DEADLINE, DONE,
    ENTRY, MARKER, SOCK_ENV,
};
use historia_lifecycle::{activated_listener, scrub_service_env, LifecycleError, Notifier};

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "notify" => role_notify(),
        "notify-none" => role_notify_none(),
        "adopt" => role_adopt(),
        "adopt-none" => role_adopt_none(),
        "adopt-bad" => role_adopt_bad(),
        other => panic!("unknown role {other}"),
    });
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

/// Sends READY=1, tries a STATUS that smuggles a second assignment, sends
/// STOPPING=1; reports how the STATUS went and what a scrubbed child sees.
fn role_notify() {
    let n = Notifier::from_env()
        .expect("NOTIFY_SOCKET parses")
        .expect("NOTIFY_SOCKET is set");
    n.ready().expect("send READY=1");
    match n.status("a\nREADY=1") {
        Err(LifecycleError::InvalidArgument { .. }) => report("STATUS REFUSED"),
        other => report(format!("STATUS {other:?}")),
    }
    n.stopping().expect("send STOPPING=1");
    let out = scrub_service_env(&mut Command::new("/bin/sh"))
        .args(["-c", "echo ${NOTIFY_SOCKET-unset}"])
        .output()
        .expect("run sh");
    report(format!(
        "GRANDCHILD SEES {}",
        String::from_utf8_lossy(&out.stdout).trim()
    ));
}

/// Reports what `Notifier::from_env` gives without NOTIFY_SOCKET.
fn role_notify_none() {
    match Notifier::from_env() {
        Ok(None) => report("NONE"),
        other => report(format!("GOT {other:?}")),
    }
}

/// fd 3 is the listener at $HISTORIA_TEST_SOCK (named "ctl"), fd 4 one bound
/// elsewhere (named "other").
fn role_adopt() {
    let sock = env_path(SOCK_ENV);
    report(format!(
        "INHERITED CLOEXEC {} {}",
        is_cloexec(3),
        is_cloexec(4)
    ));
    match activated_listener(&sock, Some("other")) {
        Err(
            e @ LifecycleError::InvalidArgument {
                what: "inherited socket",
                ..
            },
        ) => report(format!("OTHER REFUSED {e}")),
        other => report(format!("OTHER {other:?}")),
    }
    // Even a refusal leaves every inherited fd close-on-exec.
    report(format!("NOW CLOEXEC {} {}", is_cloexec(3), is_cloexec(4)));
    let listener = activated_listener(&sock, None)
        .expect("adopt by path")
        .expect("LISTEN_PID is ours");
    report(format!("ADOPTED {}", listener.as_raw_fd()));
    // It is the socket at the path, and it listens.
    let mut client = UnixStream::connect(&sock).expect("connect to the adopted socket");
    let (mut served, _) = listener.accept().expect("accept");
    served.write_all(b"!").expect("write");
    let mut byte = [0u8; 1];
    client.read_exact(&mut byte).expect("read");
    report(format!("ACCEPTED {}", byte[0] as char));
    match activated_listener(&sock, Some("ctl")) {
        Err(LifecycleError::InvalidArgument { .. }) => report("AGAIN REFUSED"),
        other => report(format!("AGAIN {other:?}")),
    }
    // The fd not chosen stays open, untouched but close-on-exec.
    report(format!("FD4 OPEN CLOEXEC {}", is_cloexec(4)));
}

/// LISTEN_PID names another process: nothing to adopt.
fn role_adopt_none() {
    match activated_listener(Path::new("/nonexistent/s.sock"), None) {
        Ok(None) => report("NONE"),
        other => report(format!("GOT {other:?}")),
    }
}

/// LISTEN_PID is ours but LISTEN_FDS is bad.
fn role_adopt_bad() {
    match activated_listener(Path::new("/nonexistent/s.sock"), None) {
        Err(LifecycleError::InvalidArgument { what, .. }) => report(format!("INVALID {what}")),
        other => report(format!("GOT {other:?}")),
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// Every datagram waiting on `rx`, as text.
fn drain(rx: &UnixDatagram) -> Vec<String> {
    rx.set_nonblocking(true).expect("nonblocking");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match rx.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// The notify child's own report lines.
const NOTIFY_LINES: [&str; 2] = ["STATUS REFUSED", "GRANDCHILD SEES unset"];

#[test]
fn ready_then_stopping_reach_a_path_socket_and_nothing_else() {
    let p = paths();
    let sock = p.dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&sock).expect("bind the receiver");
    // The child's sends are synchronous: when it has exited, all are queued.
    let lines = p.child("notify").env("NOTIFY_SOCKET", &sock).run();
    assert_eq!(lines, NOTIFY_LINES);
    assert_eq!(drain(&rx), ["READY=1", "STOPPING=1"]);
}

#[cfg(target_os = "linux")]
#[test]
fn ready_then_stopping_reach_an_abstract_socket_and_nothing_else() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let p = paths();
    // Unique per run: the tempdir's own name.
    let tag = p.dir.path().file_name().unwrap().to_string_lossy();
    let name = format!("historia-test-notify-{}-{tag}", std::process::id());
    let addr = SocketAddr::from_abstract_name(&name).expect("abstract address");
    let rx = UnixDatagram::bind_addr(&addr).expect("bind the abstract receiver");
    let lines = p
        .child("notify")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .run();
    assert_eq!(lines, NOTIFY_LINES);
    assert_eq!(drain(&rx), ["READY=1", "STOPPING=1"]);
}

#[test]
fn no_notify_socket_means_no_notifier() {
    let lines = ChildSpec::new("notify-none")
        .env_remove("NOTIFY_SOCKET")
        .run();
    assert_eq!(lines, ["NONE"]);
}

/// Runs `role` as `systemd-socket-activate` would: `fds` become 3, 4, … in
/// the child (not close-on-exec), and `sh` sets `LISTEN_PID` to the child's
/// own PID before it `exec`s the test binary. Returns the report lines
/// before [`DONE`], after asserting the child exited 0.
fn run_activated(role: &str, fds: &[RawFd], envs: &[(&str, &OsStr)]) -> Vec<String> {
    assert!(fds.len() <= 8, "run_activated passes at most 8 fds");
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(exe)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let fds = fds.to_vec();
    // SAFETY: only fcntl(2), dup2(2) and prctl(2), all async-signal-safe; no
    // allocation (the Vec was built before fork).
    unsafe {
        cmd.pre_exec(move || {
            use nix::libc;
            // First out of the way (above any target number), close-on-exec,
            // then into place: dup2 leaves the copy without FD_CLOEXEC.
            let mut high = [0 as RawFd; 8];
            for (i, &fd) in fds.iter().enumerate() {
                high[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..fds.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn the activated child");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // The watchdog: kill the child at the deadline.
    let deadline = Instant::now() + DEFAULT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("activated child {role} outlived its deadline");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    let transcript = format!("{stdout}\n[stderr]\n{stderr}");
    assert!(
        status.success(),
        "child {role} exited with {status}:\n{transcript}"
    );
    let mut lines: Vec<String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix(MARKER).map(str::to_string))
        .collect();
    assert_eq!(
        lines.pop().as_deref(),
        Some(DONE),
        "child {role} did not finish:\n{transcript}"
    );
    lines
}

#[test]
fn a_listening_socket_passed_as_fd_3_is_adopted_by_path_and_refused_by_name_elsewhere() {
    let p = paths();
    let listener = UnixListener::bind(&p.sock).expect("bind the activated socket");
    let other_path = p.dir.path().join("other.sock");
    let other = UnixListener::bind(&other_path).expect("bind the other socket");
    let lines = {
        let fds = [listener.as_raw_fd(), other.as_raw_fd()];
        run_activated(
            "adopt",
            &fds,
            &[
                (SOCK_ENV, p.sock.as_os_str()),
                ("LISTEN_FDS", OsStr::new("2")),
                ("LISTEN_FDNAMES", OsStr::new("ctl:other")),
            ],
        )
    };
    assert_eq!(lines.len(), 7, "{lines:#?}");
    assert_eq!(lines[0], "INHERITED CLOEXEC false false");
    assert!(
        lines[1].starts_with("OTHER REFUSED ") && lines[1].contains(&*other_path.to_string_lossy()),
        "the refusal names the other path: {lines:#?}"
    );
    assert_eq!(lines[2], "NOW CLOEXEC true true");
    assert_eq!(lines[3], "ADOPTED 3");
    assert_eq!(lines[4], "ACCEPTED !");
    assert_eq!(lines[5], "AGAIN REFUSED");
    assert_eq!(lines[6], "FD4 OPEN CLOEXEC true");
}

#[test]
fn listen_pid_of_another_process_offers_nothing() {
    // LISTEN_PID is the test process's own PID, not the child's.
    let lines = ChildSpec::new("adopt-none")
        .env("LISTEN_PID", std::process::id().to_string())
        .env("LISTEN_FDS", "1")
        .run();
    assert_eq!(lines, ["NONE"]);
}

#[test]
fn listen_fds_zero_for_us_is_an_error() {
    let lines = run_activated("adopt-bad", &[], &[("LISTEN_FDS", OsStr::new("0"))]);
    assert_eq!(lines, ["INVALID LISTEN_FDS"]);
}
