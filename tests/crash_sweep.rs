//! The crash-point sweep: a real holder (`examples/crash_point.rs`: acquire a
//! `DaemonGuard`, then `close()` it) is SIGKILLed at every system call of
//! acquire and of cleanup by `strace --inject=NAME:signal=SIGKILL:when=K`,
//! and after each kill the next acquire must win with no manual cleanup,
//! leave nothing behind after its own close, and never have removed the
//! decoy file that sits in the same directory.
//!
//! strace counts `when=K` per system call name (and per thread), so a plain
//! `--inject=all:…:when=N` only ever kills at the first repeat of some call.
//! The sweep therefore records one clean run with `strace -f`, takes every
//! system call the main thread makes between the holder's `@@acquire` and
//! `@@end` markers, and kills at exactly that one (`NAME`, its ordinal `K`
//! among the main thread's calls of that name). The literal sweep (`all`,
//! N = 1, 2, … until a run completes) runs too; it adds the kills during
//! start-up. The number of crash points covered is printed.
//!
//! strace comes from Debian's `strace`; a missing one fails the test naming
//! the package (`.ci/run` installs it).

#![cfg(target_os = "linux")]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::examples::{example, require_tool, run, Ran};
use common::{dir_names, snapshot};
use historia_lifecycle::{DaemonGuard, SignalMode};

/// One system call the main thread makes: its name and its ordinal among
/// the main thread's calls of that name (what strace's `when=` counts).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    name: String,
    nth: usize,
}

