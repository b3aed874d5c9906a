//! Per-signal actions (issue 11's signal story): SIGHUP as a reload request
//! acknowledged to a service manager, SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 ending
//! the process with cleanup when asked, signals left alone really left alone,
//! a signal inherited as ignored staying ignored, the previous disposition
//! after the last guard, graceful and default guards in one process, a dead
//! signal thread replaced by the next guard, and an install that fails
//! half-way leaving nothing behind.
//!
//! Every signal goes to a child process (this test binary re-run with a
//! role, see `common`) under a watchdog; the test process never installs the
//! crate's handlers.

mod common;

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    assert_absent, child_main, child_paths, dev_ino, env_path, is_signal_thread, paths, pipe_fds,
    process_alive, read_stdin_line, ready_line, report, thread_names, ChildProc,
};
use historia_lifecycle::{DaemonGuard, LifecycleError, PidFileGuard, SignalAction, SignalMode};
use nix::libc;
use nix::sys::signal::Signal;

/// `HUP=reload,QUIT=terminate`: the `on_signal` calls a child makes.
const ACTIONS_ENV: &str = "HISTORIA_TEST_ACTIONS";
/// `exit`, `graceful` or `off`: the `signals()` shorthand (default: none).
const SHORTHAND_ENV: &str = "HISTORIA_TEST_SHORTHAND";
/// A signal name: install a signal-hook flag handler for it before acquiring.
const PRE_HANDLER_ENV: &str = "HISTORIA_TEST_PRE_HANDLER";
/// A second path pair, for the roles with two guards.
const SOCK2_ENV: &str = "HISTORIA_TEST_SOCK2";
const PID2_ENV: &str = "HISTORIA_TEST_PID2";
/// A directory for the `emfile` role's attempts.
const DIR_ENV: &str = "HISTORIA_TEST_DIR";

// ---------------------------------------------------------------------------
// Child roles
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "actions" => role_actions(),
        "mixed" => role_mixed(),
        "kill-helper" => role_kill_helper(),
        "emfile" => role_emfile(),
        other => panic!("unknown child role {other:?}"),
    });
}

fn signal_named(name: &str) -> i32 {
    match name {
        "TERM" => libc::SIGTERM,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        other => panic!("unknown signal {other}"),
    }
}

/// A guard on the [`child_paths`] pair built from [`SHORTHAND_ENV`] and
/// [`ACTIONS_ENV`], then a command loop on stdin:
/// - `reload`: wait for a reload request, acknowledge it (`begin`/`done`),
///   report `RELOADED <taken> <count> <signal>`;
/// - `shutdown`: wait for a shutdown request, report `SHUTDOWN <taken> <signal>`;
/// - `flag`: report and clear the [`PRE_HANDLER_ENV`] flag, `FLAG <bool>`;
/// - `ping`: report `PONG`;
/// - `drop`: drop the guard, report `DROPPED`;
/// - `exit`: exit with the shutdown's conventional status.
fn role_actions() {
    let flag = Arc::new(AtomicBool::new(false));
    if let Ok(name) = std::env::var(PRE_HANDLER_ENV) {
        signal_hook::flag::register(signal_named(&name), Arc::clone(&flag))
            .expect("install the application's own handler");
    }
    let (sock, pid) = child_paths();
    let mut b = DaemonGuard::builder(sock, pid);
    match std::env::var(SHORTHAND_ENV).as_deref() {
        Ok("exit") => b = b.signals(SignalMode::Exit),
        Ok("graceful") => b = b.signals(SignalMode::Graceful),
        Ok("off") => b = b.signals(SignalMode::Off),
        _ => {}
    }
    for spec in std::env::var(ACTIONS_ENV).unwrap_or_default().split(',') {
        let Some((sig, action)) = spec.split_once('=') else {
            continue;
        };
        let action = match action {
            "terminate" => SignalAction::Terminate,
            "shutdown" => SignalAction::Shutdown,
            "reload" => SignalAction::Reload,
            "leave" => SignalAction::Leave,
            other => panic!("unknown action {other}"),
        };
        b = b.on_signal(signal_named(sig), action);
    }
    let mut guard = Some(b.acquire().expect("acquire"));
    report(ready_line(guard.as_ref().unwrap()));
    let mut code = 0;
    while let Some(cmd) = read_stdin_line() {
        let g = guard.as_ref();
        match cmd.as_str() {
            "reload" => {
                let r = g.expect("a guard").reload();
                let taken = r.wait_timeout(Duration::from_secs(15));
                r.begin().expect("RELOADING=1").done().expect("READY=1");
                report(format!(
                    "RELOADED {taken} {} {}",
                    r.count(),
                    r.signal().unwrap_or(-1)
                ));
            }
            "shutdown" => {
                let s = g.expect("a guard").shutdown();
                let taken = s.wait_timeout(Duration::from_secs(15));
                code = s.exit_code();
                report(format!("SHUTDOWN {taken} {}", s.signal().unwrap_or(-1)));
            }
            "flag" => report(format!("FLAG {}", flag.swap(false, Ordering::SeqCst))),
            "ping" => report("PONG"),
            "drop" => {
                drop(guard.take());
                report("DROPPED");
            }
            "exit" => std::process::exit(code),
            other => panic!("unknown command {other}"),
        }
    }
}

