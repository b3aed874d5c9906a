//! `PidFileGuard`, the claim without a socket, and what every guard shares:
//! racing starts, recovery after SIGKILL, cleanup on SIGTERM, a forked child
//! that keeps its hands off, `disable_cleanup`, cleanup after `chdir(2)`, and
//! one file spelt two ways.
//!
//! Every guard that installs signal handling lives in a child process (this
//! test binary re-run with a role, see `common`).

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Stdio;

use common::{
    child_main, child_paths, dev_ino, env_path, paths, read_stdin_line, report, snapshot,
    tree_snapshot, wait_for_stdin_eof, ChildProc, Rng,
};
use historia_lifecycle::{
    read_pid_file, running_pid, DaemonGuard, LifecycleError, PidFileGuard, SignalMode,
};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::ForkResult;

/// For the race role: the winner holds its guard until this file exists.
const RELEASE_ENV: &str = "HISTORIA_TEST_RELEASE";
/// For the chdir roles: where the child moves after acquiring.
const CHDIR_ENV: &str = "HISTORIA_TEST_CHDIR";
/// For the chdir roles: "pid" (a `PidFileGuard`) or "socket" (a `DaemonGuard`).
const KIND_ENV: &str = "HISTORIA_TEST_KIND";

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "race" => role_race(),
        "hold-pid" => role_hold_pid(),
        "fork-drop" => role_fork_drop(),
        "disabled" => role_disabled(),
        "chdir" => role_chdir(),
        "try-hold" => role_try_hold(),
        "look-and-fork" => role_look_and_fork(),
        other => panic!("unknown child role {other:?}"),
    });
}

fn pid_path() -> PathBuf {
    child_paths().1
}

fn ready(g: &PidFileGuard) -> String {
    format!("READY {} {}", g.pid(), g.reclaimed_stale_pid_file())
}

/// Waits on stdin (the shared barrier), then races to acquire.
fn role_race() {
    report("WAITING");
    wait_for_stdin_eof();
    match PidFileGuard::builder(pid_path())
        .signals(SignalMode::Off)
        .acquire()
    {
        Ok(g) => {
            report(ready(&g));
            // Hold until the parent has checked the PID file and says so by
            // creating the release file (stdin is the spent barrier).
            let release = env_path(RELEASE_ENV);
            while !release.exists() {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            drop(g);
        }
        Err(LifecycleError::AlreadyRunning) => report("REFUSED AlreadyRunning"),
        Err(e) => report(format!("ERROR {e:?}")),
    }
}

/// Acquires with the default signal handling, reports, then obeys stdin:
/// `drop`, `close`, or end of file.
fn role_hold_pid() {
    let mut g = Some(PidFileGuard::acquire(pid_path()).expect("acquire"));
    report(ready(g.as_ref().unwrap()));
    while let Some(cmd) = read_stdin_line() {
        match cmd.as_str() {
            "drop" => {
                drop(g.take());
                report("DROPPED");
            }
            "close" => report(format!("CLOSED {:?}", g.take().unwrap().close())),
            other => panic!("unknown command {other:?}"),
        }
    }
}

/// Acquires once (no signal handling), reports `READY …`, `REFUSED
/// AlreadyRunning` or `ERROR …`, then holds what it got until end of stdin.
fn role_try_hold() {
    let got = PidFileGuard::builder(pid_path())
        .signals(SignalMode::Off)
        .acquire();
    match &got {
        Ok(g) => report(ready(g)),
        Err(LifecycleError::AlreadyRunning) => report("REFUSED AlreadyRunning"),
        Err(e) => report(format!("ERROR {e:?}")),
    }
    wait_for_stdin_eof();
    drop(got);
}

/// A status poller in a program that also starts processes: one thread asks
/// `running_pid` in a loop (each look a shared trial flock when nothing
/// holds the claim), another spawns `true` in a loop (each child holds
/// copies of the looker's descriptors until its exec). Runs until end of
/// stdin, then reports how many looks it made.
fn role_look_and_fork() {
    let path = pid_path();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spawner = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::process::Command::new("true").status();
            }
        })
    };
    let looker = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut looks = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = running_pid(&path);
                looks += 1;
            }
            looks
        })
    };
    report("LOOKING");
    wait_for_stdin_eof();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    spawner.join().unwrap();
    report(format!("LOOKS {}", looker.join().unwrap()));
}

