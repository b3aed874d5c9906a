//! The guard's signal handling beside tokio's own: an application that
//! also listens with `tokio::signal::unix::signal(SignalKind::terminate())`,
//! registered before or after acquiring.
//!
//! - `SignalMode::Graceful`: both see SIGTERM, tokio's stream and the
//!   guard's shutdown future, and the process lives on to close the guard.
//! - `SignalMode::Exit` (the default): the guard removes the files and the
//!   process dies of SIGTERM (status 143 in a shell), tokio's stream
//!   notwithstanding.
//!
//! Each case is a child process (this test binary re-run in a role, see
//! tests/common) with a watchdog: signal dispositions are per process.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{assert_absent, child_main, child_paths, paths, report, ENTRY};
use historia_lifecycle::{DaemonGuard, SignalMode};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

/// How long a child waits for a SIGTERM that the parent sends right after
/// READY: only a broken build gets near it.
const CHILD_WAIT: Duration = Duration::from_secs(10);

#[test]
fn child_process_entry() {
    assert_eq!(ENTRY, "child_process_entry");
    child_main(|role| {
        let (mode, order) = role.split_once(':').expect("role is MODE:ORDER");
        let mode = match mode {
            "graceful" => SignalMode::Graceful,
            "exit" => SignalMode::Exit,
            other => panic!("unknown mode {other}"),
        };
        coexisting_app(mode, order == "before");
    });
}

/// The application: a tokio runtime with its own SIGTERM stream, registered
/// before or after the guard.
fn coexisting_app(mode: SignalMode, tokio_first: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (sock, pid) = child_paths();
        let mut early = tokio_first.then(|| signal(SignalKind::terminate()).expect("tokio signal"));
        let guard = DaemonGuard::builder(&sock, &pid)
            .signals(mode)
            .acquire()
            .expect("acquire");
        let mut term = match early.take() {
            Some(term) => term,
            None => signal(SignalKind::terminate()).expect("tokio signal"),
        };
        report("READY");
        let saw_tokio = tokio::time::timeout(CHILD_WAIT, term.recv()).await.is_ok();
        let saw_guard = tokio::time::timeout(CHILD_WAIT, guard.shutdown().requested())
            .await
            .is_ok();
        // In SignalMode::Exit the process is dead before it gets here.
        report(format!(
            "SAW tokio={saw_tokio} guard={saw_guard} exit_code={}",
            guard.shutdown().exit_code()
        ));
        guard.close().expect("close");
        report("CLOSED");
    });
}

fn graceful(order: &str) {
    let p = paths();
    let mut child = p.child(&format!("graceful:{order}")).spawn();
    assert_eq!(child.expect_line(), "READY");
    assert!(p.sock.exists() && p.pid.exists());
    child.signal(Signal::SIGTERM);
    assert_eq!(
        child.expect_line(),
        "SAW tokio=true guard=true exit_code=143",
        "{}",
        child.transcript()
    );
    // The process lived on to close the guard itself, and exits 0.
    assert_eq!(child.finish(), ["CLOSED"]);
    p.assert_gone();
}

fn exit(order: &str) {
    let p = paths();
    let mut child = p.child(&format!("exit:{order}")).spawn();
    assert_eq!(child.expect_line(), "READY");
    assert!(p.sock.exists() && p.pid.exists());
    child.signal(Signal::SIGTERM);
    child.wait_signaled(Signal::SIGTERM);
    assert_absent(&[&p.sock, &p.pid]);
}

#[test]
fn graceful_with_a_tokio_sigterm_stream_registered_before_acquiring_both_see_it() {
    graceful("before");
}

#[test]
fn graceful_with_a_tokio_sigterm_stream_registered_after_acquiring_both_see_it() {
    graceful("after");
}

#[test]
fn exit_mode_with_a_tokio_sigterm_stream_registered_before_still_cleans_up_and_dies_143() {
    exit("before");
}

#[test]
fn exit_mode_with_a_tokio_sigterm_stream_registered_after_still_cleans_up_and_dies_143() {
    exit("after");
}
