//! A small daemon built on `historia-lifecycle`: one instance at a time, a
//! PID file that `start-stop-daemon` trusts, recovery after SIGKILL, and
//! graceful shutdown on SIGTERM, SIGINT (Ctrl-C) or a `stop` command. It runs
//! in the foreground (as a service manager wants it), or with `--daemonize`
//! detaches as daemon(7) describes and returns once it serves.
//!
//! ```text
//! cargo run --example daemon                      # default paths, see --help
//! cargo run --example daemon -- --socket /tmp/d/daemon.sock --pid /tmp/d/daemon.pid
//! cargo run --example daemon -- --daemonize --log /tmp/d/daemon.log
//! cargo run --example ctl -- status|ping|stop     # talk to it
//! ```
//!
//! It speaks a line protocol on its Unix socket, one command per line:
//! `ping` → `pong`, `status` → `pid 1234 uptime 12.3s`, `stop` → `stopping`
//! (then shuts down), anything else → `error: unknown command "x"`.
//! Try it by hand with `socat - UNIX-CONNECT:<socket>`.
//!
//! SIGHUP is a reload request (`reload requested` in the log; a real daemon
//! re-reads its configuration there): the daemon keeps serving, unlike a
//! daemon that leaves SIGHUP at its default and dies with its files left.
//! SIGQUIT removes both files, then ends the process by SIGQUIT.
//!
//! Exit status: 0 after `stop`, 128+N after signal N (143 for SIGTERM, 130
//! for SIGINT), 3 when another instance is already running, 2 for a bad
//! command line, 1 for any other error. With `--daemonize` the command
//! returns 0 once the daemon is ready, 3 when another instance runs, 1 when
//! the daemon could not start (the reason on stderr).

use std::error::Error;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use historia_lifecycle::{
    probe_socket, running_pid, DaemonGuard, Daemonize, LifecycleError, Shutdown, SignalAction,
    SignalMode, SocketState,
};
use nix::libc;

#[path = "shared/cli.rs"]
mod cli;
use cli::{parse_args, report, resolve_paths};

/// Exit status when another instance holds the claim, distinct from other
/// failures so scripts can tell "already up" from "broken".
const EXIT_ALREADY_RUNNING: i32 = 3;
const EXIT_USAGE: i32 = 2;
const EXIT_ERROR: i32 = 1;

/// Longest command line a client may send. Commands are a few bytes; the
/// bound keeps a client from making us buffer without limit.
const MAX_LINE: usize = 1024;
/// A client that sends nothing for this long is disconnected, so idle
/// connections cannot pile up forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that stops reading cannot stall its thread for longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many clients at once; more are turned away with an error line
/// instead of each costing a thread.
const MAX_CLIENTS: usize = 64;
/// How long shutdown waits for requests being answered before it removes the
/// files anyway. Short: a stuck client must not keep the daemon alive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

const USAGE: &str = "\
usage: daemon [--socket PATH] [--pid PATH] [--daemonize [--log PATH]]

Runs a demo daemon in the foreground until `stop`, SIGTERM or Ctrl-C.

options:
  --socket PATH   Unix socket to listen on   (env HISTORIA_DEMO_SOCKET)
  --pid PATH      PID file to hold and lock  (env HISTORIA_DEMO_PID)
  --daemonize     detach (daemon(7): fork, setsid, fork, chdir /, stdio to
                  /dev/null) and return once the daemon serves
  --log PATH      with --daemonize: append the daemon's output to PATH
  -h, --help      print this help

By default both live in $XDG_RUNTIME_DIR/historia-demo/, or in
<temp dir>/historia-demo-<uid>/ when XDG_RUNTIME_DIR is unset or unusable,
as daemon.sock and daemon.pid.

exit status: 0 after `stop`, 128+N after signal N (143 SIGTERM, 130 SIGINT),
3 if another instance is running, 2 for a bad command line, 1 on error;
with --daemonize: 0 once the daemon is ready, 3 if another instance is
running, 1 if the daemon could not start";

/// Prints one line to stdout and flushes it at once, so that whoever reads a
/// pipe or a log file sees start-up progress as it happens. Write errors are
/// ignored on purpose: a closed terminal must not take the daemon down (and
/// `println!` would panic on one).
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// As [`say!`], for diagnostics on stderr.
macro_rules! warn {
    ($($arg:tt)*) => {{
        let _ = writeln!(io::stderr().lock(), $($arg)*);
    }};
}

