//! End to end: the `daemon` and `ctl` examples run as real processes, as a
//! user would run them, and we check sockets, PID files and exit statuses.
//!
//! Every test uses its own tempdir paths (never the user's runtime dir), puts
//! a watchdog on every wait (the child is killed when it fires), and kills
//! its daemons on failure through [`Daemon`]'s Drop.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_absent, paths, private_tempdir, Paths};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Generous bound on every wait: start-up, exit, a reply. Only a hang gets
/// near it.
const WATCHDOG: Duration = Duration::from_secs(10);

/// The path of an example binary, built once per test run.
///
/// `cargo test` builds examples before integration tests, but
/// `cargo test --test e2e` does not, and a stale binary would test old code;
/// so we build the two examples once ourselves. It is a quick no-op
/// when they are fresh (cargo holds no lock while tests run).
fn example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("path of the test binary");
        // <target>/<profile>/deps/e2e-<hash> → <target>/<profile>/examples
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let out = Command::new(env!("CARGO"))
            // Only ours: a broken unrelated example must not fail these tests.
            .args(["build", "--quiet", "--profile", profile])
            .args(["--example", "daemon", "--example", "ctl"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build of the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("examples")
    });
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A command for an example with the override variables cleared, so the
/// developer's environment cannot redirect a test.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(example(name));
    cmd.env_remove("HISTORIA_DEMO_SOCKET")
        .env_remove("HISTORIA_DEMO_PID")
        .stdin(Stdio::null());
    cmd
}

/// `daemon --socket … --pid …` for these paths.
fn daemon_cmd(p: &Paths) -> Command {
    let mut cmd = command("daemon");
    cmd.arg("--socket").arg(&p.sock).arg("--pid").arg(&p.pid);
    cmd
}

