//! The wiring behind [`SignalAction`]: one process-wide self-pipe, one
//! helper thread (`historia-signal`), and a registry of the live guards.
//!
//! The raw handler (installed through signal-hook at most once per signal,
//! never removed) only checks `getpid(2)` and writes one byte to a pipe: no
//! allocation, no lock. The helper thread does the real work in ordinary
//! Rust, under the registry's lock: wake the guards' [`Shutdown`] or
//! [`Reload`] handles, or run their [`Cleanup`] and re-raise the signal with
//! its default action.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::cleanup::Cleanup;
use crate::error::{LifecycleError, Result};
use crate::rebind::SocketSlot;
use crate::reload::Reload;
use crate::shutdown::Shutdown;
use crate::signals::{slot, SignalAction, SignalTable, SIGNALS};
use crate::sync::lock;
use crate::sys::Disposition;

/// Write end of the self-pipe, read by the raw handler.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
/// The process the helper thread serves; a forked child sees another PID.
static OWNER_PID: AtomicI32 = AtomicI32::new(0);
/// No helper thread reads the pipe `PIPE_WRITE` writes to (its pipe was
/// closed under it, by code closing descriptors it does not own, and could
/// not be replaced yet): the raw handler falls back to the previous
/// disposition, and the next guard starts a new helper.
static HELPER_DEAD: AtomicBool = AtomicBool::new(false);
/// Per slot of [`SIGNALS`]: the disposition the signal had before our
/// handler was installed, as a [`Disposition`] code, read by the raw handler.
static PREVIOUS: [AtomicU8; SIGNALS.len()] = [const { AtomicU8::new(0) }; SIGNALS.len()];

struct Entry {
    id: u64,
    /// The guard's table, with the shorthands that defer to an inherited
    /// `SIG_IGN` already cleared.
    table: SignalTable,
    cleanup: Arc<Cleanup>,
    shutdown: Shutdown,
    reload: Reload,
    socket: Option<Arc<SocketSlot>>,
}

struct Registry {
    entries: Vec<Entry>,
    next_id: u64,
    /// The PID whose helper thread and pipe are set up; 0 before the first.
    installed_for: i32,
    /// Per slot: signal-hook's action is registered (inherited by a forked
    /// child, like the handler itself).
    hooked: [bool; SIGNALS.len()],
    /// Counts helper threads started; a helper whose number is no longer
    /// this one was replaced and must not touch the pipe.
    helper_gen: u64,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    entries: Vec::new(),
    next_id: 0,
    installed_for: 0,
    hooked: [false; SIGNALS.len()],
    helper_gen: 0,
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

/// The handles a signal acts on for one guard.
pub(crate) struct Handles {
    pub(crate) cleanup: Arc<Cleanup>,
    pub(crate) shutdown: Shutdown,
    pub(crate) reload: Reload,
    /// The socket a [`SignalAction::Rebind`] re-creates; `None` for a guard
    /// without one.
    pub(crate) socket: Option<Arc<SocketSlot>>,
}

/// The signals a table acts on, blocked in the calling thread from the
/// start of an acquire until the guard's handling is installed, and
/// unblocked (the previous mask restored) on drop.
///
/// Without it a SIGTERM between `listen(2)` and the handlers' installation
/// (a client that connected at once and then stopped the daemon, as
/// [`stop`](crate::stop) right after [`ensure_running`](crate::ensure_running)
/// does) killed the process by the default action with both files left.
/// Held, the signal stays pending and is acted on as soon as the mask is
/// restored: with the handling installed (the files go, the process ends
/// by the signal), or, if the acquire failed, by the previous disposition
/// with nothing of ours left on disk. A thread only masks itself: in a
/// program whose other threads already run, the kernel may hand such a
/// signal to one of those instead.
pub(crate) struct HeldSignals(Option<nix::sys::signal::SigSet>);

impl HeldSignals {
    /// Blocks what `table` acts on; nothing if it acts on nothing.
    pub(crate) fn hold(table: &SignalTable) -> Self {
        use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
        if table.is_empty() {
            return HeldSignals(None);
        }
        let mut set = SigSet::empty();
        for (i, &sig) in SIGNALS.iter().enumerate() {
            if table.action(i) != SignalAction::Leave {
                if let Ok(sig) = Signal::try_from(sig) {
                    set.add(sig);
                }
            }
        }
        let mut old = SigSet::empty();
        // Cannot fail for SIG_BLOCK with a valid set; if it did, nothing is
        // held and nothing is restored.
        match pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)) {
            Ok(()) => HeldSignals(Some(old)),
            Err(_) => HeldSignals(None),
        }
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&old),
                None,
            );
        }
    }
}

