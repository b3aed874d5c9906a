//! An async daemon on `historia-lifecycle`: tokio + axum serving HTTP on the
//! guard's Unix socket, one instance at a time, with a graceful drain on
//! SIGTERM or SIGINT.
//!
//! ```text
//! cargo run -p historia-lifecycle-async-example -- --socket /tmp/d/http.sock --pid /tmp/d/http.pid
//! curl --unix-socket /tmp/d/http.sock http://localhost/       # pid and uptime
//! curl --unix-socket /tmp/d/http.sock http://localhost/slow   # answers after 2 s
//! kill -TERM "$(cat /tmp/d/http.pid)"
//! ```
//!
//! On SIGTERM (SignalMode::Graceful) it stops accepting at once, so new
//! connections are refused, lets the requests in progress finish (within
//! [`DRAIN_TIMEOUT`]), removes the socket and the PID file, and exits 143. A
//! second SIGTERM during the drain ends it at once, the files removed by the
//! crate's signal thread.
//!
//! Exit status: 128+N after signal N (143 for SIGTERM, 130 for SIGINT), 3
//! when another instance is already running, 2 for a bad command line, 1 for
//! any other error; the same as the sync example daemon's.

use std::error::Error;
use std::fmt;
use std::future::IntoFuture;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::{routing::get, Router};
use historia_lifecycle::{running_pid, DaemonGuard, LifecycleError, SignalAction, SignalMode};

#[path = "../../shared/cli.rs"]
mod cli;
use cli::{parse_args, report, resolve_paths};

/// Exit status when another instance holds the claim, as the sync example.
const EXIT_ALREADY_RUNNING: i32 = 3;
const EXIT_USAGE: i32 = 2;
const EXIT_ERROR: i32 = 1;

/// How long the requests in progress get to finish after a shutdown
/// request, before the daemon removes its files and exits anyway: a stuck
/// client must not keep it alive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/slow` takes to answer: long enough to send SIGTERM in the
/// middle of it.
const SLOW: Duration = Duration::from_secs(2);

const USAGE: &str = "\
usage: async-daemon [--socket PATH] [--pid PATH]

Serves HTTP on a Unix socket in the foreground until SIGTERM or Ctrl-C:
GET / (pid and uptime), GET /slow (answers after 2 s).

options:
  --socket PATH   Unix socket to listen on   (env HISTORIA_DEMO_SOCKET)
  --pid PATH      PID file to hold and lock  (env HISTORIA_DEMO_PID)
  -h, --help      print this help

By default both live in $XDG_RUNTIME_DIR/historia-demo/, or in
<temp dir>/historia-demo-<uid>/, as daemon.sock and daemon.pid.

exit status: 128+N after signal N (143 SIGTERM, 130 SIGINT),
3 if another instance is running, 2 for a bad command line, 1 on error";

/// One line on stdout, flushed at once (the tests and a log reader see it as
/// it happens); write errors are ignored, a closed terminal must not take the
/// daemon down.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

fn main() {
    let code = match parse_args(std::env::args_os().skip(1), &[], false) {
        Ok(None) => {
            say!("{USAGE}");
            0
        }
        Ok(Some(args)) => match run(args.socket, args.pid) {
            Ok(code) => code,
            Err(e) => {
                report("async-daemon", e.as_ref());
                EXIT_ERROR
            }
        },
        Err(msg) => {
            let _ = writeln!(io::stderr(), "async-daemon: {msg}\n\n{USAGE}");
            EXIT_USAGE
        }
    };
    // The guard is closed and the runtime shut down by now (`run` owns both),
    // so exiting skips no cleanup.
    std::process::exit(code);
}

