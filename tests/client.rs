//! The client side in real processes: connect-or-spawn with exactly one
//! daemon among racing clients, readiness and start-up errors (a failure
//! report, a crash, exit 0, a hang), a spawner killed mid-spawn, what the
//! spawned daemon inherits, and `stop` with deadlines.
//!
//! The daemon is this test binary in the role `daemon`, told how to behave
//! by `HISTORIA_TEST_BEHAVE`; it appends one line per start to a spawn log,
//! so the tests count spawns from the daemons' own word.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    child_main, child_paths, env_path, paths, process_alive, report, wait_for_stdin_eof, ChildProc,
    Paths, CHILD_ENV, ENTRY, PID_ENV, SOCK_ENV,
};
use historia_lifecycle::{
    ensure_running, running_pid, signal_daemon, stop, DaemonGuard, Launcher, LifecycleError,
    PidFileGuard, SignalMode, Started, Stopped,
};

/// The spawn log every daemon appends to.
const SPAWNS_ENV: &str = "HISTORIA_TEST_SPAWNS";
/// How the daemon role behaves.
const BEHAVE_ENV: &str = "HISTORIA_TEST_BEHAVE";

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "daemon" => role_daemon(),
        "client" => role_client(),
        other => panic!("unknown role {other}"),
    });
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

fn log_spawn(extra: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(env_path(SPAWNS_ENV))
        .expect("open spawn log");
    let me = std::process::id();
    let sid = nix::unistd::getsid(None).map(|p| p.as_raw()).unwrap_or(-1);
    let stdin = std::fs::read_link("/proc/self/fd/0").unwrap_or_default();
    writeln!(f, "spawn {me} sid={sid} stdin={} {extra}", stdin.display()).expect("log");
}

/// A daemon: serves "hello <pid>" to each connection, as told.
fn role_daemon() {
    let behave = std::env::var(BEHAVE_ENV).unwrap_or_default();
    let (sock, pid) = child_paths();
    log_spawn(&behave);
    match behave.as_str() {
        "segv" => {
            // std's own SIGSEGV handler (stack-overflow detection) would
            // return from a raised signal; die the way a real crash does.
            // SAFETY: restoring the default disposition in a single-purpose
            // child process.
            unsafe { nix::libc::signal(nix::libc::SIGSEGV, nix::libc::SIG_DFL) };
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV).unwrap();
            unreachable!("SIGSEGV kills the process");
        }
        "exit0" => std::process::exit(0),
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        "slow" => std::thread::sleep(Duration::from_millis(400)),
        _ => {}
    }
    if behave == "child-then-exit" {
        // Takes the claim (which takes the readiness pipe and makes it
        // close-on-exec) but binds nothing, so no connect can succeed; then
        // a grandchild spawned before any report, and an exit. The
        // grandchild must not hold the pipe, or the spawner would wait.
        let _claim = PidFileGuard::acquire(&pid).expect("claim");
        let child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        std::fs::write(
            env_path(SPAWNS_ENV).with_extension("grandchild"),
            child.id().to_string(),
        )
        .unwrap();
        // Exit 0: the spawner then waits for the pipe's EOF (a double-forking
        // daemon's grandchild may still report), which comes at once only if
        // the grandchild does not hold the write end.
        std::process::exit(0);
    }
    let mode = match behave.as_str() {
        "ignore-term" => SignalMode::Off,
        "exit-soon-after-term" | "slow-stop" => SignalMode::Graceful,
        _ => SignalMode::Exit,
    };
    let guard = match DaemonGuard::builder(&sock, &pid).signals(mode).acquire() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("daemon: {e}");
            std::process::exit(if matches!(e, LifecycleError::AlreadyRunning) {
                3
            } else {
                1
            });
        }
    };
    if behave == "ignore-term" {
        // SAFETY: a single-purpose child ignores SIGTERM before any thread
        // of the guard exists.
        unsafe { nix::libc::signal(nix::libc::SIGTERM, nix::libc::SIG_IGN) };
    }
    if behave == "exit-soon-after-term" {
        // Exits by itself 50 ms after SIGTERM: a stop that slept through its
        // deadline and then signalled "the holder" would hit a restarted
        // daemon instead.
        let shutdown = guard.shutdown().clone();
        std::thread::spawn(move || {
            shutdown.wait();
            std::thread::sleep(Duration::from_millis(50));
            std::process::exit(0);
        });
    }
    if behave != "no-ready" {
        guard.ready().expect("ready");
    }
    if behave == "slow-stop" {
        // A daemon with last work to do: on SIGTERM it stops answering (the
        // listener closed, the socket file still there), works 300 ms, and
        // only then lets the claim go.
        let mut guard = guard;
        let listener = guard.take_listener().expect("listener");
        listener.set_nonblocking(true).expect("non-blocking");
        let me = std::process::id();
        while !guard.shutdown().is_requested() {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let _ = writeln!(conn, "hello {me}");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        drop(listener);
        std::fs::write(env_path(SPAWNS_ENV).with_extension("closed"), "").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(guard);
        return;
    }
    let me = std::process::id();
    for conn in guard.listener().expect("listener").incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = writeln!(conn, "hello {me}");
    }
}

