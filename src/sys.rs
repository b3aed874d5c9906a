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

/// Why [`signal_if`] failed: the caller's check, or the OS.
pub(crate) enum SignalError {
    Check(crate::LifecycleError),
    Os(std::io::Error),
}

/// Sends `signal` to `pid` if `still_ours()` confirms it, returning whether it
/// was sent (`false`: the check failed or the process is gone).
///
/// Linux: the pidfd is opened before the check, so the signal reaches the
/// process that was checked even if `pid` is recycled meanwhile.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn signal_if(
    pid: u32,
    signal: i32,
    still_ours: impl FnOnce() -> Result<bool, crate::LifecycleError>,
) -> Result<bool, SignalError> {
    use nix::errno::Errno;
    use nix::libc;
    use std::os::fd::{AsRawFd, FromRawFd};

    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if raw < 0 {
        return match Errno::last() {
            Errno::ESRCH => Ok(false),
            // Kernel older than 5.3: check, then kill(2).
            Errno::ENOSYS => kill_if(pid, signal, still_ours),
            e => Err(SignalError::Os(e.into())),
        };
    }
    // SAFETY: a successful pidfd_open returned a descriptor we now own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    if !still_ours().map_err(SignalError::Check)? {
        return Ok(false);
    }
    // SAFETY: a valid pidfd, a null siginfo (as kill(2)), no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return match Errno::last() {
            Errno::ESRCH => Ok(false),
            e => Err(SignalError::Os(e.into())),
        };
    }
    Ok(true)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn signal_if(
    pid: u32,
    signal: i32,
    still_ours: impl FnOnce() -> Result<bool, crate::LifecycleError>,
) -> Result<bool, SignalError> {
    kill_if(pid, signal, still_ours)
}

/// Check, then `kill(2)`: the portable fallback.
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
    let meta = file.metadata().map_err(drop)?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    flock_holder_key(major, minor, meta.ino())
}

/// [`flock_holder`] for the lock-table key `major:minor:ino` itself (see
/// `holder::lock_key_if_different` for when it is not `stat(2)`'s).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn flock_holder_key(major: u64, minor: u64, ino: u64) -> Result<Option<u32>, ()> {
    use std::io::Read;
    /// Reads of a torn (multi-`read(2)`) `/proc/locks` before a miss stands.
    const TORN_READS: usize = 16;
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
        let found = parse_proc_locks(&String::from_utf8_lossy(&text), major, minor, ino);
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
