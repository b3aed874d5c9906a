//! Socket activation: adopting the listening socket a service manager passed
//! down (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), as `sd_listen_fds(3)`
//! and `systemd.socket(5)` describe.
//!
//! The parsing and the choice of fd are pure and unit-tested below; the OS
//! part is [`inspect_fd`] (`getsockname(2)`, `getsockopt(2)`) and [`adopt`].
//!
//! Why not the `listenfd` crate: 1.0 accepts `LISTEN_FDS` with no
//! `LISTEN_PID`, ignores `LISTEN_FDNAMES` and never checks that the fd is
//! listening.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::SockType;

use crate::error::{LifecycleError, Result};

/// Whether a [`DaemonGuard`](crate::DaemonGuard) takes the listening socket a
/// service manager passed down (socket activation) instead of binding its
/// own; set with
/// [`DaemonGuardBuilder::socket_activation`](crate::DaemonGuardBuilder::socket_activation).
///
/// An adopted socket belongs to the manager (`systemd.socket(5)`): the guard
/// never probes, binds, chmods or unlinks it, on Drop or on a signal. It
/// still takes the PID file's claim, so a second, hand-started instance gets
/// [`LifecycleError::AlreadyRunning`].
///
/// # The probing hazard
/// Under a `.socket` unit, a `connect(2)` to the socket *starts the
/// service*. Tools that probe it ([`probe_socket`](crate::probe_socket),
/// [`check_singleton`](crate::check_singleton), a client's ping) wake the
/// daemon; use [`running_pid`](crate::running_pid) to ask whether it runs
/// without starting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Activation {
    /// Default: adopt the socket when `LISTEN_PID`/`LISTEN_FDS` offer one to
    /// this process, else bind one.
    #[default]
    Auto,
    /// Adopt, and fail with [`LifecycleError::InvalidArgument`] when no
    /// socket was passed down.
    Require,
    /// Always bind our own; ignore `LISTEN_FDS`.
    Never,
}

/// The first inherited fd (`SD_LISTEN_FDS_START` in `sd-daemon.h`).
pub(crate) const SD_LISTEN_FDS_START: RawFd = 3;

/// The longest fd name systemd accepts (`FDNAME_MAX`).
const FDNAME_MAX: usize = 255;

/// What `LISTEN_FDS`/`LISTEN_FDNAMES` offer this process: fds
/// `SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count`, with their names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListenFds {
    /// How many fds were passed.
    pub(crate) count: usize,
    /// One entry per fd, `None` for an unnamed one (an empty name, as in
    /// `x::z`); empty when `LISTEN_FDNAMES` is unset (so a huge `LISTEN_FDS`
    /// allocates nothing).
    pub(crate) names: Vec<Option<String>>,
}

impl ListenFds {
    /// The fds and their names, in order.
    pub(crate) fn fds(&self) -> impl Iterator<Item = (RawFd, Option<&str>)> + '_ {
        // parse_listen_env bounds count so every fd number fits an i32.
        (0..self.count).map(move |i| (SD_LISTEN_FDS_START + i as RawFd, self.name(i)))
    }

    fn name(&self, i: usize) -> Option<&str> {
        self.names.get(i).and_then(|n| n.as_deref())
    }
}

fn invalid(what: &'static str, reason: String) -> LifecycleError {
    LifecycleError::InvalidArgument { what, reason }
}

/// A decimal number of ASCII digits only (no sign, no space); `Err(true)` when
/// the digits overflow a u64, `Err(false)` when it is no such number.
fn decimal(value: &OsStr) -> std::result::Result<u64, bool> {
    let b = value.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Err(false);
    }
    std::str::from_utf8(b)
        .map_err(|_| false)?
        .parse()
        .map_err(|_| true)
}