/// The main thread's system calls between the markers, from `strace -f`'s
/// log of a clean run.
fn window(log: &str) -> Vec<Point> {
    let mut main_tid = None;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut inside = false;
    let mut points = Vec::new();
    for line in log.lines() {
        let Some((tid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        // "<... name resumed>", "+++ exited", "--- SIGCHLD": not a new call.
        if call.starts_with('<') || call.starts_with('+') || call.starts_with('-') {
            continue;
        }
        let Some(name) = call
            .split('(')
            .next()
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        else {
            continue;
        };
        let main = main_tid.get_or_insert_with(|| tid.to_string());
        if tid != main.as_str() {
            continue;
        }
        let nth = {
            let n = seen.entry(name.to_string()).or_default();
            *n += 1;
            *n
        };
        if call.contains("\"@@end\\n\"") {
            break;
        }
        if inside {
            points.push(Point {
                name: name.to_string(),
                nth,
            });
        }
        if call.contains("\"@@acquire\\n\"") {
            inside = true;
        }
    }
    assert!(inside, "no @@acquire marker in the strace log:\n{log}");
    points
}

fn holder(strace: &Path, inject: Option<String>, dir: &Path, log: &Path) -> Ran {
    holder_with(strace, inject, dir, log, &[])
}

fn holder_with(
    strace: &Path,
    inject: Option<String>,
    dir: &Path,
    log: &Path,
    extra: &[&str],
) -> Ran {
    let mut cmd = Command::new(strace);
    cmd.args(["-f", "-qq", "-o"]).arg(log);
    if let Some(spec) = inject {
        cmd.arg(format!("--inject={spec}"));
    }
    cmd.arg(example("crash_point"))
        .arg(dir.join("daemon.sock"))
        .arg(dir.join("daemon.pid"))
        .args(extra);
    common::default_signals(&mut cmd);
    run(cmd)
}

/// Killed by the injected SIGKILL (strace then dies by it too), or it got
/// through to `@@end` and exited 0. Anything else fails the test.
fn was_killed(r: &Ran, what: &str) -> bool {
    if r.status.signal() == Some(9) || r.code() == Some(128 + 9) {
        return true;
    }
    assert!(
        r.status.success() && r.stderr.contains("@@end"),
        "{what}: neither killed nor completed: {r}"
    );
    false
}

/// After a kill: only the holder's own names (or nothing) beside the decoy,
/// the decoy untouched; then the next acquire wins with no manual cleanup
/// and its close leaves the decoy alone.
fn check_recovery(dir: &Path, decoy: &Path, decoy_before: &common::FileSnapshot, what: &str) {
    let allowed = ["daemon.pid", "daemon.sock", "decoy"];
    for name in dir_names(dir) {
        assert!(allowed.contains(&name.as_str()), "{what}: left {name:?}");
    }
    assert_eq!(&snapshot(decoy), decoy_before, "{what}: the decoy changed");
    let guard = DaemonGuard::builder(dir.join("daemon.sock"), dir.join("daemon.pid"))
        .signals(SignalMode::Off)
        .acquire()
        .unwrap_or_else(|e| panic!("{what}: the next acquire failed: {e}"));
    guard
        .close()
        .unwrap_or_else(|e| panic!("{what}: close failed: {e}"));
    assert_eq!(dir_names(dir), ["decoy"], "{what}: not clean after close");
    assert_eq!(&snapshot(decoy), decoy_before, "{what}: the decoy changed");
}

#[test]
fn sigkill_at_every_syscall_of_acquire_and_cleanup_never_needs_manual_cleanup() {
    let strace = require_tool("strace", "strace");
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("strace.log");
    let dir = scratch.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let decoy = dir.join("decoy");
    std::fs::write(&decoy, b"not yours\n").unwrap();
    let decoy_before = snapshot(&decoy);

    // One clean run, recorded.
    let clean = holder(&strace, None, &dir, &log);
    assert!(!was_killed(&clean, "the recording run"), "{clean}");
    assert_eq!(dir_names(&dir), ["decoy"]);
    let points = window(&std::fs::read_to_string(&log).unwrap());
    let calls: BTreeSet<&str> = points.iter().map(|p| p.name.as_str()).collect();
    assert!(
        ["openat", "flock", "linkat", "bind", "listen", "unlink"]
            .iter()
            .all(|c| calls.contains(c)),
        "the window misses the claim's calls: {calls:?}"
    );

    // Kill at each of them.
    let mut killed = 0;
    let mut got_through = Vec::new();
    for p in &points {
        let what = format!("SIGKILL at {} #{}", p.name, p.nth);
        let spec = format!("{}:signal=SIGKILL:when={}", p.name, p.nth);
        let r = holder(&strace, Some(spec), &dir, &scratch.path().join("k.log"));
        if was_killed(&r, &what) {
            killed += 1;
        } else {
            got_through.push(what.clone()); // the call count moved (a futex)
        }
        check_recovery(&dir, &decoy, &decoy_before, &what);
    }

    // The literal sweep: the first repeat of any call, N = 1, 2, ...
    let mut literal = 0;
    for n in 1.. {
        let what = format!("SIGKILL at the first call made for the {n}th time");
        let spec = format!("all:signal=SIGKILL:when={n}");
        let r = holder(&strace, Some(spec), &dir, &scratch.path().join("k.log"));
        let k = was_killed(&r, &what);
        check_recovery(&dir, &decoy, &decoy_before, &what);
        if !k {
            break;
        }
        literal += 1;
        assert!(n < 1000, "the holder never got through");
    }

    let _ = writeln!(
        std::io::stderr(),
        "crash sweep: {killed} of {} system calls of acquire+close killed and recovered \
         ({} got through: {got_through:?}); literal all:when=N sweep: {literal} crash points",
        points.len(),
        got_through.len()
    );
    assert!(
        killed * 10 >= points.len() * 9,
        "only {killed} of {} aimed kills landed",
        points.len()
    );
}

/// A SIGTERM that arrives while `acquire` runs (strace delivers one as the
/// process enters `linkat(2)`, which names the PID file, or `listen(2)`,
/// after which clients can connect) is held until the guard's handling is
/// installed, and then acted on: the files go and the process ends by
/// SIGTERM. Without the hold the default action killed it with both files
/// left (a client that connected at once and stopped the daemon saw that).
#[test]
fn a_sigterm_during_acquire_is_held_until_the_handling_is_installed() {
    let strace = require_tool("strace", "strace");
    for call in ["linkat", "listen"] {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("strace.log");
        // `hold`: it sleeps after acquiring, so only the signal ends it.
        let r = holder_with(
            &strace,
            Some(format!("{call}:signal=SIGTERM:when=1")),
            dir.path(),
            &log,
            &["hold"],
        );
        let trace = std::fs::read_to_string(&log).unwrap_or_default();
        // strace ends the way its tracee did.
        assert!(
            r.status.signal() == Some(15) || r.code() == Some(128 + 15),
            "{call}: not ended by SIGTERM: {r}\n{trace}"
        );
        assert!(
            trace.contains("SIGTERM"),
            "{call}: no SIGTERM was delivered:\n{trace}"
        );
        let left: Vec<String> = dir_names(dir.path())
            .into_iter()
            .filter(|n| n != "strace.log")
            .collect();
        assert!(left.is_empty(), "{call}: files left: {left:?}\n{trace}");
    }
}
