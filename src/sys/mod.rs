//! Every platform difference in the crate lives here: the `sun_path` limit,
//! close-on-exec descriptors, unnamed files, signalling a checked PID and how
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

// stream_socket, signal_pipe, unnamed_file_in, link_unnamed, signal_if,
// process_has_open, flock_holder.
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

/// Sets `O_NONBLOCK` on `fd`, keeping its other status flags.
fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Why [`signal_if`] failed: the caller's check, or the OS.
pub(crate) enum SignalError {
    Check(crate::LifecycleError),
    Os(std::io::Error),
}

/// Check, then `kill(2)`: the portable way, and Linux's fallback on kernels
/// without pidfds.
///
/// The signal stays a raw number on purpose: `signal_daemon` passes any
/// `i32` through to the kernel, and neither nix's `Signal` enum nor rustix's
/// `Signal` can carry 0 or the real-time signals, so a typed `kill` would
/// turn those into errors here.
fn kill_if(
    pid: u32,
    signal: i32,
    still_ours: impl FnOnce() -> Result<bool, crate::LifecycleError>,
) -> Result<bool, SignalError> {
    use nix::errno::Errno;
    if !still_ours().map_err(SignalError::Check)? {
        return Ok(false);
    }
    // SAFETY: kill(2) with a positive PID (checked by running_pid's parsing).
    let r = unsafe { nix::libc::kill(pid as nix::libc::pid_t, signal) };
    if r < 0 {
        return match Errno::last() {
            Errno::ESRCH => Ok(false),
            e => Err(SignalError::Os(e.into())),
        };
    }
    Ok(true)
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
