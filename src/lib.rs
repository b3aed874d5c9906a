//! Daemon lifecycle for Unix: exactly one instance at a time, a PID file
//! other tools can trust, recovery after a crash with no manual cleanup, and
//! an RAII guard that removes what it created on Drop, SIGTERM or SIGINT.
//!
//! # Use this when
//! You write a long-running local server, agent or dev-tool daemon that
//! listens on a Unix socket (as tmux, gpg-agent, sccache or turborepo's
//! daemon do) and must never run twice, even when two copies start in the
//! same millisecond, the last one was SIGKILLed, or its PID was recycled.
//! One line at start-up does it:
//!
//! ```no_run
//! // no_run: a real daemon serves until it is stopped.
//! use historia_lifecycle::{runtime_dir, DaemonGuard, LifecycleError};
//! let dir = runtime_dir("my-daemon")?;
//! let guard = DaemonGuard::acquire(dir.join("daemon.sock"), dir.join("daemon.pid"))?;
//! for stream in guard.listener().unwrap().incoming() {
//!     // serve
//! #   drop(stream);
//! }
//! # Ok::<(), LifecycleError>(())
//! ```
//!
//! A daemon that serves TCP or HTTP, or nothing at all, and only needs "one
//! instance, a PID file tools trust, cleanup on Drop and signals" (a unit
//! with systemd's `PIDFile=`) uses [`PidFileGuard`]: the same claim, with no
//! socket.
//!
//! ```
//! use historia_lifecycle::{LifecycleError, PidFileGuard};
//! let dir = tempfile::tempdir()?;
//! let _guard = PidFileGuard::acquire(dir.path().join("server.pid"))?;
//! // let tcp = std::net::TcpListener::bind("127.0.0.1:8080")?; ...
//! # Ok::<(), LifecycleError>(())
//! ```
//!
//! # Lifecycle: acquire → serve → Drop or signal
//! 1. [`DaemonGuard::acquire`] takes an exclusive `flock(2)` on the PID file,
//!    held for the guard's whole life (FreeBSD pidfile(3) style, written
//!    atomically), removes a provably stale socket and binds a fresh one. A
//!    second instance gets [`LifecycleError::AlreadyRunning`];
//!    [`running_pid`] names the one that runs.
//! 2. The daemon serves on [`DaemonGuard::listener`].
//! 3. Drop, [`DaemonGuard::close`], SIGTERM or SIGINT remove the socket and
//!    the PID file, but only in the process that created them and only while
//!    they are still the files it created. See [Signals](#signals).
//!
//! # Signals
//! By default SIGTERM and SIGINT remove the files and end the process by
//! the signal (status 143 or 130), from a helper thread, while the daemon's
//! own threads stay blocked wherever they are. Each signal can do something
//! else ([`SignalAction`], set per guard with `on_signal`; [`SignalMode`]
//! is the shorthand for SIGTERM and SIGINT):
//!
//! | action | what the signal does |
//! |---|---|
//! | [`SignalAction::Terminate`] | remove every guard's files, then end the process by the signal (SIGTERM, SIGINT by default; SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 when asked) |
//! | [`SignalAction::Shutdown`] | a graceful shutdown request on [`Shutdown`] (a second signal while it is pending terminates) |
//! | [`SignalAction::Reload`] | a reload request on [`Reload`], acknowledged to a service manager with `RELOADING=1` … `READY=1` |
//! | [`SignalAction::Rebind`] | re-create the socket if it was deleted (tmux's SIGUSR1), onto the listener the guard holds |
//! | [`SignalAction::Leave`] | nothing installed (SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 by default) |
//!
//! ```
//! use historia_lifecycle::{PidFileGuard, SignalAction, SignalMode};
//! use nix::libc::SIGHUP;
//! let dir = tempfile::tempdir()?;
//! let guard = PidFileGuard::builder(dir.path().join("d.pid"))
//!     .signals(SignalMode::Graceful)
//!     .on_signal(SIGHUP, SignalAction::Reload)
//!     .acquire()?;
//! # guard.shutdown().request();
//! while !guard.shutdown().is_requested() {
//!     if guard.reload().wait_timeout(std::time::Duration::from_millis(100)) {
//!         let reloading = guard.reload().begin()?;
//!         // re-read the configuration
//!         reloading.done()?;
//!     }
//! }
//! guard.close()?;
//! # Ok::<(), historia_lifecycle::LifecycleError>(())
//! ```
//!
//! The traps, each spelt out on [`SignalMode`]: handlers registered through
//! signal-hook or tokio coexist with ours (a raw `sigaction(2)` after a
//! guard replaces them); a signal inherited as ignored (`nohup`, `daemon &`
//! in a script) stays ignored unless asked for with `on_signal`; after the
//! last guard the handler stays installed (signal-hook cannot remove one)
//! but does what the process did before; a forked child never touches its
//! parent's files.
//!
//! # Service managers
//! The guards are good citizens under systemd (`Type=notify`, `.socket`
//! units) and `start-stop-daemon --notify-await` with no configuration: a
//! daemon calls [`DaemonGuard::ready`] once it serves (`READY=1`), cleanup
//! sends `STOPPING=1` first, and a start that fails sends its reason and
//! `ERRNO=`. A socket passed down by the manager (`LISTEN_FDS`) is adopted
//! and never unlinked ([`Activation`]). Underneath, [`Notifier`] is the
//! `sd_notify(3)` client and [`activated_listener`] the `sd_listen_fds(3)`
//! adoption; both read the environment and never write it, and
//! [`scrub_service_env`] keeps those variables from the children a daemon
//! spawns. Unit files: `docs/service-managers.md`.
//!
//! # Daemonizing
//! Under a service manager, don't: systemd, runit, s6, launchd and
//! `start-stop-daemon --background` run the program in the background
//! themselves and track it by its PID; run in the foreground and call
//! [`DaemonGuard::ready`]. Daemonize when the program is started by hand or
//! from a script and must detach, or for a supervisor that expects a forking
//! daemon (systemd's `Type=forking`, `start-stop-daemon --start` without
//! `--background`, SysV init scripts).
//!
//! [`DaemonGuardBuilder::daemonize`] and [`PidFileGuardBuilder::daemonize`]
//! do it with the claim held, in the order FreeBSD
//! [pidfile(3)](https://man.freebsd.org/cgi/man.cgi?query=pidfile&sektion=3)
//! teaches: claim (and bind) first, so "already running (pid N)" and a bind
//! error reach the terminal; then
//! [daemon(7)](https://man7.org/linux/man-pages/man7/daemon.7.html)'s SysV
//! steps (`fork(2)`, `setsid(2)`, a second fork, `chdir("/")`, umask, stdio
//! to `/dev/null` or a log file, inherited descriptors closed); the daemon
//! takes the claim over (the PID file names it), and the original process
//! exits 0 once the daemon calls `ready()`, or prints the daemon's start-up
//! error ([`PidFileGuard::start_failed`]) or a timeout and exits 1. That is
//! the contract `Type=forking` and `start-stop-daemon --start` rely on. See
//! [`Daemonize`] for the options and the rule about threads (daemonize
//! before any start, a tokio runtime included).
//!
//! After a `fork(2)` of your own, the child calls
//! [`PidFileGuard::take_over_after_fork`] and the parent
//! [`PidFileGuard::hand_over_to_child`] (both on [`DaemonGuard`] too): a
//! fresh PID file naming the child, already flocked, is renamed over the old
//! one while that is still locked, so no instant exists at which the claim
//! is free or the file is torn.
//!
//! # The client side
//! A daemon's command-line client connects or starts it with
//! [`ensure_running`] (exactly one spawn among racing clients, serialised
//! on `<socket>.lock`; the daemon's [`DaemonGuard::ready`] reports down a
//! pipe, and a failed start returns its reason), and stops it with
//! [`stop`] (SIGTERM through a pidfd, SIGKILL after the deadline, never a
//! recycled PID or a restarted daemon).
//!
//! # tokio / async
//! [`Shutdown::requested`] is the shutdown request as a future: no runtime
//! and no thread of its own (the crate's one signal thread wakes it), so any
//! executor drives it; any number of tasks may await it, it is cancel-safe,
//! and it resolves at once if the request came first. With feature `tokio`
//! (off by default), `DaemonGuard::take_tokio_listener` hands the socket to
//! the runtime, non-blocking and still close-on-exec, and answers
//! [`LifecycleError::NoRuntime`] outside one instead of tokio's panic.
//!
//! The core of `examples/async` (axum, so no doctest here; CI builds and
//! tests it with curl): on SIGTERM axum stops accepting at once, the
//! request in progress gets its whole answer, then both files go and the
//! daemon exits 143.
//!
//! ```ignore
//! let mut guard = DaemonGuard::builder(&socket_path, &pid_path)
//!     .signals(SignalMode::Graceful)
//!     .acquire()?;
//! let listener = guard.take_tokio_listener()?;
//! let server = tokio::spawn(
//!     axum::serve(listener, app)
//!         .with_graceful_shutdown(guard.shutdown().requested())
//!         .into_future(),
//! );
//! guard.ready()?;
//! guard.shutdown().requested().await;
//! let _ = tokio::time::timeout(DRAIN_TIMEOUT, server).await;
//! let code = guard.shutdown().exit_code(); // 143 after SIGTERM
//! guard.close()?;
//! std::process::exit(code);
//! ```
//!
//! The same with tokio alone (runs with `--features tokio`):
//!
//! ```
//! # #[cfg(feature = "tokio")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use historia_lifecycle::{DaemonGuard, SignalMode};
//!
//! let dir = tempfile::tempdir()?;
//! let mut guard = DaemonGuard::builder(dir.path().join("d.sock"), dir.path().join("d.pid"))
//!     .signals(SignalMode::Graceful)
//!     .acquire()?;
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! let code = rt.block_on(async {
//!     let listener = guard.take_tokio_listener()?;
//!     let server = tokio::spawn(async move {
//!         while let Ok((stream, _)) = listener.accept().await {
//!             tokio::spawn(async move {
//!                 if stream.writable().await.is_ok() {
//!                     let _ = stream.try_write(b"hello\n");
//!                 }
//!             });
//!         }
//!     });
//!     guard.ready()?;
//!     guard.shutdown().request(); // here; in a daemon, SIGTERM or a `stop` command
//!     guard.shutdown().requested().await;
//!     server.abort(); // stop accepting: the listener closes, connects are refused
//!     Ok::<_, Box<dyn std::error::Error>>(guard.shutdown().exit_code())
//! })?;
//! guard.close()?;
//! assert_eq!(code, 0); // 0 after request(), 143 after SIGTERM
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "tokio"))]
//! # fn main() {}
//! ```
//!
//! The guard gives its listener up rather than a `dup(2)`, so once the
//! server drops it new connections are refused; after
//! [`DaemonGuard::rebind`], take the fresh one again. A tokio
//! `signal(SignalKind::terminate())` stream, registered before or after
//! acquiring, sees SIGTERM too in [`SignalMode::Graceful`]; the default
//! [`SignalMode::Exit`] still removes the files and ends the process.
//! There is no tokio-util `CancellationToken` bridge: the future already
//! fits `select!` and every graceful-shutdown hook, and a token is three
//! lines away (spawn a task that awaits `requested()`, then `cancel()`s).
//!
//! # Design
//! - **One claim, several front doors.** Every guard rests on the same
//!   claim: an exclusive flock on the PID file, held for the guard's life.
//!   [`PidFileGuard`] is the claim with owned cleanup and signal handling;
//!   [`DaemonGuard`] is that plus a socket bound under the claim.
//! - **The lock decides, never the PID.** A PID file's number may be stale or
//!   recycled; the flock dies with its holder. A PID file that is empty,
//!   garbage, or names some unrelated process does not block a start.
//! - **Never destroy what is not provably ours.** The only proof that a
//!   socket is stale is `ECONNREFUSED` from `connect(2)` on a path that
//!   `lstat(2)` says is a socket. Regular files, directories, FIFOs and
//!   symlinks at our paths are reported with
//!   [`LifecycleError::UnexpectedFileType`] and left alone. Removal checks the
//!   device and inode first, and uses the paths made absolute at acquire, so
//!   a `chdir(2)` in between changes nothing.
//! - **No hangs.** Probes use a non-blocking `connect(2)`; PID files are
//!   opened `O_NONBLOCK|O_NOFOLLOW` and read with a 64-byte bound.
//! - **Synchronous core.** No async runtime is needed; acquiring runs
//!   before one starts (and daemonizing must: `fork(2)` keeps only the
//!   calling thread), and the shutdown future needs none.
//!
//! # Security
//! Put the socket and PID file in a private runtime dir: [`runtime_dir`]
//! gives `$XDG_RUNTIME_DIR/<app>` or `${TMPDIR:-/tmp}/<app>-<uid>`, mode 0700, and
//! refuses one owned by someone else or open to others, as tmux does. Every
//! descriptor is opened close-on-exec, and the PID file is never written
//! through a symlink.
//!
//! A PID file others can open is one they can lock: a local user who holds
//! `flock -s` on a 0644 PID file left by a SIGKILLed daemon blocks every
//! restart (each gets [`LifecycleError::AlreadyRunning`]) for as long as
//! they hold it. A private directory rules that out; where the directory is
//! shared (a system daemon in `/run`), make the file owner-only with
//! [`PidFileGuardBuilder::pid_file_mode`]`(0o600)`.
//!
//! # What cleanup cannot cover
//! SIGKILL, [`std::process::abort`], [`std::process::exit`],
//! `panic = "abort"` and power loss run no cleanup, so the files stay. The
//! next [`DaemonGuard::acquire`] reclaims them by itself: the dead holder's
//! flock is gone, so the PID file is replaced and the socket proven stale and
//! removed. [`DaemonInfo::cleanup`] does the same for tools.
//!
//! # The seed API
//! The free functions ([`check_singleton`], [`write_pid_file`],
//! [`read_pid_file`], [`cleanup_pid_file`], [`cleanup_socket_file`],
//! [`ensure_dir`]) and [`DaemonInfo`] are building blocks. They are safe to
//! call but take no lock, so two processes using only them can both start;
//! use [`DaemonGuard`] for exactly one.
//!
//! # Platform notes
//! Unix only; tested on Linux, compiled for macOS. `sun_path` holds 107 bytes
//! of path on Linux and 103 on macOS (`unix(7)`); longer socket paths are
//! refused with [`LifecycleError::PathTooLong`], never truncated.
//! [`running_pid`] reads `/proc/locks` on Linux and falls back to a trial lock
//! elsewhere. Without `/proc` (macOS, the BSDs) it cannot check that the PID
//! in the file still holds the lock, so when the locker has exited and a
//! child it forked without `exec` keeps the lock, it may name a recycled PID:
//! the weaker guarantee there. Across PID namespaces it names a holder it can
//! see by its PID in the caller's namespace, and answers
//! [`LifecycleError::HolderUnknown`] for one it cannot see, never the number
//! in the file.
//!
//! A Unix stream listener whose backlog is full answers `connect(2)` with
//! `EAGAIN` on Linux but with `ECONNREFUSED`, the stale socket's answer, on
//! macOS and the BSDs. So there the lockless [`check_singleton`] and
//! [`try_check_singleton`] never remove a refused socket
//! ([`SocketState::Refused`]; the answer is `AlreadyRunning`, also after a
//! crash); the guards and [`DaemonInfo::cleanup`], which hold the PID file's
//! claim while they look, reclaim it.

