//! The readiness pipe between [`ensure_running`](crate::ensure_running) and
//! the daemon it spawns: one line, `ready` or `failed: <kind> <message>`,
//! written by the same calls that tell a service manager (`ready()`, a
//! failed acquire).
//!
//! The spawner names the pipe's write end in `HISTORIA_READY_FD` as
//! `<fd>:<inode>`. The daemon uses the fd only if it is open, a FIFO, and has
//! that inode: a grandchild that inherited the variable but not the
//! descriptor (every fd here is close-on-exec) never writes into an
//! unrelated pipe that happens to have the same number.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{one_line, LifecycleError};

/// The variable that names the readiness pipe: `<fd>:<inode>`.
pub(crate) const READY_FD_ENV: &str = "HISTORIA_READY_FD";

/// The line a daemon writes once it serves.
pub(crate) const READY_LINE: &str = "ready";

/// Parses `HISTORIA_READY_FD`: `<fd>:<inode>` with a descriptor above the
/// standard three. Anything else is ignored (`None`): the variable is ours,
/// but a daemon must not fail to start because a stray copy is garbled.
pub(crate) fn parse_ready_fd(value: &OsStr) -> Option<(RawFd, u64)> {
    let (fd, ino) = value.to_str()?.split_once(':')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(fd) || !all_digits(ino) {
        return None;
    }
    let fd: RawFd = fd.parse().ok()?;
    (fd > 2).then_some(())?;
    Some((fd, ino.parse().ok()?))
}

/// The write end of the readiness pipe, taken from the environment once.
#[derive(Debug)]
pub(crate) struct ReadyPipe(File);

impl ReadyPipe {
    /// The pipe `HISTORIA_READY_FD` names, if it is really there: open, a
    /// FIFO, with the named inode. It is made close-on-exec at once, so the
    /// daemon's own children never hold it (and never keep a spawner
    /// waiting).
    ///
    /// Taken at most once per process: a second guard (or a second try
    /// after a failed acquire) gets `None`, so two owners can never close
    /// the same descriptor.
    pub(crate) fn from_env() -> Option<ReadyPipe> {
        static TAKEN: AtomicBool = AtomicBool::new(false);
        let (fd, ino) = parse_ready_fd(&std::env::var_os(READY_FD_ENV)?)?;
        if TAKEN.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: only borrowed to examine it; nothing is closed. A closed
        // number fails fstat with EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let meta = nix::sys::stat::fstat(borrowed).ok()?;
        let is_fifo = (meta.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFIFO;
        if !is_fifo || meta.st_ino as u64 != ino {
            return None;
        }
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
        if TAKEN.swap(true, Ordering::AcqRel) {
            return None; // another thread took it meanwhile
        }
        // SAFETY: the spawner passed this descriptor to us for this use
        // alone; from here this process owns it (it is closed after the one
        // line is written).
        Some(ReadyPipe(unsafe { File::from_raw_fd(fd) }))
    }

    /// Writes `ready` and closes the pipe.
    pub(crate) fn ready(self) {
        self.line(READY_LINE);
    }

    /// Writes `failed: <kind> <message>` and closes the pipe.
    pub(crate) fn failed(self, e: &LifecycleError) {
        self.line(&failure_line(e));
    }

    fn line(mut self, line: &str) {
        // Best effort: a spawner that gave up has closed its end (EPIPE; Rust
        // ignores SIGPIPE), and the daemon goes on either way.
        let _ = self.0.write_all(format!("{line}\n").as_bytes());
    }
}

/// `failed: <kind> <message>`: the kind is one stable word a client can
/// act on (`already-running` means another instance won the start).
pub(crate) fn failure_line(e: &LifecycleError) -> String {
    format!("failed: {} {}", kind_word(e), one_line(e))
}

fn kind_word(e: &LifecycleError) -> &'static str {
    match e {
        LifecycleError::AlreadyRunning => "already-running",
        LifecycleError::Io(_) => "io",
        LifecycleError::PidFile(_) => "pid-file",
        LifecycleError::UnexpectedFileType { .. } => "unexpected-file-type",
        LifecycleError::PathTooLong { .. } => "path-too-long",
        LifecycleError::InsecureDir { .. } => "insecure-dir",
        LifecycleError::InvalidArgument { .. } => "invalid-argument",
        LifecycleError::HolderUnknown { .. } => "holder-unknown",
        LifecycleError::Signals(_) => "signals",
        _ => "other",
    }
}

/// What a daemon said on the readiness pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Report {
    /// `ready`.
    Ready,
    /// `failed: already-running …`: another instance won; connect to it.
    AlreadyRunning,
    /// `failed: <kind> <message>`: the rest of the line.
    Failed(String),
}

/// Parses the daemon's line (without its newline).
pub(crate) fn parse_report(line: &str) -> Report {
    let line = line.trim_end_matches(['\n', '\r']);
    if line == READY_LINE {
        return Report::Ready;
    }
    match line.strip_prefix("failed: ") {
        Some(rest) if rest.starts_with("already-running") => Report::AlreadyRunning,
        Some(rest) => Report::Failed(rest.to_string()),
        None => Report::Failed(format!("unexpected readiness report {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_fd_values() {
        assert_eq!(parse_ready_fd(OsStr::new("5:1234")), Some((5, 1234)));
        for bad in [
            "",
            "5",
            ":1",
            "5:",
            "2:9",
            "0:9",
            "-5:9",
            "5:-9",
            "a:1",
            "5:1:2",
            " 5:1",
            "5:1 ",
            "99999999999:1",
            "5:99999999999999999999999",
        ] {
            assert_eq!(parse_ready_fd(OsStr::new(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn reports_round_trip() {
        assert_eq!(parse_report("ready"), Report::Ready);
        assert_eq!(parse_report("ready\n"), Report::Ready);
        let line = failure_line(&LifecycleError::AlreadyRunning);
        assert_eq!(parse_report(&line), Report::AlreadyRunning);
        let e = LifecycleError::InvalidArgument {
            what: "paths",
            reason: "two\nlines".into(),
        };
        let line = failure_line(&e);
        assert!(!line.contains('\n'), "{line:?}");
        assert_eq!(
            parse_report(&line),
            Report::Failed("invalid-argument invalid paths: two lines".into())
        );
        assert!(matches!(parse_report("hello"), Report::Failed(m) if m.contains("hello")));
    }
}