/// Adds a guard to the signal handling: installs the helper thread on first
/// use in this process (or again, if it ended), and each signal's handler on
/// the first guard that asks for it. `Ok(None)` for a table that acts on
/// nothing (nothing is installed then).
///
/// A failure half-way (a pipe or thread that cannot be made, a handler
/// refused) adds no entry and leaves what was installed in place, so the next
/// guard only installs what is missing.
pub(crate) fn register(table: SignalTable, handles: Handles) -> Result<Option<Registration>> {
    table.validate()?;
    if table.rebinds() && handles.socket.is_none() {
        return Err(crate::signals::rebind_needs_a_socket());
    }
    if table.is_empty() {
        return Ok(None);
    }
    let pid = handles.cleanup.owner() as i32;
    let mut reg = lock(&REGISTRY);
    if reg.installed_for != pid || HELPER_DEAD.load(Ordering::Acquire) {
        start_helper(&mut reg, pid).map_err(LifecycleError::Signals)?;
    }
    let mut effective = table;
    for (i, &sig) in SIGNALS.iter().enumerate() {
        if table.action(i) == SignalAction::Leave {
            continue;
        }
        if !reg.hooked[i] {
            // Read before installing: afterwards it is ours.
            let before = crate::sys::disposition(sig).map_err(LifecycleError::Signals)?;
            PREVIOUS[i].store(before as u8, Ordering::Release);
            if before == Disposition::Ignore && !table.is_explicit(i) {
                effective = effective.leaving(i);
                continue;
            }
            // SAFETY: `on_signal` is async-signal-safe: it reads atomics and
            // calls getpid(2), write(2) and signal-hook's async-signal-safe
            // `emulate_default_handler`. It neither allocates nor locks.
            unsafe { signal_hook::low_level::register(sig, move || on_signal(sig, i)) }
                .map_err(LifecycleError::Signals)?;
            reg.hooked[i] = true;
        } else if previous(i) == Disposition::Ignore && !table.is_explicit(i) {
            effective = effective.leaving(i);
        }
    }
    reg.next_id += 1;
    let id = reg.next_id;
    reg.entries.push(Entry {
        id,
        table: effective,
        cleanup: handles.cleanup,
        shutdown: handles.shutdown,
        reload: handles.reload,
        socket: handles.socket,
    });
    Ok(Some(Registration { id, pid }))
}

fn previous(i: usize) -> Disposition {
    Disposition::from_code(PREVIOUS[i].load(Ordering::Acquire))
}

/// Sets up the pipe and helper thread for process `pid`: on first use, on
/// first use in a forked child (whose registry copy holds its parent's
/// guards), or after the helper ended.
fn start_helper(reg: &mut Registry, pid: i32) -> io::Result<()> {
    if reg.installed_for != pid && reg.installed_for != 0 {
        // We are a forked child: the parent's guards are not ours. Its pipe's
        // descriptors are left alone, not closed by number: the child may
        // have closed them already and reused the numbers for its own files.
        reg.entries.clear();
    }
    // After the helper ended in this process the old write end is leaked,
    // not closed: whoever closed the read end under the helper may have
    // closed it too, and its number may be someone else's file now.
    let (read, write) = crate::sys::signal_pipe().map_err(io::Error::from)?;
    let gen = reg.helper_gen + 1;
    std::thread::Builder::new()
        // 15 bytes: Linux truncates thread names (comm) longer than that.
        .name("historia-signal".into())
        .spawn(move || helper(File::from(read), gen))?;
    reg.helper_gen = gen;
    PIPE_WRITE.store(write.into_raw_fd(), Ordering::Release);
    OWNER_PID.store(pid, Ordering::Release);
    HELPER_DEAD.store(false, Ordering::Release);
    reg.installed_for = pid;
    Ok(())
}

