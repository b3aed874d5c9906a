//! What each signal does to a guard: [`SignalMode`] (the shorthands for
//! SIGTERM and SIGINT) and [`SignalAction`] (one signal at a time), kept per
//! guard in a [`SignalTable`]. The wiring that carries them out (the raw
//! handler, the helper thread, the registry of live guards) is in
//! `signal_thread.rs`.

use nix::libc;

use crate::error::{LifecycleError, Result};

/// What a guard does when the process receives SIGTERM or SIGINT: the
/// shorthand for [`SignalAction`]s on those two signals.
///
/// | mode | SIGTERM, SIGINT |
/// |---|---|
/// | [`Exit`](Self::Exit) (default) | [`SignalAction::Terminate`] |
/// | [`Graceful`](Self::Graceful) | [`SignalAction::Shutdown`] |
/// | [`Off`](Self::Off) | [`SignalAction::Leave`] |
///
/// Other signals (SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) are left alone unless
/// the builder's `on_signal` asks for them. The handling is installed at most
/// once per process and per signal and shared by all guards: acquiring and
/// dropping guards in a loop adds no handlers and no threads. A process holds
/// at most one helper thread, `historia-signal`.
///
/// # Coexisting with your own handlers
/// The crate registers its actions through signal-hook, which chains every
/// action registered for a signal, so actions you register with signal-hook
/// or tokio (`tokio::signal::unix::signal`, which uses the same registry),
/// before or after the guard, still run. With [`SignalAction::Terminate`]
/// the process then ends, so use [`SignalMode::Graceful`] (which never ends
/// it on the first signal) or [`SignalMode::Off`] if you want to decide
/// yourself. Handlers installed with raw `sigaction(2)` *after* a guard
/// replace the crate's and signal-hook's; install them first, or use
/// signal-hook.
///
/// # Inherited "ignored"
/// A signal that is ignored (`SIG_IGN`) when the first guard installs its
/// handling stays ignored for the shorthands: `nohup` ignores SIGHUP, and a
/// non-interactive shell starts `daemon &` with SIGINT and SIGQUIT ignored,
/// so such a daemon is not killed by a Ctrl-C meant for the shell. An
/// explicit `on_signal(sig, action)` is installed whatever the inherited
/// disposition: the daemon asked for it.
///
/// # After the last guard
/// signal-hook never removes a handler (nor restores `SIG_DFL`), so once
/// installed the crate's handler stays for the life of the process. With no
/// guard asking for a signal, the handler does what the process did before
/// it was installed: the default action (the process ends, as by the signal,
/// with a core dump for SIGQUIT), nothing for a signal that was ignored, and
/// for an earlier handler, that handler (signal-hook still calls it). What
/// stays visible: `sigaction(2)` reports a handler, not `SIG_DFL` or
/// `SIG_IGN`, and so a program this process later `exec`s starts with the
/// signal's default action where it would have inherited "ignored".
/// A process with guards still alive that receives a signal none of them
/// asked for (a handler installed for an earlier guard) removes their files
/// first when that signal's previous action was to end the process.
///
/// # Across `fork`
/// A child created with `fork(2)` (without `exec`) inherits the handler but is
/// not the guard's owner: a signal takes the child's previous disposition and
/// touches none of the parent's files. After `exec`, handlers are reset by
/// the kernel. A child that takes the claim over
/// ([`PidFileGuard::take_over_after_fork`](crate::PidFileGuard::take_over_after_fork),
/// or [`daemonize`](crate::PidFileGuardBuilder::daemonize)) gets its own
/// signal thread and the guard's actions from then on.
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
    /// Turn SIGTERM/SIGINT into a shutdown request: the guard's
    /// [`Shutdown`](crate::Shutdown) handle wakes, the daemon drains its work
    /// and drops the guard, which removes the files. A signal that arrives
    /// while a shutdown is already requested (by an earlier signal, or by
    /// [`Shutdown::request`](crate::Shutdown::request), e.g. a `stop`
    /// command) removes the files and ends the process as in
    /// [`SignalMode::Exit`], so a stuck drain can still be interrupted.
    Graceful,
    /// Install nothing for SIGTERM and SIGINT. The files are removed on Drop
    /// or [`close`](crate::DaemonGuard::close) only; use this when the
    /// application handles signals itself.
    Off,
}