fn main() {
    let code = match parse_args(std::env::args_os().skip(1), &[], true) {
        Ok(None) => {
            say!("{USAGE}");
            0
        }
        Ok(Some(args)) if args.log.is_some() && !args.daemonize => {
            warn!("daemon: --log needs --daemonize (in the foreground, redirect the output)\n\n{USAGE}");
            EXIT_USAGE
        }
        Ok(Some(args)) => match run(args) {
            Ok(code) => code,
            Err(e) => {
                report("daemon", e.as_ref());
                EXIT_ERROR
            }
        },
        Err(msg) => {
            warn!("daemon: {msg}\n\n{USAGE}");
            EXIT_USAGE
        }
    };
    // Every guard is closed by now (`run` owns it), so exiting here skips no
    // cleanup.
    std::process::exit(code);
}

/// Runs the daemon; returns its exit status.
fn run(args: cli::Parsed) -> Result<i32, Box<dyn Error>> {
    let (socket_path, pid_path) = resolve_paths(args.socket, args.pid, true)
        .map_err(|e| context("cannot choose the runtime dir", e))?;
    say!("socket {}", socket_path.display());
    say!("pid file {}", pid_path.display());

    // Graceful: SIGTERM/SIGINT only wake `guard.shutdown()`, so we decide how
    // to wind down; a second signal during a stuck drain still ends us.
    // SIGHUP: a reload request, taken by the reload thread below. SIGQUIT
    // (Ctrl-\): remove both files, then end by SIGQUIT (a core dump where
    // enabled), instead of leaving them for the next start to reclaim.
    let builder = DaemonGuard::builder(&socket_path, &pid_path)
        .signals(SignalMode::Graceful)
        .on_signal(libc::SIGHUP, SignalAction::Reload)
        .on_signal(libc::SIGQUIT, SignalAction::Terminate);
    let acquired = if args.daemonize {
        // The claim and the socket are taken before forking, so "already
        // running" and a bind error print here, on the terminal. From then
        // on this process waits: it exits 0 once the daemon calls
        // `ready()` below, or prints why the daemon could not start.
        let mut options = Daemonize::new();
        if let Some(log) = &args.log {
            options = options.log_file(log);
        }
        builder.daemonize(&options)
    } else {
        builder.acquire()
    };
    let mut guard = match acquired {
        Ok(guard) => guard,
        Err(LifecycleError::AlreadyRunning) => {
            refuse_second_instance(&socket_path, &pid_path);
            return Ok(EXIT_ALREADY_RUNNING);
        }
        Err(e) => return Err(context("cannot start", e)),
    };
    if guard.is_socket_activated() {
        say!("socket passed down by the service manager (socket activation)");
    } else {
        say!("{}", reclaim_note(&guard));
    }
    say!("pid {}", guard.pid());

    let Some(listener) = guard.take_listener() else {
        // A fresh guard always has its listener; the guard's Drop cleans up.
        return Err("the guard's listener was already taken".into());
    };
    let state = Arc::new(State {
        pid: guard.pid(),
        started: Instant::now(),
        shutdown: guard.shutdown().clone(),
        clients: Arc::default(),
        busy: Arc::default(),
    });
    let acceptor_state = Arc::clone(&state);
    if let Err(e) = thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(listener, acceptor_state))
    {
        // Whoever waits for the start (the terminal after --daemonize, a
        // client, a service manager) hears why.
        guard.start_failed(&e);
        return Err(context("cannot start the accept thread", e));
    }
    // Reloads: this example has no configuration to re-read, so it only
    // says so; `begin`/`done` tell a service manager waiting on the reload
    // (`Type=notify-reload`) RELOADING=1, then READY=1.
    let reload = guard.reload().clone();
    let reloader = thread::Builder::new()
        .name("reload".into())
        .spawn(move || loop {
            reload.wait();
            match reload.begin() {
                Ok(reloading) => {
                    say!("reload requested (nothing to re-read in this example)");
                    if let Err(e) = reloading.done() {
                        report("daemon", context("cannot report the reload", e).as_ref());
                    }
                }
                Err(e) => report("daemon", context("cannot report the reload", e).as_ref()),
            }
        });
    if let Err(e) = reloader {
        guard.start_failed(&e);
        return Err(context("cannot start the reload thread", e));
    }
    // One call tells every waiting party: READY=1 to systemd or
    // `start-stop-daemon --notify-await` when NOTIFY_SOCKET is set.
    if let Err(e) = guard.ready() {
        report("daemon", context("cannot report readiness", e).as_ref());
    }
    say!("ready");

    guard.shutdown().wait();
    say!("shutting down ({})", reason(guard.shutdown()));

    // Let answers being written finish, within a bound. Idle connections are
    // not waited for: they hold no request, and exiting closes them.
    let left = state.busy.wait_zero(DRAIN_TIMEOUT);
    if left > 0 {
        warn!("daemon: {left} request(s) still running after {DRAIN_TIMEOUT:?}; exiting anyway");
    }

    let code = guard.shutdown().exit_code();
    // close() rather than Drop: Drop has to stay silent, close() says what
    // could not be removed.
    if let Err(e) = guard.close() {
        report(
            "daemon",
            context("cannot remove the socket or PID file", e).as_ref(),
        );
        return Ok(EXIT_ERROR);
    }
    say!("stopped");
    Ok(code)
}

