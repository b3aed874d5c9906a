//! Every platform difference in the crate lives here: the `sun_path` limit,
//! close-on-exec descriptors, unnamed files, pinning a process to signal and
//! wait for, and how
//! to learn which process holds a flock.
//!
//! This file holds what every platform shares; the one switch below picks
//! `linux.rs` (Linux and Android: `O_TMPFILE`, pidfds, `/proc`) or
//! `other.rs` (macOS and the BSDs), which define the same `pub(crate)` items.

use std::os::fd::OwnedFd;

#[cfg_attr(any(target_os = "linux", target_os = "android"), path = "linux.rs")]
#[cfg_attr(
    not(any(target_os = "linux", target_os = "android")),
    path = "other.rs"
)]
mod imp;

// stream_socket, signal_pipe, cloexec_pipe, unnamed_file_in, link_unnamed,
// pidfd_open, pidfd_send_signal, cloexec_from, process_has_open,
// flock_holder, exchange, other_threads.
pub(crate) use imp::*;

/// Longest socket path, in bytes, that fits `sun_path` with its NUL: 107 on
/// Linux (`sun_path[108]`), 103 on macOS and the BSDs (`sun_path[104]`). See
/// `unix(7)`.
pub(crate) const SUN_PATH_MAX: usize = {
    // Sized from libc's own struct so every target gets its real limit.
    let addr: std::mem::MaybeUninit<nix::libc::sockaddr_un> = std::mem::MaybeUninit::uninit();
    // SAFETY: only the field's size is taken; nothing is read.
    let len = unsafe { std::mem::size_of_val(&(*addr.as_ptr()).sun_path) };
    len - 1
};

/// The descriptors open in this process: the entries of `/proc/self/fd`
/// (Linux) or `/dev/fd` (macOS, the BSDs), else every number below
/// `sysconf(_SC_OPEN_MAX)` (at most 65536) that `fcntl(F_GETFD)` accepts.
/// The directory's own descriptor is left out.
pub(crate) fn open_fds() -> Vec<std::os::fd::RawFd> {
    use std::os::fd::RawFd;
    for dir in ["/proc/self/fd", "/dev/fd"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut fds: Vec<RawFd> = entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            // The listing's own descriptor is closed by now.
            fds.retain(|&fd| fd_flags(fd).is_some());
            fds.sort_unstable();
            return fds;
        }
    }
    // SAFETY: sysconf(3) only reads a limit; nix wraps it only behind its
    // "feature" feature, which this crate does not enable.
    let max = unsafe { nix::libc::sysconf(nix::libc::_SC_OPEN_MAX) };
    let max = if max <= 0 { 1024 } else { max.min(65536) } as RawFd;
    (0..max).filter(|&fd| fd_flags(fd).is_some()).collect()
}

/// `fcntl(F_GETFD)` of `fd`: its descriptor flags, `None` when it is not
/// open.
pub(crate) fn fd_flags(fd: std::os::fd::RawFd) -> Option<nix::fcntl::FdFlag> {
    // SAFETY: only borrowed for one fcntl; a closed number answers EBADF.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_GETFD)
        .ok()
        .map(nix::fcntl::FdFlag::from_bits_truncate)
}