/// A client: waits on the shared barrier (stdin), then connect-or-spawn.
fn role_client() {
    wait_for_stdin_eof();
    let (sock, pid) = child_paths();
    let behave = std::env::var(BEHAVE_ENV).unwrap_or_default();
    let mut cmd = daemon_command(&env_path(SPAWNS_ENV), &behave);
    match ensure_running(&sock, &pid, &mut cmd, Duration::from_secs(15)) {
        Ok(conn) => {
            let what = match conn.started {
                Started::Found => "FOUND".to_string(),
                Started::Spawned { pid } => format!("SPAWNED {pid}"),
                other => format!("{other:?}"),
            };
            report(format!("{what} {}", read_hello(conn.stream)));
        }
        Err(e) => report(format!("ERROR {e}")),
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// This test binary as the daemon role. Paths come from the environment
/// the caller's process has (children inherit it) or are set here.
fn daemon_command(spawns: &Path, behave: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", ENTRY, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "daemon")
        .env(SPAWNS_ENV, spawns)
        .env(BEHAVE_ENV, behave);
    cmd
}

fn daemon_for(p: &Paths, behave: &str) -> Command {
    let mut cmd = daemon_command(&spawns(p), behave);
    cmd.env(SOCK_ENV, &p.sock).env(PID_ENV, &p.pid);
    cmd
}

/// `ensure_running` (10 s) with the daemon role behaving as `behave`,
/// which must spawn a new daemon: its PID and the connection.
fn spawn_new(p: &Paths, behave: &str) -> (u32, UnixStream) {
    let conn = ensure_running(
        &p.sock,
        &p.pid,
        &mut daemon_for(p, behave),
        Duration::from_secs(10),
    )
    .unwrap();
    let Started::Spawned { pid } = conn.started else {
        panic!("expected a spawn, got {:?}", conn.started)
    };
    (pid, conn.stream)
}

fn spawns(p: &Paths) -> PathBuf {
    p.dir.path().join("spawns.log")
}

fn spawn_lines(p: &Paths) -> Vec<String> {
    std::fs::read_to_string(spawns(p))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn read_hello(stream: UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("hello");
    line.trim().to_string()
}

/// Kills whatever daemon holds the claim at the end of a test (through the
/// claim, never a bare PID), and waits until it is gone.
struct StopAtEnd<'a>(&'a Paths);

impl Drop for StopAtEnd<'_> {
    fn drop(&mut self) {
        for _ in 0..500 {
            match signal_daemon(&self.0.pid, nix::libc::SIGKILL) {
                Ok(None) => return,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

fn launcher(p: &Paths, timeout: Duration) -> Launcher {
    Launcher::new(&p.sock, &p.pid).timeout(timeout)
}

// ---------------------------------------------------------------------------
// Connect or spawn
// ---------------------------------------------------------------------------

/// 32 clients released at once: exactly one spawns (the daemons' own log
/// says one start), all 32 are connected to that one daemon; over rounds.
#[test]
fn racing_clients_start_exactly_one_daemon() {
    const ROUNDS: usize = 3;
    const CLIENTS: usize = 32;
    for round in 0..ROUNDS {
        let p = paths();
        let _stop = StopAtEnd(&p);
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut clients: Vec<ChildProc> = (0..CLIENTS)
            .map(|_| {
                let stdin: OwnedFd = read.try_clone().unwrap();
                p.child("client")
                    .env(SPAWNS_ENV, spawns(&p))
                    .stdin(Stdio::from(stdin))
                    .deadline(Duration::from_secs(40))
                    .spawn()
            })
            .collect();
        drop(read);
        drop(write);
        let lines: Vec<String> = clients.iter_mut().map(|c| c.finish().join(" ")).collect();
        let spawned: Vec<&String> = lines.iter().filter(|l| l.starts_with("SPAWNED ")).collect();
        assert_eq!(spawned.len(), 1, "round {round}: {lines:#?}");
        let daemon = spawned[0].split_whitespace().nth(1).unwrap().to_string();
        for l in &lines {
            assert!(
                l.ends_with(&format!("hello {daemon}")),
                "round {round}: every client talks to the one daemon: {l}"
            );
        }
        assert_eq!(
            spawn_lines(&p).len(),
            1,
            "round {round}: {:?}",
            spawn_lines(&p)
        );
        assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon.parse().unwrap()));
    }
}

/// The spawned daemon is detached: its own session, stdin from /dev/null.
/// A second call finds it running.
#[test]
fn spawned_daemon_is_detached_and_found_the_second_time() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let conn = launcher(&p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(&p, ""))
        .expect("spawn");
    let Started::Spawned { pid } = conn.started else {
        panic!("expected a spawn, got {:?}", conn.started)
    };
    assert_eq!(read_hello(conn.stream), format!("hello {pid}"));
    let line = &spawn_lines(&p)[0];
    assert!(
        line.contains(&format!("spawn {pid} sid={pid} ")),
        "own session: {line}"
    );
    assert!(line.contains("stdin=/dev/null"), "{line}");

    let again = launcher(&p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(&p, ""))
        .expect("connect");
    assert_eq!(again.started, Started::Found);
    assert_eq!(spawn_lines(&p).len(), 1);
}

/// A daemon SIGKILLed with its files left: the next call starts a new one,
/// which reclaims them.
#[test]
fn stale_files_of_a_sigkilled_daemon_are_recovered() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let (pid, _) = spawn_new(&p, "");
    signal_daemon(&p.pid, nix::libc::SIGKILL).unwrap();
    common::examples::wait_until(|| running_pid(&p.pid).ok() == Some(None), "the kill");
    assert!(
        p.sock.exists() && p.pid.exists(),
        "SIGKILL leaves both files"
    );
    let (new, stream) = spawn_new(&p, "");
    assert_ne!(new, pid);
    assert_eq!(read_hello(stream), format!("hello {new}"));
}

/// A daemon that stops answering before it lets the claim go (SIGTERM, then
/// 300 ms of last work): a client arriving in between waits, and spawns a
/// new daemon once the claim is free, instead of waiting for an answer that
/// never comes until its timeout.
#[test]
fn a_client_arriving_while_the_daemon_stops_spawns_the_next_one() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let (old, stream) = spawn_new(&p, "slow-stop");
    assert_eq!(read_hello(stream), format!("hello {old}"));
    signal_daemon(&p.pid, nix::libc::SIGTERM).unwrap();
    let closed = spawns(&p).with_extension("closed");
    common::examples::wait_until(|| closed.exists(), "the listener closing");
    // Nothing answers, the claim is still the old daemon's.
    assert!(UnixStream::connect(&p.sock).is_err());
    assert_eq!(running_pid(&p.pid).unwrap(), Some(old));
    let (new, stream) = spawn_new(&p, "");
    assert_ne!(new, old);
    assert_eq!(read_hello(stream), format!("hello {new}"));
    assert!(!process_alive(old), "the old daemon finished its stop");
}