/// Parses the socket-activation variables, as `sd_listen_fds_with_names(3)`.
///
/// - `Ok(None)`: nothing is meant for this process: `LISTEN_PID` is absent or
///   names another process (a parent that forked us without `exec`).
/// - `Ok(Some(_))`: `LISTEN_PID` is `our_pid` and `LISTEN_FDS` is a count of
///   at least 1.
///
/// Stricter than `sd_listen_fds(3)`, which returns 0 for these: once
/// `LISTEN_PID` names us, an absent `LISTEN_FDS` or a count of 0 is a
/// misconfigured manager, reported rather than silently treated as "no
/// sockets" (the daemon would then bind a socket of its own).
///
/// # Errors
/// [`LifecycleError::InvalidArgument`] naming the variable and its value:
/// - `LISTEN_PID` is not a PID (garbage, 0, beyond `i32::MAX`);
/// - `LISTEN_FDS` is absent (with `LISTEN_PID` ours), 0, negative, garbage,
///   or so large that fd numbers would pass `i32::MAX`;
/// - `LISTEN_FDNAMES` has another number of `:`-separated names than
///   `LISTEN_FDS` says, or a name that `FileDescriptorName=` would refuse
///   (over 255 bytes, or not printable ASCII; `:` separates).
pub(crate) fn parse_listen_env(
    pid: Option<&OsStr>,
    fds: Option<&OsStr>,
    names: Option<&OsStr>,
    our_pid: u32,
) -> Result<Option<ListenFds>> {
    let Some(pid) = pid else {
        return Ok(None);
    };
    let shown = |v: &OsStr| format!("{:?}", v.to_string_lossy());
    match decimal(pid) {
        Ok(p) if p >= 1 && p <= i32::MAX as u64 => {
            if p != u64::from(our_pid) {
                return Ok(None);
            }
        }
        _ => {
            return Err(invalid(
                "LISTEN_PID",
                format!("{} is not a process ID", shown(pid)),
            ))
        }
    }
    let Some(fds) = fds else {
        return Err(invalid(
            "LISTEN_FDS",
            "is unset, but LISTEN_PID names this process".into(),
        ));
    };
    // The last fd, START + count - 1, must still be an fd number.
    let max = (i32::MAX - SD_LISTEN_FDS_START + 1) as u64;
    let count = match decimal(fds) {
        Ok(0) => {
            return Err(invalid(
                "LISTEN_FDS",
                format!("{} passes no fd; it must be at least 1", shown(fds)),
            ))
        }
        Ok(n) if n <= max => n as usize,
        Ok(_) | Err(true) => {
            return Err(invalid(
                "LISTEN_FDS",
                format!(
                    "{} is too large: fd numbers would pass i32::MAX",
                    shown(fds)
                ),
            ))
        }
        Err(false) => {
            return Err(invalid(
                "LISTEN_FDS",
                format!("{} is not a positive decimal count", shown(fds)),
            ))
        }
    };
    let names = match names {
        None => Vec::new(),
        Some(all) => {
            let parts: Vec<&[u8]> = all.as_bytes().split(|&b| b == b':').collect();
            if parts.len() != count {
                return Err(invalid(
                    "LISTEN_FDNAMES",
                    format!(
                        "{} has {} names for LISTEN_FDS={count}",
                        shown(all),
                        parts.len()
                    ),
                ));
            }
            let mut out = Vec::with_capacity(count);
            for part in parts {
                if part.len() > FDNAME_MAX {
                    return Err(invalid(
                        "LISTEN_FDNAMES",
                        format!("a name is {} bytes; at most {FDNAME_MAX}", part.len()),
                    ));
                }
                if !part.iter().all(|&b| (b' '..=b'~').contains(&b)) {
                    return Err(invalid(
                        "LISTEN_FDNAMES",
                        format!("{} holds a name that is not printable ASCII", shown(all)),
                    ));
                }
                // Printable ASCII, so UTF-8.
                let name = String::from_utf8_lossy(part).into_owned();
                out.push((!name.is_empty()).then_some(name));
            }
            out
        }
    };
    Ok(Some(ListenFds { count, names }))
}