/// Sets `O_NONBLOCK` on `fd`, keeping its other status flags.
fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// A process to signal and wait for, pinned as early as possible: on Linux
/// 5.3+ a pidfd (`pidfd_open(2)`), so a recycled PID can never receive our
/// signal or end our wait; elsewhere, or where `pidfd_open` is missing or
/// refused (old kernels, seccomp sandboxes answering ENOSYS or EPERM), the
/// bare PID with `kill(2)`.
#[derive(Debug)]
pub(crate) struct Process {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl Process {
    /// Pins `pid`; `Ok(None)` when no such process exists.
    pub(crate) fn open(pid: u32) -> std::io::Result<Option<Process>> {
        let pid_t = nix::unistd::Pid::from_raw(pid as nix::libc::pid_t);
        match imp::pidfd_open(pid) {
            Ok(fd) => Ok(Some(Process {
                pid,
                pidfd: Some(fd),
            })),
            Err(nix::errno::Errno::ESRCH) => Ok(None),
            Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) => {
                match nix::sys::signal::kill(pid_t, None) {
                    Err(nix::errno::Errno::ESRCH) => Ok(None),
                    _ => Ok(Some(Process { pid, pidfd: None })),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The PID.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` (`0` only checks); `Ok(false)` when the process is
    /// gone. `EPERM` is an error: alive, but not ours to signal.
    pub(crate) fn signal(&self, signal: i32) -> std::io::Result<bool> {
        use nix::errno::Errno;
        let r = match &self.pidfd {
            Some(fd) => imp::pidfd_send_signal(fd, signal),
            // A raw number on purpose: nix's and rustix's typed `Signal` cannot
            // carry 0 or the real-time signals that `signal_daemon` passes on.
            // SAFETY: kill(2) with a positive PID (running_pid's parsing
            // bounds it to 1..=i32::MAX).
            None => nix::errno::Errno::result(unsafe {
                nix::libc::kill(self.pid as nix::libc::pid_t, signal)
            })
            .map(drop),
        };
        match r {
            Ok(()) => Ok(true),
            Err(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until the process has exited, at most `timeout`; returns
    /// whether it did. With a pidfd this is one `poll(2)` (it becomes
    /// readable at exit); without, `kill(pid, 0)` every few milliseconds.
    pub(crate) fn wait_exit(&self, timeout: std::time::Duration) -> bool {
        use std::os::fd::AsFd;
        use std::time::Instant;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(fd) = &self.pidfd {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                    Ok(n) if n > 0 => return true,
                    Ok(_) if left.is_zero() => return false,
                    _ => continue, // EINTR, or a longer wait than u16 ms
                }
            }
            if !matches!(self.signal(0), Ok(true)) {
                return true;
            }
            if left.is_zero() {
                return false;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(5)));
        }
    }
}

/// Finds the PID holding an exclusive `FLOCK` on `major:minor:ino` in the text
/// of `/proc/locks` (format in `proc(5)`): lines such as
/// `3: FLOCK  ADVISORY  WRITE 4242 00:1a:5120 0 EOF`. Waiters (`->`) are
/// skipped. `Some(0)`: held by a process whose PID this namespace cannot see.
// Pure parsing, unit-tested on every platform; only Linux calls it.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
pub(crate) fn parse_proc_locks(text: &str, major: u64, minor: u64, ino: u64) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _ordinal = fields.next()?;
        let mut class = fields.next()?;
        if class == "->" {
            return None;
        }
        if class != "FLOCK" {
            // An OFD or POSIX lock line ("OFDLCK", "POSIX"): not ours.
            class = "";
        }
        let _advisory = fields.next()?;
        let access = fields.next()?;
        let pid = fields.next()?;
        let id = fields.next()?;
        if class.is_empty() || access != "WRITE" {
            return None;
        }
        let mut parts = id.split(':');
        let maj = u64::from_str_radix(parts.next()?, 16).ok()?;
        let min = u64::from_str_radix(parts.next()?, 16).ok()?;
        let i: u64 = parts.next()?.parse().ok()?;
        if (maj, min, i) != (major, minor, ino) {
            return None;
        }
        // 0 means the holder is outside our PID namespace: held, PID unknown.
        pid.parse::<u32>().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
1: POSIX  ADVISORY  WRITE 900 00:1a:5120 0 EOF
2: FLOCK  ADVISORY  READ 901 00:1a:5120 0 EOF
3: FLOCK  ADVISORY  WRITE 4242 fd:01:5120 0 EOF
3: -> FLOCK  ADVISORY  WRITE 4243 00:1a:5120 0 EOF
4: FLOCK  ADVISORY  WRITE 77 00:1a:5120 0 EOF
";

    #[test]
    fn proc_locks_finds_the_exclusive_flock_on_that_inode_only() {
        assert_eq!(parse_proc_locks(SAMPLE, 0, 0x1a, 5120), Some(77));
        assert_eq!(parse_proc_locks(SAMPLE, 0xfd, 1, 5120), Some(4242));
        assert_eq!(parse_proc_locks(SAMPLE, 0, 0x1a, 5121), None);
        assert_eq!(parse_proc_locks("", 0, 0x1a, 5120), None);
        assert_eq!(parse_proc_locks("garbage line\n\n1:", 0, 0x1a, 5120), None);
        let hidden = "1: FLOCK  ADVISORY  WRITE 0 00:1a:9 0 EOF\n";
        assert_eq!(parse_proc_locks(hidden, 0, 0x1a, 9), Some(0));
    }

    #[test]
    fn sun_path_limit_matches_the_platform() {
        #[cfg(target_os = "linux")]
        assert_eq!(SUN_PATH_MAX, 107);
        #[cfg(target_os = "macos")]
        assert_eq!(SUN_PATH_MAX, 103);
    }
}

/// A signal's disposition before this crate installed a handler for it, as
/// `sigaction(2)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Disposition {
    /// `SIG_DFL`: the signal's default action.
    Default = 0,
    /// `SIG_IGN`: inherited as ignored (`nohup`, `cmd &` in a script).
    Ignore = 1,
    /// A handler someone installed before us; signal-hook keeps calling it.
    Handler = 2,
}

impl Disposition {
    /// The disposition stored as `code` (`Disposition as u8`).
    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 => Disposition::Ignore,
            2 => Disposition::Handler,
            _ => Disposition::Default,
        }
    }
}

/// The current disposition of `sig`, read without changing it.
pub(crate) fn disposition(sig: i32) -> std::io::Result<Disposition> {
    use nix::libc;
    // nix's `sigaction` always installs a new action; reading needs libc's
    // with a null `act`.
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with a null `act`, sigaction(2) only writes the current action
    // into `old`, which is large enough for it.
    if unsafe { libc::sigaction(sig, std::ptr::null(), old.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call (and zeroed before it).
    let old = unsafe { old.assume_init() };
    Ok(match old.sa_sigaction {
        libc::SIG_DFL => Disposition::Default,
        libc::SIG_IGN => Disposition::Ignore,
        _ => Disposition::Handler,
    })
}

/// Makes descriptor `target` (a listening socket) refer to the socket `new`
/// instead, keeping its number and `FD_CLOEXEC`, then shuts the old socket
/// down so an `accept(2)` blocked on it returns (`EINVAL` on Linux) and the
/// next one on `target` takes the new socket's connections.
pub(crate) fn replace_listener(
    new: std::os::fd::BorrowedFd<'_>,
    target: std::os::fd::RawFd,
) -> std::io::Result<bool> {
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // A second reference to the old socket, to shut it down once `target`
    // no longer names it.
    // SAFETY: fcntl(2) F_DUPFD_CLOEXEC on a descriptor the caller vouches
    // for; the result is a fresh descriptor we own.
    let old =
        unsafe { OwnedFd::from_raw_fd(check(libc::fcntl(target, libc::F_DUPFD_CLOEXEC, 0))?) };
    // `target` and our `old`: nobody else's.
    let alone = imp::descriptors_of_socket(target) == Some(2);
    imp::dup_cloexec_onto(new.as_raw_fd(), target)?;
    if alone {
        // SAFETY: shutdown(2) on the descriptor we own. Best effort: the old
        // socket's file is gone already, so nobody can connect to it anyway.
        unsafe { libc::shutdown(old.as_raw_fd(), libc::SHUT_RDWR) };
    }
    Ok(alone)
}
