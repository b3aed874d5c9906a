//! Control command for the `daemon` example: ask whether it runs, ping it,
//! stop it.
//!
//! ```text
//! cargo run --example ctl -- status     # running (pid N) | not running | stale files left
//! cargo run --example ctl -- ping       # pong
//! cargo run --example ctl -- stop       # `stop` over the socket, else SIGTERM, then SIGKILL
//! cargo run --example ctl -- start      # connect, or start ./daemon and wait until ready
//! cargo run --example ctl -- restart
//! ```
//!
//! It finds the daemon the way the daemon does: `--socket`/`--pid`, then
//! `HISTORIA_DEMO_SOCKET`/`HISTORIA_DEMO_PID`, then the private runtime dir.
//!
//! The one rule worth copying: when it has to signal the daemon, it signals
//! the process that [`running_pid`] names, the kernel-verified holder of the
//! PID file's lock, never the number written in the file, which may belong to
//! an unrelated process by now.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use historia_lifecycle::{
    ensure_running, probe_socket, running_pid, wait_for_exit, LifecycleError, Started, Stopped,
};

#[path = "shared/cli.rs"]
mod cli;
use cli::{parse_args, report, resolve_paths};

/// `status` exit codes follow the LSB init-script convention.
const EXIT_RUNNING: i32 = 0;
const EXIT_NOT_RUNNING: i32 = 3;
const EXIT_STATUS_UNKNOWN: i32 = 4;
const EXIT_USAGE: i32 = 2;
const EXIT_ERROR: i32 = 1;

/// How long to wait for the daemon's reply on the socket.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `stop` waits for the daemon to exit after asking it to.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(2);
/// How long `start` waits for the daemon to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Replies are one short line; more than this is not our daemon.
const MAX_REPLY: u64 = 1024;

const USAGE: &str = "\
usage: ctl [--socket PATH] [--pid PATH] <status|ping|start|stop|restart>

commands:
  status   print \"running (pid N)\", \"not running\", or
           \"not running, stale files left (...)\";
           exit 0 if running, 3 if not, 4 if it cannot tell
  ping     send ping over the socket and print the reply
  start    connect to the daemon, or start the `daemon` program beside this
           one and wait (up to 10s) until it is ready; exit 0 either way
  restart  stop, then start
  stop     ask the daemon to stop over the socket; if that fails, send
           SIGTERM to the process holding the PID file's lock; wait up to
           5s for it to exit, then SIGKILL it

options:
  --socket PATH   the daemon's socket   (env HISTORIA_DEMO_SOCKET)
  --pid PATH      the daemon's PID file (env HISTORIA_DEMO_PID)
  -h, --help      print this help

Default paths are the daemon's: daemon.sock and daemon.pid in
$XDG_RUNTIME_DIR/historia-demo/ or <temp dir>/historia-demo-<uid>/.";

fn main() {
    let code = match parse_args(
        std::env::args_os().skip(1),
        &["status", "ping", "stop", "start", "restart"],
        false,
    ) {
        Ok(None) => {
            println!("{USAGE}");
            0
        }
        Ok(Some(cli::Parsed { word: None, .. })) => {
            eprintln!("ctl: missing command: status, ping, start, stop or restart\n\n{USAGE}");
            EXIT_USAGE
        }
        Ok(Some(cli::Parsed {
            word: Some(command),
            socket,
            pid,
            ..
        })) => match resolve_paths(socket, pid, false) {
            Ok((socket, pid)) => match command.as_str() {
                "status" => status(&socket, &pid),
                "ping" => ping(&socket),
                "start" => start(&socket, &pid),
                "restart" => match stop(&socket, &pid) {
                    0 => start(&socket, &pid),
                    code => code,
                },
                _ => stop(&socket, &pid),
            },
            Err(e) => {
                report("ctl", &e);
                if command == "status" {
                    EXIT_STATUS_UNKNOWN
                } else {
                    EXIT_ERROR
                }
            }
        },
        Err(msg) => {
            eprintln!("ctl: {msg}\n\n{USAGE}");
            EXIT_USAGE
        }
    };
    std::process::exit(code);
}