/// A graceful guard on the [`child_paths`] pair and a default-mode guard on
/// the [`SOCK2_ENV`]/[`PID2_ENV`] pair; `shutdown` as in [`role_actions`].
fn role_mixed() {
    let (sock, pid) = child_paths();
    let graceful = DaemonGuard::builder(sock, pid)
        .signals(SignalMode::Graceful)
        .acquire()
        .expect("acquire the graceful guard");
    let _default = DaemonGuard::acquire(env_path(SOCK2_ENV), env_path(PID2_ENV))
        .expect("acquire the default guard");
    report(ready_line(&graceful));
    while let Some(cmd) = read_stdin_line() {
        assert_eq!(cmd, "shutdown");
        let s = graceful.shutdown();
        let taken = s.wait_timeout(Duration::from_secs(15));
        report(format!("SHUTDOWN {taken} {}", s.signal().unwrap_or(-1)));
    }
}

/// The pipes this process has a descriptor of ("pipe:[inode]").
fn pipe_inodes() -> BTreeSet<String> {
    pipe_fds()
        .into_iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect()
}

fn signal_threads() -> usize {
    thread_names()
        .iter()
        .filter(|n| is_signal_thread(n))
        .count()
}

/// `1`: the `kill-helper` role keeps the process out of descriptors while
/// the signal thread tries to replace its pipe.
const FILL_ENV: &str = "HISTORIA_TEST_FILL";

