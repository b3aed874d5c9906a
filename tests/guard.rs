//! `DaemonGuard` across processes: mutual exclusion (P1), losers change
//! nothing (P3), the bound socket (P4), owned cleanup (P5), no inherited
//! claim (P7) and no leaks (P8).
//!
//! Every guard that matters here lives in a child process (this test binary
//! re-run with a role, see `common`), so flocks, PIDs and `fork` behave as
//! they do for real daemons. Guards taken in the test process itself use
//! `SignalMode::Off`, so the harness never gets our signal handlers.

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{symlink, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    builder_from_env, child_main, child_paths, dev_ino, dir_names, env_path, is_cloexec,
    is_signal_thread, mode_of, open_fds, parse_ready, paths, process_alive, ready_line,
    refusal_line, report, role_hold, serve_bare_listener, snapshot, thread_names,
    wait_for_stdin_eof, ChildProc, Paths, Rng, MODE_ENV, SOCK_ENV, UMASK_ENV,
};
use historia_lifecycle::{
    probe_socket, read_pid_file, running_pid, DaemonGuard, FileKind, LifecycleError, SignalMode,
    SocketState,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};

/// Role parameter: which variant of a scenario to play.
const VARIANT_ENV: &str = "HISTORIA_TEST_VARIANT";
/// For the `cycles` role: how many acquire/drop cycles.
const CYCLES_ENV: &str = "HISTORIA_TEST_CYCLES";

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "race" => role_race(),
        "hold" => role_hold(),
        "listen" => serve_bare_listener(&child_paths().0),
        "lockless-daemon" => role_lockless_daemon(),
        "serve" => role_serve(),
        "fork" => role_fork(),
        "fds" => role_fds(),
        "spawn-sleep" => role_spawn_sleep(),
        "cycles" => role_cycles(),
        "churn-locks" => role_churn_locks(),
        other => panic!("unknown child role {other:?}"),
    });
}

/// P1 racer: waits at the barrier (end of file on a stdin shared by all
/// racers), acquires, and reports. The winner answers one connection.
fn role_race() {
    let (sock, pid) = child_paths();
    report("WAITING");
    wait_for_stdin_eof();
    match DaemonGuard::acquire(&sock, &pid) {
        Ok(g) => {
            report(ready_line(&g));
            let (mut conn, _) = g.listener().expect("listener").accept().expect("accept");
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).expect("read from client");
            conn.write_all(&byte).expect("write to client");
            report("ACCEPTED");
        }
        Err(e) => report(refusal_line(&e)),
    }
}

/// A daemon that does not use the claim (an older version, another
/// program): binds a plain listener at the socket path and writes its PID
/// into the PID file with `fs::write`, unlocked. Reports "SERVING <pid>",
/// then holds the listener until end of file on stdin.
fn role_lockless_daemon() {
    let (sock, pid) = child_paths();
    let listener = UnixListener::bind(&sock)
        .unwrap_or_else(|e| panic!("bind a plain listener at {}: {e}", sock.display()));
    let me = std::process::id();
    fs::write(&pid, format!("{me}\n")).expect("write the PID file");
    report(format!("SERVING {me}"));
    wait_for_stdin_eof();
    drop(listener);
}

/// Serves one connection (echo of one line), optionally through
/// `take_listener` (variant `take`).
fn role_serve() {
    let mut g = builder_from_env().acquire().expect("acquire");
    let take = std::env::var(VARIANT_ENV).as_deref() == Ok("take");
    let listener = if take {
        let l = g.take_listener().expect("take_listener gives the listener");
        assert!(g.listener().is_none(), "taken listener still in the guard");
        l
    } else {
        g.listener()
            .expect("listener")
            .try_clone()
            .expect("dup listener")
    };
    let cloexec = is_cloexec(g.listener().unwrap_or(&listener).as_raw_fd());
    report(format!("READY {} cloexec={cloexec}", g.pid()));
    let (conn, _) = listener.accept().expect("accept");
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).expect("read");
    (&conn)
        .write_all(format!("echo:{line}").as_bytes())
        .expect("write");
    report(format!("SERVED {}", line.trim_end()));
    wait_for_stdin_eof();
    drop(listener);
    drop(g);
}

