//! The crate's one error type, and the helpers that give every I/O failure its
//! operation and path.

use std::fmt;
use std::fs::FileType;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// Shorthand for `Result<T, LifecycleError>`.
pub type Result<T, E = LifecycleError> = std::result::Result<T, E>;

/// Everything that can go wrong while claiming, checking or cleaning up a
/// daemon's socket and PID file.
///
/// Every state a caller acts on is its own variant, so match on variants, never
/// on message text:
///
/// ```
/// use historia_lifecycle::LifecycleError;
///
/// fn exit_code(e: &LifecycleError) -> i32 {
///     match e {
///         LifecycleError::AlreadyRunning => 3,
///         LifecycleError::UnexpectedFileType { .. } => 4,
///         _ => 1,
///     }
/// }
/// assert_eq!(exit_code(&LifecycleError::AlreadyRunning), 3);
/// ```
///
/// Messages are lowercase; a message about a path names the operation, the
/// path and what the OS said, on one line, as tempfile's path errors do:
///
/// ```text
/// cannot create PID file /run/app/daemon.pid: Permission denied (os error 13)
/// ```
///
/// so `eprintln!("{e}")` says everything. The OS error is in the text, so it
/// is not repeated as the [`source`](std::error::Error::source): a chain
/// printer (`anyhow`'s `{:#}`, a loop over `source()`) shows each fact once.
/// Its kind stays on the [`io::Error`] ([`io::Error::kind`]) and its number is
/// [`LifecycleError::raw_os_error`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// Another live instance holds the claim: its flock on the PID file, or a
    /// socket at the path that accepts connections.
    ///
    /// [`running_pid`](crate::running_pid) tells which process it is.
    #[error("another instance is already running")]
    AlreadyRunning,

    /// A system call on a path failed.
    ///
    /// Errors made by this crate carry the operation, the path and the OS
    /// error in their message while keeping the OS error's
    /// [`io::ErrorKind`]; [`LifecycleError::raw_os_error`] gives its number.
    #[error(transparent)]
    Io(#[from] io::Error),

    /// An orphaned socket was removed.
    ///
    /// Kept for the seed API. No function in this crate returns it as an
    /// error: [`check_singleton`](crate::check_singleton) reports the same
    /// fact as [`SingletonCheck::StaleSocketCleaned`](crate::SingletonCheck).
    #[error("a stale socket was removed")]
    StaleSocketCleaned,

    /// A PID file holds something other than one decimal PID in
    /// `1..=i32::MAX`. The message names the path and what was found.
    #[error("{0}")]
    PidFile(String),

    /// Something other than what the operation needs sits at a path (a
    /// regular file where the socket should be, a symlink where the PID file
    /// should be, …). It was left untouched.
    #[error("{path}: found a {found} where a {expected} was expected; left it untouched")]
    UnexpectedFileType {
        /// The path that was examined.
        path: PathBuf,
        /// What the operation needs there.
        expected: FileKind,
        /// What `lstat(2)` found there.
        found: FileKind,
    },

    /// A socket path is longer than `sun_path` can hold, see `unix(7)`.
    /// Nothing on disk was changed.
    #[error("socket path {path} is {len} bytes; sun_path holds at most {max} on this platform")]
    PathTooLong {
        /// The socket path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest path `sun_path` holds, without its NUL.
        max: usize,
    },

    /// A runtime dir failed the ownership or permission checks that keep
    /// other users away from the socket and PID file.
    #[error("runtime dir {path} is unsafe: {reason}")]
    InsecureDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An argument was rejected before anything on disk changed.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },

    /// The claim on a PID file is held, but no live process holding it can
    /// be named: the process that locked it exited while a child it forked
    /// (without `exec`) keeps the lock, the holder runs in a PID namespace
    /// the caller cannot see (a container looking at the host's daemon), or
    /// the caller's `/proc` belongs to another PID namespace. Treat the
    /// daemon as running; signal nothing.
    #[error("{path}: the claim is held, but no live process holding it can be identified")]
    HolderUnknown {
        /// The PID file.
        path: PathBuf,
    },

    /// The socket path is taken by something that is not ours and not
    /// provably stale, found when `bind(2)` answered `EADDRINUSE` under the
    /// claim: a socket of another user that refuses us permission to
    /// connect, a socket of another type (datagram, seqpacket), or a path
    /// another process keeps replacing. Nothing was removed. (A process that
    /// *listens* there is [`AlreadyRunning`](Self::AlreadyRunning): it serves
    /// on the path without holding the claim, as an older version of the
    /// daemon would.)
    #[error("socket path {path} is in use by someone else: {reason}; left it untouched")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
        /// What was found there.
        reason: String,
    },

    /// Installing the SIGTERM/SIGINT handling failed. The message ends with
    /// the OS error.
    #[error("cannot install the SIGTERM/SIGINT handlers: {0}")]
    Signals(io::Error),

    /// A daemon that [`ensure_running`](crate::ensure_running) started
    /// reported that it cannot start, with its own reason (`failed: <kind>
    /// <message>` on the readiness pipe).
    #[error("the daemon for {socket} (pid {pid}) could not start: {reason}")]
    StartFailed {
        /// The socket the daemon was started for.
        socket: PathBuf,
        /// The daemon's PID.
        pid: u32,
        /// What the daemon said: its error kind and message.
        reason: String,
    },

    /// A daemon that [`ensure_running`](crate::ensure_running) started
    /// exited, or was killed by a signal, before it was ready.
    #[error(
        "the daemon for {socket} (pid {pid}) {status} before it was ready{}",
        tail_text(output)
    )]
    DaemonExited {
        /// The socket the daemon was started for.
        socket: PathBuf,
        /// The daemon's PID.
        pid: u32,
        /// How it ended: "exited with status 1", "was killed by signal 11".
        status: String,
        /// The end of what it wrote to its log file during this start
        /// (empty without a log file).
        output: String,
    },

    /// A daemon did not become ready, or did not exit, within the time
    /// allowed.
    #[error("{what} for {path}{} did not finish within {waited:?}", pid_text(*pid))]
    Timeout {
        /// What was waited for ("daemon start", "daemon stop").
        what: &'static str,
        /// The socket or PID file it was about.
        path: PathBuf,
        /// The process waited for, when known.
        pid: Option<u32>,
        /// How long was waited.
        waited: std::time::Duration,
    },

    /// A method that needs a tokio runtime (feature `tokio`:
    /// `DaemonGuard::take_tokio_listener`) was called outside one, where
    /// tokio itself would panic. Nothing was changed: the listener is still
    /// in the guard. Call it inside the runtime (`#[tokio::main]`, a task,
    /// or after `Runtime::enter`).
    #[error("no tokio runtime is running on this thread (call this inside the runtime)")]
    NoRuntime,
}