/// Acquires, forks; the child drops its copy of the guard and exits; the
/// parent reports whether its PID file and claim survived.
fn role_fork_drop() {
    let path = pid_path();
    let g = PidFileGuard::acquire(&path).expect("acquire");
    // SAFETY: the child only drops a guard and calls _exit; the guard's
    // drop takes no lock another thread could hold at fork (the signal
    // thread is idle in read(2)) beyond the cleanup's own mutex, which is
    // unlocked here.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            drop(g);
            // SAFETY: _exit is always safe; it skips atexit handlers.
            unsafe { nix::libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).expect("waitpid");
            assert_eq!(status, WaitStatus::Exited(child, 0));
            report(format!(
                "AFTER-CHILD {} {:?}",
                path.exists(),
                running_pid(&path).map_err(|e| e.to_string())
            ));
            drop(g);
            report(format!("AFTER-DROP {}", path.exists()));
        }
    }
}

/// Disables cleanup, then obeys stdin: `enable`, `drop`, or end of file.
fn role_disabled() {
    let mut g = Some(PidFileGuard::acquire(pid_path()).expect("acquire"));
    g.as_mut().unwrap().disable_cleanup(true);
    report(ready(g.as_ref().unwrap()));
    while let Some(cmd) = read_stdin_line() {
        match cmd.as_str() {
            "enable" => {
                g.as_mut().unwrap().disable_cleanup(false);
                report("ENABLED");
            }
            "drop" => {
                drop(g.take());
                report("DROPPED");
            }
            other => panic!("unknown command {other:?}"),
        }
    }
}