/// Acquires, forks (no exec), and lets the forked child end its copy of the
/// guard by variant: `drop`, `close`, or `exit` (std::process::exit, no
/// destructors). Reports how the forked child ended, then holds until end of
/// file on stdin.
fn role_fork() {
    let g = builder_from_env().acquire().expect("acquire");
    report(ready_line(&g));
    let variant = std::env::var(VARIANT_ENV).expect("variant");
    // SAFETY: the forked child only drops or closes the guard (getpid(2),
    // atomics, close(2), unlink(2) if it wrongly thought itself the owner)
    // and exits; it takes no lock another thread could have held at fork.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match variant.as_str() {
                "drop" => {
                    drop(g);
                    0
                }
                "close" => match g.close() {
                    Ok(()) => 0,
                    Err(_) => 3,
                },
                "exit" => std::process::exit(0),
                _ => 4,
            };
            // SAFETY: _exit(2) ends the forked child without running the
            // parent's atexit handlers or flushing its copied buffers.
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).expect("waitpid");
            let how = match status {
                WaitStatus::Exited(_, code) => format!("exited {code}"),
                WaitStatus::Signaled(_, sig, _) => format!("signaled {sig}"),
                other => format!("other {other:?}"),
            };
            report(format!("FORKED {child} {how}"));
            wait_for_stdin_eof();
            drop(g);
        }
    }
}

/// Lists the descriptors an acquire adds and checks each is close-on-exec,
/// also for the ones `keep()` hands back.
fn role_fds() {
    let before = open_fds();
    let g = builder_from_env().acquire().expect("acquire");
    let after = open_fds();
    let new: Vec<i32> = after.difference(&before).copied().collect();
    let cloexec = new.iter().filter(|&&fd| is_cloexec(fd)).count();
    let listener_fd = g.listener().expect("listener").as_raw_fd();
    report(format!(
        "NEWFDS {} {cloexec} listener_is_new={}",
        new.len(),
        new.contains(&listener_fd)
    ));
    let (file, listener) = g.keep();
    let listener = listener.expect("kept listener");
    report(format!(
        "KEPT {} {}",
        is_cloexec(file.as_raw_fd()),
        is_cloexec(listener.as_raw_fd())
    ));
    wait_for_stdin_eof();
}

/// Acquires, spawns `sleep 30` the ordinary way, and holds until killed.
fn role_spawn_sleep() {
    let g = builder_from_env().acquire().expect("acquire");
    let mut sleep = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    report(format!("{} {}", ready_line(&g), sleep.id()));
    wait_for_stdin_eof();
    // Only reached if the parent lets us go instead of SIGKILLing us.
    let _ = sleep.kill();
    let _ = sleep.wait();
}

/// Acquire/drop cycles, tracking this process's descriptor and thread counts
/// after every cycle.
fn role_cycles() {
    let (sock, pid) = child_paths();
    let n: usize = std::env::var(CYCLES_ENV)
        .expect("cycles")
        .parse()
        .expect("number");
    let modes = [SignalMode::Exit, SignalMode::Graceful, SignalMode::Off];
    let (mut fds, mut threads) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let g = DaemonGuard::builder(&sock, &pid)
            .signals(modes[i % modes.len()])
            .acquire()
            .unwrap_or_else(|e| panic!("cycle {i}: {e:?}"));
        assert!(g.listener().is_some());
        drop(g);
        assert!(!sock.exists() && !pid.exists(), "cycle {i} left files");
        fds.push(open_fds().len());
        threads.push(thread_names().len());
    }
    let stats = |v: &[usize]| {
        let rest = &v[1..];
        format!(
            "{} {} {}",
            v[0],
            rest.iter().min().expect("cycles"),
            rest.iter().max().expect("cycles")
        )
    };
    let signal_threads = thread_names()
        .iter()
        .filter(|n| is_signal_thread(n))
        .count();
    report(format!(
        "CYCLES {n} fds {} threads {} signal_threads {signal_threads}",
        stats(&fds),
        stats(&threads)
    ));
}