fn tail_text(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!("; its output ended with: {}", output.trim_end())
    }
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

impl LifecycleError {
    /// The path this error is about, where it has one.
    ///
    /// Every variant that concerns one file answers: [`Io`](Self::Io) made by
    /// this crate (the path its message names), [`PidFile`](Self::PidFile)
    /// (read back from the message this crate wrote; lossy for a path that is
    /// not UTF-8, and `None` for a message built elsewhere),
    /// [`UnexpectedFileType`](Self::UnexpectedFileType),
    /// [`PathTooLong`](Self::PathTooLong), [`InsecureDir`](Self::InsecureDir),
    /// [`HolderUnknown`](Self::HolderUnknown) and
    /// [`SocketInUse`](Self::SocketInUse). The others answer `None`:
    /// [`AlreadyRunning`](Self::AlreadyRunning),
    /// [`StaleSocketCleaned`](Self::StaleSocketCleaned) and
    /// [`Signals`](Self::Signals) and [`NoRuntime`](Self::NoRuntime) are
    /// about no path, and
    /// [`InvalidArgument`](Self::InvalidArgument) is about the values passed
    /// in (its message quotes them, two paths when both name one file), not
    /// about a file found on disk.
    ///
    /// ```
    /// use historia_lifecycle::read_pid_file;
    /// let dir = tempfile::tempdir()?;
    /// let pid = dir.path().join("daemon.pid");
    /// std::fs::create_dir(&pid)?;
    /// let err = read_pid_file(&pid).unwrap_err();
    /// assert_eq!(err.path(), Some(pid.as_path()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> Option<&Path> {
        match self {
            LifecycleError::Io(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<PathError>())
                .map(|p| p.path.as_path()),
            LifecycleError::PidFile(message) => pid_file_path(message),
            LifecycleError::UnexpectedFileType { path, .. }
            | LifecycleError::HolderUnknown { path }
            | LifecycleError::PathTooLong { path, .. }
            | LifecycleError::InsecureDir { path, .. }
            | LifecycleError::Timeout { path, .. }
            | LifecycleError::SocketInUse { path, .. } => Some(path),
            LifecycleError::StartFailed { socket, .. }
            | LifecycleError::DaemonExited { socket, .. } => Some(socket),
            LifecycleError::AlreadyRunning
            | LifecycleError::StaleSocketCleaned
            | LifecycleError::InvalidArgument { .. }
            | LifecycleError::Signals(_)
            | LifecycleError::NoRuntime => None,
        }
    }
}