/// The raw signal action. Runs in signal context.
fn on_signal(sig: i32, i: usize) {
    if nix::unistd::getpid().as_raw() == OWNER_PID.load(Ordering::Acquire)
        && !HELPER_DEAD.load(Ordering::Acquire)
    {
        let fd = PIPE_WRITE.load(Ordering::Acquire);
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` outlives the call.
        let n = unsafe { nix::libc::write(fd, (&byte as *const u8).cast(), 1) };
        if n == 1 || nix::errno::Errno::last() == nix::errno::Errno::EAGAIN {
            // Written, or the pipe is full of wake-ups already: the helper
            // will see this signal's byte or an earlier one of the same.
            return;
        }
        // EPIPE or EBADF: someone closed a descriptor of ours. The helper
        // cannot hear us any more; the next guard starts a new one.
        HELPER_DEAD.store(true, Ordering::Release);
    }
    // A forked child without guards of its own, or no helper to hand the
    // signal to: what the process did before we were installed.
    if previous(i) == Disposition::Default {
        let _ = signal_hook::low_level::emulate_default_handler(sig);
    }
}

/// The helper thread: turns signal bytes into requests or cleanup. `gen`
/// is its number in the registry.
fn helper(mut pipe: File, gen: u64) {
    let mut buf = [0u8; 32];
    loop {
        match pipe.read(&mut buf) {
            Ok(n) if n > 0 => {
                for &sig in &buf[..n] {
                    dispatch(i32::from(sig));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            _ => {
                // End of file or EBADF: only code closing descriptors it
                // does not own gets here. The number may name another file
                // by now: never close it again.
                let _ = pipe.into_raw_fd();
                match heal(gen) {
                    Some(fresh) => pipe = fresh,
                    None => return,
                }
            }
        }
    }
}

/// Replaces a broken self-pipe from the helper thread itself, so signals
/// reach it again without waiting for another guard. `None` when this
/// helper was replaced meanwhile, or no pipe can be made (then the next
/// guard starts a new helper).
fn heal(gen: u64) -> Option<File> {
    let reg = lock(&REGISTRY);
    if reg.helper_gen != gen {
        return None;
    }
    match crate::sys::signal_pipe() {
        Ok((read, write)) => {
            // The old write end is leaked, as in `start_helper`.
            PIPE_WRITE.store(write.into_raw_fd(), Ordering::Release);
            HELPER_DEAD.store(false, Ordering::Release);
            Some(File::from(read))
        }
        Err(_) => {
            HELPER_DEAD.store(true, Ordering::Release);
            None
        }
    }
}

/// Carries out signal `sig` for every registered guard (see
/// [`SignalAction`] for the order).
fn dispatch(sig: i32) {
    let Some(i) = slot(sig) else { return };
    let reg = lock(&REGISTRY);
    let (mut asked, mut terminate, mut graceful, mut forced) = (false, false, false, false);
    for e in &reg.entries {
        match e.table.action(i) {
            SignalAction::Reload => {
                e.reload.set(sig);
                asked = true;
            }
            SignalAction::Shutdown => {
                graceful = true;
                forced |= e.shutdown.is_requested();
            }
            SignalAction::Terminate => terminate = true,
            SignalAction::Rebind => {
                if let Some(socket) = &e.socket {
                    socket.rebind_from_signal(&e.cleanup);
                }
                asked = true;
            }
            SignalAction::Leave => {}
        }
    }
    if graceful && !forced {
        for e in &reg.entries {
            if e.table.action(i) == SignalAction::Shutdown {
                e.shutdown.set(sig);
            }
        }
        return;
    }
    if !terminate && !forced && (asked || previous(i) != Disposition::Default) {
        // Reload or rebind only; or no guard asked for the signal and it did not end
        // the process before us (ignored, or a handler signal-hook calls).
        return;
    }
    // Terminate, a second signal during a graceful shutdown, or a signal
    // whose previous action ends the process: leave nothing behind first.
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
