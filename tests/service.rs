//! The guards under a service manager, with real processes and the real
//! tools: `READY=1` when the daemon says so and `STOPPING=1` first thing at
//! cleanup (Drop or SIGTERM), `ERRNO=` and `STATUS=` for a start that fails,
//! socket activation through `systemd-socket-activate` (the socket is
//! adopted, never unlinked; the PID-file claim still refuses a second
//! instance), and `start-stop-daemon --notify-await` against the example
//! daemon.
//!
//! The tools come from Debian's `systemd` and `dpkg` packages; a test whose
//! tool is missing fails naming the package (`.ci/run` installs both).

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::examples::{
    daemon_cmd, read_reply, request_on, require_tool, run, send, ssd_stop, Daemon, KillOnDrop,
    WATCHDOG,
};
use common::{
    child_main, child_paths, is_socket, paths, read_stdin_line, report, wait_for_stdin_eof,
    CHILD_ENV, ENTRY, PID_ENV, SOCK_ENV,
};
use historia_lifecycle::{Activation, DaemonGuard, LifecycleError, PidFileGuard, SignalMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "serve-ready" => role_serve_ready(),
        "pid-ready" => role_pid_ready(),
        "try-start" => role_try_start(),
        "require-activation" => role_require_activation(),
        "activated" => role_activated(),
        other => panic!("unknown role {other}"),
    });
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

/// A socket daemon in the default mode: acquires, reports, waits for `ready`
/// on stdin, calls `guard.ready()`, then blocks (the parent sends SIGTERM).
fn role_serve_ready() {
    let (sock, pid) = child_paths();
    let guard = DaemonGuard::acquire(&sock, &pid).expect("acquire");
    report("ACQUIRED");
    assert_eq!(read_stdin_line().as_deref(), Some("ready"));
    guard.ready().expect("READY=1");
    report("READY");
    wait_for_stdin_eof();
    drop(guard);
    report("DROPPED");
}

/// A PID-file-only daemon: ready at once, dropped at end of stdin.
fn role_pid_ready() {
    let guard = PidFileGuard::acquire(child_paths().1).expect("acquire");
    guard.ready().expect("READY=1");
    report("READY");
    wait_for_stdin_eof();
    drop(guard);
    report("DROPPED");
}

/// Tries to start; reports the error variant.
fn role_try_start() {
    let (sock, pid) = child_paths();
    match DaemonGuard::builder(&sock, &pid)
        .signals(SignalMode::Off)
        .acquire()
    {
        Ok(_) => report("STARTED"),
        Err(LifecycleError::AlreadyRunning) => report("REFUSED AlreadyRunning"),
        Err(e) => report(format!("ERROR {e}")),
    }
}

/// `Activation::Require` with nothing passed down.
fn role_require_activation() {
    let (sock, pid) = child_paths();
    match DaemonGuard::builder(&sock, &pid)
        .signals(SignalMode::Off)
        .socket_activation(Activation::Require)
        .acquire()
    {
        Err(LifecycleError::InvalidArgument { what, .. }) => report(format!("REFUSED {what}")),
        other => report(format!("GOT {other:?}")),
    }
}