/// What one signal does to a guard; set with `on_signal` on
/// [`DaemonGuardBuilder`](crate::DaemonGuardBuilder::on_signal) and
/// [`PidFileGuardBuilder`](crate::PidFileGuardBuilder::on_signal).
///
/// When guards of one process ask for different actions on the same signal,
/// each gets its own, in this order: every [`Reload`](Self::Reload) guard
/// is told; then, if any guard asks for [`Shutdown`](Self::Shutdown) and none
/// of those has a shutdown pending yet, each of them is asked to shut down
/// and the process goes on (a [`Terminate`](Self::Terminate) guard's files
/// stay until it is dropped or the process ends); otherwise, if any guard
/// asks for `Terminate` (or a `Shutdown` guard already had one pending), the
/// files of every guard in the process are removed and the process ends by
/// the signal.
///
/// # Signals during acquire
/// The thread that acquires blocks the signals its guard will act on
/// (`pthread_sigmask(3)`) from the start of the acquire until their handling
/// is installed, then restores its mask: a SIGTERM sent the moment the
/// socket listens (a client that connected and stopped the daemon at once)
/// is acted on then, with cleanup, instead of killing the process by the
/// default action with its files left. If the acquire fails, a held signal
/// gets the previous disposition after what was placed has been removed. A
/// thread only blocks signals for itself: in a program whose other threads
/// already run, the kernel may deliver such a signal to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignalAction {
    /// Remove the files of every guard in the process, then end the process
    /// by the signal's default action (status 128 + signal in a shell: 143
    /// for SIGTERM, 129 for SIGHUP; SIGQUIT also dumps core where enabled).
    Terminate,
    /// A graceful shutdown request on the guard's
    /// [`Shutdown`](crate::Shutdown) handle; a second signal while one is
    /// pending acts as [`Terminate`](Self::Terminate).
    Shutdown,
    /// A reload request on the guard's [`Reload`](crate::Reload) handle
    /// (SIGHUP by convention: re-read the configuration, reopen log files).
    Reload,
    /// Re-create the socket if it was deleted while the daemon runs (a tmp
    /// cleaner, an operator's `rm`), as tmux does on SIGUSR1: what
    /// [`DaemonGuard::rebind`](crate::DaemonGuard::rebind) does, from the
    /// signal thread, with the new socket moved onto the listener
    /// descriptor the guard holds, so an accept loop on
    /// [`DaemonGuard::listener`](crate::DaemonGuard::listener) serves it
    /// without knowing. Only for a [`DaemonGuard`](crate::DaemonGuard) that
    /// bound its socket; see `rebind` for what is never replaced.
    ///
    /// # The accept loop sees one error
    /// An `accept(2)` blocked on the old socket when the signal arrives
    /// returns `EINVAL` once (the old socket is shut down to wake it); the
    /// next call on the same descriptor accepts on the new socket. Write the
    /// loop to go on after an error (`for s in listener.incoming() { let
    /// Ok(s) = s else { continue }; … }`), not to end.
    ///
    /// # Copies of the listener
    /// A copy made with `try_clone` shares the old socket: shutting that
    /// down would make every later `accept(2)` on the copy fail at once (a
    /// busy loop). So when the guard's descriptor is not the old socket's
    /// only one (counted in `/proc/self/fd`, read only), or the copies
    /// cannot be counted (macOS and the BSDs: no `/proc`), the old socket
    /// is left alone: the new socket is still moved onto the guard's
    /// descriptor, but an accept blocked on the old one (on the guard's
    /// descriptor or a copy) stays blocked. Accept on
    /// [`DaemonGuard::listener`](crate::DaemonGuard::listener) itself to get
    /// the seamless switch, or call `rebind()` from your own loop. After
    /// [`take_listener`](crate::DaemonGuard::take_listener) the guard does
    /// not know the descriptor: the signal then only re-creates the file,
    /// and the next `take_listener` hands out the new listener. Errors are
    /// not reported (a signal has no caller); call `rebind()` to see them.
    Rebind,
    /// Install nothing for this signal on this guard's behalf.
    Leave,
}