/// A daemon that cannot bind tells the caller why.
#[test]
fn a_daemon_that_cannot_bind_reports_its_reason() {
    let p = paths();
    std::fs::create_dir(&p.sock).unwrap();
    let e = ensure_running(
        &p.sock,
        &p.pid,
        &mut daemon_for(&p, ""),
        Duration::from_secs(10),
    )
    .expect_err("cannot bind over a directory");
    match &e {
        LifecycleError::StartFailed { reason, .. } => {
            assert!(reason.starts_with("unexpected-file-type "), "{reason}");
            assert!(reason.contains("directory"), "{reason}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    assert!(!p.pid.exists());
}

/// Crash, exit 0 and a hang before ready: the right error, within the
/// deadline; the log's tail comes with a crash.
#[test]
fn crash_exit_and_hang_before_ready_give_the_right_error() {
    let p = paths();
    let log = p.dir.path().join("daemon.log");
    let e = launcher(&p, Duration::from_secs(10))
        .log_file(&log)
        .connect_or_spawn(&mut daemon_for(&p, "segv"))
        .expect_err("segfault");
    match &e {
        LifecycleError::DaemonExited { status, output, .. } => {
            assert!(status.contains("SIGSEGV"), "{status}");
            assert!(
                output.contains("running 1 test"),
                "the log's tail: {output:?}"
            );
        }
        other => panic!("expected DaemonExited, got {other:?}"),
    }

    let p = paths();
    let e = launcher(&p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(&p, "exit0"))
        .expect_err("exit 0 before ready");
    assert!(
        matches!(&e, LifecycleError::DaemonExited { status, .. } if status == "exited with status 0"),
        "{e:?}"
    );

    let p = paths();
    let e = launcher(&p, Duration::from_millis(600))
        .connect_or_spawn(&mut daemon_for(&p, "hang"))
        .expect_err("hang");
    let LifecycleError::Timeout { pid: Some(pid), .. } = e else {
        panic!("expected a timeout naming the PID, got {e:?}")
    };
    let line = &spawn_lines(&p)[0];
    assert!(line.starts_with(&format!("spawn {pid} ")), "{line}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A daemon that never calls `ready()` is still reached, by connecting.
#[test]
fn a_daemon_that_never_reports_is_reached_by_connecting() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let conn = launcher(&p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(&p, "no-ready"))
        .expect("fallback to connect");
    assert!(matches!(conn.started, Started::Spawned { .. }));
    assert!(read_hello(conn.stream).starts_with("hello "));
}

/// The daemon's own children do not hold the readiness pipe: a daemon that
/// spawns a long-lived child and then dies is reported at once, not after
/// the timeout.
#[test]
fn the_readiness_pipe_is_not_inherited_by_the_daemons_children() {
    let p = paths();
    let e = launcher(&p, Duration::from_secs(20))
        .connect_or_spawn(&mut daemon_for(&p, "child-then-exit"))
        .expect_err("the daemon exits 0 without reporting");
    let grandchild = std::fs::read_to_string(spawns(&p).with_extension("grandchild"))
        .ok()
        .and_then(|s| s.parse::<i32>().ok());
    if let Some(g) = grandchild {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(g),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        matches!(&e, LifecycleError::DaemonExited { status, .. } if status == "exited with status 0"),
        "an EOF, not a timeout: the grandchild does not hold the pipe: {e:?}"
    );
}

/// A spawner SIGKILLed while its daemon is still starting: the next client
/// gets the spawn lock and a connection, and one daemon serves.
#[test]
fn a_spawner_killed_mid_spawn_does_not_block_the_next_client() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let mut first = p
        .child("client")
        .env(SPAWNS_ENV, spawns(&p))
        .env(BEHAVE_ENV, "slow")
        .spawn();
    first.close_stdin();
    common::examples::wait_until(|| !spawn_lines(&p).is_empty(), "the first spawn");
    first.kill_and_wait();
    let conn = launcher(&p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(&p, "slow"))
        .expect("the next client proceeds");
    let hello = read_hello(conn.stream);
    let holder = running_pid(&p.pid)
        .unwrap()
        .expect("a daemon holds the claim");
    assert_eq!(hello, format!("hello {holder}"));
}

// ---------------------------------------------------------------------------
// Stop
// ---------------------------------------------------------------------------

fn start(p: &Paths, behave: &str) -> u32 {
    let conn = launcher(p, Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_for(p, behave))
        .expect("start");
    match conn.started {
        Started::Spawned { pid } => pid,
        other => panic!("expected a spawn, got {other:?}"),
    }
}

/// Nothing running: nothing signalled. A PID file naming an unrelated live
/// process (no lock): refused as not running, the process untouched.
#[test]
fn stop_signals_nothing_without_a_holder() {
    let p = paths();
    let r = stop(&p.pid, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    assert_eq!(r, Stopped::NotRunning);

    let mut bystander = common::examples::KillOnDrop(
        Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::fs::write(&p.pid, bystander.0.id().to_string()).unwrap();
    let r = stop(&p.pid, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    assert_eq!(r, Stopped::NotRunning);
    assert!(
        bystander.0.try_wait().unwrap().is_none(),
        "the process the file names was not signalled"
    );
}

/// A daemon that exits on SIGTERM is stopped; one that ignores it is killed
/// after the graceful deadline; the claim is free afterwards.
#[test]
fn stop_terminates_then_kills() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let pid = start(&p, "");
    let r = stop(&p.pid, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    assert_eq!(r, Stopped::Stopped { pid });
    assert_eq!(running_pid(&p.pid).unwrap(), None);
    p.assert_gone();

    let p = paths();
    let _stop = StopAtEnd(&p);
    let pid = start(&p, "ignore-term");
    let r = stop(&p.pid, Duration::from_millis(200), Duration::from_secs(5)).unwrap();
    assert_eq!(r, Stopped::Killed { pid });
    assert_eq!(running_pid(&p.pid).unwrap(), None);
}

/// A restart racing the stop: the old daemon exits soon after SIGTERM and a
/// new one starts at once; the stop reports the old one stopped and the new
/// one keeps running, not signalled.
#[test]
fn stop_never_hits_a_daemon_restarted_meanwhile() {
    let p = paths();
    let _stop = StopAtEnd(&p);
    let old = start(&p, "exit-soon-after-term");
    let restarter = {
        let (sock, pid, spawns) = (p.sock.clone(), p.pid.clone(), spawns(&p));
        std::thread::spawn(move || {
            // Keep trying until a new daemon answers.
            loop {
                let mut cmd = daemon_command(&spawns, "");
                cmd.env(SOCK_ENV, &sock).env(PID_ENV, &pid);
                if let Ok(conn) = ensure_running(&sock, &pid, &mut cmd, Duration::from_secs(5)) {
                    if let Started::Spawned { pid } = conn.started {
                        return pid;
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Let the restarter find the old one first, then stop with a graceful
    // deadline far beyond the old daemon's exit.
    std::thread::sleep(Duration::from_millis(20));
    let r = stop(&p.pid, Duration::from_secs(2), Duration::from_secs(2)).unwrap();
    assert_eq!(r, Stopped::Stopped { pid: old });
    let new = restarter.join().unwrap();
    assert_ne!(new, old);
    // Past the old graceful deadline: the new daemon still holds the claim.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(running_pid(&p.pid).unwrap(), Some(new));
    let conn = UnixStream::connect(&p.sock).expect("the new daemon answers");
    assert_eq!(read_hello(conn), format!("hello {new}"));
}
