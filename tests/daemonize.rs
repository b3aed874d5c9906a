//! Daemonizing with the claim held, with real processes: the claim handed to
//! a forked child (FreeBSD's pidfile(3) test suite, ported, plus a chain of
//! hand-overs watched by a racer), and the builders' `daemonize` as the
//! original process and the daemon look from outside (exit status and
//! message, session, terminal, cwd, stdio, descriptors, umask, the PID file
//! naming the daemon once the original exits), under `start-stop-daemon`,
//! and 16 starts racing.
//!
//! Daemons here are not children of the test (they double-fork away), so
//! every test that starts one holds a [`StopOnDrop`] that stops whatever
//! holds its PID file, passing or failing.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::examples::{command, daemon_cmd, require_tool, run, send, ssd_stop, wait_until, Ran};
use common::{
    child_main, child_paths, paths, process_alive, read_stdin_line, report, wait_for_stdin_eof,
};
use historia_lifecycle::{
    read_pid_file, running_pid, DaemonGuard, LifecycleError, PidFileGuard, SignalMode,
};

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "uncontested" => role_uncontested(),
        "self" => role_self(),
        "hold" => role_hold(),
        "inherit" => role_inherit(),
        "inherit-socket" => role_inherit_socket(),
        "chain" => role_chain(),
        "probe" => role_probe(),
        other => panic!("unknown role {other}"),
    });
}

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

fn pid_guard(path: &Path, mode: SignalMode) -> Result<PidFileGuard, LifecycleError> {
    PidFileGuard::builder(path).signals(mode).acquire()
}

/// FreeBSD `test_pidfile_uncontested`: the claim, the file naming us,
/// `running_pid` naming us, and `close()` removing it.
fn role_uncontested() {
    let pid = child_paths().1;
    let guard = pid_guard(&pid, SignalMode::Off).expect("uncontested claim");
    report(format!(
        "HELD {} {:?} {:?}",
        std::process::id(),
        read_pid_file(&pid).unwrap(),
        running_pid(&pid).unwrap()
    ));
    guard.close().expect("close");
    report(format!("CLOSED {}", pid.exists()));
}

/// FreeBSD `test_pidfile_self`: a second claim in the same process fails,
/// and names us.
fn role_self() {
    let pid = child_paths().1;
    let _guard = pid_guard(&pid, SignalMode::Off).expect("first claim");
    let second = pid_guard(&pid, SignalMode::Off);
    report(format!(
        "SECOND {} {} {:?}",
        std::process::id(),
        matches!(second, Err(LifecycleError::AlreadyRunning)),
        running_pid(&pid).unwrap()
    ));
}

/// Holds a PID-file claim until stdin ends.
fn role_hold() {
    let _guard = pid_guard(&child_paths().1, SignalMode::Off).expect("claim");
    report(format!("HELD {}", std::process::id()));
    wait_for_stdin_eof();
}

/// Runs `body` as the forked child of a role process and `_exit`s, so the
/// child never returns into the test harness it was copied from (whose
/// other threads it does not have).
fn in_forked_child(body: impl FnOnce()) -> ! {
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_ok();
    // SAFETY: _exit(2) ends the process at once, running nothing of the
    // harness's.
    unsafe { nix::libc::_exit(if ok { 0 } else { 101 }) }
}

/// FreeBSD `test_pidfile_inherited`, ported: the claim is taken before
/// `fork`, the child takes it over, the parent hands it over, and then the
/// parent's own claim attempt fails and names the child. The parent then
/// ends (the role returns); the child keeps the claim and obeys stdin:
/// `close` closes its guard; end of file leaves it to signals.
fn role_inherit() {
    let pid = child_paths().1;
    // Default signal handling: the parent has its helper thread, the child
    // must get its own.
    let mut guard = pid_guard(&pid, SignalMode::Exit).expect("claim before fork");
    // SAFETY: the child only takes the claim over, reports, reads stdin and
    // `_exit`s (glibc's allocator survives the fork of a threaded process).
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => in_forked_child(move || {
            guard.take_over_after_fork().expect("take over");
            report(format!("CHILD {} {}", std::process::id(), guard.pid()));
            while let Some(cmd) = read_stdin_line() {
                if cmd == "close" {
                    report(format!("CLOSED {:?}", guard.close()));
                    return;
                }
            }
            // End of file: stay until a signal ends us.
            loop {
                std::thread::park();
            }
        }),
        nix::unistd::ForkResult::Parent { child } => {
            let child = child.as_raw() as u32;
            guard
                .hand_over_to_child(child, Duration::from_secs(10))
                .expect("hand over");
            let again = pid_guard(&pid, SignalMode::Off);
            report(format!(
                "PARENT {} {} {:?} {:?}",
                std::process::id(),
                matches!(again, Err(LifecycleError::AlreadyRunning)),
                running_pid(&pid).unwrap(),
                read_pid_file(&pid).unwrap()
            ));
            // Dropping the disarmed copy removes nothing and unlocks nothing.
            drop(guard);
            report(format!("DROPPED {:?}", running_pid(&pid).unwrap()));
        }
    }
}