impl LifecycleError {
    /// The OS error number (`errno`) behind this error, if one is: for
    /// [`Io`](Self::Io) (also through the operation-and-path wrapper whose
    /// message already shows it) and [`Signals`](Self::Signals).
    ///
    /// ```
    /// use historia_lifecycle::read_pid_file;
    /// let dir = tempfile::tempdir()?;
    /// std::fs::write(dir.path().join("a-file"), b"")?;
    /// let err = read_pid_file(&dir.path().join("a-file/daemon.pid")).unwrap_err();
    /// assert_eq!(err.raw_os_error(), Some(20)); // ENOTDIR
    /// assert!(err.to_string().ends_with("Not a directory (os error 20)"), "{err}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            LifecycleError::Io(e) | LifecycleError::Signals(e) => os_errno(e),
            _ => None,
        }
    }
}

/// The kind of file found at a path, as `lstat(2)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link (never followed by this crate where it matters).
    Symlink,
    /// A Unix domain socket.
    Socket,
    /// A FIFO (named pipe).
    Fifo,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
}

impl FileKind {
    /// Classifies a [`FileType`] from `symlink_metadata`.
    pub(crate) fn of(ft: FileType) -> FileKind {
        if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_dir() {
            FileKind::Directory
        } else if ft.is_socket() {
            FileKind::Socket
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_block_device() {
            FileKind::BlockDevice
        } else {
            FileKind::Regular
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::Socket => "socket",
            FileKind::Fifo => "FIFO",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
        })
    }
}

/// An I/O error with the operation and path it happened on, as tempfile's
/// `PathError`. It travels inside an [`io::Error`] of the same kind, so
/// `LifecycleError::Io(e).kind()` still tells `PermissionDenied` from the rest.
#[derive(Debug)]
struct PathError {
    op: &'static str,
    path: PathBuf,
    source: io::Error,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot {} {}: {}",
            self.op,
            self.path.display(),
            self.source
        )
    }
}

/// No source: the OS error is already the end of the message, and a chain
/// printer would show it twice.
impl std::error::Error for PathError {}

/// How every [`LifecycleError::PidFile`] message this crate makes begins.
const PID_FILE_PREFIX: &str = "invalid PID file ";

/// Builds [`LifecycleError::PidFile`]: "invalid PID file <path>: <what>".
/// `what` never holds ": " (the caller escapes file content), so the last
/// ": " ends the path, whatever the path holds.
pub(crate) fn invalid_pid_file(path: &Path, what: &str) -> LifecycleError {
    debug_assert!(!what.contains(": "), "{what:?}");
    LifecycleError::PidFile(format!("{PID_FILE_PREFIX}{}: {what}", path.display()))
}

/// The path in a message made by [`invalid_pid_file`].
fn pid_file_path(message: &str) -> Option<&Path> {
    let rest = message.strip_prefix(PID_FILE_PREFIX)?;
    let end = rest.rfind(": ")?;
    Some(Path::new(&rest[..end]))
}

/// The operation named by an error made by [`io_at`] ("connect to socket").
pub(crate) fn op_of(e: &LifecycleError) -> Option<&'static str> {
    match e {
        LifecycleError::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<PathError>())
            .map(|p| p.op),
        _ => None,
    }
}

/// The OS error number behind `e`, looking through the operation-and-path
/// wrapper that [`io_at`] puts around it.
pub(crate) fn os_errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<PathError>())
            .and_then(|p| p.source.raw_os_error())
    })
}

/// `e` and every cause under it on one line ("cannot bind socket /x:
/// Permission denied (os error 13)"), for a channel that takes one line,
/// such as sd_notify's `STATUS=`.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace(['\n', '\r'], " ")
}

