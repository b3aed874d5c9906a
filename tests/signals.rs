//! SIGTERM and SIGINT (P6): cleanup in the default mode while the daemon is
//! blocked in a syscall, several guards at once, one helper thread however
//! many guards come and go, graceful shutdown and its forced second signal,
//! a forked child that keeps its hands off the parent's files, and a forked
//! child that closed its inherited descriptors and keeps its own claim.
//!
//! Every signal goes to a child process (this test binary re-run with a
//! role, see `common`); the test process never installs the crate's
//! handlers.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{
    child_main, child_paths, dev_ino, env_path, is_signal_thread, open_fds, parse_ready, paths,
    pipe_fds, process_alive, read_stdin_line, ready_line, report, snapshot, thread_names,
    wait_for_stdin_eof, ChildProc, Paths,
};
use historia_lifecycle::{
    probe_socket, running_pid, DaemonGuard, LifecycleError, SignalMode, SocketState,
};
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
        "fork-close-fds" => role_fork_close_fds(),
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

/// Default mode guard on the [`child_paths`] pair, then a fork (no exec)
/// whose child behaves like daemonizing code: it closes every inherited
/// descriptor above stderr, opens throwaway files so that the next free
/// number is where the parent's signal pipe was, and acquires its own
/// default-mode guard on the [`SOCK2_ENV`]/[`PID2_ENV`] pair. That forked
/// child reports `C-READY <pid> <its listener fd> <the parent's pipe fds>`
/// and sleeps (bounded) holding its guard; this process reports how it
/// ended, then holds its own guard until end of file on stdin.
fn role_fork_close_fds() {
    let before = pipe_fds();
    let g = acquire(SignalMode::Exit);
    // The signal pipe is the one pair of pipe ends the first guard added.
    let signal_pipe: Vec<RawFd> = pipe_fds().difference(&before).copied().collect();
    assert_eq!(signal_pipe.len(), 2, "signal pipe fds: {signal_pipe:?}");
    report(ready_line(&g));
    let (sock2, pid2) = (env_path(SOCK2_ENV), env_path(PID2_ENV));
    // SAFETY: the forked child runs only this function's code and ends with
    // _exit(2). The only other thread here, the crate's signal helper, is
    // blocked in read(2) and holds no lock.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        ForkResult::Child => {
            // Never unwind into the forked copy of the test harness.
            let code = match std::panic::catch_unwind(|| {
                forked_closer(&signal_pipe, &sock2, &pid2);
            }) {
                Ok(()) => 0,
                Err(_) => 101,
            };
            // SAFETY: ends the forked child without running anything of the
            // parent's (no destructors, no atexit handlers).
            unsafe { nix::libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let how = match waitpid(child, None).expect("waitpid") {
                WaitStatus::Exited(_, code) => format!("exited {code}"),
                WaitStatus::Signaled(_, sig, _) => format!("signaled {}", sig as i32),
                other => format!("other {other:?}"),
            };
            report(format!("GRANDCHILD {how}"));
            wait_for_stdin_eof();
            drop(g);
        }
    }
}