/// The socket guard handed to a forked child: the child answers one
/// connection with its PID, then waits for a signal.
fn role_inherit_socket() {
    let (sock, pid) = child_paths();
    let mut guard = DaemonGuard::acquire(&sock, &pid).expect("claim and bind before fork");
    // SAFETY: as in `role_inherit`.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => in_forked_child(|| {
            guard.take_over_after_fork().expect("take over");
            report(format!("CHILD {}", std::process::id()));
            let (mut conn, _) = guard
                .listener()
                .expect("listener")
                .accept()
                .expect("accept");
            std::io::Write::write_all(&mut conn, format!("{}\n", std::process::id()).as_bytes())
                .expect("answer");
            drop(conn);
            loop {
                std::thread::park();
            }
        }),
        nix::unistd::ForkResult::Parent { child } => {
            guard
                .hand_over_to_child(child.as_raw() as u32, Duration::from_secs(10))
                .expect("hand over");
            report(format!(
                "PARENT {} {}",
                guard.listener().is_none(),
                common::examples::pid_in_file(&pid)
            ));
            drop(guard);
            report(format!("DROPPED {}", sock.exists()));
        }
    }
}

/// How many times the claim passes down the chain.
const GENERATIONS: usize = 48;

/// A chain of hand-overs: once stdin says `go`, each generation forks the
/// next, which takes the claim over, and exits once it handed over; the
/// last one reports and waits for end of file on stdin, then closes its
/// guard.
fn role_chain() {
    let pid = child_paths().1;
    let mut guard = pid_guard(&pid, SignalMode::Off).expect("first claim");
    report(format!("GEN {}", std::process::id()));
    assert_eq!(read_stdin_line().as_deref(), Some("go"));
    let mut original = true;
    for _ in 0..GENERATIONS {
        // SAFETY: as in `role_inherit`.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                guard.take_over_after_fork().expect("take over");
                report(format!("GEN {}", std::process::id()));
                original = false;
            }
            nix::unistd::ForkResult::Parent { child } => {
                guard
                    .hand_over_to_child(child.as_raw() as u32, Duration::from_secs(10))
                    .expect("hand over");
                if original {
                    return; // the role process ends normally (DONE)
                }
                in_forked_child(|| ());
            }
        }
    }
    in_forked_child(move || {
        report("LAST");
        wait_for_stdin_eof();
        guard.close().expect("close");
    })
}

/// Races the chain: tries to take the claim and reads the PID file in a
/// loop until `<dir>/stop` exists; reports what it saw.
fn role_probe() {
    let pid = child_paths().1;
    let stop = pid.with_file_name("stop");
    let (mut rounds, mut won, mut bad_reads, mut not_running) = (0u64, 0u64, Vec::new(), 0u64);
    let mut named = std::collections::BTreeSet::new();
    while !stop.exists() {
        rounds += 1;
        match pid_guard(&pid, SignalMode::Off) {
            Err(LifecycleError::AlreadyRunning) => {}
            Ok(_) => won += 1,
            Err(e) => bad_reads.push(format!("acquire: {e}")),
        }
        match read_pid_file(&pid) {
            Ok(Some(n)) => {
                named.insert(n);
            }
            other => bad_reads.push(format!("read: {other:?}")),
        }
        match running_pid(&pid) {
            Ok(Some(n)) => {
                named.insert(n);
            }
            Ok(None) => not_running += 1,
            // A reader that opened a generation's file just before the next
            // one replaced it may find only a departed locker: "held, holder
            // unknown", never a wrong PID.
            Err(LifecycleError::HolderUnknown { .. }) => {}
            Err(e) => bad_reads.push(format!("running_pid: {e}")),
        }
        if rounds == 1 {
            report("PROBING"); // racing from now on
        }
    }
    bad_reads.truncate(5);
    report(format!(
        "PROBED {rounds} {won} {not_running} {:?} {:?}",
        bad_reads,
        named.iter().collect::<Vec<_>>()
    ));
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Stops whatever holds the claim on a PID file when the test ends: the
/// daemons here are nobody's children.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = historia_lifecycle::stop(&self.0, Duration::from_secs(2), Duration::from_secs(2));
    }
}

