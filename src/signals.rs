//! SIGTERM/SIGINT handling for guards: one process-wide self-pipe, one helper
//! thread (`historia-signal`), and a registry of the live guards.
//!
//! The raw handler (installed once through signal-hook, never removed) only
//! checks `getpid(2)` and writes one byte to a pipe: no allocation, no lock.
//! The helper thread does the real work in ordinary Rust: run the guards'
//! [`Cleanup`] and re-raise the signal with its default action, or wake the
//! graceful guards' [`Shutdown`] handles.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use nix::libc;

use crate::cleanup::Cleanup;
use crate::error::{LifecycleError, Result};
use crate::shutdown::Shutdown;
use crate::sync::lock;

/// What a guard does when the process receives SIGTERM or SIGINT.
///
/// Whatever the mode, the handling is installed at most once per process and
/// shared by all guards: acquiring and dropping guards in a loop adds no
/// handlers and no threads. A process holds at most one helper thread,
/// `historia-signal`.
///
/// # Coexisting with your own handlers
/// The crate registers its action through signal-hook, which chains every
/// action registered for a signal, so actions you register with signal-hook
/// (`flag::register`, `iterator::Signals`, …) still run. In
/// [`SignalMode::Exit`] the process then ends, so use
/// [`SignalMode::Graceful`] (which never ends it) or [`SignalMode::Off`] if
/// you want to decide yourself. Handlers installed with raw `sigaction`
/// *after* a guard replace the crate's and signal-hook's; install them first,
/// or use signal-hook.
///
/// Once installed, the action stays for the life of the process. With no guard
/// alive it emulates the default action (terminate), as if it were not there.
///
/// # Other signals
/// Only SIGTERM and SIGINT are handled. SIGHUP and SIGQUIT keep their
/// defaults (many daemons use SIGHUP to reload): they end the process without
/// cleanup, like SIGKILL, and the next start reclaims the files.
///
/// # Across `fork`
/// A child created with `fork(2)` (without `exec`) inherits the handler but is
/// not the guard's owner: on SIGTERM/SIGINT it takes the default action and
/// touches none of the parent's files. After `exec`, handlers are reset by
/// the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SignalMode {
    /// Default. On SIGTERM or SIGINT, remove the socket and PID file of every
    /// guard in the process, then re-raise the signal with its default action,
    /// so the process ends "killed by SIGTERM" (a shell shows status 143, or
    /// 130 for SIGINT). Works while every other thread is blocked in a
    /// syscall.
    #[default]
    Exit,
    /// Turn SIGTERM/SIGINT into a shutdown request: the guard's [`Shutdown`]
    /// handle wakes, the daemon drains its work and drops the guard, which
    /// removes the files. A signal that arrives while a shutdown is already
    /// requested (by an earlier signal, or by [`Shutdown::request`], e.g. a
    /// `stop` command) removes the files and ends the process as in
    /// [`SignalMode::Exit`], so a stuck drain can still be interrupted.
    Graceful,
    /// Install nothing. The files are removed on Drop or
    /// [`close`](crate::DaemonGuard::close) only; use this when the
    /// application handles signals itself.
    Off,
}

/// Write end of the self-pipe, read by the raw handler.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// The process the helper thread serves; a forked child sees another PID.
static OWNER_PID: AtomicI32 = AtomicI32::new(0);
/// signal-hook actions are registered once per process, and inherited by
/// forked children.
static ACTIONS_REGISTERED: AtomicBool = AtomicBool::new(false);

struct Entry {
    id: u64,
    mode: SignalMode,
    cleanup: Arc<Cleanup>,
    shutdown: Shutdown,
}

struct Registry {
    entries: Vec<Entry>,
    next_id: u64,
    /// The PID whose helper thread and pipe are set up; 0 before the first.
    installed_for: i32,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    entries: Vec::new(),
    next_id: 0,
    installed_for: 0,
});

/// A guard's place in the registry. [`Registration::unregister`] leaves it;
/// a registration merely dropped (after `keep()`) leaves it too, after
/// checking it is not a forked child's copy.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    pid: i32,
}