/// Holds many flocks (so `/proc/locks` outgrows one page) and takes and
/// drops one more in a loop until killed: the lock-table churn of a busy
/// machine.
fn role_churn_locks() {
    let dir = env_path(SOCK_ENV).with_file_name("churn");
    fs::create_dir_all(&dir).expect("churn dir");
    let me = std::process::id();
    let held: Vec<fs::File> = (0..100)
        .map(|i| {
            let f = fs::File::create(dir.join(format!("{me}-{i}"))).expect("create");
            f.lock().expect("flock");
            f
        })
        .collect();
    report(format!("CHURNING {}", held.len()));
    // A varying number of extra locks moves every other line up and down the
    // table, so lines keep crossing the boundaries between reads.
    let extra: Vec<PathBuf> = (0..60)
        .map(|i| dir.join(format!("{me}-extra-{i}")))
        .collect();
    let mut rng = Rng::new(u64::from(me));
    loop {
        let n = rng.below(extra.len() as u64) as usize;
        let locked: Vec<fs::File> = extra[..n]
            .iter()
            .map(|path| {
                let f = fs::File::create(path).expect("create");
                f.lock().expect("flock");
                f
            })
            .collect();
        drop(locked);
    }
}

// ---------------------------------------------------------------------------
// Parent helpers
// ---------------------------------------------------------------------------

/// A `hold` child that got the claim.
fn spawn_holder(p: &Paths) -> ChildProc {
    let child = p.child("hold").spawn();
    parse_ready(&child);
    child
}

// ---------------------------------------------------------------------------
// P1: mutual exclusion
// ---------------------------------------------------------------------------

/// P1: 30 rounds of 16-32 processes released at once from one barrier:
/// exactly one wins each round, every other one gets exactly
/// `AlreadyRunning`, the PID file and `running_pid` name the winner, and the
/// winner's listener answers. Every other round starts from a crashed
/// daemon's stale PID file and socket, so the racers fight over locking the
/// existing file (and none may take another's look for a holder and wait
/// it out forever, or both give up).
#[test]
fn p1_racing_processes_exactly_one_wins_every_round() {
    const ROUNDS: usize = 30;
    let seed = Rng::clock_seed();
    let mut rng = Rng::new(seed);
    let p = paths();
    let started = Instant::now();
    let mut winners_per_round = Vec::new();
    let mut racers = 0;
    for round in 0..ROUNDS {
        let n = 16 + rng.below(17) as usize;
        racers += n;
        let stale = round % 2 == 1;
        if stale {
            std::fs::write(&p.pid, "4194303").unwrap();
            // Bound, then closed without unlinking: connecting is refused.
            drop(std::os::unix::net::UnixListener::bind(&p.sock).unwrap());
        }
        // The barrier: every racer's stdin is this pipe; closing the write
        // end wakes them all with end of file at the same instant.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let children: Vec<ChildProc> = (0..n)
            .map(|_| {
                let stdin: OwnedFd = read.try_clone().expect("dup read end");
                p.child("race").stdin(Stdio::from(stdin)).spawn()
            })
            .collect();
        drop(read);
        for c in &children {
            assert_eq!(c.expect_line(), "WAITING");
        }
        drop(write);

        let (mut winners, mut refused, mut other) = (Vec::new(), 0, Vec::new());
        for (i, c) in children.iter().enumerate() {
            let line = c.expect_line();
            if line.starts_with("READY ") {
                winners.push((i, line));
            } else if line == "REFUSED AlreadyRunning" {
                refused += 1;
            } else {
                other.push(line);
            }
        }
        winners_per_round.push(winners.len());
        assert!(
            other.is_empty(),
            "round {round} (seed {seed}): losers must get exactly AlreadyRunning: {other:?}"
        );
        assert_eq!(
            winners.len(),
            1,
            "round {round} (seed {seed}): {n} racers, winners {winners:?}"
        );
        assert_eq!(refused, n - 1);
        let winner = &children[winners[0].0];
        let winner_pid = winner.pid();
        assert!(winners[0].1.starts_with(&format!("READY {winner_pid} ")));
        // Nothing reclaimed without stale files. With them, the racer that
        // cleared them need not be the one whose file then got the name.
        if !stale {
            assert_eq!(winners[0].1, format!("READY {winner_pid} false false"));
        }
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(winner_pid));
        assert_eq!(running_pid(&p.pid).unwrap(), Some(winner_pid));

        // The one listener answers: a byte goes there and back.
        let mut client = UnixStream::connect(&p.sock).expect("connect to the winner");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.write_all(b"x").unwrap();
        let mut echo = [0u8; 1];
        client.read_exact(&mut echo).expect("winner echoes");
        assert_eq!(&echo, b"x");
        assert_eq!(winner.expect_line(), "ACCEPTED");

        for mut c in children {
            c.wait_success();
        }
        p.assert_gone();
        assert!(
            dir_names(p.dir.path()).is_empty(),
            "round {round} left files"
        );
    }
    eprintln!(
        "P1: {ROUNDS} rounds, {racers} racing processes in {:.2?} (seed {seed}); \
         winners per round: {winners_per_round:?}",
        started.elapsed()
    );
}