/// `status`: ask the kernel who holds the PID file's lock.
fn status(socket: &Path, pid_path: &Path) -> i32 {
    match running_pid(pid_path) {
        Ok(Some(pid)) => {
            println!("running (pid {pid})");
            return EXIT_RUNNING;
        }
        Ok(None) => {}
        Err(e @ LifecycleError::HolderUnknown { .. }) => {
            // Held, but not by a process we can name: running all the same.
            println!("running (pid unknown: {e})");
            return EXIT_RUNNING;
        }
        Err(e) => {
            report("ctl", &e);
            return EXIT_STATUS_UNKNOWN;
        }
    }
    // Nobody holds the lock. Something may still answer on the socket (the PID
    // file was deleted by hand, say): that is a running daemon too.
    if probe_socket(socket).is_ok_and(|s| s.is_live()) {
        println!(
            "running (pid unknown: {} answers, but no process holds {})",
            socket.display(),
            pid_path.display()
        );
        return EXIT_RUNNING;
    }
    match (blocker(socket), leftovers(socket, pid_path)) {
        (Some(why), _) => println!("not running, but {why}"),
        (None, None) => println!("not running"),
        (None, Some(files)) => println!("not running, stale files left ({files})"),
    }
    EXIT_NOT_RUNNING
}

/// `ping`: one round trip over the socket.
fn ping(socket: &Path) -> i32 {
    match request(socket, "ping") {
        Ok(reply) => {
            println!("{reply}");
            if reply == "pong" {
                0
            } else {
                EXIT_ERROR
            }
        }
        Err(e) => {
            eprintln!("ctl: cannot ping the daemon at {}: {e}", socket.display());
            EXIT_ERROR
        }
    }
}

/// `stop`: the polite way first (a `stop` command on the socket), then the
/// library's `stop`: SIGTERM to the lock holder through a pidfd, a wait, and
/// SIGKILL after the graceful deadline. Never a recycled PID, never a daemon
/// restarted meanwhile.
fn stop(socket: &Path, pid_path: &Path) -> i32 {
    let mut unreachable = None;
    // Who we are about to ask, looked up first: a supervisor may start a new
    // daemon the moment this one exits, and that one must be neither waited
    // for nor signalled.
    let asked = running_pid(pid_path).ok().flatten();
    let outcome = match request(socket, "stop") {
        Ok(reply) => {
            println!(
                "asked the daemon to stop over {}: {reply}",
                socket.display()
            );
            let waited = match asked {
                Some(old) => wait_for_holder_change(pid_path, old),
                None => wait_for_exit(pid_path, STOP_TIMEOUT),
            };
            if let (Some(old), Ok(Stopped::Stopped { pid })) = (asked, &waited) {
                if *pid != old {
                    println!(
                        "pid {old} stopped; pid {pid} took its place meanwhile (a supervisor \
                         restarting it?) and keeps running"
                    );
                    return 0;
                }
            }
            match waited {
                Err(LifecycleError::Timeout { .. }) => {
                    eprintln!("ctl: still running after {STOP_TIMEOUT:?}; sending SIGTERM");
                    historia_lifecycle::stop(pid_path, KILL_AFTER, KILL_AFTER)
                }
                other => other,
            }
        }
        Err(e) => {
            unreachable = Some(e);
            historia_lifecycle::stop(pid_path, STOP_TIMEOUT, KILL_AFTER)
        }
    };
    if let (Some(e), Ok(Stopped::Stopped { .. } | Stopped::Killed { .. })) =
        (&unreachable, &outcome)
    {
        println!("cannot reach the daemon over {}: {e}", socket.display());
    }
    match outcome {
        // Asked over the socket and gone before we looked: it stopped.
        Ok(Stopped::NotRunning) if unreachable.is_none() => finished(socket, pid_path),
        Ok(Stopped::NotRunning) => {
            // Stopping a stopped service succeeds, as in LSB init scripts.
            match (blocker(socket), leftovers(socket, pid_path)) {
                (Some(why), _) => println!("not running, but {why}"),
                (None, None) => println!("not running"),
                (None, Some(files)) => println!(
                    "not running, stale files left ({files}); the next start reclaims them"
                ),
            }
            0
        }
        Ok(Stopped::Stopped { pid }) => {
            if unreachable.is_some() {
                println!(
                    "sent SIGTERM to pid {pid} (the holder of the lock on {})",
                    pid_path.display()
                );
            }
            finished(socket, pid_path)
        }
        Ok(Stopped::Killed { pid }) => {
            println!("pid {pid} ignored SIGTERM for {STOP_TIMEOUT:?}; killed it with SIGKILL");
            finished(socket, pid_path)
        }
        Ok(other) => {
            println!("{other:?}");
            0
        }
        Err(e) => {
            report("ctl", &e);
            EXIT_ERROR
        }
    }
}

