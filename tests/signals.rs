//! SIGTERM and SIGINT (P6): cleanup in the default mode while the daemon is
//! blocked in a syscall, several guards at once, one helper thread however
//! many guards come and go, graceful shutdown and its forced second signal,
//! and a forked child that keeps its hands off the parent's files.
//!
//! Every signal goes to a child process (this test binary re-run with a
//! role, see `common`); the test process never installs the crate's
//! handlers.

mod common;

use std::time::Duration;

use common::{
    child_main, child_paths, dev_ino, env_path, is_signal_thread, parse_ready, paths,
    process_alive, read_stdin_line, ready_line, report, snapshot, thread_names, wait_for_stdin_eof,
    ChildProc, Paths,
};
use historia_lifecycle::{probe_socket, running_pid, DaemonGuard, SignalMode, SocketState};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Pid};

/// A second path pair, for the role with two guards.
const SOCK2_ENV: &str = "HISTORIA_TEST_SOCK2";
const PID2_ENV: &str = "HISTORIA_TEST_PID2";
/// How many acquire/drop cycles the `cycles-then-hold` role runs.
const CYCLES: usize = 200;

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "block-accept" => role_block_accept(),
        "block-stdin" => role_block_stdin(),
        "two-guards" => role_two_guards(),
        "cycles-then-hold" => role_cycles_then_hold(),
        "graceful" => role_graceful(),
        "fork-sleeper" => role_fork_sleeper(),
        other => panic!("unknown child role {other:?}"),
    });
}

fn acquire(mode: SignalMode) -> DaemonGuard {
    let (sock, pid) = child_paths();
    DaemonGuard::builder(sock, pid)
        .signals(mode)
        .acquire()
        .expect("acquire")
}

/// Default mode; the main thread then blocks in accept(2) for good.
fn role_block_accept() {
    let g = acquire(SignalMode::Exit);
    report(ready_line(&g));
    let accepted = g.listener().expect("listener").accept();
    report(format!("ACCEPTED {accepted:?}"));
}

/// Default mode; the main thread then blocks in read(2) on stdin.
fn role_block_stdin() {
    let g = acquire(SignalMode::Exit);
    report(ready_line(&g));
    wait_for_stdin_eof();
    report("EOF");
}

/// Two guards on two path pairs in one process, then blocked on stdin.
fn role_two_guards() {
    let a = acquire(SignalMode::Exit);
    let (sock2, pid2) = (env_path(SOCK2_ENV), env_path(PID2_ENV));
    let b = DaemonGuard::acquire(sock2, pid2).expect("acquire second pair");
    report(format!("READY {} {}", a.pid(), b.pid()));
    wait_for_stdin_eof();
}

/// Acquire/drop cycles, counting threads; then holds one guard, blocked on
/// stdin, so the parent can check the signal handling still works.
fn role_cycles_then_hold() {
    let (sock, pid) = child_paths();
    let before = thread_names().len();
    let mut after_first = 0;
    let mut most = 0;
    for i in 0..CYCLES {
        let g = DaemonGuard::acquire(&sock, &pid).unwrap_or_else(|e| panic!("cycle {i}: {e:?}"));
        drop(g);
        let n = thread_names().len();
        if i == 0 {
            after_first = n;
        }
        most = most.max(n);
    }
    let last = thread_names().len();
    let signal_threads = thread_names()
        .iter()
        .filter(|n| is_signal_thread(n))
        .count();
    report(format!(
        "THREADS {before} {after_first} {most} {last} {signal_threads}"
    ));
    let g = DaemonGuard::acquire(&sock, &pid).expect("acquire after the cycles");
    report(ready_line(&g));
    wait_for_stdin_eof();
}

/// Graceful mode: waits for the shutdown request, reports it, then obeys
/// stdin: `drop` drops the guard and exits with `Shutdown::exit_code()`;
/// until then it is a drain that is stuck for as long as the parent likes.
fn role_graceful() {
    let g = acquire(SignalMode::Graceful);
    report(ready_line(&g));
    let requested = g.shutdown().wait_timeout(Duration::from_secs(30));
    let sig = g.shutdown().signal().map_or(-1, |s| s);
    report(format!("SHUTDOWN {requested} {sig}"));
    while let Some(cmd) = read_stdin_line() {
        if cmd == "drop" {
            let code = g.shutdown().exit_code();
            drop(g);
            report(format!("DROPPED {code}"));
            std::process::exit(code);
        }
    }
}