/// Started by `systemd-socket-activate`: adopts fd 3, answers the queued
/// client with "hello", then ends as stdin says (`drop`), or by a signal.
fn role_activated() {
    let (sock, pid) = child_paths();
    let guard = DaemonGuard::acquire(&sock, &pid).expect("acquire under activation");
    report(format!("ACTIVATED {}", guard.is_socket_activated()));
    let (mut conn, _) = guard
        .listener()
        .expect("listener")
        .accept()
        .expect("accept");
    std::io::Write::write_all(&mut conn, b"hello\n").expect("answer");
    drop(conn);
    report("ANSWERED");
    if read_stdin_line().as_deref() == Some("drop") {
        drop(guard);
        report("DROPPED");
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Every datagram that arrives on `rx` within `wait` after the last one, as
/// text: the sends are synchronous, so what a finished child sent is queued.
fn drain(rx: &UnixDatagram, wait: Duration) -> Vec<String> {
    rx.set_read_timeout(Some(wait)).expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = rx.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

/// A datagram receiver at a path in the test dir.
fn receiver(dir: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.join("notify.sock");
    (UnixDatagram::bind(&path).expect("bind the receiver"), path)
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

/// Exactly `READY=1` once the daemon calls `ready()`, nothing before it,
/// then exactly `STOPPING=1` when SIGTERM starts the cleanup; both files
/// are gone and the process died by SIGTERM.
#[test]
fn ready_after_the_call_and_stopping_at_sigterm_in_that_order() {
    let p = paths();
    let (rx, notify) = receiver(p.dir.path());
    let mut c = p.child("serve-ready").env("NOTIFY_SOCKET", &notify).spawn();
    assert_eq!(c.expect_line(), "ACQUIRED");
    assert_eq!(
        drain(&rx, Duration::from_millis(50)),
        Vec::<String>::new(),
        "nothing before the daemon says it is ready"
    );
    c.send_line("ready");
    assert_eq!(c.expect_line(), "READY");
    assert_eq!(drain(&rx, Duration::from_millis(50)), ["READY=1"]);
    c.signal(Signal::SIGTERM);
    c.wait_signaled(Signal::SIGTERM);
    assert_eq!(drain(&rx, Duration::from_millis(50)), ["STOPPING=1"]);
    p.assert_gone();
}

/// The same for a PID-file-only guard ended by Drop, to an abstract
/// `NOTIFY_SOCKET=@name`.
#[cfg(target_os = "linux")]
#[test]
fn pid_file_guard_reports_ready_and_stopping_to_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let p = paths();
    let tag = p.dir.path().file_name().unwrap().to_string_lossy();
    let name = format!("historia-test-service-{}-{tag}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
    let rx = UnixDatagram::bind_addr(&addr).expect("bind the abstract receiver");
    let mut c = p
        .child("pid-ready")
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .spawn();
    assert_eq!(c.expect_line(), "READY");
    c.close_stdin();
    assert_eq!(c.expect_line(), "DROPPED");
    c.wait_success();
    assert_eq!(
        drain(&rx, Duration::from_millis(50)),
        ["READY=1", "STOPPING=1"]
    );
    assert!(!p.pid.exists());
}

/// A start that fails while a manager waits tells it why, in one datagram:
/// the reason as `STATUS=` and the errno as `ERRNO=`. No `READY=1` and no
/// `STOPPING=1`.
#[test]
fn a_failed_start_reports_errno_and_the_reason() {
    // The socket path is a directory: EISDIR (21).
    let p = paths();
    std::fs::create_dir(&p.sock).unwrap();
    let (rx, notify) = receiver(p.dir.path());
    let lines = p.child("try-start").env("NOTIFY_SOCKET", &notify).run();
    assert!(lines[0].starts_with("ERROR "), "{lines:?}");
    let got = drain(&rx, Duration::from_millis(50));
    assert_eq!(got.len(), 1, "{got:?}");
    let (status, errno) = got[0].split_once('\n').expect("two assignments");
    assert!(
        status.starts_with("STATUS=cannot start: ") && status.contains(&*p.sock.to_string_lossy()),
        "{status}"
    );
    assert_eq!(errno, format!("ERRNO={}", nix::libc::EISDIR));
    assert!(!p.pid.exists(), "the failed start left no PID file");

    // Already running: EEXIST (17), and the running daemon is untouched.
    let p = paths();
    let mut holder = p.child("pid-ready").spawn();
    assert_eq!(holder.expect_line(), "READY");
    let (rx, notify) = receiver(p.dir.path());
    let lines = p.child("try-start").env("NOTIFY_SOCKET", &notify).run();
    assert_eq!(lines, ["REFUSED AlreadyRunning"]);
    let got = drain(&rx, Duration::from_millis(50));
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].ends_with(&format!("\nERRNO={}", nix::libc::EEXIST)),
        "{got:?}"
    );
    holder.stop();
}

/// `Activation::Require` with nothing passed down is refused clearly.
#[test]
fn required_activation_without_a_socket_is_refused() {
    let p = paths();
    let lines = p
        .child("require-activation")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .run();
    assert_eq!(lines, ["REFUSED socket activation"]);
    p.assert_gone();
}

// ---------------------------------------------------------------------------
// Socket activation, with systemd-socket-activate
// ---------------------------------------------------------------------------

/// `systemd-socket-activate -l <socket> <this test binary as role>`.
fn socket_activate(p: &common::Paths, role: &str) -> KillOnDrop {
    let tool = require_tool("systemd-socket-activate", "systemd");
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(tool)
        .arg("-l")
        .arg(&p.sock)
        // The tool passes on only the variables named with -E.
        .args(["-E", &format!("{CHILD_ENV}={role}")])
        .args(["-E", &format!("{SOCK_ENV}={}", p.sock.display())])
        .args(["-E", &format!("{PID_ENV}={}", p.pid.display())])
        .arg(exe)
        .args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn systemd-socket-activate");
    KillOnDrop(child)
}

/// Connects to the socket the tool binds, once it listens (it binds, then
/// listens: for a moment in between a connect is refused).
fn connect_when_listening(path: &Path) -> UnixStream {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{} never listened: {e}",
                path.display()
            ),
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads the marker lines of a child that is not a `ChildProc` until one
/// starts with `prefix`.
fn expect_marker(out: &mut impl std::io::BufRead, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read child output");
        assert!(n > 0, "child ended before {prefix:?}");
        if let Some(msg) = line.trim_end().strip_prefix(common::MARKER) {
            assert!(msg.starts_with(prefix), "expected {prefix:?}, got {msg:?}");
            return msg.to_string();
        }
    }
}

/// The adopted socket answers the queued first client, a second instance
/// is refused by the claim, and at the end (Drop, or SIGTERM) the PID file
/// goes while the manager's socket file stays.
#[test]
fn adopted_socket_is_served_and_never_unlinked() {
    for end in ["drop", "sigterm"] {
        let p = paths();
        let mut tool = socket_activate(&p, "activated");
        // The tool execs the daemon on the first connection, which queues.
        let client = connect_when_listening(&p.sock);
        client.set_read_timeout(Some(WATCHDOG)).unwrap();
        let mut out = std::io::BufReader::new(tool.0.stdout.take().unwrap());
        assert_eq!(expect_marker(&mut out, "ACTIVATED"), "ACTIVATED true");
        assert_eq!(read_reply(&client), "hello");
        expect_marker(&mut out, "ANSWERED");
        assert!(p.pid.exists());

        let second: Vec<String> = p.child("try-start").run();
        assert_eq!(second, ["REFUSED AlreadyRunning"], "the claim still holds");

        match end {
            "drop" => {
                use std::io::Write;
                writeln!(tool.0.stdin.as_mut().unwrap(), "drop").unwrap();
                expect_marker(&mut out, "DROPPED");
                let status = common::examples::wait_with_watchdog(&mut tool.0, "activated");
                assert!(status.success(), "{status}");
            }
            _ => {
                let pid = Pid::from_raw(tool.0.id() as i32);
                kill(pid, Signal::SIGTERM).unwrap();
                let status = common::examples::wait_with_watchdog(&mut tool.0, "activated");
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status}");
            }
        }
        assert!(!p.pid.exists(), "{end}: the PID file is ours and goes");
        assert!(
            is_socket(&p.sock),
            "{end}: the socket file is the manager's and stays"
        );
    }
}

