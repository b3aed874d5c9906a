//! The async example daemon as a user runs it: a real process serving HTTP
//! on the guard's Unix socket, driven by curl (`curl --unix-socket`, a
//! client nobody here wrote), stopped by real signals. Every wait has a
//! watchdog.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::examples::{require_tool, run, wait_with_watchdog, Daemon, KillOnDrop, Ran};
use common::{paths, Paths};
use nix::sys::signal::Signal;

/// What `/slow` answers, in full.
const SLOW_BODY: &str = "slow answer, complete after 2000 ms\n";

/// `async-daemon --socket … --pid …`, the developer's overrides cleared.
fn daemon_cmd(p: &Paths) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_async-daemon"));
    cmd.arg("--socket")
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .env_remove("HISTORIA_DEMO_SOCKET")
        .env_remove("HISTORIA_DEMO_PID")
        .stdin(Stdio::null());
    cmd
}

/// `curl` for `http://localhost<path>` over the Unix socket; fails naming
/// the package when curl is missing.
fn curl(sock: &Path, path: &str) -> Command {
    let mut cmd = Command::new(require_tool("curl", "curl"));
    // -sS: no progress meter, but errors; --max-time: curl's own watchdog.
    cmd.args(["-sS", "--max-time", "15", "--unix-socket"])
        .arg(sock)
        .arg(format!("http://localhost{path}"))
        .stdin(Stdio::null());
    cmd
}

/// curl's exit status for "Failed to connect" (`CURLE_COULDNT_CONNECT`).
const CURL_COULDNT_CONNECT: i32 = 7;

fn assert_code(ran: &Ran, code: i32, what: &str) {
    assert_eq!(ran.code(), Some(code), "{what}: {ran}");
}

/// The lines the daemon printed, in order, that are among `wanted`.
fn log_lines<'a>(d: &Daemon, wanted: &[&'a str]) -> Vec<&'a str> {
    let out = d.output();
    out.lines()
        .filter_map(|l| wanted.iter().find(|w| **w == l).copied())
        .collect()
}

#[test]
fn get_is_answered_over_the_unix_socket_and_sigint_exits_130() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    let ran = run(curl(&p.sock, "/"));
    assert_code(&ran, 0, "GET /");
    assert!(
        ran.stdout.starts_with(&format!("pid {} uptime ", d.pid())),
        "{ran}"
    );
    let missing = run(curl(&p.sock, "/nope"));
    assert_code(&missing, 0, "GET /nope");

    d.signal(Signal::SIGINT);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(130), "{status}\n{}", d.output());
    p.assert_gone();
}

/// SIGHUP is a reload request a task awaits (`Reload::requested`): the
/// daemon keeps serving, `GET /` counts each reload, and both files stay.
#[test]
fn sighup_is_a_reload_the_async_daemon_awaits_and_it_keeps_serving() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    for n in 1..=2 {
        d.signal(Signal::SIGHUP);
        d.wait_for_line(&format!("reloaded ({n})"));
        let ran = run(curl(&p.sock, "/"));
        assert_code(&ran, 0, "GET / after SIGHUP");
        assert!(ran.stdout.ends_with(&format!(" reloads {n}\n")), "{ran}");
    }
    assert!(p.sock.exists() && p.pid.exists());
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(143), "{status}\n{}", d.output());
    p.assert_gone();
}

