//! Every platform difference in the crate lives here: the `sun_path` limit and
//! how to learn which process holds a flock.

use std::fs::File;
use std::os::fd::OwnedFd;
#[cfg(any(target_os = "linux", target_os = "android"))]
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

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

/// A close-on-exec Unix stream socket, non-blocking if asked.
///
/// Linux and the BSDs set both flags atomically in `socket(2)`, so no
/// concurrent `fork`+`exec` can inherit the descriptor. macOS has no
/// `SOCK_CLOEXEC`; there the flags follow with `fcntl(2)`, as std does.
pub(crate) fn stream_socket(nonblocking: bool) -> nix::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblocking {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        socket(AddressFamily::Unix, SockType::Stream, flags, None)
    }
    #[cfg(target_vendor = "apple")]
    {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        set_cloexec(&fd)?;
        if nonblocking {
            set_nonblocking(&fd)?;
        }
        Ok(fd)
    }
}

/// A close-on-exec pipe whose write end is non-blocking: the self-pipe that a
/// signal handler writes to must never block it.
pub(crate) fn signal_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    #[cfg(target_vendor = "apple")]
    let (read, write) = {
        let (r, w) = nix::unistd::pipe()?;
        set_cloexec(&r)?;
        set_cloexec(&w)?;
        (r, w)
    };
    set_nonblocking(&write)?;
    Ok((read, write))
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

#[cfg(target_vendor = "apple")]
fn set_cloexec(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}

/// An unnamed regular file in `dir` (Linux `O_TMPFILE`), so a PID file can be
/// written and locked before it has a name: a process killed before
/// [`link_unnamed`] leaves nothing behind. `Ok(None)` where the kernel, the
/// filesystem or a missing `/proc` rules it out; the caller then falls back
/// to a named temp file.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn unnamed_file_in(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::OnceLock;
    // `link_unnamed` names the file through /proc/self/fd.
    static PROC_FD: OnceLock<bool> = OnceLock::new();
    if !*PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
        return Ok(None);
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => Ok(Some(f)),
        // Old kernels answer EISDIR, filesystems without support EOPNOTSUPP.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR | nix::libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Other platforms have no `O_TMPFILE`.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn unnamed_file_in(_dir: &Path) -> std::io::Result<Option<File>> {
    Ok(None)
}

/// Gives the unnamed `file` the name `path`, failing with `AlreadyExists` if
/// the name is taken: `linkat(2)` of `/proc/self/fd/N` with
/// `AT_SYMLINK_FOLLOW` (which, unlike `AT_EMPTY_PATH`, needs no capability).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn link_unnamed(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        proc_path.as_str(),
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )
    .map_err(std::io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn link_unnamed(_file: &File, _path: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
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
        match pidfd_open(pid) {
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
            Some(fd) => pidfd_send_signal(fd, signal),
            None => {
                let sig = match signal {
                    0 => None,
                    s => Some(nix::sys::signal::Signal::try_from(s)?),
                };
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig)
            }
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

#[cfg(any(target_os = "linux", target_os = "android"))]
fn pidfd_open(pid: u32) -> nix::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor
    // (close-on-exec, as every pidfd).
    let raw = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as nix::libc::pid_t, 0) };
    if raw < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: a successful pidfd_open returned a descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as i32) })
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn pidfd_open(_pid: u32) -> nix::Result<OwnedFd> {
    Err(nix::errno::Errno::ENOSYS)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a null siginfo (as kill(2)), no flags.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<nix::libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn pidfd_send_signal(_fd: &OwnedFd, _signal: i32) -> nix::Result<()> {
    Err(nix::errno::Errno::ENOSYS)
}

/// Whether process `pid` has the file `dev_ino` open, from `/proc/<pid>/fd`.
/// A lock holder always has its PID file open, so this tells a live holder
/// from a PID that `/proc/locks` or the file still names after its process
/// exited (the lock kept by a forked child) or was recycled. `None` where it
/// cannot tell: no `/proc`, or another user's process.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn process_has_open(pid: u32, dev_ino: (u64, u64)) -> Option<bool> {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(false),
        Err(_) => return None,
    };
    let found = entries.flatten().any(|entry| {
        // metadata() follows the magic link to the open file itself.
        std::fs::metadata(entry.path()).is_ok_and(|m| (m.dev(), m.ino()) == dev_ino)
    });
    Some(found)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn process_has_open(_pid: u32, _dev_ino: (u64, u64)) -> Option<bool> {
    None
}

/// Which process holds the exclusive flock on `file`, when the kernel can say.
///
/// Linux lists every flock in `/proc/locks` with the locker's PID and the
/// file's device and inode, so this reads the holder without touching the
/// lock. `Ok(None)` means no exclusive flock on that inode; `Err(())` means the
/// platform cannot tell (no `/proc`), and the caller falls back to a trial lock.
///
/// `/proc/locks` is a seq_file: one `read(2)` returns a consistent snapshot
/// of at most one buffer (a page) of lines, and the next `read(2)` resumes by
/// line *index*. When the list is longer than that and other processes lock or
/// unlock in between, lines shift and one can be skipped: perhaps our
/// holder's. So a miss counts only if the whole file came in one `read(2)`;
/// a file read in pieces is read again, a few times, before a miss is
/// believed. A hit is always genuine.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn flock_holder(file: &File) -> Result<Option<u32>, ()> {
    use std::io::Read;
    /// Reads of a torn (multi-`read(2)`) `/proc/locks` before a miss stands.
    const TORN_READS: usize = 16;
    let meta = file.metadata().map_err(drop)?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let mut text = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    for _ in 0..TORN_READS {
        let mut locks = File::open("/proc/locks").map_err(drop)?;
        text.clear();
        let mut reads = 0;
        loop {
            match locks.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    text.extend_from_slice(&chunk[..n]);
                    reads += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        let found = parse_proc_locks(&String::from_utf8_lossy(&text), major, minor, meta.ino());
        if found.is_some() || reads <= 1 {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Other platforms have no `/proc/locks`; the caller uses a trial lock.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn flock_holder(_file: &File) -> Result<Option<u32>, ()> {
    Err(())
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

/// Marks every descriptor from `first` up close-on-exec, in a child between
/// `fork` and `exec`, so the program gets only what is meant for it.
/// Async-signal-safe: one `close_range(2)` syscall (Linux 5.11+,
/// `CLOSE_RANGE_CLOEXEC`); older kernels answer ENOSYS and nothing changes
/// (std's own descriptors are close-on-exec anyway).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn cloexec_from(first: u32) {
    const CLOSE_RANGE_CLOEXEC: nix::libc::c_uint = 1 << 2;
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on
    // descriptors; it closes nothing and touches no memory.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first,
            nix::libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Elsewhere there is no portable async-signal-safe way to list open
/// descriptors; std's and this crate's are close-on-exec already.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn cloexec_from(_first: u32) {}

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
