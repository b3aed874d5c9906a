//! Directories: `ensure_dir`, the per-user runtime dir and its safety checks,
//! and the `sun_path` length check.

use std::ffi::OsStr;
use std::fs::DirBuilder;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{io_at, wrong_type, FileKind, LifecycleError, Result};
use crate::sys::SUN_PATH_MAX;

/// File name of the socket inside a [`runtime_dir`], by convention.
pub const DEFAULT_SOCKET_NAME: &str = "daemon.sock";
/// File name of the PID file inside a [`runtime_dir`], by convention.
pub const DEFAULT_PID_NAME: &str = "daemon.pid";

/// Creates `path` and any missing parents, as `mkdir -p`.
///
/// Directories it creates get mode 0700 (less the umask), because runtime
/// dirs hold sockets and PID files that other users have no business
/// reaching. Directories that already exist are left as they are.
///
/// # Errors
/// - [`LifecycleError::UnexpectedFileType`] when `path` exists and is not a
///   directory (a symlink to a directory is accepted).
/// - [`LifecycleError::Io`] when a component cannot be created
///   (`PermissionDenied`, a parent that is a regular file, …).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let run = dir.path().join("a/b/c");
/// historia_lifecycle::ensure_dir(&run)?;
/// assert!(run.is_dir());
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
pub fn ensure_dir(path: &Path) -> Result<()> {
    // Fast path: the directory almost always exists already (one stat
    // instead of a failing mkdir per component plus a stat).
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    match DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) => {
            // create_dir_all reports "exists" for a file in the way; say what is there.
            if let Ok(meta) = std::fs::metadata(path) {
                if !meta.is_dir() {
                    return Err(wrong_type(
                        path,
                        FileKind::Directory,
                        FileKind::of(meta.file_type()),
                    ));
                }
            }
            Err(io_at("create directory", path, e))
        }
    }
}

/// Returns the private per-user runtime dir for `app`, creating it with mode
/// 0700 when it is missing, and checks it is safe to put a socket in.
///
/// The base is chosen as the XDG Base Directory spec and tmux do:
/// - `$XDG_RUNTIME_DIR/<app>` when `XDG_RUNTIME_DIR` is set, absolute, and a
///   directory owned by this user with no group or other access;
/// - otherwise `<temp dir>/<app>-<uid>` (`$TMPDIR`, else `/tmp`).
///
/// The directory is then checked as tmux checks its socket dir: it must be a
/// real directory (not a symlink), owned by the effective uid, with no group
/// or other permission bits. A directory that fails is refused, never
/// repaired, because someone else may have planted it.
///
/// # Errors
/// - [`LifecycleError::InvalidArgument`] when `app` is empty, `.`, `..`, or
///   contains `/` or NUL.
/// - [`LifecycleError::InsecureDir`] when the directory is a symlink, owned by
///   another user, or group/world accessible.
/// - [`LifecycleError::UnexpectedFileType`] when a non-directory is in the way.
/// - [`LifecycleError::Io`] when it cannot be created or examined.
///
/// ```
/// let dir = historia_lifecycle::runtime_dir("historia-doctest")?;
/// let socket = dir.join(historia_lifecycle::DEFAULT_SOCKET_NAME);
/// assert!(socket.starts_with(&dir));
/// # std::fs::remove_dir(&dir).ok(); // a doctest leaves nothing behind
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
pub fn runtime_dir(app: &str) -> Result<PathBuf> {
    let dir = runtime_dir_path(app)?;
    ensure_private_dir(&dir)?;
    Ok(dir)
}

/// The path [`runtime_dir`] would use for `app`, computed without creating or
/// checking the directory: for tools (`status`, `stop`) that must not leave a
/// directory behind when no daemon ever ran. Check an existing one with
/// [`ensure_private_dir`] before trusting what is inside.
///
/// # Errors
/// [`LifecycleError::InvalidArgument`] when `app` is empty, `.`, `..`, or
/// contains `/` or NUL.
///
/// ```
/// let path = historia_lifecycle::runtime_dir_path("historia-doctest-unused")?;
/// assert!(path.ends_with("historia-doctest-unused") || path.to_string_lossy().contains("historia-doctest-unused-"));
/// # Ok::<(), historia_lifecycle::LifecycleError>(())
/// ```
pub fn runtime_dir_path(app: &str) -> Result<PathBuf> {
    validate_app_name(app)?;
    let uid = nix::unistd::geteuid().as_raw();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| xdg_base_usable(Path::new(x), uid));
    Ok(choose_runtime_dir(
        app,
        xdg.as_deref(),
        &std::env::temp_dir(),
        uid,
    ))
}

