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
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{one_line, LifecycleError, Result};

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

    /// The write end of a pipe this process made itself (daemonize's pipe
    /// to the original process).
    pub(crate) fn from_fd(fd: OwnedFd) -> ReadyPipe {
        ReadyPipe(File::from(fd))
    }

    /// Writes `ready` and closes the pipe.
    pub(crate) fn ready(self) {
        self.line(READY_LINE);
    }

    /// Writes `failed: <kind> <message>` and closes the pipe.
    pub(crate) fn failed(self, e: &LifecycleError) {
        self.line(&failure_line(e));
    }

    /// Writes `failed: <kind> <message>` for any error: a
    /// [`LifecycleError`]'s own kind, `startup` for the rest (the daemon's
    /// own start-up steps), and closes the pipe.
    pub(crate) fn failed_with(self, e: &(dyn std::error::Error + 'static)) {
        match e.downcast_ref::<LifecycleError>() {
            Some(e) => self.failed(e),
            None => self.line(&format!("failed: startup {}", one_line(e))),
        }
    }

    /// Writes one line of its own (daemonize's `pid <n>`), keeping the pipe.
    pub(crate) fn note(&self, line: &str) {
        let _ = (&self.0).write_all(format!("{line}\n").as_bytes());
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

/// The read end of a readiness pipe: whole lines as they arrive, each wait
/// bounded, so the waiting side keeps its deadline.
#[derive(Debug)]
pub(crate) struct LineReader {
    pipe: File,
    buf: Vec<u8>,
    eof: bool,
}

/// What [`LineReader::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Polled {
    /// One line, without its newline (at end of file, the unterminated rest).
    Line(String),
    /// End of file: every holder of the write end closed it or exited.
    Eof,
    /// Nothing whole yet within the wait.
    Nothing,
}

impl LineReader {
    pub(crate) fn new(pipe: File) -> Self {
        LineReader {
            pipe,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The next line, waiting at most `wait` (`poll(2)`) for more to read.
    pub(crate) fn next(&mut self, wait: Duration) -> Result<Polled> {
        if let Some(line) = self.take_line() {
            return Ok(Polled::Line(line));
        }
        if !self.eof {
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX).max(1);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => return Ok(Polled::Nothing),
                Ok(_) => {}
                Err(e) => return Err(LifecycleError::Io(e.into())),
            }
            let mut chunk = [0u8; 512];
            match self.pipe.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LifecycleError::Io(e)),
            }
            if let Some(line) = self.take_line() {
                return Ok(Polled::Line(line));
            }
        }
        if self.eof {
            if self.buf.is_empty() {
                return Ok(Polled::Eof);
            }
            // A last line without its newline still counts.
            let rest = std::mem::take(&mut self.buf);
            return Ok(Polled::Line(String::from_utf8_lossy(&rest).into_owned()));
        }
        Ok(Polled::Nothing)
    }

    /// Removes and returns the first whole line, or a 4 KiB run without a
    /// newline (no report is that long: not ours).
    fn take_line(&mut self) -> Option<String> {
        let end = match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) => end,
            None if self.buf.len() > 4096 => self.buf.len(),
            None => return None,
        };
        let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..(end + 1).min(self.buf.len()));
        Some(line)
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

    #[test]
    fn line_reader_gives_each_line_then_the_unterminated_rest_then_eof() {
        let (r, w) = crate::sys::cloexec_pipe().unwrap();
        let mut w = File::from(w);
        w.write_all(b"pid 7\nready\nfail").unwrap();
        drop(w);
        let mut reader = LineReader::new(File::from(r));
        let wait = Duration::from_millis(100);
        assert_eq!(reader.next(wait).unwrap(), Polled::Line("pid 7".into()));
        assert_eq!(reader.next(wait).unwrap(), Polled::Line("ready".into()));
        assert_eq!(reader.next(wait).unwrap(), Polled::Line("fail".into()));
        assert_eq!(reader.next(wait).unwrap(), Polled::Eof);
        assert_eq!(reader.next(wait).unwrap(), Polled::Eof);
    }

    #[test]
    fn line_reader_waits_at_most_its_bound() {
        let (r, _w) = crate::sys::cloexec_pipe().unwrap();
        let mut reader = LineReader::new(File::from(r));
        assert_eq!(
            reader.next(Duration::from_millis(1)).unwrap(),
            Polled::Nothing
        );
    }

    #[test]
    fn failures_of_other_errors_are_startup_reports() {
        let (r, w) = crate::sys::cloexec_pipe().unwrap();
        let e = std::io::Error::other("cannot open the database /var/x.db");
        ReadyPipe::from_fd(w).failed_with(&e);
        let mut reader = LineReader::new(File::from(r));
        let Polled::Line(line) = reader.next(Duration::from_secs(5)).unwrap() else {
            panic!("no line")
        };
        assert_eq!(
            parse_report(&line),
            Report::Failed("startup cannot open the database /var/x.db".into())
        );
    }
}