/// P1: `running_pid` names the holder on every call, even while other
/// processes hold 200 flocks and take and drop more (the kernel's
/// `/proc/locks` is then read in several pieces, between which lines shift).
#[test]
fn p1_running_pid_names_the_holder_while_other_processes_churn_locks() {
    const CALLS: usize = 1000;
    let p = paths();
    let mut holder = spawn_holder(&p);
    let mut churners: Vec<ChildProc> = (0..2).map(|_| p.child("churn-locks").spawn()).collect();
    for c in &churners {
        assert_eq!(c.expect_line(), "CHURNING 100");
    }
    let misses: Vec<Option<u32>> = (0..CALLS)
        .map(|_| running_pid(&p.pid).unwrap())
        .filter(|&found| found != Some(holder.pid()))
        .collect();
    for c in &mut churners {
        c.kill_and_wait();
    }
    assert!(
        misses.is_empty(),
        "{} of {CALLS} calls said {:?}",
        misses.len(),
        misses.first()
    );
    holder.stop();
    p.assert_gone();
}

// ---------------------------------------------------------------------------
// P3: the loser changes nothing
// ---------------------------------------------------------------------------

/// P3: losing acquires, from this process and from other processes, leave
/// the winner's PID file and socket byte-for-byte, inode-for-inode and
/// timestamp-for-timestamp as they were, and the winner keeps serving.
#[test]
fn p3_losing_acquires_leave_the_winners_files_untouched() {
    let p = paths();
    let mut holder = spawn_holder(&p);
    let sock_before = snapshot(&p.sock);
    let pid_before = snapshot(&p.pid);
    let names_before = dir_names(p.dir.path());
    assert_eq!(names_before, ["daemon.pid", "daemon.sock"]);
    // Timestamps have coarse granularity: let the clock move so a rewrite
    // would show.
    std::thread::sleep(Duration::from_millis(30));

    for _ in 0..3 {
        let e = p.acquire_here().expect_err("the holder is alive");
        assert!(matches!(e, LifecycleError::AlreadyRunning), "{e:?}");
        let e = DaemonGuard::builder(&p.sock, &p.pid)
            .socket_mode(0o666)
            .backlog(1)
            .signals(SignalMode::Off)
            .acquire()
            .expect_err("the holder is alive");
        assert!(matches!(e, LifecycleError::AlreadyRunning), "{e:?}");
    }
    let losers: Vec<ChildProc> = (0..4).map(|_| p.child("hold").spawn()).collect();
    for mut l in losers {
        assert_eq!(l.expect_line(), "REFUSED AlreadyRunning");
        l.wait_success();
    }

    assert_eq!(snapshot(&p.sock), sock_before, "socket changed");
    assert_eq!(snapshot(&p.pid), pid_before, "PID file changed");
    assert_eq!(dir_names(p.dir.path()), names_before, "loser left files");
    assert_eq!(running_pid(&p.pid).unwrap(), Some(holder.pid()));
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);

    holder.stop();
    p.assert_gone();
}