/// A process pinned by a pidfd when it is named, SIGKILLed when the test
/// ends (a forked child of a role is nobody's child either).
struct Pinned(OwnedFd);

impl Pinned {
    fn new(pid: u32) -> Pinned {
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new
        // descriptor; nix has no wrapper.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as i32, 0) };
        assert!(
            fd >= 0,
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor we own.
        Pinned(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: a valid pidfd, SIGKILL, no siginfo, no flags; a process
        // that is gone answers ESRCH.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                nix::libc::SIGKILL,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Reads report lines until one starting with each of `want` arrived, and
/// returns each line's rest by its first word. A forked child and its
/// parent report on the same pipe, in no fixed order (the harness's `DONE`
/// included), so they are gathered rather than expected one by one.
fn gather(child: &common::ChildProc, want: &[&str]) -> HashMap<String, String> {
    let mut seen = HashMap::new();
    while !want.iter().all(|w| seen.contains_key(*w)) {
        let line = child.expect_line();
        let (key, rest) = line.split_once(' ').unwrap_or((&line, ""));
        seen.insert(key.to_owned(), rest.to_owned());
    }
    seen
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid,
/// pgrp, session, tty_nr, ...
fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
}

fn stat_fields(pid: u32) -> Vec<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let (_, rest) = stat.rsplit_once(") ").expect("stat format");
    rest.split_whitespace().map(str::to_owned).collect()
}

fn session_of(pid: u32) -> i64 {
    stat_fields(pid)[3].parse().unwrap()
}

fn tty_of(pid: u32) -> i64 {
    stat_fields(pid)[4].parse().unwrap()
}

fn fd_target(pid: u32, fd: u32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()
}

fn umask_of(pid: u32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("Umask line")
        .trim()
        .to_owned()
}

/// The daemon named by the PID file the moment the original process has
/// exited: alive, the claim's holder, and not the original.
fn daemon_named_by(pid_path: &Path, ran: &Ran) -> u32 {
    let named = read_pid_file(pid_path)
        .unwrap_or_else(|e| panic!("read the PID file: {e}\n{ran}"))
        .unwrap_or_else(|| panic!("no PID file after the original exited\n{ran}"));
    assert!(
        process_alive(named),
        "the PID file names a live process\n{ran}"
    );
    assert_eq!(
        running_pid(pid_path).unwrap(),
        Some(named),
        "the claim's holder is the process the file names\n{ran}"
    );
    named
}

fn daemonize_cmd(p: &common::Paths) -> Command {
    let mut cmd = daemon_cmd(p);
    cmd.arg("--daemonize");
    cmd
}

fn forking(pid_path: &Path, mode: &str) -> Command {
    let mut cmd = command("forking");
    cmd.arg(pid_path).arg(mode);
    cmd
}

// ---------------------------------------------------------------------------
// FreeBSD's pidfile(3) tests, ported
// ---------------------------------------------------------------------------

#[test]
fn freebsd_uncontested_claim_names_us_and_close_removes_it() {
    let p = paths();
    let mut child = p.child("uncontested").spawn();
    let held = child.expect_prefixed("HELD");
    let me = child.pid();
    assert_eq!(held, format!("{me} Some({me}) Some({me})"));
    assert_eq!(
        child.expect_prefixed("CLOSED"),
        "false",
        "close() removed it"
    );
    child.stop();
}

#[test]
fn freebsd_second_claim_in_the_same_process_fails_and_names_us() {
    let p = paths();
    let mut child = p.child("self").spawn();
    let me = child.pid();
    assert_eq!(
        child.expect_prefixed("SECOND"),
        format!("{me} true Some({me})"),
        "AlreadyRunning, and running_pid names this very process"
    );
    child.stop();
}

#[test]
fn freebsd_a_childs_claim_refuses_the_parent_and_names_the_child() {
    let p = paths();
    let mut child = p.child("hold").spawn();
    let holder = child.expect_prefixed("HELD");
    assert_eq!(holder, child.pid().to_string());
    let refused = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire();
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "{refused:?}"
    );
    assert_eq!(running_pid(&p.pid).unwrap(), Some(child.pid()));
    child.stop();
    assert!(!p.pid.exists());
}

/// The case the issue is about: claim, fork, hand over. The parent is
/// refused and told the child's PID, the parent's exit leaves the claim held
/// with the PID file naming the child, and the child's signal handling
/// (installed afresh after the fork) removes the file on SIGTERM.
#[test]
fn freebsd_claim_taken_before_fork_and_handed_to_the_child_refuses_the_parent_and_names_the_child()
{
    let p = paths();
    let mut parent = p.child("inherit").spawn();
    let lines = gather(&parent, &["CHILD", "PARENT", "DROPPED", "DONE"]);
    let (child, guard_pid) = lines["CHILD"].split_once(' ').unwrap();
    let child: u32 = child.parse().unwrap();
    let _pinned = Pinned::new(child);
    assert_eq!(
        guard_pid,
        child.to_string(),
        "the child's guard().pid() is its own"
    );
    assert_ne!(child, parent.pid());
    assert_eq!(
        lines["PARENT"],
        format!("{} true Some({child}) Some({child})", parent.pid()),
        "the parent is refused, and running_pid and the file name the child"
    );
    assert_eq!(lines["DROPPED"], format!("Some({child})"));
    // The parent's exit (its role returned) releases nothing.
    parent.wait_success();
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(child));
    assert_eq!(running_pid(&p.pid).unwrap(), Some(child));
    let refused = PidFileGuard::builder(&p.pid)
        .signals(SignalMode::Off)
        .acquire();
    assert!(
        matches!(refused, Err(LifecycleError::AlreadyRunning)),
        "{refused:?}"
    );
    // The child's own signal thread cleans up.
    sigterm(child);
    wait_until(|| !process_alive(child), "the child ending on SIGTERM");
    assert!(!p.pid.exists(), "SIGTERM to the child removed the PID file");
    assert_eq!(running_pid(&p.pid).unwrap(), None);
}

/// The same, ending with the child's `close()` instead of a signal.
#[test]
fn a_child_that_took_the_claim_over_removes_the_pid_file_on_close() {
    let p = paths();
    let mut parent = p.child("inherit").spawn();
    let lines = gather(&parent, &["CHILD", "PARENT", "DROPPED", "DONE"]);
    let child: u32 = lines["CHILD"].split_once(' ').unwrap().0.parse().unwrap();
    let _pinned = Pinned::new(child);
    parent.wait_success();
    // The parent is gone; the child reads the stdin it inherited.
    parent.send_line("close");
    assert_eq!(parent.expect_prefixed("CLOSED"), "Ok(())");
    assert!(!p.pid.exists(), "the child's close() removed the PID file");
    wait_until(|| !process_alive(child), "the child exiting");
    assert_eq!(running_pid(&p.pid).unwrap(), None);
}

/// A socket guard handed to a forked child: the parent's copy gives up its
/// listener and removes nothing; the child accepts on the socket, and its
/// signal handling removes both files.
#[test]
fn a_socket_guard_handed_to_a_child_serves_there_and_its_signal_removes_both_files() {
    let p = paths();
    let mut parent = p.child("inherit-socket").spawn();
    let lines = gather(&parent, &["CHILD", "PARENT", "DROPPED", "DONE"]);
    let child: u32 = lines["CHILD"].parse().unwrap();
    let _pinned = Pinned::new(child);
    assert_eq!(
        lines["PARENT"],
        format!("true {child}"),
        "the parent's listener is gone and the file names the child"
    );
    assert_eq!(lines["DROPPED"], "true", "the parent removed nothing");
    parent.wait_success();
    assert_eq!(
        send(&p.sock, ""),
        child.to_string(),
        "the child answers on the socket"
    );
    sigterm(child);
    wait_until(|| !process_alive(child), "the child ending on SIGTERM");
    p.assert_gone();
}

/// The claim passes down 48 generations (each forks the next, which takes
/// over, and exits once it handed over) while a racer keeps trying to take
/// it and reading the file: it never wins, never reads a torn, empty or
/// missing file, never hears "not running", and every PID it is told is a
/// generation's.
#[test]
fn a_chain_of_hand_overs_never_frees_the_claim_or_shows_a_torn_file() {
    let p = paths();
    let mut chain = p.child("chain").spawn();
    let first: u32 = chain.expect_prefixed("GEN").parse().unwrap();
    assert_eq!(first, chain.pid());
    // The racer starts once the claim is held, and the chain once it races.
    let mut probe = p.child("probe").spawn();
    probe.expect_prefixed("PROBING");
    chain.send_line("go");
    let mut gens = vec![first];
    let mut pins = Vec::new();
    loop {
        let line = chain.expect_line();
        if line == "LAST" {
            break;
        }
        if line == common::DONE {
            continue; // the original generation's role returned
        }
        let pid: u32 = line
            .strip_prefix("GEN ")
            .expect("GEN line")
            .parse()
            .unwrap();
        if pid != chain.pid() {
            pins.push(Pinned::new(pid));
        }
        gens.push(pid);
    }
    assert_eq!(
        gens.len(),
        GENERATIONS + 1,
        "{gens:?}\n{}",
        chain.transcript()
    );
    let last = *gens.last().unwrap();
    assert_eq!(running_pid(&p.pid).unwrap(), Some(last));
    fs::write(p.pid.with_file_name("stop"), "").unwrap();
    let probed = probe.expect_prefixed("PROBED");
    eprintln!("probe (rounds, wins, not running, bad reads, PIDs named): {probed}");
    probe.stop();
    chain.wait_success();
    chain.close_stdin(); // the last generation closes its guard
    wait_until(|| !process_alive(last), "the last generation exiting");
    assert!(
        !p.pid.exists(),
        "the last generation's close() removed the file"
    );

    let (counts, rest) = probed.split_once(" [").unwrap();
    let counts: Vec<u64> = counts.split(' ').map(|n| n.parse().unwrap()).collect();
    let (bad, named) = rest.split_once("] [").unwrap();
    assert!(counts[0] > 0, "the probe ran: {probed}");
    assert_eq!(counts[1], 0, "the racer never won the claim: {probed}");
    assert_eq!(
        counts[2], 0,
        "running_pid never said \"not running\": {probed}"
    );
    assert!(bad.is_empty(), "every read was a whole PID: {probed}");
    for n in named
        .trim_end_matches(']')
        .split(", ")
        .filter(|s| !s.is_empty())
    {
        let n: u32 = n.parse().unwrap();
        assert!(
            gens.contains(&n),
            "{n} is a generation's PID: {probed} {gens:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// daemonize
// ---------------------------------------------------------------------------

/// The transcript: `daemon --daemonize` returns 0 once the daemon
/// answers ping, with the PID file naming the daemon (not the original) the
/// moment the original exits; run again, it exits 3 naming that PID; `ctl
/// stop` stops it and both files are gone.
#[test]
fn daemonize_returns_once_ready_and_a_second_start_exits_3_naming_the_daemon() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let ran = run(daemonize_cmd(&p));
    assert_eq!(ran.code(), Some(0), "{ran}");
    let daemon = daemon_named_by(&p.pid, &ran);
    assert_eq!(send(&p.sock, "ping"), "pong", "ready means serving");
    assert_eq!(
        send(&p.sock, "status").split(' ').nth(1),
        Some(&*daemon.to_string())
    );

    let again = run(daemonize_cmd(&p));
    assert_eq!(again.code(), Some(3), "{again}");
    assert!(
        again
            .stderr
            .contains(&format!("already running as pid {daemon}")),
        "the terminal hears who runs: {again}"
    );
    assert_eq!(
        read_pid_file(&p.pid).unwrap(),
        Some(daemon),
        "the refused start changed nothing"
    );

    let stop = common::examples::ctl(&p, &["stop"]);
    assert_eq!(stop.code(), Some(0), "{stop}");
    wait_until(|| !process_alive(daemon), "the daemon exiting");
    p.assert_gone();
}

/// What daemon(7) asks of the daemon, seen from outside: its own session, of
/// which it is not the leader (second fork), no controlling terminal
/// although the original had one (run under `script`'s pty), cwd `/`, stdin
/// from /dev/null, stdout and stderr to the log file, umask 0022; SIGTERM
/// removes both files.
#[test]
fn the_daemon_has_its_own_session_no_terminal_cwd_root_and_redirected_stdio() {
    let script = require_tool("script", "bsdutils");
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let log = p.dir.path().join("daemon.log");
    let daemon_bin = common::examples::example("daemon");
    // The shell prints its own tty_nr and session first: the original runs
    // with a controlling terminal, in that session.
    let line = format!(
        "cut -d' ' -f6,7 /proc/self/stat; exec {} --daemonize --socket {} --pid {} --log {}",
        daemon_bin.display(),
        p.sock.display(),
        p.pid.display(),
        log.display()
    );
    let mut cmd = Command::new(script);
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
        .env_remove("HISTORIA_DEMO_SOCKET")
        .env_remove("HISTORIA_DEMO_PID")
        .stdin(Stdio::null());
    let ran = run(cmd);
    assert_eq!(ran.code(), Some(0), "{ran}");
    let first = ran
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let (session, tty): (i64, i64) = {
        let f: Vec<i64> = first.split(' ').map(|n| n.parse().unwrap()).collect();
        (f[0], f[1])
    };
    assert_ne!(tty, 0, "the original had a controlling terminal: {ran}");
    let daemon = daemon_named_by(&p.pid, &ran);
    assert_eq!(tty_of(daemon), 0, "the daemon has no controlling terminal");
    assert_ne!(
        session_of(daemon),
        session,
        "the daemon has a session of its own"
    );
    assert_ne!(
        session_of(daemon) as u32,
        daemon,
        "the daemon is not its session's leader"
    );
    assert_eq!(
        fd_target(daemon, 0).as_deref(),
        Some(Path::new("/dev/null"))
    );
    assert_eq!(fd_target(daemon, 1).as_deref(), Some(log.as_path()));
    assert_eq!(fd_target(daemon, 2).as_deref(), Some(log.as_path()));
    assert_eq!(
        fs::read_link(format!("/proc/{daemon}/cwd")).unwrap(),
        Path::new("/")
    );
    assert_eq!(umask_of(daemon), "0022");
    let logged = fs::read_to_string(&log).unwrap();
    assert!(logged.contains(&format!("pid {daemon}")), "{logged}");
    assert!(logged.lines().any(|l| l == "ready"), "{logged}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    wait_until(|| !process_alive(daemon), "the daemon ending on SIGTERM");
    p.assert_gone();
}

/// Without a log file all three standard descriptors are /dev/null; an
/// inherited descriptor that is not close-on-exec is closed unless kept;
/// the umask is the one asked for.
#[test]
fn daemonize_closes_inherited_descriptors_but_kept_ones_and_sets_the_umask() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let kept_file = p.dir.path().join("kept");
    let stray_file = p.dir.path().join("stray");
    let kept = fs::File::create(&kept_file).unwrap();
    let stray = fs::File::create(&stray_file).unwrap();
    let (kept_fd, stray_fd) = (kept.as_raw_fd(), stray.as_raw_fd());
    let mut cmd = forking(&p.pid, "ready");
    cmd.args(["--keep-fd", "57", "--umask", "027"]);
    // SAFETY: dup2(2) is async-signal-safe; the copies at 57 and 58 are not
    // close-on-exec, as a shell's `57>file 58>file` would give them (numbers
    // far above whatever the test holds, so dup2 never maps one onto itself).
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::dup2(kept_fd, 57) < 0 || nix::libc::dup2(stray_fd, 58) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let ran = run(cmd);
    assert_eq!(ran.code(), Some(0), "{ran}");
    let daemon = daemon_named_by(&p.pid, &ran);
    for fd in 0..3 {
        assert_eq!(
            fd_target(daemon, fd).as_deref(),
            Some(Path::new("/dev/null")),
            "fd {fd}"
        );
    }
    assert_eq!(
        fd_target(daemon, 57).as_deref(),
        Some(kept_file.as_path()),
        "kept"
    );
    assert_eq!(
        fd_target(daemon, 58),
        None,
        "the stray inherited descriptor was closed"
    );
    assert_eq!(umask_of(daemon), "0027");
    // SIGTERM: the PID-file guard's default signal handling removes the file.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    wait_until(|| !process_alive(daemon), "the daemon ending on SIGTERM");
    assert!(!p.pid.exists());
}

/// A directory at the socket path: bind fails before anything forks, so the
/// error reaches the terminal directly, with status 1, and nothing is left.
#[test]
fn daemonize_reports_a_bind_failure_before_forking() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    fs::create_dir(&p.sock).unwrap();
    let ran = run(daemonize_cmd(&p));
    assert_eq!(ran.code(), Some(1), "{ran}");
    assert!(
        ran.stderr
            .contains("found a directory where a socket was expected"),
        "{ran}"
    );
    assert!(ran.stderr.contains(&p.sock.display().to_string()), "{ran}");
    assert!(!p.pid.exists(), "{ran}");
    assert_eq!(
        running_pid(&p.pid).unwrap(),
        None,
        "no daemon was left behind"
    );
}

/// A start-up step that fails in the daemon, after the forks: the original
/// prints the daemon's own reason and its PID, and exits 1; the daemon
/// removed the PID file.
#[test]
fn daemonize_reports_a_start_up_failure_of_the_daemon() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let ran = run(forking(&p.pid, "fail"));
    assert_eq!(ran.code(), Some(1), "{ran}");
    let e = ran.stderr.trim();
    assert!(e.starts_with("forking: the daemon for "), "{ran}");
    assert!(
        e.contains("could not start: startup cannot open the state file"),
        "{ran}"
    );
    assert!(e.contains("No such file or directory"), "{ran}");
    let named: u32 = e
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the message names the daemon's PID: {ran}"));
    assert_ne!(named, 0);
    wait_until(|| !process_alive(named), "the failed daemon exiting");
    assert!(!p.pid.exists(), "{ran}");
    assert_eq!(running_pid(&p.pid).unwrap(), None);
}

/// A daemon that never reports: the original gives up at the timeout with
/// status 1, naming the daemon, which keeps running (and holding the claim)
/// until it is stopped.
#[test]
fn daemonize_times_out_when_the_daemon_never_reports() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let mut cmd = forking(&p.pid, "hang");
    cmd.args(["--timeout", "0.5"]);
    let ran = run(cmd);
    assert_eq!(ran.code(), Some(1), "{ran}");
    let daemon = daemon_named_by(&p.pid, &ran);
    assert!(
        ran.stderr.contains(&format!(
            "daemon start for {} (pid {daemon}) did not finish within",
            p.pid.display()
        )),
        "{ran}"
    );
    let stopped = historia_lifecycle::stop(&p.pid, Duration::from_secs(5), Duration::from_secs(2));
    assert!(
        matches!(stopped, Ok(historia_lifecycle::Stopped::Stopped { .. })),
        "{stopped:?}"
    );
    assert!(!p.pid.exists());
}