/// Acquires with *relative* paths from the test dir, moves to another
/// directory, then ends as stdin says: `drop`, `close`, or a signal from the
/// parent while blocked.
fn role_chdir() {
    let (sock, pid) = child_paths();
    let dir = sock.parent().unwrap().to_path_buf();
    std::env::set_current_dir(&dir).expect("chdir to the test dir");
    let (sock, pid) = (
        PathBuf::from(sock.file_name().unwrap()),
        PathBuf::from(pid.file_name().unwrap()),
    );
    enum G {
        Pid(PidFileGuard),
        Sock(DaemonGuard),
    }
    let g = match std::env::var(KIND_ENV).as_deref() {
        Ok("pid") => G::Pid(PidFileGuard::acquire(&pid).expect("acquire")),
        _ => G::Sock(DaemonGuard::acquire(&sock, &pid).expect("acquire")),
    };
    std::env::set_current_dir(env_path(CHDIR_ENV)).expect("chdir away");
    report("MOVED");
    match read_stdin_line().as_deref() {
        Some("drop") => {
            drop(g);
            report("DROPPED");
        }
        Some("close") => {
            let r = match g {
                G::Pid(g) => g.close(),
                G::Sock(g) => g.close(),
            };
            report(format!("CLOSED {r:?}"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Of N processes released at the same instant, exactly one gets the PID
/// file, the rest `AlreadyRunning`, and the file names the winner.
#[test]
fn racing_pid_file_guards_exactly_one_wins_every_round() {
    const ROUNDS: usize = 10;
    let seed = Rng::clock_seed();
    let mut rng = Rng::new(seed);
    let p = paths();
    let release_dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let n = 8 + rng.below(9) as usize;
        let release = release_dir.path().join(format!("release-{round}"));
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut children: Vec<ChildProc> = (0..n)
            .map(|_| {
                let stdin: OwnedFd = read.try_clone().expect("dup read end");
                p.child("race")
                    .env(RELEASE_ENV, &release)
                    .stdin(Stdio::from(stdin))
                    .spawn()
            })
            .collect();
        drop(read);
        for c in &children {
            assert_eq!(c.expect_line(), "WAITING");
        }
        drop(write);
        let lines: Vec<String> = children.iter().map(|c| c.expect_line()).collect();
        let winners: Vec<usize> = (0..n).filter(|&i| lines[i].starts_with("READY ")).collect();
        assert_eq!(winners.len(), 1, "round {round} (seed {seed}): {lines:?}");
        let refused = lines
            .iter()
            .filter(|l| *l == "REFUSED AlreadyRunning")
            .count();
        assert_eq!(refused, n - 1, "round {round} (seed {seed}): {lines:?}");
        let winner = children[winners[0]].pid();
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(winner));
        assert_eq!(running_pid(&p.pid).unwrap(), Some(winner));
        assert!(!p.sock.exists(), "a PID file guard binds no socket");
        std::fs::write(&release, "").unwrap();
        for c in &mut children {
            c.wait_success();
        }
        assert!(
            !p.pid.exists(),
            "round {round}: the winner's Drop removes it"
        );
    }
}

/// A SIGKILLed holder leaves its PID file; the next acquire replaces it
/// with no manual cleanup, and says so.
#[test]
fn sigkilled_holder_is_reclaimed_by_the_next_pid_file_guard() {
    let p = paths();
    let mut first = p.child("hold-pid").spawn();
    first.expect_prefixed("READY ");
    first.kill_and_wait();
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(first.pid()));
    assert_eq!(running_pid(&p.pid).unwrap(), None, "the flock died with it");

    let mut second = p.child("hold-pid").spawn();
    let ready = second.expect_prefixed("READY ");
    assert_eq!(ready, format!("{} true", second.pid()));
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(second.pid()));
    second.send_line("close");
    assert_eq!(second.expect_line(), "CLOSED Ok(())");
    second.stop();
    assert!(!p.pid.exists());
}

/// A daemon starting over a stale PID file while a status poller looks at
/// it (`running_pid`'s shared trial flock, and the copies of it that the
/// poller's own child processes hold until their exec) starts: a look is
/// never taken for a holder. Each round leaves a stale file (SIGKILL), so
/// every start has to lock the existing file beside the looks.
#[test]
fn a_start_beside_a_status_poller_is_never_refused_for_its_look() {
    const ROUNDS: usize = 40;
    let p = paths();
    let mut poller = p.child("look-and-fork").spawn();
    assert_eq!(poller.expect_line(), "LOOKING");
    for round in 0..ROUNDS {
        let mut d = p.child("try-hold").spawn();
        let line = d.expect_line();
        assert_eq!(
            line,
            format!("{} {}", ready_prefix(&d), round > 0),
            "round {round}"
        );
        d.kill_and_wait();
        assert!(p.pid.exists(), "SIGKILL leaves the stale file");
    }
    poller.close_stdin();
    let looks = poller.expect_prefixed("LOOKS ");
    assert!(looks.parse::<u64>().unwrap() > 0, "the poller looked");
    poller.wait_success();
}

fn ready_prefix(c: &ChildProc) -> String {
    format!("READY {}", c.pid())
}

/// A shared flock is a look, waited out for a moment; one that stays (here
/// `flock -s` for 30 s) counts as a holder: `AlreadyRunning`, and the file is
/// left as it was.
#[test]
fn a_brief_shared_flock_is_waited_out_and_a_lasting_one_refuses() {
    let flock_bin = common::examples::require_tool("flock", "util-linux");
    let p = paths();
    std::fs::write(&p.pid, "4194303").unwrap();
    let shared = |seconds: &str| {
        let mut c = std::process::Command::new(&flock_bin);
        // -o: only flock(1) holds the lock, not the command it runs, so
        // killing flock(1) lets it go.
        c.args(["-s", "-o"])
            .arg(&p.pid)
            .args(["sh", "-c", &format!("echo LOCKED; exec sleep {seconds}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = common::examples::KillOnDrop(c.spawn().expect("spawn flock"));
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "LOCKED");
        child
    };

    // Held for 30 s: a holder as far as a start can tell.
    let before = snapshot(&p.pid);
    let mut lasting = shared("30");
    let mut d = p.child("try-hold").spawn();
    assert_eq!(d.expect_line(), "REFUSED AlreadyRunning");
    d.close_stdin();
    d.wait_success();
    assert_eq!(snapshot(&p.pid), before, "the file is left as it was");
    let _ = lasting.0.kill();
    let _ = lasting.0.wait();

    // Held for 0.2 s, and the start begins while it is held (the child
    // acquires the moment its stdin closes, after LOCKED): it waits the look
    // out and reclaims the stale file.
    let mut d = p
        .child("race")
        .env(RELEASE_ENV, p.dir.path().join("go"))
        .spawn();
    assert_eq!(d.expect_line(), "WAITING");
    let mut brief = shared("0.2");
    d.close_stdin();
    assert_eq!(d.expect_line(), format!("{} true", ready_prefix(&d)));
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(d.pid()));
    std::fs::write(p.dir.path().join("go"), "").unwrap();
    d.wait_success();
    assert!(brief.0.wait().unwrap().success());
}

/// SIGTERM and SIGINT remove the PID file and end the process by that
/// signal, while the main thread is blocked.
#[test]
fn sigterm_and_sigint_remove_the_pid_file_and_kill_the_holder() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let p = paths();
        let mut c = p.child("hold-pid").spawn();
        c.expect_prefixed("READY ");
        assert!(p.pid.exists());
        c.signal(sig);
        c.wait_signaled(sig);
        assert!(!p.pid.exists(), "{sig}: the PID file must be gone");
    }
}