/// Tells the user what stopped the start, as found: who holds the PID file's
/// lock (`running_pid` asks the kernel, so it cannot name a dead or recycled
/// PID the way the file's text could) and what is at the socket path. The
/// lock may be held by another tool (`flock(1)`, a libbsd `pidfile_open`
/// program) with no socket at all, and that is what the message must say.
fn refuse_second_instance(socket_path: &Path, pid_path: &Path) {
    let (sock, pid) = (socket_path.display(), pid_path.display());
    let at_socket = probe_socket(socket_path);
    let message = match running_pid(pid_path) {
        Ok(Some(n)) => match at_socket {
            Ok(s) if s.is_live() => {
                format!("already running as {} on socket {sock}", process(n))
            }
            Ok(SocketState::Absent) => format!(
                "the PID file {pid} is locked by {} (no socket at {sock})",
                process(n)
            ),
            Ok(SocketState::Stale) => format!(
                "the PID file {pid} is locked by {}, which does not listen on {sock}",
                process(n)
            ),
            Ok(_) => format!(
                "the PID file {pid} is locked by {}; {}",
                process(n),
                socket_fact(&at_socket, socket_path)
            ),
            Err(e) => format!(
                "the PID file {pid} is locked by {}; the socket cannot be checked: {e}",
                process(n)
            ),
        },
        Err(e @ LifecycleError::HolderUnknown { .. }) => {
            format!("{e}; {}", socket_fact(&at_socket, socket_path))
        }
        // Nobody holds the lock now: a program serves on the socket without
        // it, or the holder exited between our attempt and this look.
        Ok(None) => match at_socket {
            Ok(s) if s.is_live() => format!(
                "a process listens on {sock} but none holds the lock on {pid} \
                 (a daemon that does not use it)"
            ),
            _ => format!("the process that held the lock on {pid} has just exited; try again"),
        },
        Err(e) => format!(
            "cannot tell who holds the lock on {pid}: {e}; {}",
            socket_fact(&at_socket, socket_path)
        ),
    };
    warn!("daemon: {message}; not starting a second instance");
}

/// "pid N (name)", the name from `/proc/N/comm` where there is one.
fn process(pid: u32) -> String {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(name) => format!("pid {pid} ({})", name.trim_end()),
        Err(_) => format!("pid {pid}"),
    }
}

/// What the probe found at the socket path, for a message.
fn socket_fact(found: &Result<SocketState, LifecycleError>, socket_path: &Path) -> String {
    let sock = socket_path.display();
    match found {
        Ok(SocketState::Absent) => format!("no socket at {sock}"),
        Ok(s) if s.is_live() => format!("a process listens on {sock}"),
        Ok(SocketState::Stale) => format!("nobody listens on the socket {sock}"),
        // macOS and the BSDs: no listener, or one whose backlog is full.
        Ok(_) => format!("connections to {sock} are refused"),
        Err(e) => format!("the socket cannot be checked: {e}"),
    }
}

/// One line saying which leftovers acquiring took over, and what they were:
/// an unlocked PID file that names no process is not a dead instance's.
fn reclaim_note(guard: &DaemonGuard) -> String {
    let mut found = Vec::new();
    if guard.reclaimed_stale_socket() {
        found.push("a stale socket (nobody listened on it)".to_owned());
    }
    if guard.reclaimed_stale_pid_file() {
        found.push(match guard.replaced_pid() {
            Some(n) => format!("a stale PID file naming pid {n}, which no longer held its lock"),
            None => "an unlocked PID file that named no process (empty or not a PID, \
                     as flock(1) leaves one)"
                .to_owned(),
        });
    }
    if found.is_empty() {
        "no stale files to reclaim".to_owned()
    } else {
        format!("reclaimed {}", found.join(" and "))
    }
}

/// Why we are shutting down, for the log line.
fn reason(shutdown: &Shutdown) -> String {
    match shutdown.signal() {
        Some(libc::SIGTERM) => "SIGTERM".into(),
        Some(libc::SIGINT) => "SIGINT".into(),
        Some(n) => format!("signal {n}"),
        None => "stop command".into(),
    }
}

/// What the client threads share.
struct State {
    pid: u32,
    started: Instant,
    shutdown: Shutdown,
    /// Open connections, capped at [`MAX_CLIENTS`].
    clients: Arc<Gauge>,
    /// Requests being answered right now; shutdown drains these.
    busy: Arc<Gauge>,
}