/// Waits up to [`STOP_TIMEOUT`] for pid `old` to stop holding the claim:
/// `Stopped { pid: old }` when nobody holds it any more, `Stopped { pid }`
/// with another PID when a new daemon holds it already (restarted by a
/// supervisor), `Timeout` when `old` still holds it.
fn wait_for_holder_change(pid_path: &Path, old: u32) -> historia_lifecycle::Result<Stopped> {
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    loop {
        match running_pid(pid_path) {
            Ok(None) => return Ok(Stopped::Stopped { pid: old }),
            Ok(Some(pid)) if pid != old => return Ok(Stopped::Stopped { pid }),
            Ok(Some(_)) | Err(LifecycleError::HolderUnknown { .. }) => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            return Err(LifecycleError::Timeout {
                what: "daemon exit",
                path: pid_path.to_path_buf(),
                pid: Some(old),
                waited: STOP_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After the daemon exited: "stopped", or which files it left behind.
fn finished(socket: &Path, pid_path: &Path) -> i32 {
    match leftovers(socket, pid_path) {
        None => println!("stopped"),
        Some(files) => {
            println!("stopped, stale files left ({files}); the next start reclaims them")
        }
    }
    0
}

/// `start`: connect to the daemon, or start the `daemon` example that sits
/// beside this program (same `--socket`/`--pid`) and wait until it is ready.
fn start(socket: &Path, pid_path: &Path) -> i32 {
    let daemon = match std::env::current_exe() {
        Ok(me) => me.with_file_name("daemon"),
        Err(e) => {
            eprintln!("ctl: cannot find the daemon program: {e}");
            return EXIT_ERROR;
        }
    };
    let mut cmd = Command::new(&daemon);
    cmd.arg("--socket").arg(socket).arg("--pid").arg(pid_path);
    match ensure_running(socket, pid_path, &mut cmd, START_TIMEOUT) {
        Ok(conn) => {
            match conn.started {
                Started::Spawned { pid } => println!("started (pid {pid})"),
                _ => println!("already running"),
            }
            0
        }
        Err(e) => {
            report("ctl", &e);
            EXIT_ERROR
        }
    }
}

/// Sends one command line and returns the reply line, without its newline.
fn request(socket: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(socket)?;
    // Bounded waits: a hung daemon must not hang its control command.
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(stream, "{command}")?;
    let mut reply = String::new();
    BufReader::new(stream.take(MAX_REPLY))
        .read_line(&mut reply)
        .map_err(|e| match e.kind() {
            // A read timeout shows up as EAGAIN: say what it means.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no reply within {REPLY_TIMEOUT:?} (is the daemon hung or stopped?)"),
            ),
            _ => e,
        })?;
    if reply.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the daemon closed the connection without a reply",
        ));
    }
    Ok(reply.trim_end().to_owned())
}

/// What at the socket path would make the next start fail, said plainly;
/// `None` when the path is free or holds a provably stale socket (which the
/// next start reclaims).
fn blocker(socket: &Path) -> Option<String> {
    match probe_socket(socket) {
        Ok(state) if state.is_live() => Some(format!(
            "something listens on {} without holding the lock: a start is refused",
            socket.display()
        )),
        Ok(_) => None,
        Err(LifecycleError::UnexpectedFileType { found, .. }) => Some(format!(
            "{} is a {found}, not a socket: a start is refused until it is moved away",
            socket.display()
        )),
        Err(e) => Some(format!("{} cannot be examined: {e}", socket.display())),
    }
}

/// Which of the two files exist, for messages; `None` when neither does.
fn leftovers(socket: &Path, pid_path: &Path) -> Option<String> {
    let present: Vec<String> = [socket, pid_path]
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .map(|p| p.display().to_string())
        .collect();
    (!present.is_empty()).then(|| present.join(", "))
}