/// Creates `dir` (mode 0700) if it is missing, then checks that it is a
/// directory, not a symlink, owned by the effective uid, with no group or
/// other permission bits, as tmux checks its socket directory.
///
/// # Errors
/// As [`runtime_dir`]: [`LifecycleError::InsecureDir`],
/// [`LifecycleError::UnexpectedFileType`] or [`LifecycleError::Io`].
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    // A symlink (dangling or not) is refused as such, before mkdir would
    // report a dangling one as a plain I/O error.
    if lstat_opt(dir)
        .ok()
        .flatten()
        .is_some_and(|m| m.file_type().is_symlink())
    {
        return Err(LifecycleError::InsecureDir {
            path: dir.to_path_buf(),
            reason: "it is a symbolic link".into(),
        });
    }
    ensure_dir(dir)?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io_at("examine", dir, e))?;
    check_private(
        dir,
        meta.file_type().is_symlink(),
        meta.is_dir(),
        meta.uid(),
        meta.mode(),
    )
}

/// The ownership and mode rules of [`ensure_private_dir`], on plain values.
fn check_private(dir: &Path, is_symlink: bool, is_dir: bool, owner: u32, mode: u32) -> Result<()> {
    let insecure = |reason: String| LifecycleError::InsecureDir {
        path: dir.to_path_buf(),
        reason,
    };
    if is_symlink {
        return Err(insecure("it is a symbolic link".into()));
    }
    if !is_dir {
        return Err(wrong_type(dir, FileKind::Directory, FileKind::Regular));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if owner != uid {
        return Err(insecure(format!("owned by uid {owner}, not by uid {uid}")));
    }
    if mode & 0o077 != 0 {
        return Err(insecure(format!(
            "mode {:04o} lets group or others in; expected 0700",
            mode & 0o7777
        )));
    }
    Ok(())
}

fn validate_app_name(app: &str) -> Result<()> {
    let bad = |reason: &str| LifecycleError::InvalidArgument {
        what: "application name",
        reason: format!("{app:?} {reason}"),
    };
    if app.is_empty() {
        return Err(bad("is empty"));
    }
    if app == "." || app == ".." {
        return Err(bad("is not a directory name"));
    }
    if app.contains('/') || app.contains('\0') {
        return Err(bad("contains '/' or NUL"));
    }
    Ok(())
}

/// Whether `$XDG_RUNTIME_DIR` may be used: absolute, a directory (not a
/// symlink), owned by `uid`, mode 0700 as the XDG spec requires.
fn xdg_base_usable(base: &Path, uid: u32) -> bool {
    base.is_absolute()
        && std::fs::symlink_metadata(base)
            .map(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0)
            .unwrap_or(false)
}

/// Pure choice of the runtime dir: `<xdg>/<app>` when a usable XDG base is
/// given, else `<tmp>/<app>-<uid>`.
pub(crate) fn choose_runtime_dir(app: &str, xdg: Option<&OsStr>, tmp: &Path, uid: u32) -> PathBuf {
    match xdg {
        Some(base) => Path::new(base).join(app),
        None => tmp.join(format!("{app}-{uid}")),
    }
}

/// Rejects a socket path that `sun_path` cannot hold, before anything on disk
/// changes, instead of letting it be truncated.
pub(crate) fn check_socket_path(path: &Path) -> Result<()> {
    let len = path.as_os_str().as_bytes().len();
    if len == 0 {
        return Err(LifecycleError::InvalidArgument {
            what: "socket path",
            reason: "is empty".into(),
        });
    }
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(LifecycleError::InvalidArgument {
            what: "socket path",
            reason: format!("{} contains a NUL byte", path.display()),
        });
    }
    if len > SUN_PATH_MAX {
        return Err(LifecycleError::PathTooLong {
            path: path.to_path_buf(),
            len,
            max: SUN_PATH_MAX,
        });
    }
    Ok(())
}

/// The directory a path lives in, for creating it and for temp files beside it.
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `lstat(2)` that maps `NotFound` to `None`.
pub(crate) fn lstat_opt(path: &Path) -> io::Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Unlinks `path` if `lstat` still shows the inode `dev_ino`, and says whether
/// it did; `NotFound` is not an error. The lstat narrows, but cannot close, the
/// window in which another process swaps the path: POSIX has no
/// unlink-if-inode. Callers hold the claim's flock, so no cooperating process
/// swaps it.
pub(crate) fn remove_if_same(path: &Path, dev_ino: (u64, u64), op: &'static str) -> Result<bool> {
    match lstat_opt(path).map_err(|e| io_at("examine", path, e))? {
        Some(m) if (m.dev(), m.ino()) == dev_ino => match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(op, path, e)),
        },
        _ => Ok(false),
    }
}