/// This process's thread count (`Threads:` in `/proc/self/status`; one
/// descriptor to read).
fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Breaks the signal pipe as buggy code would (closing a descriptor that
/// is not its own), and checks the signal handling recovers. The guard:
/// graceful, with SIGUSR1 as a reload request, over the application's own
/// SIGUSR1 handler (a signal-hook flag). After the pipe's read end is
/// closed, a SIGUSR1 raised here still runs the application's handler
/// (`FLAG true`).
/// - Without [`FILL_ENV`]: the signal thread replaces its pipe by itself
///   (`HEALED` once a new pipe appears).
/// - With it, the process is out of descriptors, so the thread cannot and
///   ends (`HELPER-GONE`); then descriptors are freed and a second guard
///   (default mode, the [`SOCK2_ENV`]/[`PID2_ENV`] pair) starts a new one
///   (`HELPER-BACK <signal threads>`).
///
/// Then it waits for a shutdown request (`SHUTDOWN <taken> <signal>`) and
/// holds until stdin closes.
fn role_kill_helper() {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(libc::SIGUSR1, Arc::clone(&flag)).expect("own handler");
    let before = pipe_fds();
    let (sock, pid) = child_paths();
    let graceful = DaemonGuard::builder(sock, pid)
        .signals(SignalMode::Graceful)
        .on_signal(libc::SIGUSR1, SignalAction::Reload)
        .acquire()
        .expect("acquire the graceful guard");
    let pipe: BTreeSet<RawFd> = pipe_fds().difference(&before).copied().collect();
    assert_eq!(pipe.len(), 2, "signal pipe fds: {pipe:?}");
    let read_end = pipe
        .iter()
        .copied()
        .find(|fd| {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            flags & libc::O_ACCMODE == libc::O_RDONLY
        })
        .expect("the read end");
    let fill = std::env::var(FILL_ENV).is_ok_and(|v| v == "1");
    let threads = thread_count();
    // By inode: a new pipe may reuse the closed read end's number.
    let initial = pipe_inodes();
    let mut fillers = Vec::new();
    if fill {
        while let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f);
        }
    }
    // SAFETY: deliberately closes a descriptor this code does not own, to
    // show the crate survives such a bug; nothing here uses it afterwards.
    // With the table full, this frees exactly one descriptor: enough to
    // read /proc, one short of a new pipe.
    assert_eq!(unsafe { libc::close(read_end) }, 0);
    nix::sys::signal::raise(Signal::SIGUSR1).expect("raise");
    report(format!("FLAG {}", flag.load(Ordering::SeqCst)));
    let wait_for = |what: &str, done: &dyn Fn() -> bool| common::examples::wait_until(done, what);
    if fill {
        wait_for("the signal thread did not end", &|| {
            thread_count() < threads
        });
        drop(fillers);
        report("HELPER-GONE");
        let second = DaemonGuard::acquire(env_path(SOCK2_ENV), env_path(PID2_ENV))
            .expect("acquire the default guard");
        // The new thread names itself once it runs.
        wait_for("no new signal thread", &|| signal_threads() == 1);
        report(format!("HELPER-BACK {}", signal_threads()));
        std::mem::forget(second); // held until the process ends
    } else {
        wait_for("no new pipe", &|| {
            pipe_inodes().difference(&initial).count() == 1
        });
        report("HEALED");
    }
    let s = graceful.shutdown();
    let taken = s.wait_timeout(Duration::from_secs(15));
    report(format!("SHUTDOWN {taken} {}", s.signal().unwrap_or(-1)));
    common::wait_for_stdin_eof();
}

/// Acquires while the process is out of descriptors, with k = 0, 1, 2, …
/// free, until an attempt succeeds: each failure must leave nothing on
/// disk, and a failure to install the signal handling (the self-pipe needs
/// two descriptors) must not keep the next attempt from installing it.
/// Reports `ATTEMPT <k> <outcome>` for each, then holds the successful
/// default-mode guard (on the [`child_paths`] pair) and reports its
/// [`ready_line`].
fn role_emfile() {
    let dir = env_path(DIR_ENV);
    let mut k = 0;
    loop {
        // Fill the descriptor table, then free k.
        let mut fillers = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f);
        }
        for _ in 0..k {
            fillers.pop();
        }
        let (sock, pid) = (dir.join(format!("{k}.sock")), dir.join(format!("{k}.pid")));
        let outcome = PidFileGuard::acquire(&pid);
        drop(fillers);
        match outcome {
            Ok(g) => {
                report(format!("ATTEMPT {k} ok"));
                drop(g);
                break;
            }
            Err(e) => {
                let kind = match e {
                    LifecycleError::Signals(_) => "signals",
                    LifecycleError::Io(_) => "io",
                    _ => "other",
                };
                assert_absent(&[&sock, &pid]);
                report(format!("ATTEMPT {k} {kind} {e}"));
            }
        }
        k += 1;
        assert!(k < 64, "never succeeded");
    }
    let (sock, pid) = child_paths();
    let g = DaemonGuard::acquire(sock, pid).expect("acquire after the failures");
    report(ready_line(&g));
    common::wait_for_stdin_eof();
}