/// A forked child dropping its copy removes nothing; the parent keeps its
/// file and its claim until its own Drop.
#[test]
fn forked_child_dropping_a_pid_file_guard_keeps_the_parents_claim() {
    let p = paths();
    let lines = p.child("fork-drop").run();
    assert_eq!(
        lines,
        vec![
            format!("AFTER-CHILD true Ok(Some({}))", child_pid_from(&lines)),
            "AFTER-DROP false".to_string()
        ]
    );
}

/// The PID the "fork-drop" child reported (its own); checked against the
/// line format, so a wrong holder still fails the comparison above.
fn child_pid_from(lines: &[String]) -> String {
    lines
        .first()
        .and_then(|l| l.strip_prefix("AFTER-CHILD true Ok(Some("))
        .and_then(|l| l.strip_suffix("))"))
        .unwrap_or("?")
        .to_string()
}

/// `disable_cleanup(true)` leaves the file at Drop and at SIGTERM; turning
/// it back on restores the cleanup.
#[test]
fn disable_cleanup_leaves_the_pid_file_and_can_be_undone() {
    // Drop with cleanup off: the file stays, the claim ends.
    let p = paths();
    let mut c = p.child("disabled").spawn();
    c.expect_prefixed("READY ");
    c.send_line("drop");
    assert_eq!(c.expect_line(), "DROPPED");
    assert!(p.pid.exists(), "disabled cleanup leaves the PID file");
    assert_eq!(running_pid(&p.pid).unwrap(), None, "but the claim is over");
    c.stop();

    // SIGTERM with cleanup off: the file stays, the process dies by SIGTERM.
    let p = paths();
    let mut c = p.child("disabled").spawn();
    c.expect_prefixed("READY ");
    c.signal(Signal::SIGTERM);
    c.wait_signaled(Signal::SIGTERM);
    assert!(p.pid.exists());

    // Re-enabled: Drop removes it again.
    let p = paths();
    let mut c = p.child("disabled").spawn();
    c.expect_prefixed("READY ");
    c.send_line("enable");
    assert_eq!(c.expect_line(), "ENABLED");
    c.send_line("drop");
    assert_eq!(c.expect_line(), "DROPPED");
    assert!(!p.pid.exists());
    c.stop();
}