/// What a socket's address family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// Not a socket at all (`ENOTSOCK`).
    NotASocket,
    /// `AF_UNIX`.
    Unix,
    /// Any other family, by number.
    Other(i32),
}

/// The address a socket is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Bound {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract name, without its leading NUL.
    // Only Linux's getsockname makes one; the checks name it everywhere.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    Abstract(Vec<u8>),
    /// No name (unbound, or a family that has no path).
    Unnamed,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bound::Path(p) => write!(f, "{}", p.display()),
            Bound::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            Bound::Unnamed => f.write_str("no address"),
        }
    }
}

/// What the kernel says about an inherited fd ([`inspect_fd`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FdFacts {
    pub(crate) family: Family,
    /// `SO_TYPE`, `None` when unknown to nix.
    pub(crate) sock_type: Option<SockType>,
    /// `SO_ACCEPTCONN`: `listen(2)` was called.
    pub(crate) listening: bool,
    pub(crate) bound: Bound,
}

/// Why an inherited fd is not our socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotASocket,
    NotUnix(i32),
    NotStream(Option<SockType>),
    NotListening,
    BoundElsewhere(Bound),
}

impl Refusal {
    fn describe(&self, expected: &Path) -> String {
        match self {
            Refusal::NotASocket => "is not a socket".into(),
            Refusal::NotUnix(family) => format!(
                "is an {} socket, not AF_UNIX",
                match *family {
                    libc::AF_INET => "AF_INET".to_string(),
                    libc::AF_INET6 => "AF_INET6".to_string(),
                    n => format!("address family {n}"),
                }
            ),
            Refusal::NotStream(t) => format!(
                "is an AF_UNIX {} socket, not a stream (SOCK_STREAM) one",
                match t {
                    Some(SockType::Datagram) => "datagram",
                    Some(SockType::SeqPacket) => "seqpacket",
                    _ => "non-stream",
                }
            ),
            Refusal::NotListening => "is an AF_UNIX stream socket that is not listening".into(),
            Refusal::BoundElsewhere(bound) => {
                format!("is bound to {bound}, not {}", expected.display())
            }
        }
    }
}

/// Whether `facts` describe a listening `AF_UNIX` stream socket bound to
/// exactly `socket_path` (byte for byte: give the path as `ListenStream=`
/// spells it).
pub(crate) fn check_fd(facts: &FdFacts, socket_path: &Path) -> std::result::Result<(), Refusal> {
    match facts.family {
        Family::NotASocket => return Err(Refusal::NotASocket),
        Family::Other(n) => return Err(Refusal::NotUnix(n)),
        Family::Unix => {}
    }
    if facts.sock_type != Some(SockType::Stream) {
        return Err(Refusal::NotStream(facts.sock_type));
    }
    if !facts.listening {
        return Err(Refusal::NotListening);
    }
    match &facts.bound {
        Bound::Path(p) if p == socket_path => Ok(()),
        other => Err(Refusal::BoundElsewhere(other.clone())),
    }
}