// ---------------------------------------------------------------------------
// Parent side
// ---------------------------------------------------------------------------

fn assert_present(paths: &[&Path]) {
    for p in paths {
        assert!(dev_ino(p).is_some(), "{} missing", p.display());
    }
}

fn ready(child: &ChildProc) {
    child.expect_prefixed("READY ");
}

/// The signals a process catches, from `SigCgt:` in `/proc/PID/status`.
fn caught(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .expect("SigCgt line");
    u64::from_str_radix(mask.trim(), 16).unwrap()
}

fn catches(pid: u32, sig: Signal) -> bool {
    caught(pid) & (1 << (sig as i32 - 1)) != 0
}

/// Runs a child through `sh`, which first runs `prelude` (`trap '' INT`,
/// `ulimit -c 0`) and then execs the test binary, so the child inherits
/// what the shell set, as a daemon started from a script does.
fn via_sh(spec: common::ChildSpec, prelude: &str) -> common::ChildSpec {
    spec.via(["sh", "-c", &format!("{prelude}; exec \"$0\" \"$@\"")])
}

/// SIGHUP with `SignalAction::Reload`: a reload request the daemon takes and
/// acknowledges; it keeps running with its files; later SIGTERM still
/// cleans up (the default for it is unchanged).
#[test]
fn sighup_reload_request_wakes_the_daemon_and_keeps_it_running() {
    let p = paths();
    let mut d = p.child("actions").env(ACTIONS_ENV, "HUP=reload").spawn();
    ready(&d);
    for round in 1..=2 {
        d.signal(Signal::SIGHUP);
        d.send_line("reload");
        assert_eq!(
            d.expect_prefixed("RELOADED "),
            format!("true {round} {}", libc::SIGHUP)
        );
        assert_present(&[&p.sock, &p.pid]);
        assert!(!d.has_exited());
    }
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

/// `SignalAction::Terminate` on SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2: the
/// files go and the process dies by that very signal (SIGQUIT's core dump
/// disabled by `ulimit -c 0`).
#[test]
fn sighup_sigquit_and_sigusr_terminate_with_cleanup_when_asked() {
    for (name, sig) in [
        ("HUP", Signal::SIGHUP),
        ("QUIT", Signal::SIGQUIT),
        ("USR1", Signal::SIGUSR1),
        ("USR2", Signal::SIGUSR2),
    ] {
        let p = paths();
        let mut d = via_sh(
            p.child("actions")
                .env(ACTIONS_ENV, format!("{name}=terminate")),
            "ulimit -c 0",
        )
        .spawn();
        ready(&d);
        assert!(catches(d.pid(), sig), "{sig} is caught");
        d.signal(sig);
        d.wait_signaled(sig);
        p.assert_gone();
    }
}

/// `SignalAction::Shutdown` on SIGHUP: a graceful shutdown request naming
/// SIGHUP, with the conventional status 129 once the daemon exits.
#[test]
fn sighup_can_request_a_graceful_shutdown() {
    let p = paths();
    let mut d = p.child("actions").env(ACTIONS_ENV, "HUP=shutdown").spawn();
    ready(&d);
    d.signal(Signal::SIGHUP);
    d.send_line("shutdown");
    assert_eq!(
        d.expect_prefixed("SHUTDOWN "),
        format!("true {}", libc::SIGHUP)
    );
    assert_present(&[&p.sock, &p.pid]);
    d.send_line("drop");
    d.expect_prefixed("DROPPED");
    p.assert_gone();
    d.send_line("exit");
    assert_eq!(d.wait().code(), Some(128 + libc::SIGHUP));
}

/// Leave alone means install nothing: a default guard catches SIGTERM and
/// SIGINT only; `SignalMode::Off` catches nothing; `on_signal(SIGINT,
/// Leave)` takes SIGINT back out of the default.
#[test]
fn signals_left_alone_are_not_caught() {
    let others = [
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    for (shorthand, actions, want_term, want_int) in [
        ("", "", true, true),
        ("off", "", false, false),
        ("", "INT=leave", true, false),
    ] {
        let p = paths();
        let d = p
            .child("actions")
            .env(SHORTHAND_ENV, shorthand)
            .env(ACTIONS_ENV, actions)
            .spawn();
        ready(&d);
        let what = format!("shorthand {shorthand:?}, actions {actions:?}");
        assert_eq!(catches(d.pid(), Signal::SIGTERM), want_term, "{what}");
        assert_eq!(catches(d.pid(), Signal::SIGINT), want_int, "{what}");
        for sig in others {
            assert!(!catches(d.pid(), sig), "{what}: {sig} is left alone");
        }
    }
}

/// A daemon started from a script with SIGINT and SIGQUIT ignored (`trap ''
/// INT QUIT`, as a non-interactive shell does for `daemon &`) keeps them
/// ignored with the default shorthand: SIGINT neither kills it nor removes
/// its files. A later SIGHUP reload (handled by the same thread, in order)
/// proves the SIGINT was not merely still on its way.
#[test]
fn an_inherited_ignored_sigint_stays_ignored() {
    let p = paths();
    let mut d = via_sh(
        p.child("actions").env(ACTIONS_ENV, "HUP=reload"),
        "trap '' INT QUIT",
    )
    .spawn();
    ready(&d);
    assert!(!catches(d.pid(), Signal::SIGINT), "SIGINT stays ignored");
    assert!(catches(d.pid(), Signal::SIGTERM));
    d.signal(Signal::SIGINT);
    d.signal(Signal::SIGHUP);
    d.send_line("reload");
    assert_eq!(
        d.expect_prefixed("RELOADED "),
        format!("true 1 {}", libc::SIGHUP)
    );
    assert_present(&[&p.sock, &p.pid]);
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

/// An explicit `on_signal` is installed whatever was inherited: under
/// `nohup` (SIGHUP ignored) a SIGHUP reload still arrives, and under `trap
/// '' INT` an explicit SIGINT terminate still cleans up.
#[test]
fn an_explicit_action_overrides_an_inherited_ignore() {
    let p = paths();
    let mut d = p
        .child("actions")
        .env(ACTIONS_ENV, "HUP=reload")
        .via(["nohup"])
        .spawn();
    ready(&d);
    d.signal(Signal::SIGHUP);
    d.send_line("reload");
    assert_eq!(
        d.expect_prefixed("RELOADED "),
        format!("true 1 {}", libc::SIGHUP)
    );
    drop(d);

    let p = paths();
    let mut d = via_sh(
        p.child("actions").env(ACTIONS_ENV, "INT=terminate"),
        "trap '' INT",
    )
    .spawn();
    ready(&d);
    d.signal(Signal::SIGINT);
    d.wait_signaled(Signal::SIGINT);
    p.assert_gone();
}

/// Waits a little and checks `d` is still alive and answering.
fn still_alive(d: &mut ChildProc) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        process_alive(d.pid()) && !d.has_exited(),
        "the process died"
    );
    d.send_line("ping");
    assert_eq!(d.expect_line(), "PONG");
}

/// After the last guard is dropped the handler stays (signal-hook never
/// removes one), but acts as the process's previous disposition: the default
/// action ends the process by the signal; an inherited ignore stays
/// ignored; an application's earlier handler still runs, and the process
/// lives.
#[test]
fn after_the_last_guard_a_signal_does_what_it_did_before() {
    // Default before: SIGTERM ends the process by SIGTERM.
    let p = paths();
    let mut d = p.child("actions").spawn();
    ready(&d);
    d.send_line("drop");
    d.expect_prefixed("DROPPED");
    p.assert_gone();
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);

    // Ignored before (an explicit install over `trap '' TERM`): ignored after.
    let p = paths();
    let mut d = via_sh(
        p.child("actions").env(ACTIONS_ENV, "TERM=terminate"),
        "trap '' TERM",
    )
    .spawn();
    ready(&d);
    assert!(catches(d.pid(), Signal::SIGTERM), "installed as asked");
    d.send_line("drop");
    d.expect_prefixed("DROPPED");
    d.signal(Signal::SIGTERM);
    still_alive(&mut d);

    // An application handler before: it still runs, nothing else happens.
    let p = paths();
    let mut d = p
        .child("actions")
        .env(PRE_HANDLER_ENV, "USR1")
        .env(ACTIONS_ENV, "USR1=reload")
        .spawn();
    ready(&d);
    d.signal(Signal::SIGUSR1);
    d.send_line("reload");
    assert_eq!(
        d.expect_prefixed("RELOADED "),
        format!("true 1 {}", libc::SIGUSR1)
    );
    d.send_line("flag");
    assert_eq!(d.expect_line(), "FLAG true", "both actions ran");
    d.send_line("drop");
    d.expect_prefixed("DROPPED");
    d.signal(Signal::SIGUSR1);
    still_alive(&mut d);
    d.send_line("flag");
    assert_eq!(d.expect_line(), "FLAG true");
}

