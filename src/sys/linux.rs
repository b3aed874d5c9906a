//! Linux and Android: atomic close-on-exec flags, `O_TMPFILE`, pidfds and
//! `/proc`. Chosen by the one switch in `sys/mod.rs`; `other.rs` defines the
//! same items for every other Unix.

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use super::{parse_proc_locks, set_nonblocking};

/// A close-on-exec Unix stream socket, non-blocking if asked.
///
/// Both flags are set atomically in `socket(2)`, so no concurrent
/// `fork`+`exec` can inherit the descriptor.
pub(crate) fn stream_socket(nonblocking: bool) -> nix::Result<OwnedFd> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    socket(AddressFamily::Unix, SockType::Stream, flags, None)
}

/// A close-on-exec pipe whose write end is non-blocking: the self-pipe that a
/// signal handler writes to must never block it.
pub(crate) fn signal_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = cloexec_pipe()?;
    set_nonblocking(&write)?;
    Ok((read, write))
}

/// A close-on-exec pipe, atomically (`pipe2(2)`), so no concurrent
/// `fork`+`exec` can inherit it.
pub(crate) fn cloexec_pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
}

/// An unnamed regular file in `dir` (`O_TMPFILE`), so a PID file can be
/// written and locked before it has a name: a process killed before
/// [`link_unnamed`] leaves nothing behind. `Ok(None)` where the kernel, the
/// filesystem or a missing `/proc` rules it out; the caller then falls back
/// to a named temp file.
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

/// Gives the unnamed `file` the name `path`, failing with `AlreadyExists` if
/// the name is taken: `linkat(2)` of `/proc/self/fd/N` with
/// `AT_SYMLINK_FOLLOW` (which, unlike `AT_EMPTY_PATH`, needs no capability).
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

/// Swaps the files at `a` and `b` in one step (`renameat2(2)` with
/// `RENAME_EXCHANGE`), both of which must exist. `Ok(false)` where the
/// kernel, the filesystem or the C library cannot (`EINVAL`, `ENOSYS`, not
/// glibc); the caller then falls back to `rename(2)`.
pub(crate) fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::errno::Errno;
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, a, AT_FDCWD, b, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => Ok(true),
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// The names (`comm`) of every thread in this process but the calling one,
/// from `/proc/self/task`; `None` without `/proc`.
pub(crate) fn other_threads() -> Option<Vec<String>> {
    let me = nix::unistd::gettid().as_raw().to_string();
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let names = tasks
        .flatten()
        .filter(|t| t.file_name().to_str() != Some(me.as_str()))
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim_end().to_owned())
                .unwrap_or_else(|_| "?".into())
        })
        .collect();
    Some(names)
}

pub(crate) fn pidfd_open(pid: u32) -> nix::Result<OwnedFd> {
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

pub(crate) fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> nix::Result<()> {
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

/// Marks every descriptor from `first` up close-on-exec, in a child between
/// `fork` and `exec`, so the program gets only what is meant for it.
/// Async-signal-safe: one `close_range(2)` syscall (Linux 5.11+,
/// `CLOSE_RANGE_CLOEXEC`); older kernels answer ENOSYS and nothing changes
/// (std's own descriptors are close-on-exec anyway).
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

/// Whether process `pid` has the file `dev_ino` open, from `/proc/<pid>/fd`.
/// A lock holder always has its PID file open, so this tells a live holder
/// from a PID that `/proc/locks` or the file still names after its process
/// exited (the lock kept by a forked child) or was recycled. `None` where it
/// cannot tell: no `/proc`, or another user's process.
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
pub(crate) fn flock_holder(file: &File) -> Result<Option<u32>, ()> {
    let meta = file.metadata().map_err(drop)?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    flock_holder_key(major, minor, meta.ino())
}

/// [`flock_holder`] for the lock-table key `major:minor:ino` itself (see
/// `holder::lock_key_if_different` for when it is not `stat(2)`'s).
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

/// `dup3(2)` with `O_CLOEXEC`: `target` becomes a close-on-exec copy of
/// `fd`, atomically.
pub(crate) fn dup_cloexec_onto(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: dup3(2) on descriptors the caller vouches for.
    if unsafe { nix::libc::dup3(fd, target, nix::libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How many descriptors of this process refer to the same open socket as
/// `fd` (itself included), from `/proc/self/fd` (read only: nothing is
/// touched). `None` without `/proc`.
pub(crate) fn descriptors_of_socket(fd: RawFd) -> Option<usize> {
    use std::os::fd::BorrowedFd;
    // SAFETY: the caller vouches `fd` is open for the duration of the call.
    let ino = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) })
        .ok()?
        .st_ino;
    let want = format!("socket:[{ino}]");
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
            .count(),
    )
}