/// The signals a guard can act on, in table order. SIGKILL and SIGSTOP cannot
/// be caught; SIGSEGV, SIGBUS, SIGFPE and SIGILL must not be (the fault would
/// recur); SIGCHLD, SIGPIPE, SIGALRM and the rest are not requests to a
/// daemon.
pub(crate) const SIGNALS: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The slot of `sig` in [`SIGNALS`], if it is one a guard can act on.
pub(crate) fn slot(sig: i32) -> Option<usize> {
    SIGNALS.iter().position(|&s| s == sig)
}

/// `SIGTERM` for 15, and so on; `signal N` for the rest.
pub(crate) fn signal_name(sig: i32) -> String {
    match signal_hook::low_level::signal_name(sig) {
        Some(name) => name.to_string(),
        None => format!("signal {sig}"),
    }
}

/// A guard's action for each signal in [`SIGNALS`], and which of them were
/// asked for explicitly (`on_signal`) rather than by a [`SignalMode`]
/// shorthand: only shorthands defer to an inherited `SIG_IGN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SignalTable {
    actions: [SignalAction; SIGNALS.len()],
    explicit: [bool; SIGNALS.len()],
    /// The first signal `on_signal` was given that a guard cannot act on,
    /// reported by `acquire` (builder methods do not fail).
    invalid: Option<i32>,
}

/// Why [`SignalAction::Rebind`] is refused for a guard without a socket.
pub(crate) fn rebind_needs_a_socket() -> LifecycleError {
    LifecycleError::InvalidArgument {
        what: "on_signal",
        reason: "SignalAction::Rebind re-creates a socket: only a DaemonGuard has one".into(),
    }
}

impl Default for SignalTable {
    fn default() -> Self {
        SignalTable::from_mode(SignalMode::Exit)
    }
}

impl SignalTable {
    /// The table for a shorthand: SIGTERM and SIGINT per `mode`, the rest
    /// left alone.
    pub(crate) fn from_mode(mode: SignalMode) -> Self {
        let mut table = SignalTable {
            actions: [SignalAction::Leave; SIGNALS.len()],
            explicit: [false; SIGNALS.len()],
            invalid: None,
        };
        table.set_mode(mode);
        table
    }

    /// A table that acts on no signal (installs nothing).
    pub(crate) fn none() -> Self {
        SignalTable::from_mode(SignalMode::Off)
    }

    /// Applies a shorthand to SIGTERM and SIGINT, replacing what they had.
    pub(crate) fn set_mode(&mut self, mode: SignalMode) {
        let action = match mode {
            SignalMode::Exit => SignalAction::Terminate,
            SignalMode::Graceful => SignalAction::Shutdown,
            SignalMode::Off => SignalAction::Leave,
        };
        for sig in [libc::SIGTERM, libc::SIGINT] {
            let i = slot(sig).expect("SIGTERM and SIGINT have slots");
            self.actions[i] = action;
            self.explicit[i] = false;
        }
    }

    /// Sets one signal's action explicitly; an unsupported signal is
    /// remembered and refused by [`validate`](Self::validate).
    pub(crate) fn set(&mut self, sig: i32, action: SignalAction) {
        match slot(sig) {
            Some(i) => {
                self.actions[i] = action;
                self.explicit[i] = true;
            }
            None => {
                self.invalid.get_or_insert(sig);
            }
        }
    }

    /// Refuses a table naming a signal a guard cannot act on.
    pub(crate) fn validate(&self) -> Result<()> {
        match self.invalid {
            None => Ok(()),
            Some(sig) => Err(LifecycleError::InvalidArgument {
                what: "on_signal",
                reason: format!(
                    "{} cannot be handled by a guard; the signals it can act on are \
                     SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2",
                    signal_name(sig)
                ),
            }),
        }
    }