/// A graceful and a default guard in one process (as documented on
/// `SignalAction`): the first SIGTERM is a shutdown request for the graceful
/// one and the process lives, every file still there; the second removes
/// all four files and ends the process by SIGTERM.
#[test]
fn graceful_and_default_guards_in_one_process() {
    let p = paths();
    let other = p.dir.path().join("other");
    let (sock2, pid2) = (other.join("d.sock"), other.join("d.pid"));
    let mut d = p
        .child("mixed")
        .env(SOCK2_ENV, &sock2)
        .env(PID2_ENV, &pid2)
        .spawn();
    ready(&d);
    d.signal(Signal::SIGTERM);
    d.send_line("shutdown");
    assert_eq!(d.expect_prefixed("SHUTDOWN "), "true 15");
    assert_present(&[&p.sock, &p.pid, &sock2, &pid2]);
    assert!(!d.has_exited());
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    assert_absent(&[&p.sock, &p.pid, &sock2, &pid2]);
}

/// The signal pipe broken by buggy code (its read end closed): a signal
/// that cannot reach the signal thread does what it did before (here the
/// application's own handler; the process lives), and the signal thread
/// replaces its pipe, or, when it cannot (out of descriptors), ends and the
/// next guard starts a new one. Either way signals work again for every
/// guard: SIGTERM is a shutdown request for the graceful one, and the
/// second SIGTERM removes every file and ends the process by SIGTERM.
#[test]
fn a_broken_signal_pipe_is_replaced() {
    for fill in ["0", "1"] {
        let p = paths();
        let other = p.dir.path().join("other");
        let (sock2, pid2) = (other.join("d.sock"), other.join("d.pid"));
        let mut d = p
            .child("kill-helper")
            .env(FILL_ENV, fill)
            .env(SOCK2_ENV, &sock2)
            .env(PID2_ENV, &pid2)
            .spawn();
        assert_eq!(d.expect_line(), "FLAG true");
        let mut files = vec![p.sock.clone(), p.pid.clone()];
        if fill == "1" {
            assert_eq!(d.expect_line(), "HELPER-GONE");
            assert_eq!(d.expect_line(), "HELPER-BACK 1");
            files.extend([sock2, pid2]);
        } else {
            assert_eq!(d.expect_line(), "HEALED");
        }
        let files: Vec<&Path> = files.iter().map(|f| f.as_path()).collect();
        assert_present(&files);
        d.signal(Signal::SIGTERM);
        assert_eq!(d.expect_prefixed("SHUTDOWN "), "true 15");
        assert_present(&files);
        d.signal(Signal::SIGTERM);
        d.wait_signaled(Signal::SIGTERM);
        assert_absent(&files);
    }
}