/// `start-stop-daemon --start` without `--background` (a forking daemon, as
/// SysV init scripts run it) returns 0 with the daemon answering and the PID
/// file naming it; `--stop --pidfile` stops it and both files are gone.
#[test]
fn start_stop_daemon_starts_and_stops_a_daemonizing_daemon() {
    let ssd = require_tool("start-stop-daemon", "dpkg");
    let daemon_bin = common::examples::example("daemon");
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let mut start = Command::new(&ssd);
    start
        .args(["--start", "--pidfile"])
        .arg(&p.pid)
        .arg("--exec")
        .arg(&daemon_bin)
        .args(["--", "--daemonize", "--socket"])
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .stdin(Stdio::null());
    let ran = run(start);
    assert_eq!(ran.code(), Some(0), "{ran}");
    let daemon = daemon_named_by(&p.pid, &ran);
    assert_eq!(send(&p.sock, "ping"), "pong");

    let r = ssd_stop(&ssd, &p.pid);
    assert_eq!(r.code(), Some(0), "stop: {r}");
    assert!(!process_alive(daemon));
    p.assert_gone();
}

/// 16 `--daemonize` starts at once: exactly one daemon; every other start
/// exits 3, naming it.
#[test]
fn sixteen_racing_daemonize_starts_leave_exactly_one_daemon() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let starts: Vec<_> = (0..16)
        .map(|_| {
            let mut cmd = daemonize_cmd(&p);
            let out = tempfile::tempfile().unwrap();
            let err = tempfile::tempfile().unwrap();
            let child = cmd
                .stdout(out.try_clone().unwrap())
                .stderr(err.try_clone().unwrap())
                .spawn()
                .expect("spawn");
            (common::examples::KillOnDrop(child), err)
        })
        .collect();
    let mut codes = Vec::new();
    let mut errors = Vec::new();
    let mut winner = None;
    for (mut child, mut err) in starts {
        let status = common::examples::wait_with_watchdog(&mut child.0, "a racing start");
        if status.code() == Some(0) {
            winner = Some(child.0.id());
        }
        codes.push(status.code());
        let mut text = String::new();
        std::io::Seek::rewind(&mut err).unwrap();
        std::io::Read::read_to_string(&mut err, &mut text).unwrap();
        errors.push(text);
    }
    let ok = codes.iter().filter(|&&c| c == Some(0)).count();
    let refused = codes.iter().filter(|&&c| c == Some(3)).count();
    assert_eq!((ok, refused), (1, 15), "{codes:?}\n{errors:#?}");
    let daemon = read_pid_file(&p.pid)
        .unwrap()
        .expect("the winner's PID file");
    assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon));
    // A start refused while the winner's original process still waited
    // for its daemon (holding the lock, the file naming it) names that one;
    // one refused before the winner had bound its socket says the holder
    // does not listen (yet): the example's message, not the claim, races.
    let winner = winner.unwrap();
    for e in errors.iter().filter(|e| !e.is_empty()) {
        assert!(
            e.contains(&format!("pid {daemon} ")) || e.contains(&format!("pid {winner} ")),
            "each refusal names the winner (daemon {daemon}, original {winner}): {e}"
        );
    }
    assert_eq!(send(&p.sock, "ping"), "pong");
    let stopped = historia_lifecycle::stop(&p.pid, Duration::from_secs(5), Duration::from_secs(2));
    assert!(
        matches!(stopped, Ok(historia_lifecycle::Stopped::Stopped { .. })),
        "{stopped:?}"
    );
    p.assert_gone();
}