impl Registration {
    /// Leaves the registry. `is_owner` is the caller's answer to "is this
    /// the registering process?", which it already needed for its cleanup: a
    /// forked child's copy must not edit a registry that is not its own.
    pub(crate) fn unregister(self, is_owner: bool) {
        if is_owner {
            remove_entry(self.id);
        }
        std::mem::forget(self);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if nix::unistd::getpid().as_raw() == self.pid {
            remove_entry(self.id);
        }
    }
}

fn remove_entry(id: u64) {
    lock(&REGISTRY).entries.retain(|e| e.id != id);
}

/// Adds a guard's cleanup to the signal handling, installing the handler and
/// the helper thread on first use in this process.
pub(crate) fn register(
    mode: SignalMode,
    cleanup: Arc<Cleanup>,
    shutdown: Shutdown,
) -> Result<Option<Registration>> {
    if mode == SignalMode::Off {
        return Ok(None);
    }
    let pid = cleanup.owner() as i32;
    let mut reg = lock(&REGISTRY);
    if reg.installed_for != pid {
        install(&mut reg, pid).map_err(LifecycleError::Signals)?;
    }
    reg.next_id += 1;
    let id = reg.next_id;
    reg.entries.push(Entry {
        id,
        mode,
        cleanup,
        shutdown,
    });
    Ok(Some(Registration { id, pid }))
}

/// Sets up the pipe and helper thread for process `pid` (first use, or first
/// use in a forked child, whose registry copy holds its parent's guards).
fn install(reg: &mut Registry, pid: i32) -> io::Result<()> {
    if reg.installed_for != 0 {
        // We are a forked child: the parent's guards are not ours. Its pipe's
        // descriptors are left alone, not closed by number: the child may
        // have closed them already and reused the numbers for its own files.
        reg.entries.clear();
    }
    let (read, write) = crate::sys::signal_pipe().map_err(io::Error::from)?;
    std::thread::Builder::new()
        // 15 bytes: Linux truncates thread names (comm) longer than that.
        .name("historia-signal".into())
        .spawn(move || helper(File::from(read)))?;
    PIPE_WRITE.store(write.into_raw_fd(), Ordering::Release);
    OWNER_PID.store(pid, Ordering::Release);
    reg.installed_for = pid;
    if !ACTIONS_REGISTERED.swap(true, Ordering::AcqRel) {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: `on_signal` is async-signal-safe: it reads atomics and
            // calls getpid(2), write(2) and signal-hook's async-signal-safe
            // `emulate_default_handler`. It neither allocates nor locks.
            unsafe { signal_hook::low_level::register(sig, move || on_signal(sig)) }?;
        }
    }
    Ok(())
}

/// The raw signal action. Runs in signal context.
fn on_signal(sig: i32) {
    if nix::unistd::getpid().as_raw() != OWNER_PID.load(Ordering::Acquire) {
        // A forked child without guards of its own: behave as if we were not
        // installed.
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        return;
    }
    let fd = PIPE_WRITE.load(Ordering::Acquire);
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; `byte` outlives the call. A full
    // pipe (EAGAIN) only drops a duplicate wake-up.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// The helper thread: turns signal bytes into cleanup or shutdown requests.
fn helper(mut pipe: File) {
    let mut buf = [0u8; 32];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                for &sig in &buf[..n] {
                    dispatch(i32::from(sig));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn dispatch(sig: i32) {
    let reg = lock(&REGISTRY);
    let mut graceful = reg
        .entries
        .iter()
        .filter(|e| e.mode == SignalMode::Graceful)
        .peekable();
    let forced = reg
        .entries
        .iter()
        .any(|e| e.mode == SignalMode::Graceful && e.shutdown.is_requested());
    if graceful.peek().is_some() && !forced {
        graceful.for_each(|e| e.shutdown.set(sig));
        return;
    }
    for e in &reg.entries {
        // Best effort: the process ends next whatever happens here. The
        // helper thread only runs in the process that installed it, the
        // owner of every registered entry.
        let _ = e.cleanup.run(true);
    }
    // The registry stays locked while the process dies, so no guard can be
    // dropped or acquired half-way.
    let _ = signal_hook::low_level::emulate_default_handler(sig);
    // Only reached if someone ignores the signal behind our back.
    std::process::exit(128 + sig);
}