/// P3: a daemon that does not use the claim serves on the socket and wrote
/// its PID into the PID file, unlocked. An acquire finds the PID file's
/// lock free, but must refuse with exactly `AlreadyRunning` (the socket is
/// live) before it touches that PID file: same inode, bytes, timestamps; the
/// socket untouched, no file added, here or from another process with the
/// default signal handling.
#[test]
fn p3_refused_acquire_leaves_a_lockless_daemons_pid_file_alone() {
    let p = paths();
    let mut daemon = p.child("lockless-daemon").spawn();
    let daemon_pid = daemon.pid();
    assert_eq!(daemon.expect_prefixed("SERVING "), daemon_pid.to_string());
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(daemon_pid));
    assert_eq!(running_pid(&p.pid).unwrap(), None, "nobody holds the lock");
    let pid_before = snapshot(&p.pid);
    let sock_before = snapshot(&p.sock);
    let tree_before = p.tree();
    assert_eq!(dir_names(p.dir.path()), ["daemon.pid", "daemon.sock"]);
    // Timestamps have coarse granularity: let the clock move so a rewrite
    // would show.
    std::thread::sleep(Duration::from_millis(30));

    for _ in 0..3 {
        let e = p.acquire_here().expect_err("a daemon serves there");
        assert!(matches!(e, LifecycleError::AlreadyRunning), "{e:?}");
        assert!(dev_ino(&p.pid).is_some(), "the daemon's PID file removed");
        let after = snapshot(&p.pid);
        assert_eq!(after.dev_ino, pid_before.dev_ino, "PID file replaced");
        assert_eq!(after.bytes, pid_before.bytes, "PID file rewritten");
        assert_eq!(after, pid_before, "PID file touched");
    }
    let mut loser = p.child("hold").spawn();
    assert_eq!(loser.expect_line(), "REFUSED AlreadyRunning");
    loser.finish();

    assert_eq!(snapshot(&p.pid), pid_before, "PID file touched");
    assert_eq!(snapshot(&p.sock), sock_before, "socket touched");
    assert_eq!(p.tree(), tree_before, "directory changed");
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(daemon_pid));
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
    daemon.stop();
}

// ---------------------------------------------------------------------------
// P4: the bound socket
// ---------------------------------------------------------------------------

fn serve_and_check(variant: &str) {
    let p = paths();
    let mut server = p.child("serve").env(VARIANT_ENV, variant).spawn();
    let rest = server.expect_prefixed("READY ");
    assert_eq!(
        rest,
        format!("{} cloexec=true", server.pid()),
        "listener must be close-on-exec"
    );
    let mut client = UnixStream::connect(&p.sock).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"ping\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&client).read_line(&mut reply).unwrap();
    assert_eq!(reply, "echo:ping\n");
    assert_eq!(server.expect_line(), "SERVED ping");
    server.stop();
    // Even with the listener taken out of it, the guard removed the socket.
    p.assert_gone();
}

/// P4: a client connects to the guard's listener and exchanges bytes; the
/// listener is close-on-exec.
#[test]
fn p4_listener_accepts_and_exchanges_bytes() {
    serve_and_check("listener");
}

/// P4: `take_listener` hands over a working listener, and the guard still
/// removes the socket file.
#[test]
fn p4_take_listener_serves_and_socket_is_still_removed() {
    serve_and_check("take");
}