/// Accepts clients until the process exits, one thread each.
///
/// After a shutdown request it turns every newcomer away instead of serving
/// it. It is never joined: it may sit in `accept(2)` until the process exits,
/// which is harmless because the guard has removed the socket by then.
fn accept_loop(listener: UnixListener, state: Arc<State>) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                // EMFILE and friends: don't spin, don't die; a later accept
                // may succeed once clients leave.
                warn!("daemon: accept failed: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if state.shutdown.is_requested() {
            turn_away(&stream, "error: shutting down");
            continue;
        }
        let Some(ticket) = state.clients.try_enter(MAX_CLIENTS) else {
            turn_away(&stream, "error: too many clients");
            continue;
        };
        let client_state = Arc::clone(&state);
        let spawned = thread::Builder::new().name("client".into()).spawn(move || {
            let _ticket = ticket; // leaves the gauge when the thread ends
            if let Err(e) = serve_client(&stream, &client_state) {
                log_client_error(&e);
            }
        });
        if let Err(e) = spawned {
            // The closure (and the stream in it) was dropped: the client sees EOF.
            warn!("daemon: cannot start a client thread: {e}");
        }
    }
}

/// A short error line to a client we will not serve. A few bytes into a fresh
/// socket's buffer never block, and the client may already be gone.
fn turn_away(mut stream: &UnixStream, line: &str) {
    let _ = writeln!(stream, "{line}");
}

/// Answers one client's commands, one line each, until it hangs up, idles
/// out, sends an over-long line, or the daemon is stopping.
fn serve_client(stream: &UnixStream, state: &State) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut writer = stream;
    let mut line = Vec::with_capacity(64);
    loop {
        line.clear();
        // One byte more than allowed, to tell "exactly MAX_LINE" from "longer".
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(()); // the client hung up
        }
        if line.len() > MAX_LINE {
            writeln!(writer, "error: line longer than {MAX_LINE} bytes")?;
            return Ok(());
        }
        if state.shutdown.is_requested() {
            writeln!(writer, "error: shutting down")?;
            return Ok(());
        }
        let busy = state.busy.enter();
        let command = String::from_utf8_lossy(&line);
        let (reply, stop) = answer(command.trim(), state);
        writeln!(writer, "{reply}")?;
        if stop {
            // After the reply, so the client hears it before the files go.
            state.shutdown.request();
            return Ok(());
        }
        drop(busy);
    }
}

/// The protocol: the reply to one command, and whether it asks us to stop.
fn answer(command: &str, state: &State) -> (String, bool) {
    match command {
        "ping" => ("pong".into(), false),
        "status" => (
            format!(
                "pid {} uptime {:.1}s",
                state.pid,
                state.started.elapsed().as_secs_f64()
            ),
            false,
        ),
        "stop" => ("stopping".into(), true),
        other => (format!("error: unknown command {other:?}"), false),
    }
}

/// Idle timeouts and clients that hang up mid-reply are routine; anything
/// else is worth a line on stderr.
fn log_client_error(e: &io::Error) {
    match e.kind() {
        io::ErrorKind::WouldBlock
        | io::ErrorKind::TimedOut
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset => {}
        _ => warn!("daemon: client error: {e}"),
    }
}

/// A counter that can be waited on until it drops to zero.
#[derive(Default)]
struct Gauge {
    count: Mutex<usize>,
    zero: Condvar,
}

/// One unit counted in a [`Gauge`], given back on drop, also when a client
/// thread panics. Owns its gauge so it can move into a thread.
struct Ticket(Arc<Gauge>);

impl Gauge {
    fn lock(&self) -> MutexGuard<'_, usize> {
        // A panicking client thread must not wedge shutdown: the count is
        // still right, because tickets give back on unwind too.
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(self: &Arc<Self>) -> Ticket {
        *self.lock() += 1;
        Ticket(Arc::clone(self))
    }

    /// Counts one in, unless `max` are in already.
    fn try_enter(self: &Arc<Self>, max: usize) -> Option<Ticket> {
        let mut n = self.lock();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Ticket(Arc::clone(self)))
    }

    /// Waits until the count is zero or `timeout` passes; returns what is
    /// left.
    fn wait_zero(&self, timeout: Duration) -> usize {
        let (n, _) = self
            .zero
            .wait_timeout_while(self.lock(), timeout, |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        *n
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut n = self.0.lock();
        *n -= 1;
        if *n == 0 {
            self.0.zero.notify_all();
        }
    }
}

/// Wraps an error with what we were doing, keeping it as the source so
/// [`report`] prints the whole chain.
fn context(what: &str, source: impl Error + 'static) -> Box<dyn Error> {
    Box::new(Context {
        what: what.to_owned(),
        source: Box::new(source),
    })
}

#[derive(Debug)]
struct Context {
    what: String,
    source: Box<dyn Error>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(self.source.as_ref())
    }
}