/// Default mode; forks a child (no exec) that only sleeps, and reports how
/// that child ended, then holds until end of file on stdin.
fn role_fork_sleeper() {
    let g = acquire(SignalMode::Exit);
    report(ready_line(&g));
    // SAFETY: the forked child only sleeps and calls _exit(2); it touches no
    // lock another thread could have held at the fork.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            // Bounded, in case the test dies before signalling us.
            for _ in 0..200 {
                std::thread::sleep(Duration::from_millis(100));
            }
            // SAFETY: ends the forked child without running anything of
            // the parent's.
            unsafe { nix::libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            report(format!("FORKED {child}"));
            let how = match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, code) => format!("exited {code}"),
                WaitStatus::Signaled(_, sig, _) => format!("signaled {}", sig as i32),
                other => format!("other {other:?}"),
            };
            report(format!("CHILD {how}"));
            wait_for_stdin_eof();
            drop(g);
        }
    }
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

/// Waits for [`ready_line`]: the child holds a guard, and found nothing
/// stale to reclaim.
fn expect_ready(child: &ChildProc) {
    assert_eq!(parse_ready(child), (false, false));
}

fn assert_present(p: &Paths) {
    assert!(dev_ino(&p.sock).is_some(), "socket missing");
    assert!(dev_ino(&p.pid).is_some(), "PID file missing");
}

/// Sends `sig` to a default-mode daemon blocked in a syscall and checks it
/// removed its files and died by that very signal.
fn signal_blocked_daemon(role_name: &str, sig: Signal) {
    let p = paths();
    let mut daemon = p.child(role_name).spawn();
    expect_ready(&daemon);
    assert_present(&p);
    // Let the main thread reach its blocking call.
    std::thread::sleep(Duration::from_millis(20));
    daemon.signal(sig);
    daemon.wait_signaled(sig);
    p.assert_gone();
    assert!(
        !daemon.transcript().contains("ACCEPTED") && !daemon.transcript().contains("EOF"),
        "the blocking call returned instead of the process ending"
    );
}

/// P6: SIGTERM to a daemon blocked in accept(2): files removed, the process
/// dies by SIGTERM.
#[test]
fn p6_sigterm_while_blocked_in_accept_removes_files_and_dies_by_sigterm() {
    signal_blocked_daemon("block-accept", Signal::SIGTERM);
}

/// P6: SIGINT to a daemon blocked in accept(2): files removed, the process
/// dies by SIGINT.
#[test]
fn p6_sigint_while_blocked_in_accept_removes_files_and_dies_by_sigint() {
    signal_blocked_daemon("block-accept", Signal::SIGINT);
}

/// P6: the same while blocked in read(2) on stdin.
#[test]
fn p6_sigterm_and_sigint_while_blocked_in_read() {
    signal_blocked_daemon("block-stdin", Signal::SIGTERM);
    signal_blocked_daemon("block-stdin", Signal::SIGINT);
}

/// P6: one SIGTERM cleans up every guard in the process.
#[test]
fn p6_one_sigterm_cleans_up_every_guard_in_the_process() {
    let p = paths();
    let other = p.dir.path().join("other");
    let (sock2, pid2) = (other.join("daemon.sock"), other.join("daemon.pid"));
    let mut daemon = p
        .child("two-guards")
        .env(SOCK2_ENV, &sock2)
        .env(PID2_ENV, &pid2)
        .spawn();
    let pid = daemon.pid();
    assert_eq!(daemon.expect_prefixed("READY "), format!("{pid} {pid}"));
    for path in [&p.sock, &p.pid, &sock2, &pid2] {
        assert!(dev_ino(path).is_some(), "{path:?} missing");
    }
    daemon.signal(Signal::SIGTERM);
    daemon.wait_signaled(Signal::SIGTERM);
    for path in [&p.sock, &p.pid, &sock2, &pid2] {
        assert!(dev_ino(path).is_none(), "{path:?} left behind");
    }
}