/// The example daemon under `systemd-socket-activate`: the queued client
/// gets `pong`, a hand-started second daemon exits 3, SIGTERM ends it with
/// 143, the PID file goes and the socket file stays.
#[test]
fn example_daemon_under_systemd_socket_activate() {
    let tool = require_tool("systemd-socket-activate", "systemd");
    let p = paths();
    let mut cmd = Command::new(tool);
    cmd.arg("-l")
        .arg(&p.sock)
        .arg(common::examples::example("daemon"));
    cmd.arg("--socket").arg(&p.sock).arg("--pid").arg(&p.pid);
    let mut d = Daemon::spawn(cmd);
    let mut client = connect_when_listening(&p.sock);
    assert_eq!(request_on(&mut client, "ping"), "pong");
    d.wait_for_line("socket passed down by the service manager (socket activation)");
    d.wait_for_line("ready");

    let second = run(daemon_cmd(&p));
    assert_eq!(
        second.code(),
        Some(3),
        "a second, hand-started daemon: {second}"
    );
    assert!(second.stderr.contains("already running"), "{second}");

    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(143), "{}", d.output());
    assert!(!p.pid.exists());
    assert!(is_socket(&p.sock), "the socket file stays for the manager");
}

// ---------------------------------------------------------------------------
// start-stop-daemon --notify-await
// ---------------------------------------------------------------------------

/// `start-stop-daemon --start --background --notify-await` returns 0 only
/// once the daemon answers on its socket; `--stop` stops it; a daemon that
/// cannot start makes it fail with status 2 and the reason.
#[test]
fn start_stop_daemon_notify_await_waits_for_ready_and_reports_failure() {
    let ssd = require_tool("start-stop-daemon", "dpkg");
    let daemon = common::examples::example("daemon");
    let p = paths();
    let start = |p: &common::Paths| {
        let mut cmd = Command::new(&ssd);
        cmd.args([
            "--start",
            "--background",
            "--notify-await",
            "--notify-timeout",
            "5",
        ])
        .arg("--pidfile")
        .arg(&p.pid)
        .arg("--exec")
        .arg(&daemon)
        .arg("--")
        .arg("--socket")
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .stdin(Stdio::null());
        run(cmd)
    };
    let r = start(&p);
    assert_eq!(r.code(), Some(0), "start: {r}");
    // Ready means serving: the very first connect after it returns works.
    assert_eq!(send(&p.sock, "ping"), "pong");

    // The daemon is not our child (--background forks it away), so
    // start-stop-daemon itself waits for it to go.
    let r = ssd_stop(&ssd, &p.pid);
    assert_eq!(r.code(), Some(0), "stop: {r}");
    p.assert_gone();

    // A directory where the socket goes: the daemon fails, and says why.
    let p = paths();
    std::fs::create_dir(&p.sock).unwrap();
    let r = start(&p);
    assert_eq!(r.code(), Some(2), "a daemon that cannot start: {r}");
    assert!(
        r.stderr.contains("Is a directory"),
        "the reason reaches the user: {r}"
    );
    assert!(!p.pid.exists());
}
