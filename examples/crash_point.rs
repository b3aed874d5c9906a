//! The smallest real holder: acquire a `DaemonGuard` (default signal
//! handling, so the signal thread starts too), then `close()` it. The
//! crash-point sweep (`tests/crash_sweep.rs`) runs it under `strace
//! --inject=…:signal=SIGKILL` to kill it at each system call of acquire and
//! of cleanup, and checks the next start needs no manual cleanup.
//!
//! ```text
//! crash_point SOCKET PID_FILE [hold]
//! ```
//!
//! With `hold` it sleeps 10 s between acquiring and closing, so that a
//! signal, not the close, ends it.
//!
//! It marks the stretch the sweep aims at with one `write(2)` each to stderr:
//! `@@acquire` before acquiring and `@@end` after closing. Exit status 0 when
//! it got through, 1 when acquiring or closing failed, 2 for bad arguments.

use std::io::Write;

use historia_lifecycle::DaemonGuard;

/// One `write(2)`: stderr is unbuffered.
fn mark(what: &str) {
    let _ = std::io::stderr().write_all(format!("@@{what}\n").as_bytes());
}

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let (socket, pid, hold) = match args.as_slice() {
        [socket, pid] => (socket, pid, false),
        [socket, pid, hold] if hold == "hold" => (socket, pid, true),
        _ => {
            eprintln!("usage: crash_point SOCKET PID_FILE [hold]");
            std::process::exit(2);
        }
    };
    mark("acquire");
    let guard = match DaemonGuard::acquire(socket, pid) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("crash_point: {e}");
            std::process::exit(1);
        }
    };
    if hold {
        // Only a signal is meant to end it; bounded, in case none comes.
        std::thread::sleep(std::time::Duration::from_secs(10));
    }
    if let Err(e) = guard.close() {
        eprintln!("crash_point: {e}");
        std::process::exit(1);
    }
    mark("end");
}