#![cfg(unix)]
// docs.rs marks the `tokio` feature's items (Cargo.toml sets `--cfg docsrs`).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![warn(rust_2018_idioms, unreachable_pub)]

mod activation;
mod chmod;
mod cleanup;
mod client;
mod daemonize;
mod error;
mod guard;
mod holder;
mod info;
mod listener;
mod notify;
mod paths;
mod pid_guard;
mod pidfile;
mod probe;
mod readiness;
mod rebind;
mod reload;
mod shutdown;
mod signal_thread;
mod signals;
mod sync;
mod sys;
#[cfg(feature = "tokio")]
mod tokio_listener;
mod waiters;

pub use activation::{activated_listener, Activation};
pub use client::{
    ensure_running, signal_daemon, stop, wait_for_exit, Connection, Launcher, Started, Stopped,
};
pub use daemonize::{Daemonize, DEFAULT_START_TIMEOUT, DEFAULT_UMASK, EXIT_START_FAILED};
pub use error::{FileKind, LifecycleError, Result};
pub use guard::{DaemonGuard, DaemonGuardBuilder, DEFAULT_BACKLOG, DEFAULT_SOCKET_MODE};
pub use info::DaemonInfo;
pub use notify::{scrub_service_env, Message, Notifier};
pub use paths::{
    ensure_dir, ensure_private_dir, runtime_dir, runtime_dir_path, DEFAULT_PID_NAME,
    DEFAULT_SOCKET_NAME,
};
pub use pid_guard::{PidFileGuard, PidFileGuardBuilder};
pub use pidfile::{cleanup_pid_file, read_pid_file, running_pid, write_pid_file, PID_FILE_MODE};
pub use probe::{
    check_singleton, cleanup_socket_file, probe_socket, try_check_singleton, SingletonCheck,
    SocketState,
};
pub use reload::{Reload, ReloadRequested, Reloading};
pub use shutdown::{Shutdown, ShutdownRequested};
pub use signals::{SignalAction, SignalMode};

// The README's and the seed description's snippets run as doctests, so the
// documented API cannot drift from the crate.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/seed.md")]
struct SeedDoctests;

#[cfg(doctest)]
#[doc = include_str!("../docs/service-managers.md")]
struct ServiceManagerDoctests;
