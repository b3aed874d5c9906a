//! The smallest forking (`Type=forking`) daemon: claims a PID file, then
//! daemonizes with `PidFileGuard::builder(..).daemonize(..)` and does what
//! its first argument says. `tests/daemonize.rs` runs it to check what the
//! original process reports and what the daemon looks like from outside.
//!
//! ```text
//! forking PID_FILE ready|fail|hang [--log PATH] [--umask OCTAL] [--timeout SECS] [--keep-fd N]...
//! ```
//!
//! - `ready`: calls `ready()`, then waits for SIGTERM or SIGINT, which
//!   remove the PID file and end it.
//! - `fail`: a start-up step after daemonizing fails for real (opening
//!   `/nonexistent/historia-state`); it reports that with `start_failed()`
//!   and exits 1, removing the PID file.
//! - `hang`: never reports; waits for a signal.
//!
//! Exit status of the command: 0 once the daemon is ready, 3 when another
//! instance holds the PID file, 1 when it could not start, 2 for bad
//! arguments.

use std::time::Duration;

use historia_lifecycle::{running_pid, Daemonize, LifecycleError, PidFileGuard};

fn usage() -> ! {
    eprintln!(
        "usage: forking PID_FILE ready|fail|hang [--log PATH] [--umask OCTAL] \
         [--timeout SECS] [--keep-fd N]..."
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(pid_path), Some(mode)) = (args.first(), args.get(1)) else {
        usage()
    };
    let mut options = Daemonize::new();
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().unwrap_or_else(|| usage());
        options = match flag.as_str() {
            "--log" => options.log_file(value),
            "--umask" => options.umask(u32::from_str_radix(value, 8).unwrap_or_else(|_| usage())),
            "--timeout" => options.timeout(Duration::from_secs_f64(
                value.parse().unwrap_or_else(|_| usage()),
            )),
            "--keep-fd" => options.keep_fd(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        };
    }
    if !matches!(mode.as_str(), "ready" | "fail" | "hang") {
        usage();
    }
    let guard = match PidFileGuard::builder(pid_path).daemonize(&options) {
        Ok(guard) => guard,
        Err(LifecycleError::AlreadyRunning) => {
            match running_pid(pid_path.as_ref()) {
                Ok(Some(pid)) => eprintln!("forking: already running (pid {pid})"),
                _ => eprintln!("forking: already running"),
            }
            std::process::exit(3);
        }
        Err(e) => {
            eprintln!("forking: {e}");
            std::process::exit(1);
        }
    };
    // In the daemon from here; stdout goes to the log file or /dev/null.
    println!("daemon {}", guard.pid());
    match mode.as_str() {
        "ready" => {
            if let Err(e) = guard.ready() {
                eprintln!("forking: cannot report readiness: {e}");
            }
            println!("ready");
        }
        "fail" => {
            if let Err(e) = std::fs::File::open("/nonexistent/historia-state") {
                let e = std::io::Error::new(
                    e.kind(),
                    format!("cannot open the state file /nonexistent/historia-state: {e}"),
                );
                guard.start_failed(&e);
                drop(guard); // removes the PID file
                std::process::exit(1);
            }
        }
        _ => {}
    }
    // The guard's signal thread removes the PID file on SIGTERM/SIGINT and
    // ends the process with the signal's status.
    loop {
        std::thread::park();
    }
}