/// The forked child of [`role_fork_close_fds`].
fn forked_closer(signal_pipe: &[RawFd], sock: &Path, pid: &Path) {
    // Die with the process that forked us: the test can reap only its own
    // children, and this one must not outlive a failed test.
    // SAFETY: prctl(2) touches no memory of ours.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) };
    // Listed before any is closed, as daemonizing code does; the numbers
    // include the parent's claim, listener and signal pipe.
    for fd in open_fds().into_iter().filter(|&fd| fd > 2) {
        // SAFETY: this process never uses the inherited objects again (it
        // ends with _exit, dropping nothing), so closing their numbers
        // cannot break an owner.
        unsafe { nix::libc::close(fd) };
    }
    // Throwaway files (a log, a config...) fill the freed numbers up to the
    // first of the parent's signal-pipe numbers, so the claim file and
    // listener of the guard below land on the pipe's old numbers.
    let first = *signal_pipe.iter().min().expect("pipe fds");
    let mut throwaway = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").expect("open /dev/null");
        let fd = f.as_raw_fd();
        throwaway.push(f);
        if fd + 1 >= first {
            break;
        }
    }
    match DaemonGuard::acquire(sock, pid) {
        Ok(c) => {
            let lfd = c.listener().map_or(-1, |l| l.as_raw_fd());
            report(format!(
                "C-READY {} {lfd} {signal_pipe:?}",
                std::process::id()
            ));
            // Bounded, in case the test dies without signalling us.
            for _ in 0..300 {
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(c);
        }
        Err(e) => report(format!("C-ERROR {e:?}")),
    }
    drop(throwaway);
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

/// SIGKILLs a grandchild (a forked child of a child role) still alive when
/// the test ends, e.g. while a failed assertion unwinds. Only while it is
/// still `parent`'s child: an unreaped child's PID cannot have been recycled.
struct KillOnDrop {
    pid: u32,
    parent: u32,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // "pid (comm) state ppid ...": the parent PID follows the state.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(self.parent) {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

/// P6 regression: a forked child (no exec) of a default-mode daemon that
/// closes all its inherited descriptors (as daemonizing code does), reuses
/// their numbers for files of its own and then acquires its own guard keeps
/// that guard whole: the crate must not close the parent's signal-pipe
/// descriptors by number, which would now be the child's claim file and
/// listener (a second instance could then start, or a debug build abort).
/// Its own signal handling works: SIGTERM removes its files and kills it,
/// and the parent's files and claim are left alone.
#[test]
fn p6_forked_child_that_closed_its_fds_keeps_its_own_claim() {
    let p = paths();
    let (c_sock, c_pid) = (p.dir.path().join("c.sock"), p.dir.path().join("c.pid"));
    let mut daemon = p
        .child("fork-close-fds")
        .env(SOCK2_ENV, &c_sock)
        .env(PID2_ENV, &c_pid)
        .spawn();
    expect_ready(&daemon);
    let (a_sock, a_pid) = (snapshot(&p.sock), snapshot(&p.pid));
    let rest = daemon.expect_prefixed("C-READY ");
    let forked: u32 = rest.split_whitespace().next().unwrap().parse().unwrap();
    let _reaper = KillOnDrop {
        pid: forked,
        parent: daemon.pid(),
    };
    assert_ne!(forked, daemon.pid(), "{rest}");
    assert!(process_alive(forked), "{rest}");

    // The forked child's claim is whole: its flock refuses a second
    // instance, names it as the holder, and its listener still accepts.
    let second = DaemonGuard::builder(&c_sock, &c_pid)
        .signals(SignalMode::Off)
        .acquire();
    assert!(
        matches!(second, Err(LifecycleError::AlreadyRunning)),
        "a second instance got past the forked child's claim ({rest}): {second:?}"
    );
    drop(second);
    assert_eq!(running_pid(&c_pid).unwrap(), Some(forked), "{rest}");
    UnixStream::connect(&c_sock)
        .unwrap_or_else(|e| panic!("connect to the forked child's socket ({rest}): {e}"));

    // Its own signal pipe works: SIGTERM removes its files, then kills it.
    kill(Pid::from_raw(forked as i32), Signal::SIGTERM).unwrap();
    assert_eq!(
        daemon.expect_prefixed("GRANDCHILD "),
        format!("signaled {}", Signal::SIGTERM as i32)
    );
    common::assert_absent(&[&c_sock, &c_pid]);

    // The parent's files and claim were never the forked child's to touch.
    assert_eq!(snapshot(&p.sock), a_sock, "socket touched");
    assert_eq!(snapshot(&p.pid), a_pid, "PID file touched");
    assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon.pid()));
    assert_eq!(probe_socket(&p.sock).unwrap(), SocketState::Listening);
    daemon.stop();
    p.assert_gone();
}