/// Picks our socket among the inherited fds: the one named `wanted` when a
/// name is asked, else the first that is a listening `AF_UNIX` stream socket
/// bound to `socket_path`. `inspect` tells the facts of one fd
/// ([`inspect_fd`] outside the tests); only candidates are inspected.
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] (`LISTEN_FDNAMES`) when no fd has
///   the name `wanted`.
/// - [`LifecycleError::InvalidArgument`] (`inherited socket`) when no
///   candidate passes [`check_fd`]; the message says, for each fd, which
///   check it failed: not a socket, not `AF_UNIX`, not a stream socket, not
///   listening, bound to another path.
/// - Whatever `inspect` returns.
pub(crate) fn select_fd(
    fds: &ListenFds,
    wanted: Option<&str>,
    socket_path: &Path,
    mut inspect: impl FnMut(RawFd) -> Result<FdFacts>,
) -> Result<RawFd> {
    let candidates: Vec<(RawFd, Option<&str>)> = fds
        .fds()
        .filter(|(_, name)| wanted.is_none() || *name == wanted)
        .collect();
    if let (Some(want), true) = (wanted, candidates.is_empty()) {
        let reason = if fds.names.is_empty() {
            format!("is unset, so no inherited fd is named {want:?}")
        } else {
            let names: Vec<&str> = fds.fds().map(|(_, n)| n.unwrap_or("")).collect();
            format!("no inherited fd is named {want:?} (the names are {names:?})")
        };
        return Err(invalid("LISTEN_FDNAMES", reason));
    }
    let mut refused = Vec::new();
    for (fd, name) in candidates {
        match check_fd(&inspect(fd)?, socket_path) {
            Ok(()) => return Ok(fd),
            Err(why) => {
                let label = match name {
                    Some(n) => format!("fd {fd} ({n:?})"),
                    None => format!("fd {fd}"),
                };
                refused.push(format!("{label} {}", why.describe(socket_path)));
            }
        }
    }
    Err(invalid(
        "inherited socket",
        format!(
            "no inherited fd is a listening AF_UNIX stream socket bound to {}: {}",
            socket_path.display(),
            refused.join("; ")
        ),
    ))
}

/// `LISTEN_FDS` names `fd`, but it is not open.
fn not_open(fd: RawFd) -> LifecycleError {
    invalid(
        "LISTEN_FDS",
        format!("names fd {fd}, which is not open in this process"),
    )
}

/// Asks the kernel about `fd`: `getsockname(2)` for the family and the bound
/// path, `getsockopt(2)` `SO_TYPE` and `SO_ACCEPTCONN`.
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] when `fd` is not open (`EBADF`).
/// - [`LifecycleError::Io`] for any other failure of those calls.
pub(crate) fn inspect_fd(fd: RawFd) -> Result<FdFacts> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrLike, SockaddrStorage};
    let addr = match getsockname::<SockaddrStorage>(fd) {
        Ok(a) => a,
        Err(Errno::ENOTSOCK) => {
            return Ok(FdFacts {
                family: Family::NotASocket,
                sock_type: None,
                listening: false,
                bound: Bound::Unnamed,
            })
        }
        Err(Errno::EBADF) => return Err(not_open(fd)),
        Err(e) => return Err(LifecycleError::Io(e.into())),
    };
    // SAFETY: getsockname filled the storage; sa_family is its first field.
    let raw_family = i32::from(unsafe { (*addr.as_ptr()).sa_family });
    let (family, bound) = match addr.as_unix_addr() {
        Some(unix) if raw_family == libc::AF_UNIX => {
            let bound = if let Some(p) = unix.path() {
                Bound::Path(p.to_path_buf())
            } else {
                #[cfg(any(target_os = "linux", target_os = "android"))]
                let b = unix
                    .as_abstract()
                    .map_or(Bound::Unnamed, |n| Bound::Abstract(n.to_vec()));
                #[cfg(not(any(target_os = "linux", target_os = "android")))]
                let b = Bound::Unnamed;
                b
            };
            (Family::Unix, bound)
        }
        _ => (Family::Other(raw_family), Bound::Unnamed),
    };
    // SAFETY: getsockname just succeeded on fd, and nothing closes it while
    // it is borrowed here.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let sock_type = getsockopt(&borrowed, sockopt::SockType).ok();
    let listening =
        getsockopt(&borrowed, sockopt::AcceptConn).map_err(|e| LifecycleError::Io(e.into()))?;
    Ok(FdFacts {
        family,
        sock_type,
        listening,
        bound,
    })
}

/// Sets `FD_CLOEXEC` on an inherited fd (`fcntl(2)`).
fn set_cloexec(fd: RawFd) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: only the descriptor flags of fd are changed; EBADF if closed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    match fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
        Ok(_) => Ok(()),
        Err(Errno::EBADF) => Err(not_open(fd)),
        Err(e) => Err(LifecycleError::Io(e.into())),
    }
}