/// P6: 200 acquire/drop cycles start exactly one helper thread (none
/// before the first guard, the same count after every cycle), and SIGTERM
/// still cleans up afterwards.
#[test]
fn p6_repeated_acquire_drop_keeps_a_single_signal_thread() {
    let p = paths();
    let mut daemon = p.child("cycles-then-hold").spawn();
    let rest = daemon.expect_prefixed("THREADS ");
    let n: Vec<usize> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (before, after_first, most, last, signal_threads) = (n[0], n[1], n[2], n[3], n[4]);
    assert_eq!(
        after_first,
        before + 1,
        "the first guard adds one thread: {rest}"
    );
    assert_eq!(most, after_first, "threads piled up: {rest}");
    assert_eq!(last, after_first, "threads piled up: {rest}");
    assert_eq!(signal_threads, 1, "one historia-signal thread: {rest}");
    expect_ready(&daemon);
    daemon.signal(Signal::SIGTERM);
    daemon.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

/// P6 graceful: the signal wakes `Shutdown` with that signal; the files stay
/// until the daemon drops its guard, which removes them; the process exits
/// with 128 + signal.
#[test]
fn p6_graceful_signal_wakes_shutdown_and_files_go_at_drop() {
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let p = paths();
        let mut daemon = p.child("graceful").spawn();
        expect_ready(&daemon);
        let (sock, pid) = (snapshot(&p.sock), snapshot(&p.pid));
        daemon.signal(sig);
        assert_eq!(
            daemon.expect_prefixed("SHUTDOWN "),
            format!("true {}", sig as i32)
        );
        // Draining: nothing removed, the claim still held, still serving.
        assert_eq!(snapshot(&p.sock), sock);
        assert_eq!(snapshot(&p.pid), pid);
        assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon.pid()));
        assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
        assert!(!daemon.has_exited());

        daemon.send_line("drop");
        let code = 128 + sig as i32;
        assert_eq!(daemon.expect_prefixed("DROPPED "), code.to_string());
        p.assert_gone();
        let status = daemon.wait();
        assert_eq!(status.code(), Some(code), "{sig}: {status}");
    }
}

/// P6 graceful: a second SIGTERM while the drain is stuck removes the files
/// and ends the process by SIGTERM.
#[test]
fn p6_second_sigterm_during_stuck_drain_forces_exit() {
    let p = paths();
    let mut daemon = p.child("graceful").spawn();
    expect_ready(&daemon);
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.expect_prefixed("SHUTDOWN "), "true 15");
    // The daemon is now blocked reading stdin: a stuck drain.
    std::thread::sleep(Duration::from_millis(20));
    assert_present(&p);
    assert!(!daemon.has_exited());
    daemon.signal(Signal::SIGTERM);
    daemon.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

/// P6: SIGTERM to a forked child (no exec) of the daemon kills that child
/// by the default action and leaves the parent's files and claim alone.
#[test]
fn p6_signal_to_forked_child_leaves_parents_files() {
    let p = paths();
    let mut daemon = p.child("fork-sleeper").spawn();
    expect_ready(&daemon);
    let (sock, pid) = (snapshot(&p.sock), snapshot(&p.pid));
    let forked: u32 = daemon.expect_prefixed("FORKED ").parse().unwrap();
    assert!(process_alive(forked));
    // Not reaped until the daemon's waitpid sees it die: the PID is the
    // forked child's for as long as we signal it.
    kill(Pid::from_raw(forked as i32), Signal::SIGTERM).unwrap();
    assert_eq!(
        daemon.expect_prefixed("CHILD "),
        format!("signaled {}", Signal::SIGTERM as i32)
    );
    assert_eq!(snapshot(&p.sock), sock, "socket touched");
    assert_eq!(snapshot(&p.pid), pid, "PID file touched");
    assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon.pid()));
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
    assert!(!daemon.has_exited());

    daemon.stop();
    p.assert_gone();
}