/// Runs the daemon on a tokio runtime; returns its exit status.
#[tokio::main]
async fn run(socket: Option<PathBuf>, pid: Option<PathBuf>) -> Result<i32, Box<dyn Error>> {
    let (socket_path, pid_path) = resolve_paths(socket, pid, true)
        .map_err(|e| context("cannot choose the runtime dir", e))?;
    say!("socket {}", socket_path.display());
    say!("pid file {}", pid_path.display());

    // Graceful: SIGTERM/SIGINT only wake `guard.shutdown()`, so the daemon
    // decides how to wind down; a second signal still ends it.
    // SIGHUP: a reload request (`kill -HUP`, `systemctl reload`). SIGQUIT:
    // remove both files, then end by SIGQUIT.
    let mut guard = match DaemonGuard::builder(&socket_path, &pid_path)
        .signals(SignalMode::Graceful)
        .on_signal(libc::SIGHUP, SignalAction::Reload)
        .on_signal(libc::SIGQUIT, SignalAction::Terminate)
        .acquire()
    {
        Ok(guard) => guard,
        Err(LifecycleError::AlreadyRunning) => {
            let who = match running_pid(&pid_path) {
                Ok(Some(n)) => format!("as pid {n}"),
                _ => format!("(the PID file {} is locked)", pid_path.display()),
            };
            let _ = writeln!(
                io::stderr(),
                "async-daemon: already running {who}; not starting a second instance"
            );
            return Ok(EXIT_ALREADY_RUNNING);
        }
        Err(e) => return Err(context("cannot start", e)),
    };
    say!("pid {}", guard.pid());

    // Non-blocking, registered with this runtime; the guard keeps the duty
    // to remove the socket file.
    let listener = Announce::new(guard.take_tokio_listener()?);
    let started = Instant::now();
    let pid = guard.pid();
    // Reloads: a task awaits each request. A real daemon re-reads its
    // configuration here; this one counts, so `GET /` shows it.
    let reloads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (reload, reloads) = (guard.reload().clone(), reloads.clone());
        tokio::spawn(async move {
            loop {
                reload.requested().await;
                // RELOADING=1 … READY=1 to a manager waiting on the reload.
                let reloading = reload.begin();
                let n = reloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                if let Ok(r) = reloading {
                    let _ = r.done();
                }
                say!("reloaded ({n})");
            }
        });
    }
    let app = Router::new()
        .route(
            "/",
            get(move || async move {
                let n = reloads.load(std::sync::atomic::Ordering::SeqCst);
                format!(
                    "pid {pid} uptime {:.1}s reloads {n}\n",
                    started.elapsed().as_secs_f64()
                )
            }),
        )
        .route("/slow", get(slow));
    // axum stops accepting (and drops the listener) as soon as the shutdown
    // future resolves, then waits for the connections it has to finish.
    let server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(guard.shutdown().requested())
            .into_future(),
    );
    // READY=1 to systemd or `start-stop-daemon --notify-await`, if they wait.
    if let Err(e) = guard.ready() {
        report(
            "async-daemon",
            context("cannot report readiness", e).as_ref(),
        );
    }
    say!("ready");

    // Any number of futures may wait for the same request: axum's and ours.
    guard.shutdown().requested().await;
    say!("shutting down ({})", reason(guard.shutdown().signal()));
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Ok(()))) => say!("drained"),
        Ok(Ok(Err(e))) => report("async-daemon", context("the server failed", e).as_ref()),
        Ok(Err(e)) => report(
            "async-daemon",
            context("the server task failed", e).as_ref(),
        ),
        Err(_) => {
            let _ = writeln!(
                io::stderr(),
                "async-daemon: requests still running after {DRAIN_TIMEOUT:?}; exiting anyway"
            );
        }
    }

    let code = guard.shutdown().exit_code();
    // close() rather than Drop: it says what could not be removed.
    if let Err(e) = guard.close() {
        report(
            "async-daemon",
            context("cannot remove the socket or PID file", e).as_ref(),
        );
        return Ok(EXIT_ERROR);
    }
    say!("stopped");
    Ok(code)
}

/// `GET /slow`: a request that is still in progress when a SIGTERM comes.
async fn slow() -> String {
    say!("slow request started");
    tokio::time::sleep(SLOW).await;
    format!("slow answer, complete after {} ms\n", SLOW.as_millis())
}

/// The guard's listener as axum serves it, saying when axum drops it: from
/// then on new connections are refused, while the socket file stays until
/// the guard is closed.
struct Announce(Option<tokio::net::UnixListener>);

impl Announce {
    fn new(listener: tokio::net::UnixListener) -> Self {
        Announce(Some(listener))
    }

    fn listener(&self) -> &tokio::net::UnixListener {
        self.0.as_ref().expect("open until dropped")
    }
}

impl axum::serve::Listener for Announce {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let listener = self.0.as_mut().expect("open until dropped");
        axum::serve::Listener::accept(listener).await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener().local_addr()
    }
}

impl Drop for Announce {
    fn drop(&mut self) {
        // Closed first, so whoever reads the line finds connections refused.
        drop(self.0.take());
        say!("stopped accepting");
    }
}

/// Why we are shutting down, for the log line. (POSIX fixes these two
/// numbers, `kill -15` and `kill -2`, on every Unix.)
fn reason(signal: Option<i32>) -> String {
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    match signal {
        Some(SIGTERM) => "SIGTERM".into(),
        Some(SIGINT) => "SIGINT".into(),
        Some(n) => format!("signal {n}"),
        None => "requested".into(),
    }
}

/// An error with what we were doing when it happened; the cause stays in
/// the source chain, which [`report`] prints.
fn context(what: &str, e: impl Error + Send + Sync + 'static) -> Box<dyn Error> {
    Box::new(Context {
        what: what.to_owned(),
        source: Box::new(e),
    })
}

#[derive(Debug)]
struct Context {
    what: String,
    source: Box<dyn Error + Send + Sync>,
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