/// Waits for `child` with the watchdog; kills it and fails when it fires.
fn wait_with_watchdog(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => return status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {WATCHDOG:?}; killed it");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A finished short-lived process.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion under the watchdog. Output goes to anonymous
/// temp files, not pipes, so a chatty child can never block on a full pipe.
fn run(mut cmd: Command) -> Ran {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    let mut child = cmd
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .expect("spawn");
    let status = wait_with_watchdog(&mut child, &format!("{cmd:?}"));
    let read = |f: &mut File| {
        let mut s = String::new();
        f.rewind().expect("rewind");
        f.read_to_string(&mut s).expect("read output");
        s
    };
    Ran {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// `ctl --socket … --pid … <args>` for these paths.
fn ctl(p: &Paths, args: &[&str]) -> Ran {
    let mut cmd = command("ctl");
    cmd.arg("--socket")
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .args(args);
    run(cmd)
}

/// A running daemon. Dropping it kills it, so a failing test leaves no
/// process behind.
struct Daemon {
    child: Child,
    /// stdout and stderr, interleaved in one file.
    log: tempfile::NamedTempFile,
}

impl Daemon {
    /// Spawns the daemon and waits until it prints "ready".
    fn start(cmd: Command) -> Daemon {
        let mut d = Daemon::spawn(cmd);
        d.wait_for_line("ready");
        d
    }

    fn spawn(mut cmd: Command) -> Daemon {
        let log = tempfile::NamedTempFile::new().expect("log file");
        // O_APPEND on both handles, so lines from stdout and stderr never
        // overwrite each other.
        let open = || {
            OpenOptions::new()
                .append(true)
                .open(log.path())
                .expect("open log")
        };
        let child = cmd
            .stdout(open())
            .stderr(open())
            .spawn()
            .expect("spawn daemon");
        Daemon { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("read daemon log")
    }

    /// Waits until the daemon has printed `line` as a whole line.
    fn wait_for_line(&mut self, line: &str) {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let out = self.output();
            if out.lines().any(|l| l == line) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("daemon exited ({status}) before printing {line:?}:\n{out}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not print {line:?} within {WATCHDOG:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits pid_t"));
        kill(pid, sig).expect("signal the daemon");
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_with_watchdog(&mut self.child, "daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Already reaped, or already dead: both fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one command line over the socket; returns the reply line.
fn send(socket: &Path, line: &str) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the daemon");
    request_on(&mut stream, line)
}

/// Sends `line` on an open connection and reads one reply line, under the
/// watchdog.
fn request_on(stream: &mut UnixStream, line: &str) -> String {
    stream.set_read_timeout(Some(WATCHDOG)).expect("timeout");
    // The daemon may answer and hang up without reading everything (a client
    // over the cap, an over-long line), so the write can fail with EPIPE; the
    // reply, already queued for us, says what happened.
    let _ = writeln!(stream, "{line}");
    read_reply(stream)
}

fn read_reply(stream: &UnixStream) -> String {
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .expect("reply within the watchdog");
    reply.trim_end().to_owned()
}

fn assert_socket(path: &Path) {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
}

fn pid_in_file(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("read PID file")
        .trim()
        .parse()
        .expect("PID file holds a number")
}

#[test]
fn ping_over_the_socket_and_via_ctl() {
    let p = paths();
    let d = Daemon::start(daemon_cmd(&p));
    let out = d.output();
    assert!(
        out.contains(&format!("socket {}", p.sock.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("pid file {}", p.pid.display())),
        "{out}"
    );
    assert!(out.contains("no stale files to reclaim"), "{out}");
    assert!(
        out.lines().any(|l| l == format!("pid {}", d.pid())),
        "{out}"
    );
    assert_socket(&p.sock);
    assert_eq!(pid_in_file(&p.pid), d.pid());

    assert_eq!(send(&p.sock, "ping"), "pong");
    let status = send(&p.sock, "status");
    assert!(
        status.starts_with(&format!("pid {} uptime ", d.pid())) && status.ends_with('s'),
        "{status}"
    );

    let r = ctl(&p, &["ping"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert_eq!(r.stdout.trim(), "pong", "{r}");
}

#[test]
fn a_second_instance_is_refused_and_names_the_running_pid() {
    let p = paths();
    let first = Daemon::start(daemon_cmd(&p));

    let second = run(daemon_cmd(&p));
    assert_eq!(second.code(), Some(3), "{second}");
    let all = format!("{}{}", second.stdout, second.stderr);
    assert!(all.contains(&format!("pid {}", first.pid())), "{second}");
    assert!(all.contains(&p.sock.display().to_string()), "{second}");

    // The refusal touched nothing of the first instance.
    assert_eq!(pid_in_file(&p.pid), first.pid());
    assert_eq!(send(&p.sock, "ping"), "pong");
}

#[test]
fn restart_after_sigkill_reclaims_the_stale_files() {
    let p = paths();
    let mut first = Daemon::start(daemon_cmd(&p));
    first.signal(Signal::SIGKILL);
    assert_eq!(first.wait_exit().signal(), Some(Signal::SIGKILL as i32));
    // SIGKILL runs no cleanup: both files are left behind.
    assert_socket(&p.sock);
    assert_eq!(pid_in_file(&p.pid), first.pid());

    let r = ctl(&p, &["status"]);
    assert_eq!(r.code(), Some(3), "{r}");
    assert!(
        r.stdout.starts_with("not running, stale files left (")
            && r.stdout.contains(&p.sock.display().to_string())
            && r.stdout.contains(&p.pid.display().to_string()),
        "{r}"
    );

    let second = Daemon::start(daemon_cmd(&p));
    let out = second.output();
    assert!(
        out.contains("reclaimed stale socket and stale PID file left by a dead instance"),
        "{out}"
    );
    assert_eq!(pid_in_file(&p.pid), second.pid());
    assert_eq!(send(&p.sock, "ping"), "pong");
}

#[test]
fn sigterm_and_sigint_remove_both_files_and_exit_128_plus_n() {
    for (sig, code, name) in [
        (Signal::SIGTERM, 143, "SIGTERM"),
        (Signal::SIGINT, 130, "SIGINT"),
    ] {
        let p = paths();
        let mut d = Daemon::start(daemon_cmd(&p));
        d.signal(sig);
        // Graceful mode: the daemon exits by itself with the conventional
        // status, rather than being killed by the signal.
        let status = d.wait_exit();
        assert_eq!(
            status.code(),
            Some(code),
            "{name}: {status}\n{}",
            d.output()
        );
        let out = d.output();
        assert!(out.contains(&format!("shutting down ({name})")), "{out}");
        assert!(out.lines().any(|l| l == "stopped"), "{out}");
        p.assert_gone();
    }
}

#[test]
fn ctl_status_in_each_state_and_ctl_stop() {
    let p = paths();
    let r = ctl(&p, &["status"]);
    assert_eq!((r.code(), r.stdout.trim()), (Some(3), "not running"), "{r}");
    // Stopping what does not run succeeds, as LSB init scripts do.
    let r = ctl(&p, &["stop"]);
    assert_eq!((r.code(), r.stdout.trim()), (Some(0), "not running"), "{r}");

    let mut d = Daemon::start(daemon_cmd(&p));
    let r = ctl(&p, &["status"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert_eq!(r.stdout.trim(), format!("running (pid {})", d.pid()), "{r}");

    let r = ctl(&p, &["stop"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(
        r.stdout.contains("stopping") && r.stdout.ends_with("stopped\n"),
        "{r}"
    );
    assert_eq!(d.wait_exit().code(), Some(0), "{}", d.output());
    assert!(d.output().contains("shutting down (stop command)"));
    p.assert_gone();

    let r = ctl(&p, &["status"]);
    assert_eq!((r.code(), r.stdout.trim()), (Some(3), "not running"), "{r}");
}

#[test]
fn ctl_stop_falls_back_to_sigterm_for_the_lock_holder() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    // Make the socket unreachable while the daemon keeps running.
    std::fs::remove_file(&p.sock).expect("remove socket");

    let r = ctl(&p, &["stop"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(
        r.stdout
            .contains(&format!("sent SIGTERM to pid {}", d.pid())),
        "{r}"
    );
    assert_eq!(d.wait_exit().code(), Some(143), "{}", d.output());
    p.assert_gone();
}

#[test]
fn start_stop_daemon_agrees_with_the_pid_file() {
    let Some(ssd) = find_start_stop_daemon() else {
        println!("skipped: start-stop-daemon is not installed");
        return;
    };
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    let ssd_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&ssd);
        cmd.args(args)
            .arg("--pidfile")
            .arg(&p.pid)
            .stdin(Stdio::null());
        cmd
    };

    let r = run(ssd_cmd(&["--status"]));
    assert_eq!(r.code(), Some(0), "status while running: {r}");

    // start-stop-daemon waits until the PID is gone from /proc, and a child
    // we have not reaped stays there as a zombie; so reap the daemon while
    // start-stop-daemon runs, as a shell or init would.
    let mut stop = KillOnDrop(
        ssd_cmd(&["--stop", "--retry", "5"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn start-stop-daemon"),
    );
    let deadline = Instant::now() + WATCHDOG;
    let (mut daemon_status, mut stop_status) = (None, None);
    while daemon_status.is_none() || stop_status.is_none() {
        if Instant::now() >= deadline {
            panic!("start-stop-daemon --stop: daemon {daemon_status:?}, tool {stop_status:?}");
        }
        daemon_status = daemon_status.or(d.child.try_wait().expect("try_wait"));
        stop_status = stop_status.or(stop.0.try_wait().expect("try_wait"));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(stop_status.and_then(|s| s.code()), Some(0), "stop");
    assert_eq!(
        daemon_status.and_then(|s| s.code()),
        Some(143),
        "{}",
        d.output()
    );
    p.assert_gone();

    let r = run(ssd_cmd(&["--status"]));
    assert_eq!(
        r.code(),
        Some(3),
        "status after stop (3 = not running): {r}"
    );
}

/// Kills and reaps a helper process when a test ends, passing or failing.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_start_stop_daemon() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("start-stop-daemon"))
        .find(|p| p.is_file())
}

#[test]
fn unknown_commands_and_long_lines_get_an_error_and_the_daemon_keeps_serving() {
    let p = paths();
    let _d = Daemon::start(daemon_cmd(&p));

    let mut conn = UnixStream::connect(&p.sock).expect("connect");
    assert_eq!(
        request_on(&mut conn, "bogus"),
        r#"error: unknown command "bogus""#
    );
    // Same connection, still served.
    assert_eq!(request_on(&mut conn, "ping"), "pong");

    let mut conn = UnixStream::connect(&p.sock).expect("connect");
    let long = "x".repeat(4096);
    assert_eq!(
        request_on(&mut conn, &long),
        "error: line longer than 1024 bytes"
    );

    assert_eq!(send(&p.sock, "ping"), "pong");
}

#[test]
fn an_idle_client_does_not_block_another() {
    let p = paths();
    let _d = Daemon::start(daemon_cmd(&p));

    // Connects and sends half a command, then goes quiet.
    let mut idle = UnixStream::connect(&p.sock).expect("connect");
    idle.write_all(b"pi").expect("send");

    assert_eq!(send(&p.sock, "ping"), "pong");
    assert_eq!(send(&p.sock, "status").split(' ').next(), Some("pid"));

    // The idle client is still served once it finishes its line.
    assert_eq!(request_on(&mut idle, "ng"), "pong");
}

#[test]
fn clients_beyond_the_cap_are_turned_away_until_others_leave() {
    let p = paths();
    let _d = Daemon::start(daemon_cmd(&p));

    // The daemon serves at most 64 clients at once.
    let mut idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&p.sock).expect("connect"))
        .collect();
    // Prove all 64 are being served, each by its own thread.
    for conn in &mut idle {
        assert_eq!(request_on(conn, "ping"), "pong");
    }
    let extra = UnixStream::connect(&p.sock).expect("connect");
    extra.set_read_timeout(Some(WATCHDOG)).expect("timeout");
    assert_eq!(read_reply(&extra), "error: too many clients");

    idle.clear(); // hang up; their threads end and give their places back
    let deadline = Instant::now() + WATCHDOG;
    loop {
        let reply = send(&p.sock, "ping");
        if reply == "pong" {
            break;
        }
        assert_eq!(reply, "error: too many clients");
        assert!(Instant::now() < deadline, "places never freed");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the daemon with no arguments in the environment `env`, checks it
/// serves at `expected_dir/daemon.sock`, that `ctl` with no arguments finds
/// it there too, and stops it with `ctl stop`.
fn check_default_paths(env: &[(&str, Option<&Path>)], expected_dir: &Path) {
    let with_env = |mut cmd: Command| {
        for (var, value) in env {
            match value {
                Some(v) => cmd.env(var, v),
                None => cmd.env_remove(var),
            };
        }
        cmd
    };
    let socket = expected_dir.join("daemon.sock");
    let pid = expected_dir.join("daemon.pid");
    let mut d = Daemon::start(with_env(command("daemon")));
    let out = d.output();
    assert!(
        out.contains(&format!("socket {}", socket.display())),
        "{out}"
    );
    assert_socket(&socket);
    assert_eq!(pid_in_file(&pid), d.pid());
    let mode = std::fs::metadata(expected_dir)
        .expect("runtime dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "runtime dir mode {mode:o}");

    let ctl_default = |command_name: &str| {
        let mut cmd = with_env(command("ctl"));
        cmd.arg(command_name);
        run(cmd)
    };
    let r = ctl_default("status");
    assert_eq!(r.code(), Some(0), "{r}");
    assert_eq!(r.stdout.trim(), format!("running (pid {})", d.pid()), "{r}");
    let r = ctl_default("stop");
    assert_eq!(r.code(), Some(0), "{r}");
    assert_eq!(d.wait_exit().code(), Some(0), "{}", d.output());
    assert_absent(&[&socket, &pid]);
}

#[test]
fn no_arguments_use_xdg_runtime_dir() {
    let xdg = private_tempdir();
    check_default_paths(
        &[("XDG_RUNTIME_DIR", Some(xdg.path()))],
        &xdg.path().join("historia-demo"),
    );
}

#[test]
fn no_arguments_without_xdg_use_a_per_user_dir_in_tmpdir() {
    let tmp = private_tempdir();
    let uid = nix::unistd::geteuid().as_raw();
    check_default_paths(
        &[("XDG_RUNTIME_DIR", None), ("TMPDIR", Some(tmp.path()))],
        &tmp.path().join(format!("historia-demo-{uid}")),
    );
}

#[test]
fn an_unsafe_default_runtime_dir_is_refused() {
    let tmp = private_tempdir();
    let uid = nix::unistd::geteuid().as_raw();
    let planted = tmp.path().join(format!("historia-demo-{uid}"));
    std::fs::create_dir(&planted).expect("mkdir");
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).expect("chmod");

    let mut cmd = command("daemon");
    cmd.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", tmp.path());
    let r = run(cmd);
    assert_eq!(r.code(), Some(1), "{r}");
    assert!(
        r.stderr.contains(&planted.display().to_string()) && r.stderr.contains("unsafe"),
        "{r}"
    );
    // Refused, not repaired, and nothing was put in it.
    let mode = std::fs::metadata(&planted)
        .expect("dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o777);
    assert_eq!(std::fs::read_dir(&planted).expect("list").count(), 0);
}

#[test]
fn environment_variables_override_the_default_paths() {
    let xdg = private_tempdir();
    let p = paths();
    let env = |cmd: &mut Command| {
        cmd.env("XDG_RUNTIME_DIR", xdg.path())
            .env("HISTORIA_DEMO_SOCKET", &p.sock)
            .env("HISTORIA_DEMO_PID", &p.pid);
    };
    let mut cmd = Command::new(example("daemon"));
    env(&mut cmd);
    let mut d = Daemon::start(cmd);
    assert_socket(&p.sock);
    assert_eq!(pid_in_file(&p.pid), d.pid());
    // Nothing was created in the default place.
    assert!(!xdg.path().join("historia-demo").exists());

    let mut stop = Command::new(example("ctl"));
    env(&mut stop);
    stop.arg("stop");
    let r = run(stop);
    assert_eq!(r.code(), Some(0), "{r}");
    assert_eq!(d.wait_exit().code(), Some(0));
    p.assert_gone();
}

#[test]
fn help_and_bad_arguments() {
    let help = |name: &str| {
        let mut cmd = command(name);
        cmd.arg("--help");
        run(cmd)
    };
    let r = help("daemon");
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(r.stdout.starts_with("usage: daemon"), "{r}");
    let r = help("ctl");
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(r.stdout.starts_with("usage: ctl"), "{r}");

    let mut cmd = command("daemon");
    cmd.arg("--bogus");
    assert_eq!(run(cmd).code(), Some(2));
    let mut cmd = command("daemon");
    cmd.arg("--socket"); // missing its value
    assert_eq!(run(cmd).code(), Some(2));
    assert_eq!(run(command("ctl")).code(), Some(2), "no command");
}
