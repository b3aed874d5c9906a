//! Crash recovery (P2): after the holder is SIGKILLed at any point, the next
//! acquire succeeds with no manual cleanup; and no PID file content (empty,
//! garbage, an unrelated live PID, the acquirer's own PID) blocks a start.
//!
//! Holders and victims are child processes (this test binary re-run with a
//! role, see `common`). Guards taken in the test process itself use
//! `SignalMode::Off`, so the harness never gets our signal handlers.

mod common;

// The tests are #[serial]: they acquire and probe in the test process, and
// a child another test forks holds copies of our descriptors (with their
// flocks) until it execs.
use serial_test::serial;
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    builder_from_env, child_main, child_paths, dir_names, is_socket, parse_ready, paths,
    process_alive, ready_line, report, role_hold, snapshot, wait_for_stdin_eof, Rng,
};
use historia_lifecycle::{
    probe_socket, read_pid_file, running_pid, signal_daemon, DaemonGuard, DaemonInfo,
    LifecycleError, SignalMode, SocketState,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{ForkResult, Pid};

/// Role parameter: which variant of a scenario to play.
const VARIANT_ENV: &str = "HISTORIA_TEST_VARIANT";

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "hold" => role_hold(),
        "hold-own-pid" => role_hold_own_pid(),
        "acquire-loop" => role_acquire_loop(),
        "fork-keep-lock" => role_fork_keep_lock(),
        other => panic!("unknown child role {other:?}"),
    });
}

/// `hold` (see `common`), after writing this process's own PID into the PID
/// file, unlocked, as a daemon restarted under the same PID after a crash
/// would find it.
fn role_hold_own_pid() {
    let (_, pid) = child_paths();
    fs::write(&pid, format!("{}\n", std::process::id())).expect("write own PID");
    role_hold();
}

/// Acquires and drops in a tight loop until killed. Only `AlreadyRunning`
/// (a momentary fd copy in a process being spawned elsewhere) is tolerated;
/// anything else panics, which shows as exit status 101 instead of SIGKILL.
fn role_acquire_loop() {
    let (sock, pid) = child_paths();
    report("LOOPING");
    loop {
        match DaemonGuard::acquire(&sock, &pid) {
            Ok(g) => drop(g),
            Err(LifecycleError::AlreadyRunning) => {}
            Err(e) => panic!("acquire in the loop: {e:?}"),
        }
    }
}

/// Acquires (`SignalMode::Off`), then forks without exec: the forked child
/// (the test's grandchild) keeps its inherited copy of the lock descriptor,
/// and of the listener unless the variant is `close-listener`, and just
/// waits: for end of file on the stdin pipe it shares with this process (the
/// test closing it when it drops this child), at most 30 s. Reports
/// "READY <pid> <reclaimed socket> <reclaimed PID file> <forked child PID>"
/// once the forked child is set up, then waits to be killed.
fn role_fork_keep_lock() {
    let g = builder_from_env()
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire");
    let close_listener = match std::env::var(VARIANT_ENV).expect("variant").as_str() {
        "keep-listener" => false,
        "close-listener" => true,
        other => panic!("unknown variant {other:?}"),
    };
    let listener_fd = g.listener().expect("listener").as_raw_fd();
    // The forked child says on this pipe when it has closed what it closes,
    // so the parent reports a settled state.
    let (set_up_r, set_up_w) = nix::unistd::pipe().expect("pipe");
    // SAFETY: the forked child only calls close(2), write(2), poll(2) and
    // _exit(2), all async-signal-safe; it allocates nothing, takes no lock
    // and runs no destructor (the guard's copy is never dropped there).
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => unsafe {
            use nix::libc;
            if close_listener {
                libc::close(listener_fd);
            }
            // Without our stdout and stderr, the test's readers see end of
            // file as soon as the locker dies.
            libc::close(1);
            libc::close(2);
            libc::write(set_up_w.as_raw_fd(), b"x".as_ptr().cast(), 1);
            let mut stdin = libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            };
            libc::poll(&mut stdin, 1, 30_000);
            libc::_exit(0)
        },
        ForkResult::Parent { child } => {
            drop(set_up_w);
            let mut byte = [0u8; 1];
            fs::File::from(set_up_r)
                .read_exact(&mut byte)
                .expect("the forked child is set up");
            report(format!("{} {child}", ready_line(&g)));
            // The test SIGKILLs us here; the guard is never dropped.
            wait_for_stdin_eof();
            drop(g);
        }
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// SIGKILLs a process we did not spawn (so cannot reap) when dropped, unless
/// disarmed after it was killed and seen gone.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|&pid| process_alive(pid)) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn is_pid_temp_file(name: &str) -> bool {
    name.starts_with(".daemon.pid.") && name.ends_with(".tmp")
}