/// The inherited fds already turned into a listener in this process: each
/// may have one owner only, or two `UnixListener`s would close it twice.
static ADOPTED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Takes ownership of the inherited listening socket `fd`: marks it
/// close-on-exec and wraps it. Other inherited fds are not touched.
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] when `fd` was adopted before in this
///   process, or is not open.
/// - [`LifecycleError::Io`] when `fcntl(2)` fails otherwise.
pub(crate) fn adopt(fd: RawFd) -> Result<UnixListener> {
    let mut adopted = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if adopted.contains(&fd) {
        return Err(invalid(
            "inherited socket",
            format!("fd {fd} was adopted already; an inherited socket has one owner"),
        ));
    }
    set_cloexec(fd)?;
    adopted.insert(fd);
    // SAFETY: the manager handed fd to this process (LISTEN_PID is ours), it
    // is open, and the set above guarantees no other owner in this process.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// The listening socket a service manager passed this process, if any: the
/// `LISTEN_FDS` fd named `name`, or without a name the one bound to
/// `socket_path`. `Ok(None)` when nothing was passed to this process
/// (`LISTEN_PID` unset or another process's).
///
/// This is systemd's socket activation (`ListenStream=` in a `.socket` unit,
/// or `systemd-socket-activate -l <path>`): the manager bound the socket, and
/// the daemon adopts it instead of binding its own. It never probes, unlinks
/// or binds anything.
///
/// ```
/// use historia_lifecycle::{activated_listener, LifecycleError};
/// // Not started by a socket unit here, so there is nothing to adopt.
/// let sock = std::path::Path::new("/run/user/1000/app/daemon.sock");
/// assert!(activated_listener(sock, None)?.is_none());
/// # Ok::<(), LifecycleError>(())
/// ```
///
/// # What happens to the fds
/// - All `LISTEN_FDS` fds get `FD_CLOEXEC`, as `sd_listen_fds(3)` does, so
///   children never inherit them; none is closed.
/// - The chosen one is owned by the returned listener from then on, once per
///   process: asking for it again is an error.
/// - The others stay open and unowned for the rest of the process (the
///   manager keeps its own copy, so closing them gains nothing).
/// - `O_NONBLOCK` stays as the manager set it: blocking unless the service
///   has `NonBlocking=yes` (`systemd.service(5)`).
///
/// # Call it early
/// Until this runs, the inherited fds are not close-on-exec: a child spawned
/// before gets a copy. The variables are read, never removed (`remove_var`
/// is unsound once threads exist); spawn children through
/// [`scrub_service_env`](crate::scrub_service_env).
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] naming the variable and its value
///   when `LISTEN_PID` is garbage, or when it names this process and
///   `LISTEN_FDS` is absent, 0, negative, garbage or overflowing, or
///   `LISTEN_FDNAMES` has the wrong number of names or an invalid one, or an
///   fd it names is not open.
/// - [`LifecycleError::InvalidArgument`] (`LISTEN_FDNAMES`) when no fd is
///   named `name`.
/// - [`LifecycleError::InvalidArgument`] (`inherited socket`) when no
///   candidate is a listening `AF_UNIX` stream socket bound to
///   `socket_path`; the message says which fd failed which check. Also when
///   it was adopted already.
/// - [`LifecycleError::Io`] when `getsockname(2)`, `getsockopt(2)` or
///   `fcntl(2)` fails otherwise.
///
/// See also: [sd_listen_fds(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_listen_fds.html),
/// [systemd.socket(5)](https://www.freedesktop.org/software/systemd/man/latest/systemd.socket.html).
pub fn activated_listener(socket_path: &Path, name: Option<&str>) -> Result<Option<UnixListener>> {
    let env = |key| std::env::var_os(key);
    // The common start has no LISTEN_PID at all: answer without the
    // getpid(2) the comparison needs.
    let Some(listen_pid) = env("LISTEN_PID") else {
        return Ok(None);
    };
    let Some(fds) = parse_listen_env(
        Some(&listen_pid),
        env("LISTEN_FDS").as_deref(),
        env("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    for (fd, _) in fds.fds() {
        set_cloexec(fd)?;
    }
    let fd = select_fd(&fds, name, socket_path, inspect_fd)?;
    adopt(fd).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// `parse_listen_env` for PID 100.
    fn parse(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
    ) -> Result<Option<ListenFds>> {
        parse_listen_env(pid.map(os), fds.map(os), names.map(os), 100)
    }

    /// Asserts `r` is InvalidArgument about `var` and names `value`.
    fn assert_invalid(r: Result<impl fmt::Debug>, var: &str, value: &str) {
        match r {
            Err(e @ LifecycleError::InvalidArgument { what, .. }) => {
                assert_eq!(what, var, "{e}");
                assert!(e.to_string().contains(value), "{e} does not name {value}");
            }
            other => panic!("expected InvalidArgument for {var}, got {other:?}"),
        }
    }

    #[test]
    fn listen_pid_missing_or_foreign_means_not_for_us() {
        assert_eq!(parse(None, Some("1"), None).unwrap(), None);
        assert_eq!(parse(None, None, None).unwrap(), None);
        assert_eq!(parse(Some("101"), Some("1"), None).unwrap(), None);
        // Even with garbage beside it: those variables are not ours to judge.
        assert_eq!(parse(Some("101"), Some("-1"), Some("a:b")).unwrap(), None);
    }

    #[test]
    fn listen_pid_garbage_is_an_error() {
        for pid in ["", "abc", "-100", "0", "+100", " 100", "2147483648"] {
            assert_invalid(parse(Some(pid), Some("1"), None), "LISTEN_PID", pid);
        }
    }

    #[test]
    fn listen_fds_for_us() {
        assert_eq!(
            parse(Some("100"), Some("2"), None).unwrap(),
            Some(ListenFds {
                count: 2,
                names: Vec::new()
            })
        );
        let fds = parse(Some("100"), Some("3"), Some("x::z"))
            .unwrap()
            .unwrap();
        assert_eq!(
            fds.names,
            vec![Some("x".to_string()), None, Some("z".to_string())]
        );
        assert_eq!(
            fds.fds().collect::<Vec<_>>(),
            vec![(3, Some("x")), (4, None), (5, Some("z"))]
        );
    }

    #[test]
    fn listen_fds_absent_zero_negative_garbage_overflow_are_errors() {
        assert_invalid(parse(Some("100"), None, None), "LISTEN_FDS", "unset");
        for fds in ["0", "-1", "", "abc", "1x", " 1", "+1", "0x10"] {
            assert_invalid(parse(Some("100"), Some(fds), None), "LISTEN_FDS", fds);
        }
        // The last fd is 3 + n - 1: n = i32::MAX - 2 still fits, one more not.
        let max = (i32::MAX - 2).to_string();
        assert_eq!(
            parse(Some("100"), Some(&max), None)
                .map(|f| f.map(|f| f.count))
                .unwrap(),
            Some(i32::MAX as usize - 2)
        );
        for fds in [
            (i32::MAX - 1).to_string(),
            u64::MAX.to_string(),
            "99999999999999999999999".to_string(),
        ] {
            assert_invalid(parse(Some("100"), Some(&fds), None), "LISTEN_FDS", &fds);
        }
    }

    #[test]
    fn listen_fdnames_count_must_match() {
        assert_invalid(
            parse(Some("100"), Some("2"), Some("a")),
            "LISTEN_FDNAMES",
            "\"a\"",
        );
        assert_invalid(
            parse(Some("100"), Some("2"), Some("a:b:c")),
            "LISTEN_FDNAMES",
            "a:b:c",
        );
        assert_invalid(
            parse(Some("100"), Some("2"), Some("")),
            "LISTEN_FDNAMES",
            "\"\"",
        );
        // One empty name for one fd is one unnamed fd.
        assert_eq!(
            parse(Some("100"), Some("1"), Some(""))
                .unwrap()
                .unwrap()
                .names,
            vec![None]
        );
    }

    #[test]
    fn listen_fdnames_must_be_valid_fd_names() {
        let longest = "n".repeat(FDNAME_MAX);
        assert!(parse(Some("100"), Some("1"), Some(&longest)).is_ok());
        let over = "n".repeat(FDNAME_MAX + 1);
        assert_invalid(
            parse(Some("100"), Some("1"), Some(&over)),
            "LISTEN_FDNAMES",
            "256 bytes",
        );
        for bad in ["tab\there", "caf\u{e9}", "del\u{7f}", "nl\n"] {
            assert_invalid(
                parse(Some("100"), Some("1"), Some(bad)),
                "LISTEN_FDNAMES",
                "ASCII",
            );
        }
        // Space and punctuation are printable.
        assert!(parse(Some("100"), Some("1"), Some("my socket.socket")).is_ok());
    }

    fn unix_listening(path: &str) -> FdFacts {
        FdFacts {
            family: Family::Unix,
            sock_type: Some(SockType::Stream),
            listening: true,
            bound: Bound::Path(path.into()),
        }
    }

    #[test]
    fn check_fd_says_which_check_failed() {
        let ours = Path::new("/run/app.sock");
        assert_eq!(check_fd(&unix_listening("/run/app.sock"), ours), Ok(()));
        let not_socket = FdFacts {
            family: Family::NotASocket,
            sock_type: None,
            listening: false,
            bound: Bound::Unnamed,
        };
        assert_eq!(check_fd(&not_socket, ours), Err(Refusal::NotASocket));
        let tcp = FdFacts {
            family: Family::Other(libc::AF_INET),
            bound: Bound::Unnamed,
            ..unix_listening("")
        };
        assert_eq!(check_fd(&tcp, ours), Err(Refusal::NotUnix(libc::AF_INET)));
        let dgram = FdFacts {
            sock_type: Some(SockType::Datagram),
            listening: false,
            ..unix_listening("/run/app.sock")
        };
        assert_eq!(
            check_fd(&dgram, ours),
            Err(Refusal::NotStream(Some(SockType::Datagram)))
        );
        let idle = FdFacts {
            listening: false,
            ..unix_listening("/run/app.sock")
        };
        assert_eq!(check_fd(&idle, ours), Err(Refusal::NotListening));
        assert_eq!(
            check_fd(&unix_listening("/run/other.sock"), ours),
            Err(Refusal::BoundElsewhere(Bound::Path(
                "/run/other.sock".into()
            )))
        );
        let abstract_ = FdFacts {
            bound: Bound::Abstract(b"app".to_vec()),
            ..unix_listening("")
        };
        assert!(matches!(
            check_fd(&abstract_, ours),
            Err(Refusal::BoundElsewhere(Bound::Abstract(_)))
        ));
        let msg = Refusal::BoundElsewhere(Bound::Path("/x".into())).describe(ours);
        assert_eq!(msg, "is bound to /x, not /run/app.sock");
    }

    /// Facts for fds 3.. from a table.
    fn table(facts: Vec<FdFacts>) -> impl FnMut(RawFd) -> Result<FdFacts> {
        move |fd| Ok(facts[(fd - SD_LISTEN_FDS_START) as usize].clone())
    }

    #[test]
    fn select_by_path_skips_other_sockets() {
        let ours = Path::new("/run/app.sock");
        let fds = parse(Some("100"), Some("3"), None).unwrap().unwrap();
        let tcp = FdFacts {
            family: Family::Other(libc::AF_INET6),
            ..unix_listening("")
        };
        let facts = vec![
            tcp,
            unix_listening("/run/other.sock"),
            unix_listening("/run/app.sock"),
        ];
        assert_eq!(select_fd(&fds, None, ours, table(facts)).unwrap(), 5);
    }

    #[test]
    fn select_by_path_fails_naming_every_fd_and_its_check() {
        let ours = Path::new("/run/app.sock");
        let fds = parse(Some("100"), Some("2"), Some("a:")).unwrap().unwrap();
        let idle = FdFacts {
            listening: false,
            ..unix_listening("/run/app.sock")
        };
        let facts = vec![unix_listening("/run/x.sock"), idle];
        let e = select_fd(&fds, None, ours, table(facts)).unwrap_err();
        assert!(
            matches!(
                e,
                LifecycleError::InvalidArgument {
                    what: "inherited socket",
                    ..
                }
            ),
            "{e:?}"
        );
        let m = e.to_string();
        assert!(m.contains("fd 3 (\"a\") is bound to /run/x.sock"), "{m}");
        assert!(
            m.contains("fd 4 is an AF_UNIX stream socket that is not listening"),
            "{m}"
        );
    }

    #[test]
    fn select_by_name() {
        let ours = Path::new("/run/app.sock");
        let fds = parse(Some("100"), Some("3"), Some("web:ctl:"))
            .unwrap()
            .unwrap();
        let facts = || {
            vec![
                unix_listening("/run/app.sock"),
                unix_listening("/run/app.sock"),
                unix_listening("/run/app.sock"),
            ]
        };
        assert_eq!(
            select_fd(&fds, Some("ctl"), ours, table(facts())).unwrap(),
            4
        );
        assert_eq!(
            select_fd(&fds, Some("web"), ours, table(facts())).unwrap(),
            3
        );
        // An empty name is no name: it cannot be asked for.
        assert_invalid(
            select_fd(&fds, Some(""), ours, table(facts())),
            "LISTEN_FDNAMES",
            "\"\"",
        );
        assert_invalid(
            select_fd(&fds, Some("nope"), ours, table(facts())),
            "LISTEN_FDNAMES",
            "nope",
        );
        let unnamed = parse(Some("100"), Some("1"), None).unwrap().unwrap();
        assert_invalid(
            select_fd(&unnamed, Some("ctl"), ours, table(facts())),
            "LISTEN_FDNAMES",
            "is unset",
        );
    }

    #[test]
    fn select_by_name_still_checks_the_named_fd() {
        let ours = Path::new("/run/app.sock");
        let fds = parse(Some("100"), Some("2"), Some("ctl:web"))
            .unwrap()
            .unwrap();
        let dgram = FdFacts {
            sock_type: Some(SockType::Datagram),
            ..unix_listening("/run/app.sock")
        };
        let e = select_fd(
            &fds,
            Some("ctl"),
            ours,
            table(vec![dgram, unix_listening("/run/app.sock")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("fd 3 (\"ctl\") is an AF_UNIX datagram socket"),
            "{e}"
        );
    }

    #[test]
    fn inspect_real_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let facts = inspect_fd(listener.as_raw_fd()).unwrap();
        assert_eq!(facts, unix_listening(path.to_str().unwrap()));
        assert_eq!(check_fd(&facts, &path), Ok(()));

        let dgram = std::os::unix::net::UnixDatagram::bind(dir.path().join("d.sock")).unwrap();
        let facts = inspect_fd(dgram.as_raw_fd()).unwrap();
        assert_eq!(facts.sock_type, Some(SockType::Datagram));
        assert!(!facts.listening);

        let file = std::fs::File::open(dir.path()).unwrap();
        assert_eq!(
            inspect_fd(file.as_raw_fd()).unwrap().family,
            Family::NotASocket
        );

        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let facts = inspect_fd(tcp.as_raw_fd()).unwrap();
        assert_eq!(facts.family, Family::Other(libc::AF_INET));
        assert!(facts.listening);

        // A connected, not listening stream socket.
        let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let facts = inspect_fd(client.as_raw_fd()).unwrap();
        assert_eq!(check_fd(&facts, &path), Err(Refusal::NotListening));
    }
}