/// Wraps `source` as [`LifecycleError::Io`] naming `op` and `path`.
pub(crate) fn io_at(op: &'static str, path: &Path, source: io::Error) -> LifecycleError {
    let kind = source.kind();
    LifecycleError::Io(io::Error::new(
        kind,
        PathError {
            op,
            path: path.to_path_buf(),
            source,
        },
    ))
}

/// [`io_at`] for a `nix` errno.
pub(crate) fn errno_at(op: &'static str, path: &Path, errno: nix::Error) -> LifecycleError {
    io_at(op, path, io::Error::from(errno))
}

/// Builds [`LifecycleError::UnexpectedFileType`].
pub(crate) fn wrong_type(path: &Path, expected: FileKind, found: FileKind) -> LifecycleError {
    LifecycleError::UnexpectedFileType {
        path: path.to_path_buf(),
        expected,
        found,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    /// What a chain printer (the examples' `report`, `anyhow`'s `{:#}`)
    /// shows: the error, then each source.
    fn chain(e: &dyn std::error::Error) -> Vec<String> {
        let mut lines = vec![e.to_string()];
        let mut cause = e.source();
        while let Some(c) = cause {
            lines.push(c.to_string());
            cause = c.source();
        }
        lines
    }

    #[test]
    fn io_errors_name_operation_path_and_os_error_once_and_keep_the_kind() {
        let e = io_at(
            "create PID file",
            Path::new("/run/x.pid"),
            io::Error::from_raw_os_error(nix::libc::EACCES),
        );
        assert_eq!(
            e.to_string(),
            "cannot create PID file /run/x.pid: Permission denied (os error 13)"
        );
        let LifecycleError::Io(inner) = &e else {
            panic!("expected Io, got {e:?}")
        };
        assert_eq!(inner.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(e.raw_os_error(), Some(nix::libc::EACCES));
        assert_eq!(os_errno(inner), Some(nix::libc::EACCES));
        assert_eq!(e.path(), Some(Path::new("/run/x.pid")));
        // The cause is in the text, so no chain printer repeats it.
        assert!(e.source().is_none(), "{:?}", e.source());
        assert_eq!(chain(&e), [e.to_string()]);
        assert_eq!(one_line(&e), e.to_string());
    }

    #[test]
    fn a_wrapped_error_shows_each_fact_once() {
        /// As the examples' `context("cannot start", e)`.
        #[derive(Debug)]
        struct Context(LifecycleError);
        impl fmt::Display for Context {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("cannot start")
            }
        }
        impl std::error::Error for Context {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let path = Path::new("/run/app/daemon.pid");
        for e in [
            io_at(
                "create PID file",
                path,
                io::Error::from_raw_os_error(nix::libc::EACCES),
            ),
            errno_at("bind socket", path, nix::errno::Errno::EROFS),
            LifecycleError::Signals(io::Error::from_raw_os_error(nix::libc::EINVAL)),
        ] {
            let lines = chain(&Context(e));
            let all = lines.join("\n");
            assert_eq!(lines.len(), 2, "{all}");
            for fact in ["os error", "cannot start"] {
                assert_eq!(all.matches(fact).count(), 1, "{fact:?} in {all}");
            }
        }
        let signals = LifecycleError::Signals(io::Error::from_raw_os_error(nix::libc::EINVAL));
        assert_eq!(
            signals.to_string(),
            "cannot install the SIGTERM/SIGINT handlers: Invalid argument (os error 22)"
        );
        assert_eq!(signals.raw_os_error(), Some(nix::libc::EINVAL));
        assert!(signals.source().is_none());
        assert_eq!(LifecycleError::AlreadyRunning.raw_os_error(), None);
    }

    /// Which variant `e` is; exhaustive, so a new variant does not compile
    /// until the test below has a sample of it.
    fn variant(e: &LifecycleError) -> usize {
        match e {
            LifecycleError::AlreadyRunning => 0,
            LifecycleError::Io(_) => 1,
            LifecycleError::StaleSocketCleaned => 2,
            LifecycleError::PidFile(_) => 3,
            LifecycleError::UnexpectedFileType { .. } => 4,
            LifecycleError::PathTooLong { .. } => 5,
            LifecycleError::InsecureDir { .. } => 6,
            LifecycleError::InvalidArgument { .. } => 7,
            LifecycleError::HolderUnknown { .. } => 8,
            LifecycleError::SocketInUse { .. } => 9,
            LifecycleError::Signals(_) => 10,
            LifecycleError::StartFailed { .. } => 11,
            LifecycleError::DaemonExited { .. } => 12,
            LifecycleError::Timeout { .. } => 13,
            LifecycleError::NoRuntime => 14,
        }
    }
    const VARIANTS: usize = 15;

    #[test]
    fn path_answers_for_every_variant_that_names_one() {
        // A path with ": " in it, and PID file content with ": " in it: the
        // message still gives the path back exactly.
        let odd = Path::new("/run/a: b/daemon.pid");
        let what = crate::pidfile::parse_pid(b"x: holds").unwrap_err();
        let eacces = || io::Error::from_raw_os_error(nix::libc::EACCES);
        let samples: Vec<(LifecycleError, Option<&Path>)> = vec![
            (LifecycleError::AlreadyRunning, None),
            (io_at("open PID file", odd, eacces()), Some(odd)),
            (LifecycleError::Io(eacces()), None),
            (LifecycleError::StaleSocketCleaned, None),
            (invalid_pid_file(odd, &what), Some(odd)),
            (
                invalid_pid_file(Path::new("/p"), "is empty"),
                Some(Path::new("/p")),
            ),
            (LifecycleError::PidFile("made by hand".into()), None),
            (
                wrong_type(odd, FileKind::Regular, FileKind::Fifo),
                Some(odd),
            ),
            (
                LifecycleError::PathTooLong {
                    path: odd.into(),
                    len: 200,
                    max: 107,
                },
                Some(odd),
            ),
            (
                LifecycleError::InsecureDir {
                    path: odd.into(),
                    reason: "mode 0777".into(),
                },
                Some(odd),
            ),
            (
                LifecycleError::InvalidArgument {
                    what: "paths",
                    reason: "the socket /a and the PID file /b are the same file".into(),
                },
                None,
            ),
            (
                LifecycleError::HolderUnknown { path: odd.into() },
                Some(odd),
            ),
            (
                LifecycleError::SocketInUse {
                    path: odd.into(),
                    reason: "a socket of another type".into(),
                },
                Some(odd),
            ),
            (LifecycleError::Signals(eacces()), None),
            (
                LifecycleError::StartFailed {
                    socket: odd.into(),
                    pid: 7,
                    reason: "io cannot bind".into(),
                },
                Some(odd),
            ),
            (
                LifecycleError::DaemonExited {
                    socket: odd.into(),
                    pid: 7,
                    status: "exited with status 1".into(),
                    output: String::new(),
                },
                Some(odd),
            ),
            (
                LifecycleError::Timeout {
                    what: "daemon start",
                    path: odd.into(),
                    pid: Some(7),
                    waited: std::time::Duration::from_secs(5),
                },
                Some(odd),
            ),
            (LifecycleError::NoRuntime, None),
        ];
        let mut seen = [false; VARIANTS];
        for (e, want) in &samples {
            seen[variant(e)] = true;
            assert_eq!(e.path(), *want, "{e:?}");
            if let Some(p) = want {
                let m = e.to_string();
                assert!(m.contains(&p.display().to_string()), "{m}");
            }
        }
        assert!(seen.iter().all(|&s| s), "a variant has no sample: {seen:?}");
    }

    #[test]
    fn messages_are_lowercase_without_final_period() {
        let all = [
            LifecycleError::AlreadyRunning,
            LifecycleError::StaleSocketCleaned,
            wrong_type(Path::new("/a"), FileKind::Socket, FileKind::Regular),
            LifecycleError::PathTooLong {
                path: "/p".into(),
                len: 200,
                max: 107,
            },
            LifecycleError::InsecureDir {
                path: "/d".into(),
                reason: "mode 0777".into(),
            },
            LifecycleError::NoRuntime,
        ];
        for e in all {
            let m = e.to_string();
            assert!(!m.ends_with('.'), "{m}");
            assert!(
                m.chars().next().unwrap().is_lowercase() || m.starts_with('/'),
                "{m}"
            );
        }
        assert_eq!(
            wrong_type(Path::new("/a/s"), FileKind::Socket, FileKind::Fifo).to_string(),
            "/a/s: found a FIFO where a socket was expected; left it untouched"
        );
    }
}