/// P2: a SIGKILLed holder leaves a stale socket and PID file; the next
/// acquire (another process) reclaims both by itself, several times over.
#[test]
#[serial]
fn p2_sigkilled_holder_is_reclaimed_by_the_next_acquire() {
    let p = paths();
    let mut holder = p.child("hold").spawn();
    assert_eq!(parse_ready(&holder), (false, false));
    for round in 0..3 {
        let dead = holder.pid();
        holder.signal(Signal::SIGKILL);
        holder.wait_signaled(Signal::SIGKILL);
        // What a crash leaves: both files, nobody holding or listening.
        assert!(is_socket(&p.sock));
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(dead));
        assert_eq!(running_pid(&p.pid).unwrap(), None);
        assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Stale);

        holder = p.child("hold").spawn();
        assert_eq!(parse_ready(&holder), (true, true), "round {round}");
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(holder.pid()));
        assert_eq!(running_pid(&p.pid).unwrap(), Some(holder.pid()));
        assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
    }
    holder.stop();
    p.assert_gone();
    assert!(dir_names(p.dir.path()).is_empty());
}

/// P2 "at any point": a child acquires and drops in a loop and is SIGKILLed
/// after a random delay, 50 times; each time a fresh acquire succeeds, and
/// nothing but the two paths and leftover PID temp files is found.
#[test]
#[serial]
fn p2_sigkill_at_random_points_never_blocks_the_next_start() {
    const ITERATIONS: usize = 50;
    let seed = Rng::clock_seed();
    let mut rng = Rng::new(seed);
    let p = paths();
    let started = Instant::now();
    let mut left_behind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut temp_files = 0;
    for i in 0..ITERATIONS {
        let mut victim = p.child("acquire-loop").spawn();
        assert_eq!(victim.expect_line(), "LOOPING");
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        victim.signal(Signal::SIGKILL);
        victim.wait_signaled(Signal::SIGKILL);

        let names = dir_names(p.dir.path());
        let unexpected: Vec<&String> = names
            .iter()
            .filter(|n| *n != "daemon.sock" && *n != "daemon.pid" && !is_pid_temp_file(n))
            .collect();
        assert!(
            unexpected.is_empty(),
            "iteration {i} (seed {seed}): stray files {unexpected:?}"
        );
        let (sock_left, pid_left) = (p.sock.exists(), p.pid.exists());
        let state = match (sock_left, pid_left) {
            (true, true) => "socket+pid",
            (false, true) => "pid only",
            (true, false) => "socket only",
            (false, false) => "nothing",
        };
        *left_behind.entry(state).or_default() += 1;

        let g = p.acquire_here().unwrap_or_else(|e| {
            panic!("iteration {i} (seed {seed}), after a kill leaving {state}: {e:?}")
        });
        assert_eq!(g.reclaimed_stale_socket(), sock_left, "iteration {i}");
        assert_eq!(g.reclaimed_stale_pid_file(), pid_left, "iteration {i}");
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(std::process::id()));
        drop(g);
        p.assert_gone();
        temp_files = dir_names(p.dir.path()).len();
    }
    eprintln!(
        "P2: {ITERATIONS} random SIGKILLs in {:.2?} (seed {seed}); left behind: {left_behind:?}; \
         PID temp files leaked (never reclaimed): {temp_files}",
        started.elapsed()
    );
}

/// P2: a PID file that is empty, garbage, oversized, names an unrelated live
/// process (PID 1, a running `sleep`, this test process) or the acquirer's
/// own PID blocks no start: the acquire succeeds and replaces it.
#[test]
#[serial]
fn p2_pid_file_content_never_blocks_a_start() {
    let mut sleep = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", b"garbage\n".to_vec()),
        ("binary", b"\0\xff\x01".to_vec()),
        ("oversized", vec![b'7'; 200]),
        ("zero", b"0\n".to_vec()),
        ("negative", b"-1\n".to_vec()),
        ("PID 1", b"1\n".to_vec()),
        ("a live sleep", format!("{}\n", sleep.id()).into_bytes()),
        (
            "this test process",
            format!("{}\n", std::process::id()).into_bytes(),
        ),
    ];
    let mut outcome = Vec::new();
    for (what, content) in &cases {
        let p = paths();
        fs::write(&p.pid, content).unwrap();
        let mut child = p.child("hold").spawn();
        outcome.push((what, parse_ready(&child)));
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(child.pid()), "{what}");
        assert_eq!(running_pid(&p.pid).unwrap(), Some(child.pid()), "{what}");
        child.stop();
        p.assert_gone();
    }
    // The acquirer's own PID, written there before it starts.
    let p = paths();
    let mut child = p.child("hold-own-pid").spawn();
    outcome.push((&"own PID", parse_ready(&child)));
    assert_eq!(running_pid(&p.pid).unwrap(), Some(child.pid()));
    child.stop();
    p.assert_gone();

    let _ = sleep.kill();
    let _ = sleep.wait();
    for (what, reclaimed) in outcome {
        assert_eq!(
            reclaimed,
            (false, true),
            "{what}: (socket, PID file) reclaimed"
        );
    }
}

