//! Readiness notification: the `sd_notify(3)` datagram protocol, written by
//! hand, and the environment a service manager hands its service.
//!
//! The pure parts (the `NOTIFY_SOCKET` address, the watchdog interval, the
//! datagram itself) are unit-tested below; [`Notifier`] only adds one
//! `sendto(2)` per message.
//!
//! Why not the `sd-notify` crate: 0.5 fails with `ENOENT` on an abstract
//! `NOTIFY_SOCKET=@name` and lets `status("a\nREADY=1")` smuggle in a second
//! assignment.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::error::{io_at, LifecycleError, Result};
use crate::sys::SUN_PATH_MAX;

/// The variable that names the manager's notification socket.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Every variable a service manager sets for its service alone: a child the
/// daemon spawns must not see them (see [`scrub_service_env`]).
const SERVICE_ENV: [&str; 7] = [
    NOTIFY_SOCKET,
    crate::readiness::READY_FD_ENV,
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// The longest datagram the manager accepts: systemd reads notifications into
/// a buffer of `NOTIFY_BUFFER_MAX` (`PIPE_BUF`, 4096) bytes and ignores any
/// message that fills it.
const DATAGRAM_MAX: usize = 4095;

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotifyAddr {
    /// A socket file (`/run/systemd/notify`).
    Path(PathBuf),
    /// A Linux abstract socket (`@name`), without the leading NUL.
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// The address as `NOTIFY_SOCKET` spells it, for messages.
    fn display(&self) -> PathBuf {
        match self {
            NotifyAddr::Path(p) => p.clone(),
            NotifyAddr::Abstract(name) => {
                let mut s = b"@".to_vec();
                s.extend_from_slice(name);
                PathBuf::from(OsStr::from_bytes(&s))
            }
        }
    }
}

/// Parses a `NOTIFY_SOCKET` value: an absolute path, or `@name` for a Linux
/// abstract socket, as `sd_notify(3)` accepts.
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] naming `NOTIFY_SOCKET` and the value
///   when it is empty, relative, a bare `@`, holds a NUL byte, or is
///   `@name` on a platform without abstract sockets.
/// - [`LifecycleError::PathTooLong`] when the path (or the abstract name)
///   does not fit `sun_path`.
pub(crate) fn parse_notify_socket(value: &OsStr) -> Result<NotifyAddr> {
    let bytes = value.as_bytes();
    let invalid = |why: &str| LifecycleError::InvalidArgument {
        what: NOTIFY_SOCKET,
        reason: format!("{:?} {why}", value.to_string_lossy()),
    };
    if bytes.contains(&0) {
        return Err(invalid("contains a NUL byte"));
    }
    let too_long = || LifecycleError::PathTooLong {
        path: PathBuf::from(value),
        len: bytes.len(),
        max: SUN_PATH_MAX,
    };
    match bytes.first() {
        Some(b'/') => {
            if bytes.len() > SUN_PATH_MAX {
                return Err(too_long());
            }
            Ok(NotifyAddr::Path(PathBuf::from(value)))
        }
        Some(b'@') => {
            let name = &bytes[1..];
            if name.is_empty() {
                return Err(invalid("is an empty abstract socket name"));
            }
            if !cfg!(any(target_os = "linux", target_os = "android")) {
                return Err(invalid(
                    "is an abstract socket address, which only Linux has",
                ));
            }
            // The leading NUL takes the place of the '@' in sun_path.
            if name.len() > SUN_PATH_MAX {
                return Err(too_long());
            }
            Ok(NotifyAddr::Abstract(name.to_vec()))
        }
        Some(_) => Err(invalid(
            "is neither an absolute path nor an @abstract socket name",
        )),
        None => Err(invalid("is empty")),
    }
}