/// Which inode `path` names now, if any.
pub(crate) fn dev_ino(path: &Path) -> Option<(u64, u64)> {
    lstat_opt(path).ok().flatten().map(|m| (m.dev(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Cases per property.
    const CASES: u32 = 5_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Any bytes as a socket path: accepted exactly when non-empty,
        /// without NUL, and within `sun_path`; never a panic, never
        /// truncated.
        #[test]
        fn socket_path_check_accepts_exactly_what_sun_path_holds(
            bytes in proptest::collection::vec(any::<u8>(), 0..=2 * SUN_PATH_MAX)
        ) {
            let path = Path::new(OsStr::from_bytes(&bytes));
            let fits = !bytes.is_empty() && !bytes.contains(&0) && bytes.len() <= SUN_PATH_MAX;
            match check_socket_path(path) {
                Ok(()) => prop_assert!(fits),
                Err(LifecycleError::PathTooLong { len, max, path: p }) => {
                    prop_assert!(!fits && len == bytes.len() && max == SUN_PATH_MAX);
                    prop_assert_eq!(p.as_os_str().as_bytes(), &bytes[..]);
                }
                Err(LifecycleError::InvalidArgument { .. }) => {
                    prop_assert!(bytes.is_empty() || bytes.contains(&0))
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }

        /// Any application name: accepted names stay one level below the
        /// base (never `..`, never a separator); the rest are refused.
        #[test]
        fn accepted_app_names_never_escape_the_runtime_base(
            app in proptest::string::string_regex("[./a-z\x00-]{0,6}|.{0,12}").unwrap()
        ) {
            let ok = validate_app_name(&app).is_ok();
            let should = !app.is_empty() && app != "." && app != ".." && !app.contains(['/', '\0']);
            prop_assert_eq!(ok, should, "{:?}", app);
            if ok {
                let base = Path::new("/run/user/1000");
                let dir = choose_runtime_dir(&app, Some(base.as_os_str()), Path::new("/tmp"), 1000);
                prop_assert_eq!(dir.parent(), Some(base));
                prop_assert_eq!(dir.file_name(), Some(OsStr::new(&app)));
                let fallback = choose_runtime_dir(&app, None, Path::new("/tmp"), 1000);
                prop_assert_eq!(fallback.parent(), Some(Path::new("/tmp")));
            }
        }
    }

    #[test]
    fn runtime_dir_prefers_xdg_and_falls_back_to_tmp_with_uid() {
        assert_eq!(
            choose_runtime_dir(
                "app",
                Some(OsStr::new("/run/user/1000")),
                Path::new("/tmp"),
                1000
            ),
            PathBuf::from("/run/user/1000/app")
        );
        assert_eq!(
            choose_runtime_dir("app", None, Path::new("/var/tmp"), 1000),
            PathBuf::from("/var/tmp/app-1000")
        );
    }

    #[test]
    fn app_names_that_escape_the_base_are_rejected() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(
                matches!(
                    validate_app_name(bad),
                    Err(LifecycleError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
        validate_app_name("historia-demo").unwrap();
    }

    #[test]
    fn private_dir_rules() {
        let me = nix::unistd::geteuid().as_raw();
        let d = Path::new("/r");
        check_private(d, false, true, me, 0o40700).unwrap();
        assert!(matches!(
            check_private(d, true, false, me, 0o700),
            Err(LifecycleError::InsecureDir { .. })
        ));
        assert!(matches!(
            check_private(d, false, true, me + 1, 0o700),
            Err(LifecycleError::InsecureDir { .. })
        ));
        for mode in [0o750, 0o705, 0o777, 0o710] {
            assert!(matches!(
                check_private(d, false, true, me, mode),
                Err(LifecycleError::InsecureDir { .. })
            ));
        }
    }

    #[test]
    fn socket_path_length_is_checked_against_sun_path() {
        let ok = format!("/{}", "a".repeat(SUN_PATH_MAX - 1));
        check_socket_path(Path::new(&ok)).unwrap();
        let long = format!("/{}", "a".repeat(SUN_PATH_MAX));
        match check_socket_path(Path::new(&long)) {
            Err(LifecycleError::PathTooLong { len, max, .. }) => {
                assert_eq!((len, max), (SUN_PATH_MAX + 1, SUN_PATH_MAX))
            }
            other => panic!("expected PathTooLong, got {other:?}"),
        }
        assert!(check_socket_path(Path::new("")).is_err());
    }

    #[test]
    fn parent_of_a_bare_name_is_the_current_dir() {
        assert_eq!(parent_dir(Path::new("x.pid")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/run/x.pid")), Path::new("/run"));
    }
}