/// P2: a stale socket with no PID file (the PID file removed by hand, say)
/// is reclaimed too.
#[test]
#[serial]
fn p2_stale_socket_without_pid_file_is_reclaimed() {
    let p = paths();
    let mut holder = p.child("hold").spawn();
    parse_ready(&holder);
    holder.signal(Signal::SIGKILL);
    holder.wait_signaled(Signal::SIGKILL);
    fs::remove_file(&p.pid).unwrap();
    let mut next = p.child("hold").spawn();
    assert_eq!(parse_ready(&next), (true, false));
    next.stop();
    p.assert_gone();
}

/// P2: the locker forks a child (no exec) that keeps the claim's lock, and
/// is SIGKILLed. The lock is held but `/proc/locks` (and the PID file) name
/// the dead locker: `running_pid` and `signal_daemon` must say
/// `HolderUnknown`, never the dead (perhaps recycled) PID, and signal
/// nothing; the daemon counts as running and an acquire is refused, touching
/// nothing. Once the forked child dies, the next acquire reclaims the files.
/// With the forked child's listener closed, only the lock says "running".
#[test]
#[serial]
fn p2_running_pid_never_names_the_dead_locker_of_a_lock_kept_by_a_forked_child() {
    for variant in ["keep-listener", "close-listener"] {
        let p = paths();
        let mut locker = p.child("fork-keep-lock").env(VARIANT_ENV, variant).spawn();
        let rest = locker.expect_prefixed("READY ");
        let f: Vec<&str> = rest.split_whitespace().collect();
        assert_eq!(f[..3], [&*locker.pid().to_string(), "false", "false"]);
        let forked: u32 = f[3].parse().expect("forked child PID");
        let mut forked_guard = KillOnDrop(Some(forked));
        assert!(process_alive(forked), "{variant}: forked child");
        // While the locker lives, it is the holder.
        assert_eq!(
            running_pid(&p.pid).unwrap(),
            Some(locker.pid()),
            "{variant}"
        );

        let dead = locker.pid();
        locker.kill_and_wait();
        assert!(process_alive(forked), "{variant}: forked child died too");
        assert_eq!(read_pid_file(&p.pid).unwrap(), Some(dead), "{variant}");
        let expected_socket = if variant == "keep-listener" {
            SocketState::Listening
        } else {
            SocketState::Stale
        };
        assert_eq!(probe_socket(&p.sock).unwrap(), expected_socket, "{variant}");
        let pid_before = snapshot(&p.pid);
        let tree_before = p.tree();

        let r = running_pid(&p.pid);
        assert!(
            matches!(&r, Err(LifecycleError::HolderUnknown { path }) if *path == p.pid),
            "{variant}: running_pid must not name dead PID {dead}: {r:?}"
        );
        let r = signal_daemon(&p.pid, Signal::SIGTERM as i32);
        assert!(
            matches!(&r, Err(LifecycleError::HolderUnknown { path }) if *path == p.pid),
            "{variant}: signal_daemon with dead PID {dead} in /proc/locks: {r:?}"
        );
        assert!(
            process_alive(forked),
            "{variant}: the lock keeper was signalled"
        );
        assert!(
            DaemonInfo::new(p.sock.clone(), p.pid.clone()).is_running(),
            "{variant}: the claim is held"
        );
        let e = p.acquire_here().expect_err("the claim is held");
        assert!(
            matches!(e, LifecycleError::AlreadyRunning),
            "{variant}: {e:?}"
        );
        assert_eq!(snapshot(&p.pid), pid_before, "{variant}: PID file touched");
        assert_eq!(p.tree(), tree_before, "{variant}: directory changed");

        // The last holder dies: the lock goes with it.
        kill(Pid::from_raw(forked as i32), Signal::SIGKILL).expect("kill the forked child");
        // Bounded wait (the forked child is not ours to reap): its exit
        // closes the lock descriptor and then, a moment later, the listener
        // it may hold; until both are closed a start is rightly refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(running_pid(&p.pid), Ok(None))
            || probe_socket(&p.sock).is_ok_and(|s| s.is_live())
        {
            assert!(
                Instant::now() < deadline,
                "{variant}: lock still held after SIGKILL of {forked}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        forked_guard.0 = None;
        let g = p.acquire_here().expect("the last holder is dead");
        assert!(g.reclaimed_stale_pid_file(), "{variant}");
        assert!(g.reclaimed_stale_socket(), "{variant}");
        assert_eq!(running_pid(&p.pid).unwrap(), Some(std::process::id()));
        drop(g);
        p.assert_gone();
    }
}