/// A guard acquired with relative paths still removes its own files after
/// the process `chdir`s elsewhere, by Drop, `close()` and SIGTERM, for both
/// guards; and a same-named file in the new directory is left alone.
#[test]
fn cleanup_after_chdir_removes_the_files_acquired_with_relative_paths() {
    for kind in ["pid", "socket"] {
        for end in ["drop", "close", "sigterm"] {
            let p = paths();
            let elsewhere = tempfile::tempdir().unwrap();
            // Decoys with the same names where the relative paths now point.
            let decoy_pid = elsewhere.path().join("daemon.pid");
            let decoy_sock = elsewhere.path().join("daemon.sock");
            std::fs::write(&decoy_pid, "1\n").unwrap();
            let _decoy_listener = std::os::unix::net::UnixListener::bind(&decoy_sock).unwrap();
            let decoys = tree_snapshot(elsewhere.path());

            let mut c = p
                .child("chdir")
                .env(KIND_ENV, kind)
                .env(CHDIR_ENV, elsewhere.path())
                .spawn();
            assert_eq!(c.expect_line(), "MOVED");
            assert!(p.pid.exists());
            assert_eq!(p.sock.exists(), kind == "socket");
            match end {
                "sigterm" => {
                    c.signal(Signal::SIGTERM);
                    c.wait_signaled(Signal::SIGTERM);
                }
                "drop" => {
                    c.send_line("drop");
                    assert_eq!(c.expect_line(), "DROPPED");
                    c.stop();
                }
                _ => {
                    c.send_line("close");
                    assert_eq!(c.expect_line(), "CLOSED Ok(())");
                    c.stop();
                }
            }
            p.assert_gone();
            assert_eq!(
                tree_snapshot(elsewhere.path()),
                decoys,
                "{kind}/{end}: the new directory's files are untouched"
            );
        }
    }
}

/// The socket and PID paths naming one file, spelt differently, are refused
/// as the same path before anything changes.
#[test]
fn one_file_spelt_two_ways_is_refused_as_the_same_path() {
    let p = paths();
    let dir = p.dir.path();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::os::unix::fs::symlink(dir, dir.join("link")).unwrap();
    let pid = dir.join("daemon.pid");
    let spellings: Vec<PathBuf> = vec![
        dir.join(".").join("daemon.pid"),
        dir.join("sub/../daemon.pid"),
        dir.join("link/daemon.pid"),
        PathBuf::from(format!("{}//daemon.pid", dir.display())),
    ];
    for sock in &spellings {
        let before = tree_snapshot(dir);
        let e = DaemonGuard::builder(sock, &pid)
            .signals(SignalMode::Off)
            .acquire()
            .expect_err("the same file twice");
        assert!(
            matches!(e, LifecycleError::InvalidArgument { what: "paths", .. }),
            "{}: {e:?}",
            sock.display()
        );
        assert!(e.to_string().contains("same file"), "{e}");
        assert_eq!(tree_snapshot(dir), before, "{}", sock.display());
    }

    // A hard link to a stale PID file at the socket path: the same inode.
    let stale = dir.join("stale.pid");
    std::fs::write(&stale, "999999\n").unwrap();
    let link = dir.join("hard.sock");
    std::fs::hard_link(&stale, &link).unwrap();
    let before = snapshot(&link);
    let e = DaemonGuard::builder(&link, &stale)
        .signals(SignalMode::Off)
        .acquire()
        .expect_err("a hard link to the PID file");
    assert!(
        matches!(e, LifecycleError::InvalidArgument { what: "paths", .. }),
        "{e:?}"
    );
    assert_eq!(snapshot(&link), before);
    assert_eq!(dev_ino(&link), dev_ino(&stale), "both names left in place");
}

/// A relative socket path is bound as given, and a client reaches it by
/// the absolute name too; `close()` then removes both files.
#[test]
fn relative_paths_bind_as_given_and_connect() {
    let p = paths();
    let mut c = p
        .child("chdir")
        .env(KIND_ENV, "socket")
        .env(CHDIR_ENV, p.dir.path())
        .spawn();
    assert_eq!(c.expect_line(), "MOVED");
    UnixStream::connect(&p.sock).expect("the socket answers");
    c.send_line("close");
    assert_eq!(c.expect_line(), "CLOSED Ok(())");
    c.stop();
    p.assert_gone();
}