/// Daemonizing refuses a process with other threads before anything is
/// claimed: this test binary runs its tests on threads of their own.
#[test]
fn daemonize_refuses_a_process_with_other_threads_and_claims_nothing() {
    let p = paths();
    let e = PidFileGuard::builder(&p.pid)
        .daemonize(&historia_lifecycle::Daemonize::new())
        .map(drop)
        .unwrap_err();
    assert!(
        matches!(&e, LifecycleError::InvalidArgument { what: "daemonize", reason } if reason.contains("thread")),
        "{e:?}"
    );
    assert!(!p.pid.exists());
}

/// Ctrl-C (SIGINT) or SIGTERM to the original process while it waits ends
/// only that process: it installed no signal handling (the guard's starts in
/// the daemon), so the daemon's PID file stays, naming the daemon, which
/// keeps the claim.
#[test]
fn a_signal_to_the_waiting_original_leaves_the_daemon_and_its_files() {
    let p = paths();
    let _stop = StopOnDrop(p.pid.clone());
    let mut cmd = forking(&p.pid, "hang");
    cmd.args(["--timeout", "60"]).stdin(Stdio::null());
    common::default_signals(&mut cmd);
    let mut original = common::examples::KillOnDrop(cmd.spawn().expect("spawn"));
    let first = original.0.id();
    wait_until(
        || {
            read_pid_file(&p.pid)
                .ok()
                .flatten()
                .is_some_and(|n| n != first)
        },
        "the daemon taking the claim over",
    );
    let daemon = read_pid_file(&p.pid).unwrap().unwrap();
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), sig);
    }
    let status = common::examples::wait_with_watchdog(&mut original.0, "the original");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(nix::libc::SIGINT),
        "{status}"
    );
    assert!(process_alive(daemon));
    assert_eq!(read_pid_file(&p.pid).unwrap(), Some(daemon));
    assert_eq!(running_pid(&p.pid).unwrap(), Some(daemon));
}