    /// The action for slot `i`.
    pub(crate) fn action(&self, i: usize) -> SignalAction {
        self.actions[i]
    }

    /// Whether slot `i` was set with `on_signal`.
    pub(crate) fn is_explicit(&self, i: usize) -> bool {
        self.explicit[i]
    }

    /// This table with slot `i` left alone (an inherited `SIG_IGN`).
    pub(crate) fn leaving(mut self, i: usize) -> Self {
        self.actions[i] = SignalAction::Leave;
        self
    }

    /// Whether any signal asks for [`SignalAction::Rebind`].
    pub(crate) fn rebinds(&self) -> bool {
        self.actions.contains(&SignalAction::Rebind)
    }

    /// Whether any signal has an action.
    pub(crate) fn is_empty(&self) -> bool {
        self.actions.iter().all(|&a| a == SignalAction::Leave)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(t: &SignalTable, sig: i32) -> SignalAction {
        t.action(slot(sig).unwrap())
    }

    #[test]
    fn modes_set_sigterm_and_sigint_only() {
        for (mode, want) in [
            (SignalMode::Exit, SignalAction::Terminate),
            (SignalMode::Graceful, SignalAction::Shutdown),
            (SignalMode::Off, SignalAction::Leave),
        ] {
            let t = SignalTable::from_mode(mode);
            assert_eq!(action(&t, libc::SIGTERM), want);
            assert_eq!(action(&t, libc::SIGINT), want);
            for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2] {
                assert_eq!(action(&t, sig), SignalAction::Leave, "{mode:?} {sig}");
            }
            assert!(!t.is_explicit(0));
            assert_eq!(t.is_empty(), mode == SignalMode::Off);
        }
    }

    #[test]
    fn on_signal_overrides_and_a_later_mode_overrides_it_back() {
        let mut t = SignalTable::default();
        t.set(libc::SIGHUP, SignalAction::Reload);
        t.set(libc::SIGTERM, SignalAction::Shutdown);
        assert_eq!(action(&t, libc::SIGHUP), SignalAction::Reload);
        assert_eq!(action(&t, libc::SIGTERM), SignalAction::Shutdown);
        assert!(t.is_explicit(slot(libc::SIGTERM).unwrap()));
        assert_eq!(action(&t, libc::SIGINT), SignalAction::Terminate);
        t.set_mode(SignalMode::Off);
        assert_eq!(action(&t, libc::SIGTERM), SignalAction::Leave);
        assert!(!t.is_explicit(slot(libc::SIGTERM).unwrap()));
        assert_eq!(action(&t, libc::SIGHUP), SignalAction::Reload);
        assert!(!t.is_empty());
        assert!(t.validate().is_ok());
    }

    #[test]
    fn signals_a_guard_cannot_act_on_are_refused_by_name() {
        for sig in [
            libc::SIGKILL,
            libc::SIGSTOP,
            libc::SIGSEGV,
            libc::SIGCHLD,
            0,
            -1,
            999,
        ] {
            let mut t = SignalTable::default();
            t.set(sig, SignalAction::Terminate);
            t.set(libc::SIGPIPE, SignalAction::Reload); // only the first is named
            let err = t.validate().unwrap_err();
            assert!(matches!(
                err,
                LifecycleError::InvalidArgument {
                    what: "on_signal",
                    ..
                }
            ));
            let text = err.to_string();
            assert!(text.contains(&signal_name(sig)), "{text}");
            assert!(!text.contains("SIGPIPE cannot"), "{text}");
        }
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(999), "signal 999");
    }

    #[test]
    fn leaving_clears_one_slot() {
        let t = SignalTable::default().leaving(slot(libc::SIGINT).unwrap());
        assert_eq!(action(&t, libc::SIGINT), SignalAction::Leave);
        assert_eq!(action(&t, libc::SIGTERM), SignalAction::Terminate);
    }
}