/// The drain: a request in progress when SIGTERM arrives gets its whole
/// answer, while new connections are refused at once; then both files are
/// gone and the daemon exits 143.
#[test]
fn sigterm_mid_request_drains_it_refuses_new_connections_removes_files_and_exits_143() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));

    let body = tempfile::NamedTempFile::new().expect("temp file");
    let mut slow = curl(&p.sock, "/slow");
    slow.stdout(body.reopen().expect("reopen"));
    let mut slow = KillOnDrop(slow.spawn().expect("spawn curl"));
    d.wait_for_line("slow request started");

    d.signal(Signal::SIGTERM);
    d.wait_for_line("stopped accepting");
    // Still draining (the guard closes only after /slow answered): the
    // socket file is there, but nobody accepts on it any more.
    assert!(p.sock.exists() && p.pid.exists(), "{}", d.output());
    let refused = UnixStream::connect(&p.sock);
    let drained = log_lines(&d, &["drained"]);
    assert!(
        drained.is_empty(),
        "precondition: /slow (2 s) was still running when we connected\n{}",
        d.output()
    );
    match refused {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
        Ok(_) => panic!("a connection after SIGTERM was accepted\n{}", d.output()),
    }
    // And as curl sees it (refused while draining, or no socket after).
    let late = run(curl(&p.sock, "/"));
    assert_code(&late, CURL_COULDNT_CONNECT, "GET / after SIGTERM");

    let status = wait_with_watchdog(&mut slow.0, "curl /slow");
    assert!(status.success(), "curl /slow: {status}\n{}", d.output());
    let mut got = String::new();
    body.reopen()
        .expect("reopen")
        .read_to_string(&mut got)
        .expect("read body");
    assert_eq!(
        got, SLOW_BODY,
        "the request in progress got its full answer"
    );

    let status = d.wait_exit();
    assert_eq!(status.code(), Some(143), "{status}\n{}", d.output());
    p.assert_gone();
    // axum's task and ours await the same future, in either order; both
    // come before the drain ends, and the guard closes after it.
    let order = log_lines(
        &d,
        &[
            "shutting down (SIGTERM)",
            "stopped accepting",
            "drained",
            "stopped",
        ],
    );
    assert_eq!(order.len(), 4, "{}", d.output());
    assert_eq!(order[2..], ["drained", "stopped"], "{}", d.output());
}

/// The drain is bounded: a client that sent half a request and then
/// nothing does not keep the daemon alive; it still removes both files and
/// exits 143.
#[test]
fn a_stuck_client_cannot_hold_the_daemon_past_the_drain_bound() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    let mut stuck = UnixStream::connect(&p.sock).expect("connect");
    stuck
        .write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")
        .expect("write half a request");
    // Served on another connection: the daemon is up and the stuck one
    // was accepted first.
    let ran = run(curl(&p.sock, "/"));
    assert_code(&ran, 0, "GET / beside the stuck client");

    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(143), "{status}\n{}", d.output());
    p.assert_gone();
    assert!(
        d.output()
            .contains("requests still running after 5s; exiting anyway"),
        "the bound, not the client, ended the drain\n{}",
        d.output()
    );
    drop(stuck);
}

/// A second SIGTERM while the drain runs ends the daemon at once through the
/// crate's signal thread, which still removes both files.
#[test]
fn a_second_sigterm_during_the_drain_ends_it_at_once_and_removes_the_files() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    let mut slow = KillOnDrop(
        curl(&p.sock, "/slow")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn curl"),
    );
    d.wait_for_line("slow request started");
    d.signal(Signal::SIGTERM);
    d.wait_for_line("shutting down (SIGTERM)");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(
        status.signal(),
        Some(Signal::SIGTERM as i32),
        "{status}\n{}",
        d.output()
    );
    p.assert_gone();
    assert!(
        log_lines(&d, &["drained"]).is_empty(),
        "it did not wait for the drain\n{}",
        d.output()
    );
    let _ = wait_with_watchdog(&mut slow.0, "curl /slow");
}

#[test]
fn a_second_instance_exits_3_and_the_first_keeps_serving() {
    let p = paths();
    let mut first = Daemon::start(daemon_cmd(&p));
    let second = run(daemon_cmd(&p));
    assert_code(&second, 3, "second instance");
    assert!(
        second
            .stderr
            .contains(&format!("already running as pid {}", first.pid())),
        "{second}"
    );
    let ran = run(curl(&p.sock, "/"));
    assert_code(&ran, 0, "GET / after the refused start");
    assert!(
        ran.stdout.starts_with(&format!("pid {} ", first.pid())),
        "{ran}"
    );

    first.signal(Signal::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(143), "{}", first.output());
    p.assert_gone();
}
