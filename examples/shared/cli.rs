//! Command-line plumbing shared by the `daemon` and `ctl` examples: the
//! `--socket`/`--pid` options, their environment variables, the default
//! paths in the private runtime dir, and error reporting.

use std::error::Error;
use std::ffi::OsString;
use std::path::PathBuf;

use historia_lifecycle::{
    ensure_private_dir, runtime_dir, runtime_dir_path, LifecycleError, DEFAULT_PID_NAME,
    DEFAULT_SOCKET_NAME,
};

/// The runtime dir's name: `$XDG_RUNTIME_DIR/historia-demo/`.
pub const APP: &str = "historia-demo";
/// Overrides the socket path when `--socket` is not given.
pub const SOCKET_ENV: &str = "HISTORIA_DEMO_SOCKET";
/// Overrides the PID file path when `--pid` is not given.
pub const PID_ENV: &str = "HISTORIA_DEMO_PID";

/// What a command line asked for.
pub struct Parsed {
    /// The one positional word (`ctl`'s command), if any.
    pub word: Option<String>,
    pub socket: Option<PathBuf>,
    pub pid: Option<PathBuf>,
    /// `--daemonize` (the daemon only).
    pub daemonize: bool,
    /// `--log PATH` (the daemon only).
    pub log: Option<PathBuf>,
}

/// Parses `--socket PATH`, `--pid PATH` (also `--opt=PATH`), `-h`/`--help`
/// and at most one positional word from `words`; with `daemon_options`
/// also `--daemonize` and `--log PATH`. `Ok(None)` means help.
pub fn parse_args(
    mut args: impl Iterator<Item = OsString>,
    words: &[&str],
    daemon_options: bool,
) -> Result<Option<Parsed>, String> {
    let mut parsed = Parsed {
        word: None,
        socket: None,
        pid: None,
        daemonize: false,
        log: None,
    };
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            return Err(format!("unexpected argument {arg:?}"));
        };
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(OsString::from(v))),
            _ => (text, None),
        };
        let slot = match flag {
            "-h" | "--help" => return Ok(None),
            "--socket" => &mut parsed.socket,
            "--pid" => &mut parsed.pid,
            "--daemonize" if daemon_options && inline.is_none() => {
                parsed.daemonize = true;
                continue;
            }
            "--log" if daemon_options => &mut parsed.log,
            w if parsed.word.is_none() && words.contains(&w) => {
                parsed.word = Some(w.to_owned());
                continue;
            }
            _ => return Err(format!("unexpected argument {text:?}")),
        };
        let value = inline
            .or_else(|| args.next())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("{flag} needs a path"))?;
        *slot = Some(PathBuf::from(value));
    }
    Ok(Some(parsed))
}

/// Flag, else environment variable, else the default name in the private
/// runtime dir.
///
/// The daemon passes `create = true`: the dir is made 0700 if missing and
/// refused if another user owns it or can enter it, as tmux does, since a
/// socket there could be hijacked. A query (`ctl`) passes `false`, so it never
/// leaves a dir behind, but still checks one that exists.
pub fn resolve_paths(
    socket: Option<PathBuf>,
    pid: Option<PathBuf>,
    create: bool,
) -> Result<(PathBuf, PathBuf), LifecycleError> {
    let from_env = |var| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let socket = socket.or_else(|| from_env(SOCKET_ENV));
    let pid = pid.or_else(|| from_env(PID_ENV));
    if let (Some(socket), Some(pid)) = (&socket, &pid) {
        return Ok((socket.clone(), pid.clone()));
    }
    let dir = if create {
        runtime_dir(APP)?
    } else {
        let dir = runtime_dir_path(APP)?;
        if std::fs::symlink_metadata(&dir).is_ok() {
            ensure_private_dir(&dir)?; // it exists, so this only checks
        }
        dir
    };
    Ok((
        socket.unwrap_or_else(|| dir.join(DEFAULT_SOCKET_NAME)),
        pid.unwrap_or_else(|| dir.join(DEFAULT_PID_NAME)),
    ))
}

/// Prints an error and every cause under it, one per line: the library's
/// messages name the operation and the path, the OS error comes last.
pub fn report(program: &str, e: &dyn Error) {
    eprintln!("{program}: error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        eprintln!("  caused by: {c}");
        cause = c.source();
    }
}