/// P4: the socket is 0600 by default and exactly 0660 with
/// `socket_mode(0o660)`, whatever the umask (077 would take the group bits
/// away, 000 would leave wider ones); the PID file is 0644.
#[test]
fn p4_socket_mode_is_exact_under_any_umask() {
    for umask in ["077", "000", "022"] {
        let (a, b) = (paths(), paths());
        let mut default = a.child("hold").env(UMASK_ENV, umask).spawn();
        let mut group = b
            .child("hold")
            .env(UMASK_ENV, umask)
            .env(MODE_ENV, "660")
            .spawn();
        parse_ready(&default);
        parse_ready(&group);
        assert_eq!(mode_of(&a.sock), 0o600, "default mode, umask {umask}");
        assert_eq!(mode_of(&b.sock), 0o660, "socket_mode(0o660), umask {umask}");
        assert_eq!(mode_of(&a.pid), 0o644, "PID file mode, umask {umask}");
        assert_eq!(mode_of(&b.pid), 0o644, "PID file mode, umask {umask}");
        for c in [&mut default, &mut group] {
            c.stop();
        }
        a.assert_gone();
        b.assert_gone();
    }
}

/// P4: a regular file, a directory, a FIFO or a symlink (dangling, or to a
/// live socket) at the socket path is refused with `UnexpectedFileType`,
/// left exactly as it was, and the PID file the attempt created is rolled
/// back, temp file included.
#[test]
fn p4_non_socket_at_socket_path_is_refused_and_left_alone() {
    let elsewhere = tempfile::tempdir().unwrap();
    let live = elsewhere.path().join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    type Make = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, FileKind, Make)> = vec![
        (
            "regular file",
            FileKind::Regular,
            Box::new(|p| fs::write(p, "not a socket\n").unwrap()),
        ),
        (
            "directory",
            FileKind::Directory,
            Box::new(|p| {
                fs::create_dir(p).unwrap();
                fs::write(p.join("inside"), "x").unwrap();
            }),
        ),
        (
            "FIFO",
            FileKind::Fifo,
            Box::new(|p| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }),
        ),
        (
            "dangling symlink",
            FileKind::Symlink,
            Box::new(|p| symlink("/nonexistent/target.sock", p).unwrap()),
        ),
        (
            "symlink to a live socket",
            FileKind::Symlink,
            Box::new(move |p| symlink(&live, p).unwrap()),
        ),
    ];
    for (what, kind, make) in cases {
        let p = paths();
        make(&p.sock);
        let before = snapshot(&p.sock);
        let err = p.acquire_here().expect_err(what);
        assert!(
            matches!(
                &err,
                LifecycleError::UnexpectedFileType {
                    expected: FileKind::Socket,
                    found,
                    ..
                } if *found == kind
            ),
            "{what}: {err:?}"
        );
        assert_eq!(err.path(), Some(p.sock.as_path()), "{what}");
        assert_eq!(snapshot(&p.sock), before, "{what} was changed");
        assert!(
            dev_ino(&p.pid).is_none(),
            "{what}: PID file not rolled back"
        );
        assert_eq!(
            dir_names(p.dir.path()),
            ["daemon.sock"],
            "{what}: stray files"
        );
        if kind == FileKind::Directory {
            assert_eq!(dir_names(&p.sock), ["inside"]);
        }
        if kind == FileKind::Fifo {
            assert!(fs::symlink_metadata(&p.sock).unwrap().file_type().is_fifo());
        }
    }
    assert_eq!(
        probe_socket(&elsewhere.path().join("live.sock")).unwrap(),
        SocketState::Listening
    );
}

/// P4: a bare listener (a plain `UnixListener` in another process, with no
/// guard and no claim) already serves at the socket path while nobody holds
/// the PID file's claim. The acquire gets the claim, then finds the socket
/// live: it must refuse with exactly `AlreadyRunning`, leave the listener's
/// socket file as it was (same inode) and roll back the PID file it created,
/// leaving no PID file and no temp file. A loser in another process, with
/// the default signal handling, gets the same.
#[test]
fn p4_bare_listener_without_a_claim_is_already_running_and_the_pid_file_rolled_back() {
    let p = paths();
    let mut listener = p.child("listen").spawn();
    assert_eq!(listener.expect_line(), "LISTENING");
    let before = snapshot(&p.sock);
    assert_eq!(dir_names(p.dir.path()), ["daemon.sock"]);
    assert_eq!(running_pid(&p.pid).unwrap(), None, "nobody holds the claim");

    let e = p.acquire_here().expect_err("a listener serves there");
    assert!(matches!(e, LifecycleError::AlreadyRunning), "{e:?}");
    let mut loser = p.child("hold").spawn();
    assert_eq!(loser.expect_line(), "REFUSED AlreadyRunning");
    loser.finish();

    let after = snapshot(&p.sock);
    assert_eq!(
        after.dev_ino, before.dev_ino,
        "the listener's socket replaced"
    );
    assert_eq!(after, before, "the listener's socket was touched");
    assert!(dev_ino(&p.pid).is_none(), "PID file not rolled back");
    let names = dir_names(p.dir.path());
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with('.') && n.ends_with(".tmp")),
        "temp file left: {names:?}"
    );
    assert_eq!(names, ["daemon.sock"], "stray files");
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
    listener.stop();
}