/// Out of descriptors: an acquire that cannot set up the signal handling
/// fails with `LifecycleError::Signals` and leaves nothing on disk, as does
/// one that cannot even open its files; once descriptors are free, the next
/// guard installs what is missing and SIGTERM cleans up.
#[test]
fn a_failed_install_leaves_nothing_and_the_next_guard_installs() {
    let p = paths();
    let tries = p.dir.path().join("tries");
    std::fs::create_dir(&tries).unwrap();
    let mut d = p.child("emfile").env(DIR_ENV, &tries).spawn();
    let mut outcomes = Vec::new();
    loop {
        let line = d.expect_line();
        if line.starts_with("READY ") {
            break;
        }
        outcomes.push(line);
    }
    assert!(
        outcomes.iter().any(|l| l.contains(" signals ")),
        "one attempt failed installing the signal handling: {outcomes:?}"
    );
    assert!(outcomes.last().unwrap().ends_with(" ok"), "{outcomes:?}");
    assert_eq!(
        std::fs::read_dir(&tries).unwrap().count(),
        0,
        "no attempt left a file: {outcomes:?}"
    );
    assert_present(&[&p.sock, &p.pid]);
    d.signal(Signal::SIGTERM);
    d.wait_signaled(Signal::SIGTERM);
    p.assert_gone();
}