/// A decimal number of ASCII digits only (no sign, no space), or `None`.
fn decimal(value: &OsStr) -> Option<u64> {
    let b = value.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// The watchdog interval the manager asks for, from `WATCHDOG_USEC` and
/// `WATCHDOG_PID`, as `sd_watchdog_enabled(3)` reads them.
///
/// `None` (no watchdog) when `WATCHDOG_USEC` is absent, zero or not a decimal
/// number, or when `WATCHDOG_PID` is set to anything but `our_pid` (the
/// variables were meant for another process, e.g. a parent that forked us).
pub(crate) fn parse_watchdog(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    our_pid: u32,
) -> Option<Duration> {
    let usec = decimal(usec?)?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        if decimal(pid)? != u64::from(our_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// One assignment (or, for [`Message::Reloading`], two) in an `sd_notify(3)`
/// datagram.
///
/// [`Notifier::send`] sends several in one datagram; each key may appear once.
///
/// ```
/// use historia_lifecycle::Message;
/// let both = [Message::Ready, Message::Status("serving on /run/app.sock")];
/// # let _ = both;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message<'a> {
    /// `READY=1`: start-up is finished (or a reload is, after
    /// [`Message::Reloading`]).
    Ready,
    /// `STOPPING=1`: the daemon is shutting down.
    Stopping,
    /// `RELOADING=1` with `MONOTONIC_USEC=` (the `CLOCK_MONOTONIC` time of the
    /// send, in µs), as `Type=notify-reload` requires; send [`Message::Ready`]
    /// when the reload is done.
    Reloading,
    /// `STATUS=<text>`: a one-line status for `systemctl status`. The text
    /// must not hold a newline (it would start another assignment) or a NUL.
    Status(&'a str),
    /// `ERRNO=<n>`: why the daemon failed, as a non-negative errno number.
    Errno(i32),
    /// `EXTEND_TIMEOUT_USEC=<µs>`: asks the manager for this much more time,
    /// counted from now, for the start, stop or reload in progress.
    ExtendTimeout(Duration),
    /// `MAINPID=<pid>`: the daemon's main process is now this one.
    MainPid(u32),
    /// `WATCHDOG=1`: the keep-alive ping (see [`Notifier::watchdog_interval`]).
    Watchdog,
}

impl Message<'_> {
    /// The keys this message sets, in order.
    fn keys(&self) -> &'static [&'static str] {
        match self {
            Message::Ready => &["READY"],
            Message::Stopping => &["STOPPING"],
            Message::Reloading => &["RELOADING", "MONOTONIC_USEC"],
            Message::Status(_) => &["STATUS"],
            Message::Errno(_) => &["ERRNO"],
            Message::ExtendTimeout(_) => &["EXTEND_TIMEOUT_USEC"],
            Message::MainPid(_) => &["MAINPID"],
            Message::Watchdog => &["WATCHDOG"],
        }
    }
}

fn bad_message(reason: String) -> LifecycleError {
    LifecycleError::InvalidArgument {
        what: "sd_notify message",
        reason,
    }
}

/// Builds the datagram for `messages`: `KEY=value` lines joined by `\n`.
/// `monotonic_usec` is the `CLOCK_MONOTONIC` time in µs that follows
/// `RELOADING=1` (taken as an argument so this stays pure).
///
/// # Errors
/// [`LifecycleError::InvalidArgument`] when `messages` is empty, repeats a key,
/// holds a `STATUS` with a newline or NUL, a negative `ERRNO`, a `MAINPID`
/// of 0 or beyond `i32::MAX`, or adds up to more than the manager reads
/// (4095 bytes).
pub(crate) fn datagram(messages: &[Message<'_>], monotonic_usec: u64) -> Result<Vec<u8>> {
    if messages.is_empty() {
        return Err(bad_message("no assignment to send".into()));
    }
    let mut keys: Vec<&str> = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for m in messages {
        for key in m.keys() {
            if keys.contains(key) {
                return Err(bad_message(format!("{key}= is given twice")));
            }
            keys.push(key);
        }
        match *m {
            Message::Ready => lines.push("READY=1".into()),
            Message::Stopping => lines.push("STOPPING=1".into()),
            Message::Reloading => {
                lines.push("RELOADING=1".into());
                lines.push(format!("MONOTONIC_USEC={monotonic_usec}"));
            }
            Message::Status(text) => {
                if text.contains('\n') {
                    return Err(bad_message(format!(
                        "STATUS text {text:?} contains a newline, which would start another assignment"
                    )));
                }
                if text.contains('\0') {
                    return Err(bad_message(format!(
                        "STATUS text {text:?} contains a NUL byte, for which the manager drops the message"
                    )));
                }
                lines.push(format!("STATUS={text}"));
            }
            Message::Errno(n) => {
                if n < 0 {
                    return Err(bad_message(format!(
                        "ERRNO={n} is negative; errno numbers are positive"
                    )));
                }
                lines.push(format!("ERRNO={n}"));
            }
            Message::ExtendTimeout(d) => {
                let usec = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
                lines.push(format!("EXTEND_TIMEOUT_USEC={usec}"));
            }
            Message::MainPid(pid) => {
                if pid == 0 || pid > i32::MAX as u32 {
                    return Err(bad_message(format!(
                        "MAINPID={pid} is not a process ID (1..={})",
                        i32::MAX
                    )));
                }
                lines.push(format!("MAINPID={pid}"));
            }
            Message::Watchdog => lines.push("WATCHDOG=1".into()),
        }
    }
    let bytes = lines.join("\n").into_bytes();
    if bytes.len() > DATAGRAM_MAX {
        return Err(bad_message(format!(
            "{} bytes; the manager ignores notifications over {DATAGRAM_MAX}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// The sending end of `sd_notify(3)`: the manager's socket, read once from
/// `NOTIFY_SOCKET`, and the watchdog interval it asked for.
///
/// Each call sends one datagram from a fresh unbound, close-on-exec
/// `AF_UNIX` `SOCK_DGRAM` socket (`unix(7)`), as `sd_notify(3)` does, so a
/// `Notifier` holds no descriptor and can be cloned and sent anywhere.
/// Sends block only while the manager's receive queue is full, as
/// `sd_notify(3)`'s do.
///
/// Systemd (`Type=notify`, `Type=notify-reload`, see `systemd.service(5)`) and
/// `start-stop-daemon --notify-await` read these messages. Where
/// `NOTIFY_SOCKET` is unset, [`Notifier::from_env`] returns `None` and a
/// daemon simply sends nothing.
///
/// ```
/// use historia_lifecycle::{LifecycleError, Notifier};
///
/// fn started(notifier: Option<&Notifier>) -> Result<(), LifecycleError> {
///     if let Some(n) = notifier {
///         n.ready()?;
///     }
///     Ok(())
/// }
/// // Once, early: Some under systemd, None where nobody waits.
/// let notifier = Notifier::from_env()?;
/// // ... bind or adopt the socket, then, once serving:
/// # if false {
/// started(notifier.as_ref())?;
/// # }
/// # Ok::<(), LifecycleError>(())
/// ```
///
/// # The environment
/// `from_env` reads the variables and never writes them (`remove_var` is
/// unsound once threads exist), so children the daemon spawns would inherit
/// them and could talk to the manager in its name: spawn them through
/// [`scrub_service_env`].
///
/// See also: [sd_notify(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html),
/// [sd_watchdog_enabled(3)](https://www.freedesktop.org/software/systemd/man/latest/sd_watchdog_enabled.html).
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: NotifyAddr,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (and `WATCHDOG_USEC`/`WATCHDOG_PID`) once;
    /// `Ok(None)` when `NOTIFY_SOCKET` is unset: nobody waits for a report.
    ///
    /// # Errors
    /// - [`LifecycleError::InvalidArgument`] naming `NOTIFY_SOCKET` and its
    ///   value when it is set but is neither an absolute path nor `@name` (or
    ///   is `@name` on a platform other than Linux).
    /// - [`LifecycleError::PathTooLong`] when it does not fit `sun_path`
    ///   (`unix(7)`).
    pub fn from_env() -> Result<Option<Notifier>> {
        let Some(value) = std::env::var_os(NOTIFY_SOCKET) else {
            return Ok(None);
        };
        let addr = parse_notify_socket(&value)?;
        let watchdog = parse_watchdog(
            std::env::var_os("WATCHDOG_USEC").as_deref(),
            std::env::var_os("WATCHDOG_PID").as_deref(),
            std::process::id(),
        );
        Ok(Some(Notifier { addr, watchdog }))
    }

    /// How often the manager wants [`Notifier::watchdog`], as
    /// `WATCHDOG_USEC` said when [`Notifier::from_env`] ran; `None` when it
    /// wants none (unset, zero, garbage, or `WATCHDOG_PID` names another
    /// process). Ping at about half this interval.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `messages` in one datagram.
    ///
    /// # Errors
    /// - [`LifecycleError::InvalidArgument`] when the messages are refused
    ///   (see [`Message`]): empty, a repeated key, a `STATUS` with a newline
    ///   or NUL, a negative `ERRNO`, an impossible `MAINPID`, too long.
    ///   Nothing is sent then.
    /// - [`LifecycleError::Io`] naming the socket when `socket(2)` or
    ///   `sendto(2)` fails (`NotFound` or `ConnectionRefused`: no manager
    ///   listens there any more).
    pub fn send(&self, messages: &[Message<'_>]) -> Result<()> {
        let monotonic = if messages.contains(&Message::Reloading) {
            monotonic_usec()?
        } else {
            0
        };
        let bytes = datagram(messages, monotonic)?;
        let fail = |e| io_at("send a notification to", &self.addr.display(), e);
        // std opens it close-on-exec.
        let socket = UnixDatagram::unbound().map_err(fail)?;
        let sent = match &self.addr {
            NotifyAddr::Path(path) => socket.send_to(&bytes, path),
            #[cfg(any(target_os = "linux", target_os = "android"))]
            NotifyAddr::Abstract(name) => {
                #[cfg(target_os = "android")]
                use std::os::android::net::SocketAddrExt;
                #[cfg(target_os = "linux")]
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(&bytes, &addr))
            }
            // parse_notify_socket refuses abstract names elsewhere.
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            NotifyAddr::Abstract(_) => Err(std::io::ErrorKind::Unsupported.into()),
        }
        .map_err(fail)?;
        if sent != bytes.len() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", bytes.len()),
            )));
        }
        Ok(())
    }

    /// Sends `READY=1`.
    ///
    /// # Errors
    /// As [`Notifier::send`]: [`LifecycleError::Io`] when the send fails.
    pub fn ready(&self) -> Result<()> {
        self.send(&[Message::Ready])
    }

    /// Sends `STOPPING=1`.
    ///
    /// # Errors
    /// As [`Notifier::send`]: [`LifecycleError::Io`] when the send fails.
    pub fn stopping(&self) -> Result<()> {
        self.send(&[Message::Stopping])
    }

    /// Sends `RELOADING=1` with `MONOTONIC_USEC=` read from
    /// `clock_gettime(2)` `CLOCK_MONOTONIC`; send [`Notifier::ready`] when
    /// the reload is done.
    ///
    /// # Errors
    /// As [`Notifier::send`]: [`LifecycleError::Io`] when the clock or the
    /// send fails.
    pub fn reloading(&self) -> Result<()> {
        self.send(&[Message::Reloading])
    }

    /// Sends `STATUS=<text>`.
    ///
    /// # Errors
    /// - [`LifecycleError::InvalidArgument`] when `text` holds a newline or a
    ///   NUL byte; nothing is sent.
    /// - [`LifecycleError::Io`] when the send fails.
    pub fn status(&self, text: &str) -> Result<()> {
        self.send(&[Message::Status(text)])
    }

    /// Sends `ERRNO=<errno>`: why the daemon failed.
    ///
    /// # Errors
    /// - [`LifecycleError::InvalidArgument`] when `errno` is negative.
    /// - [`LifecycleError::Io`] when the send fails.
    pub fn errno(&self, errno: i32) -> Result<()> {
        self.send(&[Message::Errno(errno)])
    }

    /// Sends `EXTEND_TIMEOUT_USEC=`: asks for `more` time, from now.
    ///
    /// # Errors
    /// As [`Notifier::send`]: [`LifecycleError::Io`] when the send fails.
    pub fn extend_timeout(&self, more: Duration) -> Result<()> {
        self.send(&[Message::ExtendTimeout(more)])
    }

    /// Sends `MAINPID=<pid>`.
    ///
    /// # Errors
    /// - [`LifecycleError::InvalidArgument`] when `pid` is 0 or beyond
    ///   `i32::MAX`.
    /// - [`LifecycleError::Io`] when the send fails.
    pub fn main_pid(&self, pid: u32) -> Result<()> {
        self.send(&[Message::MainPid(pid)])
    }

    /// Sends `WATCHDOG=1`, the keep-alive ping.
    ///
    /// # Errors
    /// As [`Notifier::send`]: [`LifecycleError::Io`] when the send fails.
    pub fn watchdog(&self) -> Result<()> {
        self.send(&[Message::Watchdog])
    }
}

/// `CLOCK_MONOTONIC` now, in µs (`clock_gettime(2)`).
fn monotonic_usec() -> Result<u64> {
    use nix::time::{clock_gettime, ClockId};
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map_err(|e| LifecycleError::Io(std::io::Error::from(e)))?;
    let secs = u64::try_from(now.tv_sec()).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec()).unwrap_or(0) / 1000;
    Ok(secs.saturating_mul(1_000_000).saturating_add(micros))
}

/// Removes the variables a service manager meant for this process alone
/// (`NOTIFY_SOCKET`, `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`,
/// `WATCHDOG_USEC`, `WATCHDOG_PID`, and `HISTORIA_READY_FD`, the readiness
/// pipe of [`ensure_running`](crate::ensure_running)) from the environment `cmd` gives its
/// child, with [`Command::env_remove`]. This process's own environment is
/// never written: `remove_var` is unsound once threads exist.
///
/// Without it a child could report `READY=1` or `STOPPING=1` to the manager
/// in the daemon's name, or take `LISTEN_FDS` for its own if it runs with the
/// PID the variables name.
///
/// ```
/// use std::process::Command;
/// let mut cmd = Command::new("true");
/// historia_lifecycle::scrub_service_env(&mut cmd).arg("--version");
/// assert!(cmd.get_envs().any(|(k, v)| k == "NOTIFY_SOCKET" && v.is_none()));
/// ```
pub fn scrub_service_env(cmd: &mut Command) -> &mut Command {
    for key in SERVICE_ENV {
        cmd.env_remove(key);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    fn invalid_what(e: &LifecycleError) -> &'static str {
        match e {
            LifecycleError::InvalidArgument { what, .. } => what,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn notify_socket_absolute_path() {
        assert_eq!(
            parse_notify_socket(os("/run/systemd/notify")).unwrap(),
            NotifyAddr::Path("/run/systemd/notify".into())
        );
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn notify_socket_abstract_name() {
        assert_eq!(
            parse_notify_socket(os("@/org/freedesktop/systemd1/notify/123")).unwrap(),
            NotifyAddr::Abstract(b"/org/freedesktop/systemd1/notify/123".to_vec())
        );
        let longest = format!("@{}", "n".repeat(SUN_PATH_MAX));
        assert!(parse_notify_socket(os(&longest)).is_ok());
        let over = format!("@{}", "n".repeat(SUN_PATH_MAX + 1));
        assert!(matches!(
            parse_notify_socket(os(&over)),
            Err(LifecycleError::PathTooLong { len, max: SUN_PATH_MAX, .. }) if len == SUN_PATH_MAX + 2
        ));
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    #[test]
    fn notify_socket_abstract_name_is_refused_off_linux() {
        let e = parse_notify_socket(os("@name")).unwrap_err();
        assert_eq!(invalid_what(&e), "NOTIFY_SOCKET");
    }

    #[test]
    fn notify_socket_garbage_is_invalid_and_named() {
        for v in ["", "relative/sock", "notify", "./x", "@", " /lead-space"] {
            let e = parse_notify_socket(os(v)).unwrap_err();
            assert_eq!(invalid_what(&e), "NOTIFY_SOCKET", "{v:?}");
            assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
            assert!(e.to_string().contains(&format!("{v:?}")), "{e}");
        }
        let nul = OsStr::from_bytes(b"/run/a\0b");
        assert_eq!(
            invalid_what(&parse_notify_socket(nul).unwrap_err()),
            "NOTIFY_SOCKET"
        );
    }

    #[test]
    fn notify_socket_path_too_long_for_sun_path() {
        let fits = format!("/{}", "p".repeat(SUN_PATH_MAX - 1));
        assert!(parse_notify_socket(os(&fits)).is_ok());
        let over = format!("/{}", "p".repeat(SUN_PATH_MAX));
        match parse_notify_socket(os(&over)).unwrap_err() {
            LifecycleError::PathTooLong { path, len, max } => {
                assert_eq!(path, PathBuf::from(&over));
                assert_eq!((len, max), (SUN_PATH_MAX + 1, SUN_PATH_MAX));
            }
            other => panic!("expected PathTooLong, got {other:?}"),
        }
    }

    #[test]
    fn watchdog_interval_cases() {
        let w =
            |usec: Option<&str>, pid: Option<&str>| parse_watchdog(usec.map(os), pid.map(os), 42);
        assert_eq!(w(Some("30000000"), None), Some(Duration::from_secs(30)));
        assert_eq!(w(Some("1"), Some("42")), Some(Duration::from_micros(1)));
        // Absent, zero, garbage.
        assert_eq!(w(None, None), None);
        assert_eq!(w(None, Some("42")), None);
        assert_eq!(w(Some("0"), None), None);
        for garbage in [
            "",
            "abc",
            "-5",
            "+5",
            " 5",
            "5 ",
            "1.5",
            "99999999999999999999999",
        ] {
            assert_eq!(w(Some(garbage), None), None, "{garbage:?}");
        }
        // Another process's, or a PID that is no number.
        assert_eq!(w(Some("1000"), Some("43")), None);
        assert_eq!(w(Some("1000"), Some("")), None);
        assert_eq!(w(Some("1000"), Some("x42")), None);
    }

    #[test]
    fn each_message_has_its_datagram() {
        let one = |m: Message<'_>| String::from_utf8(datagram(&[m], 7).unwrap()).unwrap();
        assert_eq!(one(Message::Ready), "READY=1");
        assert_eq!(one(Message::Stopping), "STOPPING=1");
        assert_eq!(one(Message::Reloading), "RELOADING=1\nMONOTONIC_USEC=7");
        assert_eq!(
            one(Message::Status("serving 3 clients")),
            "STATUS=serving 3 clients"
        );
        assert_eq!(one(Message::Status("")), "STATUS=");
        assert_eq!(one(Message::Errno(2)), "ERRNO=2");
        assert_eq!(one(Message::Errno(0)), "ERRNO=0");
        assert_eq!(
            one(Message::ExtendTimeout(Duration::from_millis(1500))),
            "EXTEND_TIMEOUT_USEC=1500000"
        );
        assert_eq!(
            one(Message::ExtendTimeout(Duration::MAX)),
            format!("EXTEND_TIMEOUT_USEC={}", u64::MAX)
        );
        assert_eq!(one(Message::MainPid(4242)), "MAINPID=4242");
        assert_eq!(one(Message::Watchdog), "WATCHDOG=1");
    }

    #[test]
    fn several_messages_share_one_datagram_in_order() {
        let d = datagram(&[Message::Reloading, Message::Status("reloading")], 123).unwrap();
        assert_eq!(d, b"RELOADING=1\nMONOTONIC_USEC=123\nSTATUS=reloading");
    }

    #[test]
    fn status_with_a_newline_or_nul_is_refused() {
        for text in ["a\nREADY=1", "\n", "trailing\n", "a\0b"] {
            let e = datagram(&[Message::Status(text)], 0).unwrap_err();
            assert_eq!(invalid_what(&e), "sd_notify message", "{text:?}");
        }
    }

    #[test]
    fn keys_are_never_repeated() {
        for msgs in [
            &[Message::Ready, Message::Ready][..],
            &[Message::Status("a"), Message::Status("b")],
            &[Message::Reloading, Message::Reloading],
            &[Message::Errno(1), Message::Errno(2)],
        ] {
            let e = datagram(msgs, 0).unwrap_err();
            assert_eq!(invalid_what(&e), "sd_notify message", "{msgs:?}");
        }
        // Different keys together are fine.
        assert!(datagram(&[Message::Ready, Message::Stopping, Message::Watchdog], 0).is_ok());
    }

    #[test]
    fn impossible_values_and_sizes_are_refused() {
        let refused = |msgs: &[Message<'_>]| {
            assert_eq!(
                invalid_what(&datagram(msgs, 0).unwrap_err()),
                "sd_notify message",
                "{msgs:?}"
            )
        };
        refused(&[]);
        refused(&[Message::Errno(-1)]);
        refused(&[Message::MainPid(0)]);
        refused(&[Message::MainPid(i32::MAX as u32 + 1)]);
        assert!(datagram(&[Message::MainPid(i32::MAX as u32)], 0).is_ok());
        let fits = "s".repeat(DATAGRAM_MAX - "STATUS=".len());
        assert!(datagram(&[Message::Status(&fits)], 0).is_ok());
        let over = format!("{fits}s");
        refused(&[Message::Status(&over)]);
    }

    #[test]
    fn scrub_removes_every_service_variable_from_the_child_only() {
        let mut cmd = Command::new("true");
        cmd.env("KEEP", "1");
        scrub_service_env(&mut cmd);
        let envs: Vec<_> = cmd.get_envs().collect();
        for key in SERVICE_ENV {
            assert!(envs.contains(&(OsStr::new(key), None)), "{key} not removed");
        }
        assert!(envs.contains(&(OsStr::new("KEEP"), Some(OsStr::new("1")))));
        assert_eq!(envs.len(), SERVICE_ENV.len() + 1);
    }
}
