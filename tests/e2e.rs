//! End to end: the `daemon` and `ctl` examples run as real processes, as a
//! user would run them, and we check sockets, PID files and exit statuses.
//!
//! Every test uses its own tempdir paths (never the user's runtime dir), puts
//! a watchdog on every wait (the child is killed when it fires), and kills
//! its daemons on failure through [`Daemon`]'s Drop.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::examples::*;
use common::{assert_absent, paths, private_tempdir};
use nix::sys::signal::Signal;

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
        out.contains(&format!(
            "reclaimed a stale socket (nobody listened on it) and a stale PID file \
             naming pid {}, which no longer held its lock",
            first.pid()
        )),
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

/// SIGHUP is a reload request, not the end: the daemon says so, keeps its
/// files and keeps answering (a daemon leaving SIGHUP at its default dies
/// with both files left behind); SIGTERM still stops it as usual.
#[test]
fn sighup_is_a_reload_and_the_daemon_keeps_serving() {
    let p = paths();
    let mut d = Daemon::start(daemon_cmd(&p));
    const SAID: &str = "reload requested (nothing to re-read in this example)";
    for n in 1..=2 {
        d.signal(Signal::SIGHUP);
        wait_until(
            || d.output().lines().filter(|l| *l == SAID).count() == n,
            "the daemon saying it reloads",
        );
        assert_eq!(send(&p.sock, "ping"), "pong");
        assert_socket(&p.sock);
        assert_eq!(pid_in_file(&p.pid), d.pid());
    }
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(143), "{}", d.output());
    p.assert_gone();
}

/// SIGQUIT (asked for with `SignalAction::Terminate`) removes both files,
/// then the daemon dies by SIGQUIT (core dumps off for the test).
#[test]
fn sigquit_removes_both_files_and_ends_by_sigquit() {
    use std::os::unix::process::CommandExt;
    let p = paths();
    let mut cmd = daemon_cmd(&p);
    // SAFETY: setrlimit(2) is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            let zero = nix::libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            nix::libc::setrlimit(nix::libc::RLIMIT_CORE, &zero);
            Ok(())
        });
    }
    let mut d = Daemon::start(cmd);
    d.signal(Signal::SIGQUIT);
    let status = d.wait_exit();
    assert_eq!(
        status.signal(),
        Some(Signal::SIGQUIT as i32),
        "{status}\n{}",
        d.output()
    );
    p.assert_gone();
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
    let ssd = require_tool("start-stop-daemon", "dpkg");
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

/// `ctl start` starts the `daemon` beside it and waits until it is ready,
/// `ctl start` again finds it, `ctl restart` replaces it, `ctl stop` ends
/// it; every step exits 0.
#[test]
fn ctl_start_restart_and_stop_use_the_library_client() {
    let p = paths();
    let r = ctl(&p, &["start"]);
    assert_eq!(r.code(), Some(0), "{r}");
    let first: u32 = r
        .stdout
        .trim()
        .strip_prefix("started (pid ")
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{r}"))
        .parse()
        .unwrap();
    // Ready means serving: the first request after `start` is answered.
    assert_eq!(send(&p.sock, "ping"), "pong");
    assert_eq!(pid_in_file(&p.pid), first);

    let r = ctl(&p, &["start"]);
    assert_eq!(
        (r.code(), r.stdout.trim()),
        (Some(0), "already running"),
        "{r}"
    );

    let r = ctl(&p, &["restart"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(
        r.stdout.contains("stopped\n") && r.stdout.contains("started (pid "),
        "{r}"
    );
    let second = pid_in_file(&p.pid);
    assert_ne!(second, first);
    assert_eq!(send(&p.sock, "ping"), "pong");

    let r = ctl(&p, &["stop"]);
    assert_eq!(r.code(), Some(0), "{r}");
    assert!(r.stdout.ends_with("stopped\n"), "{r}");
    p.assert_gone();
}

/// `ctl stop` under a supervisor that restarts the daemon the moment it
/// exits (a shell loop, as runit or a `while true` wrapper would): each stop
/// ends the daemon it asked, over the socket (exit 0), and never waits for
/// or signals the one started in its place. It used to look at the claim
/// only after asking, find the new daemon holding it, wait 5 s for it and
/// then SIGTERM it (exit 143). strace slows ctl's writes so that the restart
/// always comes first.
#[test]
fn ctl_stop_under_a_restarting_supervisor_never_hits_the_next_daemon() {
    const STARTS: usize = 5;
    let strace = require_tool("strace", "strace");
    let p = paths();
    let exits = p.dir.path().join("exits.log");
    let script = format!(
        "for i in $(seq {STARTS}); do '{}' --socket '{}' --pid '{}' >/dev/null 2>&1; \
         echo $? >> '{}'; done",
        example("daemon").display(),
        p.sock.display(),
        p.pid.display(),
        exits.display()
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &script]).stdin(Stdio::null());
    common::default_signals(&mut sh);
    let mut supervisor = KillOnDrop(sh.spawn().expect("spawn the supervisor loop"));
    let mut stopped = Vec::new();
    for round in 0..STARTS {
        let mut up = None;
        wait_until(
            || {
                up = historia_lifecycle::running_pid(&p.pid).ok().flatten();
                up.is_some_and(|pid| !stopped.contains(&pid))
                    && UnixStream::connect(&p.sock).is_ok()
            },
            "the next daemon answering",
        );
        stopped.push(up.unwrap());
        // Every write(2) of ctl's returns 300 ms late (the request on the
        // socket, the "asked the daemon" line): by the time ctl could look
        // at the claim after asking, the supervisor has the next daemon up.
        let mut cmd = Command::new(&strace);
        cmd.args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "--inject=write:delay_exit=300000",
        ])
        .arg(example("ctl"))
        .arg("--socket")
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .arg("stop")
        .env_remove("HISTORIA_DEMO_SOCKET")
        .env_remove("HISTORIA_DEMO_PID")
        .stdin(Stdio::null());
        let r = run(cmd);
        assert_eq!(r.code(), Some(0), "round {round}: {r}");
        assert!(!r.stderr.contains("SIGTERM"), "round {round}: {r}");
    }
    let status = wait_with_watchdog(&mut supervisor.0, "the supervisor loop");
    assert!(status.success(), "{status}");
    let codes = std::fs::read_to_string(&exits).unwrap();
    assert_eq!(
        codes.lines().collect::<Vec<_>>(),
        vec!["0"; STARTS],
        "every daemon ended by its own stop, none by SIGTERM (143)"
    );
    p.assert_gone();
}