/// A signal a guard cannot act on is refused by name before anything on
/// disk changes (checked in this process: nothing is installed before the
/// check).
#[test]
fn an_unsupported_signal_is_refused_before_anything_changes() {
    let p = paths();
    for sig in [libc::SIGKILL, libc::SIGSEGV, libc::SIGPIPE, 0] {
        let e = DaemonGuard::builder(&p.sock, &p.pid)
            .on_signal(sig, SignalAction::Terminate)
            .acquire()
            .unwrap_err();
        assert!(
            matches!(
                e,
                LifecycleError::InvalidArgument {
                    what: "on_signal",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = PidFileGuard::builder(&p.pid)
            .on_signal(sig, SignalAction::Reload)
            .acquire()
            .unwrap_err();
        assert!(matches!(e, LifecycleError::InvalidArgument { .. }), "{e:?}");
        assert_eq!(std::fs::read_dir(p.dir.path()).unwrap().count(), 0);
    }
}

/// Under a service manager (`NOTIFY_SOCKET`), acknowledging a SIGHUP reload
/// sends `RELOADING=1` with a `MONOTONIC_USEC=` of this boot's monotonic
/// clock, then `READY=1`, as `Type=notify-reload` expects.
#[test]
fn a_reload_acknowledgement_tells_the_service_manager() {
    use nix::time::{clock_gettime, ClockId};
    let p = paths();
    let notify = p.dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&notify).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut d = p
        .child("actions")
        .env(ACTIONS_ENV, "HUP=reload")
        .env("NOTIFY_SOCKET", &notify)
        .spawn();
    ready(&d);
    let usec =
        |t: nix::sys::time::TimeSpec| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000;
    let before = usec(clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap());
    d.signal(Signal::SIGHUP);
    d.send_line("reload");
    d.expect_prefixed("RELOADED true");
    let after = usec(clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap());
    let mut buf = [0u8; 512];
    let n = manager.recv(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).to_string();
    let stamp: u64 = first
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .unwrap_or_else(|| panic!("{first:?}"))
        .parse()
        .unwrap();
    assert!(
        (before..=after).contains(&stamp),
        "{before} <= {stamp} <= {after}"
    );
    let n = manager.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
}
