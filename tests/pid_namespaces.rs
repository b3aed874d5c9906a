//! `running_pid` across PID namespaces (containers), with the real
//! `unshare(1)` from util-linux (root only): it names the holder by its PID
//! here when it can see it, and answers `HolderUnknown`, never a wrong PID,
//! when it cannot, even when the number in the file is the reader's own PID
//! or `/proc` belongs to another namespace than the reader.
//!
//! Every party is a real process (this test binary re-run with a role, see
//! `common`), some of them run through `unshare --pid --fork --kill-child`:
//! the watchdog kills `unshare`, and `--kill-child` takes its child along.

#![cfg(target_os = "linux")]

mod common;

use std::path::Path;

use common::examples::require_tool;
use common::{child_main, child_paths, paths, report, wait_for_stdin_eof, ChildProc, Paths};
use historia_lifecycle::{running_pid, signal_daemon, LifecycleError, PidFileGuard, SignalMode};
use serial_test::serial;

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "hold-pid" => {
            let (_, pid) = child_paths();
            let g = PidFileGuard::builder(&pid)
                .signals(SignalMode::Off)
                .acquire()
                .expect("acquire");
            report(format!("READY {}", std::process::id()));
            wait_for_stdin_eof();
            drop(g);
        }
        "read-holder" => {
            let (_, pid) = child_paths();
            report(format!("SELF {}", std::process::id()));
            report(format!("RUNNING_PID {}", outcome(running_pid(&pid))));
            // Signal 0 only checks: a wrong answer must not hurt anyone.
            report(format!("SIGNAL {}", outcome(signal_daemon(&pid, 0))));
        }
        other => panic!("unknown child role {other:?}"),
    });
}

fn outcome(r: Result<Option<u32>, LifecycleError>) -> String {
    match r {
        Ok(Some(pid)) => format!("pid {pid}"),
        Ok(None) => "none".into(),
        Err(LifecycleError::HolderUnknown { .. }) => "holder unknown".into(),
        Err(e) => format!("error {e}"),
    }
}

/// `unshare --pid --fork --kill-child`, with a `/proc` of the new namespace
/// mounted (in a new mount namespace) when `own_proc`.
fn unshare_pid(own_proc: bool) -> Vec<String> {
    let unshare = require_tool("unshare", "util-linux");
    let mut w = vec![unshare.display().to_string()];
    w.extend(["--pid", "--fork", "--kill-child"].map(String::from));
    if own_proc {
        w.push("--mount-proc".into());
    }
    w
}

/// The one child of process `pid` (the process `unshare --fork` started).
fn only_child(pid: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("read the children of unshare");
    let kids: Vec<u32> = text
        .split_whitespace()
        .map(|k| k.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), 1, "unshare {pid} has children {kids:?}");
    kids[0]
}

/// A reader's report: its own PID, then what `running_pid` and
/// `signal_daemon` answered.
fn read_from(p: &Paths, own_proc: bool) -> (String, String, String) {
    let lines = p.child("read-holder").via(unshare_pid(own_proc)).run();
    match lines.as_slice() {
        [s, r, g] => (
            s.clone(),
            r.strip_prefix("RUNNING_PID ").unwrap().to_string(),
            g.strip_prefix("SIGNAL ").unwrap().to_string(),
        ),
        other => panic!("reader said {other:?}"),
    }
}

fn hold(p: &Paths, wrapper: Option<Vec<String>>) -> (ChildProc, String) {
    let spec = p.child("hold-pid");
    let spec = match wrapper {
        Some(w) => spec.via(w),
        None => spec,
    };
    let child = spec.spawn();
    let ready = child.expect_prefixed("READY ");
    (child, ready)
}

fn pid_in_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
#[serial]
fn a_holder_in_a_child_pid_namespace_is_named_by_its_pid_here() {
    let p = paths();
    let (mut holder, its_own) = hold(&p, Some(unshare_pid(true)));
    // Inside, it is PID 1, and that is what it wrote.
    assert_eq!(its_own, "1");
    assert_eq!(pid_in_file(&p.pid), "1");
    let here = only_child(holder.pid());
    assert_eq!(running_pid(&p.pid).unwrap(), Some(here));
    // The kernel agrees: that process is PID 1 in its own namespace.
    let status = std::fs::read_to_string(format!("/proc/{here}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        ["NSpid:", &here.to_string(), "1"]
    );
    holder.stop();
    assert_eq!(running_pid(&p.pid).unwrap(), None);
}

#[test]
#[serial]
fn a_reader_that_cannot_see_the_holder_gets_holder_unknown() {
    let p = paths();
    let (mut holder, _) = hold(&p, None);
    let (_, running, signal) = read_from(&p, true);
    assert_eq!(running, "holder unknown");
    assert_eq!(signal, "holder unknown");
    assert!(common::process_alive(holder.pid()));
    holder.stop();
}

#[test]
#[serial]
fn a_holder_whose_pid_in_its_namespace_is_the_readers_own_is_never_named() {
    // Holder and reader are both PID 1, each in a namespace of its own: the
    // file says "1", and PID 1 in the reader's namespace is the reader, which
    // has the file open (to read it) but does not hold the lock.
    let p = paths();
    let (mut holder, its_own) = hold(&p, Some(unshare_pid(true)));
    assert_eq!(its_own, "1");
    let (me, running, signal) = read_from(&p, true);
    assert_eq!(me, "SELF 1");
    assert_eq!(running, "holder unknown", "the reader named itself");
    assert_eq!(signal, "holder unknown");
    holder.stop();
}

#[test]
#[serial]
fn a_reader_whose_proc_is_another_namespaces_gets_holder_unknown() {
    // `unshare --pid` without --mount-proc: /proc is still the parent
    // namespace's, so the PIDs in /proc/locks are not the reader's PIDs.
    let p = paths();
    let (mut holder, host_pid) = hold(&p, None);
    let (me, running, signal) = read_from(&p, false);
    assert_eq!(me, "SELF 1");
    assert_eq!(
        running, "holder unknown",
        "the reader named {host_pid}, a PID of another namespace"
    );
    assert_eq!(signal, "holder unknown");
    holder.stop();
}