// ---------------------------------------------------------------------------
// P5: owned cleanup
// ---------------------------------------------------------------------------

/// P5: dropping the guard removes both files, while the process lives on.
#[test]
fn p5_drop_removes_both_files() {
    let p = paths();
    let mut holder = spawn_holder(&p);
    assert!(p.sock.exists() && p.pid.exists());
    holder.send_line("drop");
    assert_eq!(holder.expect_line(), "DROPPED");
    p.assert_gone();
    assert!(!holder.has_exited(), "Drop, not process exit, removed them");
    assert_eq!(running_pid(&p.pid).unwrap(), None);
    holder.stop();
}

/// P5: `close()` returns `Ok(())` and removes both files; the process then
/// exits without cleaning up again, so a newer instance's files survive.
#[test]
fn p5_close_returns_ok_removes_and_never_cleans_up_twice() {
    let p = paths();
    let mut old = spawn_holder(&p);
    old.send_line("close");
    assert_eq!(old.expect_line(), "CLOSED Ok(())");
    p.assert_gone();

    let mut new = spawn_holder(&p);
    let (sock, pid) = (snapshot(&p.sock), snapshot(&p.pid));
    old.stop();
    assert_eq!(snapshot(&p.sock), sock);
    assert_eq!(snapshot(&p.pid), pid);
    assert_eq!(running_pid(&p.pid).unwrap(), Some(new.pid()));
    new.stop();
    p.assert_gone();
}

/// P5: a `fork`ed child (no exec) that drops its copy of the guard, closes
/// it, or exits without destructors removes nothing, and the parent's claim
/// holds: same files, `running_pid` still the parent, a new acquire refused.
#[test]
fn p5_forked_child_ending_its_copy_keeps_parents_files_and_claim() {
    for variant in ["drop", "close", "exit"] {
        let p = paths();
        let mut daemon = p.child("fork").env(VARIANT_ENV, variant).spawn();
        parse_ready(&daemon);
        let daemon_pid = daemon.pid();
        let (sock, pid) = (snapshot(&p.sock), snapshot(&p.pid));
        let forked = daemon.expect_prefixed("FORKED ");
        assert!(
            forked.ends_with(" exited 0"),
            "{variant}: forked child ended with {forked}"
        );
        assert_eq!(snapshot(&p.sock), sock, "{variant}: socket touched");
        assert_eq!(snapshot(&p.pid), pid, "{variant}: PID file touched");
        assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon_pid), "{variant}");
        assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
        let e = p
            .acquire_here()
            .expect_err("the parent still holds the claim");
        assert!(
            matches!(e, LifecycleError::AlreadyRunning),
            "{variant}: {e:?}"
        );

        daemon.stop();
        p.assert_gone();
    }
}

/// P5: an operator deleted the files and a newer instance took the paths;
/// the old guard's Drop (or close) leaves the newer files alone.
#[test]
fn p5_old_guard_leaves_a_newer_instances_files_alone() {
    for end in ["drop", "close"] {
        let p = paths();
        let mut old = spawn_holder(&p);
        fs::remove_file(&p.sock).unwrap();
        fs::remove_file(&p.pid).unwrap();
        let mut new = p.child("hold").spawn();
        let (reclaimed_sock, reclaimed_pid) = parse_ready(&new);
        assert!(
            !reclaimed_sock && !reclaimed_pid,
            "nothing was left to reclaim"
        );
        let (sock, pid) = (snapshot(&p.sock), snapshot(&p.pid));

        old.send_line(end);
        let expected = if end == "drop" {
            "DROPPED"
        } else {
            "CLOSED Ok(())"
        };
        assert_eq!(old.expect_line(), expected);
        old.stop();

        assert_eq!(snapshot(&p.sock), sock, "{end}: newer socket touched");
        assert_eq!(snapshot(&p.pid), pid, "{end}: newer PID file touched");
        assert_eq!(running_pid(&p.pid).unwrap(), Some(new.pid()));
        assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
        new.stop();
        p.assert_gone();
    }
}

// ---------------------------------------------------------------------------
// P7: no inherited claim
// ---------------------------------------------------------------------------

/// P7: a daemon spawns `sleep 30` and is SIGKILLed; while the sleep still
/// runs (holding none of the daemon's descriptors), a new acquire succeeds.
#[test]
fn p7_program_spawned_by_daemon_does_not_keep_the_claim() {
    let p = paths();
    let mut daemon = p.child("spawn-sleep").spawn();
    let rest = daemon.expect_prefixed("READY ");
    let sleep_pid: u32 = rest
        .split_whitespace()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .expect("sleep pid");
    // Kill the sleep whatever happens below.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
        }
    }
    let _sleep = KillOnDrop(sleep_pid);

    daemon.kill_and_wait();
    assert!(process_alive(sleep_pid), "sleep must outlive the daemon");
    // The sleep holds no descriptor naming the PID file.
    let pid_path = fs::canonicalize(&p.pid).unwrap();
    for fd in fs::read_dir(format!("/proc/{sleep_pid}/fd")).unwrap() {
        let target = fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert_ne!(target, pid_path, "sleep inherited the PID file");
    }

    let mut next = p.child("hold").spawn();
    let (reclaimed_sock, reclaimed_pid) = parse_ready(&next);
    assert!(process_alive(sleep_pid), "the sleep ran during the acquire");
    assert!(reclaimed_sock && reclaimed_pid);
    assert_eq!(running_pid(&p.pid).unwrap(), Some(next.pid()));
    next.stop();
    p.assert_gone();
}

/// P7: every descriptor an acquire adds (PID file lock, listener, signal
/// pipe) is close-on-exec, and so are the ones `keep()` hands back.
#[test]
fn p7_every_descriptor_the_guard_holds_is_cloexec() {
    let p = paths();
    let mut child = p.child("fds").spawn();
    let rest = child.expect_prefixed("NEWFDS ");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (new, cloexec): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
    assert!(new >= 2, "at least the lock and the listener: {rest}");
    assert_eq!(cloexec, new, "descriptors without FD_CLOEXEC: {rest}");
    assert_eq!(f[2], "listener_is_new=true");
    assert_eq!(child.expect_line(), "KEPT true true");
    child.stop();
}

// ---------------------------------------------------------------------------
// P8: no leaks
// ---------------------------------------------------------------------------

/// P8: 2000 acquire/drop cycles (all three signal modes) leave the
/// descriptor and thread counts exactly where the first cycle left them.
#[test]
fn p8_thousands_of_cycles_leave_fd_and_thread_counts_flat() {
    let p = paths();
    let mut child = p.child("cycles").env(CYCLES_ENV, "2000").spawn();
    let rest = child.expect_prefixed("CYCLES ");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // "2000 fds <first> <min> <max> threads <first> <min> <max> signal_threads <n>"
    assert_eq!(f[0], "2000");
    let num = |i: usize| -> usize { f[i].parse().unwrap() };
    assert_eq!((num(3), num(4)), (num(2), num(2)), "fd count moved: {rest}");
    assert_eq!(
        (num(7), num(8)),
        (num(6), num(6)),
        "thread count moved: {rest}"
    );
    assert_eq!(num(10), 1, "one signal thread: {rest}");
    child.wait_success();
    p.assert_gone();
}
