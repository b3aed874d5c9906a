//! PID files: atomic writing, strict reading, idempotent removal, and the
//! flock claim that the guards hold for their whole life.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::libc;
use tempfile::NamedTempFile;

use crate::error::{invalid_pid_file, io_at, wrong_type, FileKind, LifecycleError, Result};
use crate::holder::ProcView;
use crate::paths::{dev_ino, ensure_dir, lstat_opt, parent_dir, remove_if_same};

/// Mode of the PID files this crate writes: readable by all (tools such as
/// `start-stop-daemon` read it), writable by the owner only. The guards take
/// another with `pid_file_mode` (0600 keeps other users from locking it, see
/// [`PidFileGuardBuilder::pid_file_mode`](crate::PidFileGuardBuilder::pid_file_mode));
/// [`write_pid_file`] always uses this one.
pub const PID_FILE_MODE: u32 = 0o644;

/// A PID file holds one number; anything longer than this is not one.
const MAX_PID_FILE_LEN: u64 = 64;

/// Writes the current process's PID to `pid_path` and returns the PID.
///
/// The file holds the PID in decimal digits and nothing else, no newline, as
/// FreeBSD pidfile(3)'s `pidfile_write` writes it: libbsd's `pidfile_read`
/// (behind `pidfile_open(3)`) wants the whole file to be the number, so a C
/// program using it reads our PID instead of failing with `EINVAL`.
/// [`read_pid_file`] accepts the number with or without surrounding
/// whitespace.
///
/// The file is written atomically: the PID goes into a fresh temp file in the
/// same directory (opened `O_CREAT|O_EXCL|O_CLOEXEC`, so it never follows a
/// link), set to mode 0644, then `rename(2)`d over `pid_path`. A reader sees
/// the old file or the new one, never a torn one.
///
/// This is the unlocked primitive of the seed API. It does not stop a second
/// instance; [`DaemonGuard::acquire`](crate::DaemonGuard::acquire) does.
///
/// # Errors
/// - [`LifecycleError::UnexpectedFileType`] when something other than a
///   regular file is at `pid_path` (a symlink, directory, FIFO, …); it is
///   left untouched, and so is whatever a symlink points to.
/// - [`LifecycleError::Io`] when the temp file cannot be created, written or
///   renamed (a missing or read-only directory, …).
///
/// ```
/// use historia_lifecycle::{read_pid_file, write_pid_file};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("daemon.pid");
/// let pid = write_pid_file(&path)?;
/// assert_eq!(pid, std::process::id());
/// assert_eq!(std::fs::read_to_string(&path)?, pid.to_string()); // digits only
/// assert_eq!(read_pid_file(&path)?, Some(pid));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_pid_file(pid_path: &Path) -> Result<u32> {
    // Advisory: gives a clear error instead of replacing a special file. The
    // rename below never follows a link either way.
    if let Some(meta) = lstat_opt(pid_path).map_err(|e| io_at("examine PID file", pid_path, e))? {
        if !meta.is_file() {
            return Err(wrong_type(
                pid_path,
                FileKind::Regular,
                FileKind::of(meta.file_type()),
            ));
        }
    }
    let pid = std::process::id();
    let tmp = temp_file_beside(pid_path, pid)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(PID_FILE_MODE))
        .map_err(|e| io_at("set mode of new PID file", pid_path, e))?;
    tmp.persist(pid_path)
        .map_err(|e| io_at("rename temp file over PID file", pid_path, e.error))?;
    Ok(pid)
}

/// Reads the PID in `pid_path`.
///
/// Accepts exactly one decimal number in `1..=i32::MAX` (the range of a
/// positive `pid_t`), optionally surrounded by ASCII whitespace. Reads at most
/// 64 bytes and never blocks: the file is opened `O_NONBLOCK|O_NOFOLLOW` and
/// must be a regular file.
///
/// # Errors
/// - [`LifecycleError::PidFile`] for anything else in the file: empty, 0,
///   negative, hexadecimal, more than one value, beyond `i32::MAX` (as a
///   `pid_t` such a value wraps negative, and `kill(-1, …)` signals every
///   process), NUL bytes, non-UTF-8, over 64 bytes. The message names the
///   path and what was found.
/// - [`LifecycleError::UnexpectedFileType`] when the path is a symlink,
///   directory, FIFO, socket or device.
/// - [`LifecycleError::Io`] when it cannot be opened or read.
///
/// A missing file is `Ok(None)`.
pub fn read_pid_file(pid_path: &Path) -> Result<Option<u32>> {
    let Some(mut file) = open_pid_file(pid_path)? else {
        return Ok(None);
    };
    parse_file(&mut file, pid_path).map(Some)
}

/// Removes the PID file at `pid_path`. Idempotent: a missing file is success.
///
/// Only a regular file is removed; anything else at the path is reported and
/// left alone. It does not check whose PID is inside: it is for the owner at
/// shutdown, which [`DaemonGuard`](crate::DaemonGuard) does for you.
///
/// # Errors
/// - [`LifecycleError::UnexpectedFileType`] when the path is not a regular
///   file (a symlink is reported, not followed or removed).
/// - [`LifecycleError::Io`] when `unlink(2)` fails for a reason other than
///   `ENOENT`.
pub fn cleanup_pid_file(pid_path: &Path) -> Result<()> {
    let Some(meta) = lstat_opt(pid_path).map_err(|e| io_at("examine PID file", pid_path, e))?
    else {
        return Ok(());
    };
    if !meta.is_file() {
        return Err(wrong_type(
            pid_path,
            FileKind::Regular,
            FileKind::of(meta.file_type()),
        ));
    }
    remove_if_same(pid_path, (meta.dev(), meta.ino()), "remove PID file").map(drop)
}

/// Returns the PID of the live process holding the claim on `pid_path`, or
/// `None` when no process holds it (no daemon, or only stale files left).
///
/// Use it after [`DaemonGuard::acquire`](crate::DaemonGuard::acquire) returns
/// [`LifecycleError::AlreadyRunning`] to tell the user which process runs, and
/// before signalling a daemon: unlike the number in the file, it cannot name
/// a recycled PID, because the claim is a flock that dies with its holder.
///
/// On Linux the holder comes from `/proc/locks` (`proc(5)`), which reads the
/// lock without taking it, and counts only if `/proc/<pid>/fd` shows that
/// process still has the PID file open. The lock table is searched under the
/// device number the kernel prints there, which on btrfs subvolumes and
/// overlayfs is not `stat(2)`'s `st_dev` (it comes from
/// `/proc/self/mountinfo`). When `/proc/locks` names no live holder (or on
/// other platforms), a shared trial `flock(2)` tells whether the claim is
/// held, and the PID comes from the file, checked the same way on Linux.
/// An `acquire` racing that trial lock is not refused for it: a claim is
/// exclusive and the trial is shared, so the acquire sees only a look and
/// waits for it to end (up to half a second, which also covers a copy of
/// the trial lock held by a child that another thread of the looking
/// process forked at that instant, until its `exec(2)`). A PID file
/// replaced while it looks (a claim handed to a forked child renames a new
/// file over the old one) is looked at again, so a hand-over never reads
/// as "not running".
///
/// # PID namespaces (containers)
/// - Looking into a child namespace (the host, a container's daemon): the
///   kernel translates the holder's PID into ours, so the answer is its PID
///   here, not the number in the file (its PID in its own namespace).
/// - Looking at a holder this namespace cannot see (a container looking at
///   the host's or a sibling container's daemon through a shared
///   directory): [`LifecycleError::HolderUnknown`], never the number in the
///   file, which here may be an unrelated process or the caller itself.
/// - A `/proc` mounted for another PID namespace than the caller's
///   (`unshare --pid` without `--mount-proc`) speaks in PIDs that are not
///   the caller's: a held claim is then `HolderUnknown` too.
///
/// # Without `/proc` (macOS, the BSDs, a Linux chroot without it)
/// The weaker guarantee: nothing can check that the PID in the file still
/// holds the lock, so once the trial lock shows the claim is held, the
/// file's PID is the answer. If the process that locked it has exited while
/// a child it forked without `exec` keeps the lock, that PID may have been
/// recycled, and this names the unrelated process that now has it (and
/// [`signal_daemon`](crate::signal_daemon) would signal it). Daemons that
/// fork helpers should `exec` them (every descriptor of the guard is
/// close-on-exec) or run them before acquiring.
///
/// # Errors
/// - [`LifecycleError::HolderUnknown`] when the claim is held but no live
///   process that holds it can be named: the locker exited and a child it
///   forked (without `exec`) keeps the lock, or the holder lives in a PID
///   namespace this one cannot see, or `/proc` is another namespace's. Do
///   not start, and do not signal anything.
/// - As [`read_pid_file`]: [`LifecycleError::PidFile`] when the claim is held
///   but the file's content is not a PID, [`LifecycleError::UnexpectedFileType`]
///   and [`LifecycleError::Io`].
///
/// ```
/// use historia_lifecycle::{running_pid, DaemonGuard, LifecycleError};
/// let dir = tempfile::tempdir()?;
/// let (sock, pid) = (dir.path().join("d.sock"), dir.path().join("d.pid"));
/// assert_eq!(running_pid(&pid)?, None);
/// let guard = DaemonGuard::builder(&sock, &pid).signals(historia_lifecycle::SignalMode::Off).acquire()?;
/// assert_eq!(running_pid(&pid)?, Some(std::process::id()));
/// drop(guard);
/// assert_eq!(running_pid(&pid)?, None);
/// # Ok::<(), LifecycleError>(())
/// ```
pub fn running_pid(pid_path: &Path) -> Result<Option<u32>> {
    // A file replaced while we looked at it (a claim handed to a forked
    // child renames a new one over the old) may already have lost its
    // holders: an answer of "nobody" or "unknown" about it says nothing
    // about the file now at the path, so look again at that one.
    let mut answer = running_pid_once(pid_path)?;
    for _ in 0..8 {
        match answer {
            (Ok(None) | Err(LifecycleError::HolderUnknown { .. }), Some(id))
                if dev_ino(pid_path) != Some(id) =>
            {
                answer = running_pid_once(pid_path)?;
            }
            _ => break,
        }
    }
    answer.0
}

/// What one look found: the answer about the file that was at the path, and
/// that file's device and inode (`None` when there was none).
type Look = (Result<Option<u32>>, Option<(u64, u64)>);

/// One look for [`running_pid`].
fn running_pid_once(pid_path: &Path) -> Result<Look> {
    let Some(file) = open_pid_file(pid_path)? else {
        return Ok((Ok(None), None));
    };
    let meta = file
        .metadata()
        .map_err(|e| io_at("examine PID file", pid_path, e))?;
    let id = (meta.dev(), meta.ino());
    Ok((holder_of(file, id, pid_path), Some(id)))
}

/// Who holds the claim on the open PID file `file` (`id`, at `pid_path`).
fn holder_of(mut file: File, id: (u64, u64), pid_path: &Path) -> Result<Option<u32>> {
    let unknown = || {
        Err(LifecycleError::HolderUnknown {
            path: pid_path.to_path_buf(),
        })
    };
    // A PID counts only if that process still has the file open: the lock
    // table and the file may name a process that is gone.
    let holds = |pid: u32| crate::sys::process_has_open(pid, id) != Some(false);
    // The lock table's answer: a live holder, one hidden in another PID
    // namespace (PID 0), or nothing usable.
    let from_table = |holder: Option<u32>| match holder {
        Some(0) => Some(unknown()),
        Some(h) if holds(h) => Some(Ok(Some(h))),
        _ => None,
    };
    // /proc's PIDs are ours, or none can be trusted (see `holder`).
    let view = crate::holder::proc_view();
    if view == ProcView::Ours {
        if let Some(answer) = from_table(crate::sys::flock_holder(&file).ok().flatten()) {
            return answer;
        }
    }
    // No live holder found: none at all, a lock kept by a forked child after
    // the locker exited, or one listed under another device number. The lock
    // itself tells whether it is held.
    match file.try_lock_shared() {
        Ok(()) => Ok(None), // nobody holds it; closing the file unlocks
        Err(TryLockError::WouldBlock) => {
            match view {
                // Its PIDs and our PIDs differ: no number can be trusted.
                ProcView::Foreign => return unknown(),
                ProcView::Ours => {
                    // btrfs subvolumes, overlayfs: /proc/locks names the
                    // superblock's device, not stat's. Look under that.
                    if let Some(answer) = from_table(crate::holder::flock_holder_by_lock_key(&file))
                    {
                        return answer;
                    }
                }
                ProcView::Absent => {}
            }
            let pid = parse_file(&mut file, pid_path)?;
            // With our /proc, the lock table would have listed us: the file
            // names us (or our number in another namespace), not the holder.
            if view == ProcView::Ours && pid == std::process::id() {
                return unknown();
            }
            if holds(pid) {
                Ok(Some(pid))
            } else {
                unknown()
            }
        }
        Err(TryLockError::Error(e)) => Err(io_at("lock PID file", pid_path, e)),
    }
}

/// The flock claim on a PID file, held for a guard's whole life.
#[derive(Debug)]
pub(crate) struct Claim {
    /// The PID file, open and exclusively flocked. Closing it (the last copy
    /// of the open file description) releases the claim.
    pub(crate) file: File,
    /// Device and inode of the PID file, to recognise it at cleanup.
    pub(crate) dev_ino: (u64, u64),
    /// Whether a stale PID file (unlocked, left by a dead holder) was replaced.
    pub(crate) reclaimed: bool,
    /// Whether any run of `under_stale` answered `true` (it reclaimed
    /// something, such as a stale socket).
    pub(crate) stale_work: bool,
    /// The PID the last replaced stale file named, when it held one: `None`
    /// for an empty file (as `flock(1)` creates) or garbage.
    pub(crate) stale_pid: Option<u32>,
}

/// Takes the claim on `pid_path`, in the style of FreeBSD pidfile(3) but
/// never showing a torn or empty file.
///
/// 1. A fresh file gets the PID (digits only, as [`write_pid_file`]), `mode`
///    (0644 unless the guard was told otherwise) and an exclusive flock before it has a name (Linux `O_TMPFILE`;
///    elsewhere a named temp file beside the PID file). A missing directory is created then (0700, as
///    [`ensure_dir`]), not looked for first.
/// 2. It is linked in with no-replace semantics. If that works, nobody else
///    had the path: the claim is ours.
/// 3. Otherwise the existing file is opened read-only (`O_NOFOLLOW`) and
///    `flock(LOCK_EX|LOCK_NB)`ed. `EWOULDBLOCK` means a live holder:
///    [`LifecycleError::AlreadyRunning`], and nothing of theirs was touched;
///    unless only shared flocks (a [`running_pid`] looking) hold it, which
///    are waited out for a moment (`lock_past_probes`).
/// 4. Got the lock: its holder is dead. While still holding that lock,
///    `under_stale` runs with the stale file's device and inode (the
///    guard's socket probe: a daemon that does not use the lock but serves on
///    the socket makes it fail, and then the stale file stays as it was).
///    Then, only if the path still names the inode we locked, the stale file
///    is unlinked, and back to step 2.
///
/// What must happen under the claim once it is ours (binding the socket) is
/// the caller's next step; if it fails, the caller removes our file.
///
/// Every file that can be at the path is locked by a live process or
/// provably stale, and only a no-replace link puts a file there, so two
/// racers cannot both win.
pub(crate) fn claim(
    pid_path: &Path,
    pid: u32,
    mode: u32,
    mut under_stale: impl FnMut((u64, u64)) -> Result<bool>,
) -> Result<Claim> {
    // No "is someone there?" look before creating our file: when dozens of
    // processes start at once, losers that look first and then link anyway
    // queue on the directory, and their p99 rose from about 0.15 ms to 6 ms
    // in the contention harness (BENCHMARKS.md).
    let mut reclaimed = false;
    let mut stale_work = false;
    let mut stale_pid = None;

    let mut fresh = Fresh::new(pid_path, pid)?;
    // Our own new file: nobody else can have locked it.
    fresh
        .file()
        .try_lock()
        .map_err(|e| io_at("lock new PID file", pid_path, io::Error::from(e)))?;
    let meta = fresh
        .file()
        .metadata()
        .map_err(|e| io_at("examine new PID file", pid_path, e))?;
    // Exact mode, whatever the umask did to the creation mode, set before
    // the file has its name: tools must be able to read the PID (0644), or
    // only the owner may open it at all (0600, see the guards'
    // `pid_file_mode`), and nobody else may write it.
    if meta.permissions().mode() & 0o7777 != mode {
        fresh
            .file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_at("set mode of new PID file", pid_path, e))?;
    }
    let ours = (meta.dev(), meta.ino());

    // Each round ends in a win, a loss, an error, or the stale file being
    // cleared for the next round; a handful of rounds is plenty unless
    // something is deliberately churning the path.
    for _ in 0..64 {
        match fresh.place(pid_path) {
            Ok(file) => {
                return Ok(Claim {
                    file,
                    dev_ino: ours,
                    reclaimed,
                    stale_work,
                    stale_pid,
                })
            }
            Err((back, e)) if e.kind() == io::ErrorKind::AlreadyExists => fresh = back,
            Err((_, e)) => return Err(io_at("create PID file", pid_path, e)),
        }
        if let Some((mut stale, id)) = lock_existing(pid_path)? {
            stale_work |= under_stale(id)?;
            // What it named, for the caller's message; read under the lock,
            // bounded, and never a reason to fail.
            let named = parse_file(&mut stale, pid_path).ok();
            if remove_if_same(pid_path, id, "remove stale PID file")? {
                reclaimed = true;
                stale_pid = named;
            }
            drop(stale);
        }
    }
    Err(io_at(
        "claim PID file",
        pid_path,
        io::Error::other("the path changed 64 times during the claim"),
    ))
}

/// Puts a fresh PID file for `pid` over the one at `pid_path` (absolute),
/// which the caller holds the claim on (`old`, its device and inode), so the
/// claim passes to `pid` with no gap: the hand-over to a forked child.
///
/// The new file gets the PID, `mode` and an exclusive flock before it has
/// its final name (a temp file beside the PID file, `O_EXCL|O_CLOEXEC`),
/// and then replaces the old one in one step. At every instant the path
/// names a complete file locked by a live process: the old inode stays
/// locked by the caller's descriptors until they are closed, the new one by
/// the returned [`File`]. A reader sees the old file or the new one, never
/// a torn one, and a racer gets [`LifecycleError::AlreadyRunning`] from
/// either.
///
/// On Linux the replacement is `renameat2(2)`'s `RENAME_EXCHANGE` (on
/// macOS `renamex_np(2)`'s `RENAME_SWAP`), so what was at the path is
/// checked *after* the swap: if it was not `old` (an operator put another
/// file there), the swap is undone and the call fails, leaving their file in
/// place. Elsewhere (the BSDs, and filesystems without the flag) the path is
/// checked, then `rename(2)`d over: the tiny window of any
/// check-then-rename.
pub(crate) fn replace_claimed(
    pid_path: &Path,
    pid: u32,
    mode: u32,
    old: (u64, u64),
) -> Result<(File, (u64, u64))> {
    let tmp = temp_file_beside(pid_path, pid)?;
    tmp.as_file()
        .try_lock()
        .map_err(|e| io_at("lock new PID file", pid_path, io::Error::from(e)))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_at("set mode of new PID file", pid_path, e))?;
    let meta = tmp
        .as_file()
        .metadata()
        .map_err(|e| io_at("examine new PID file", pid_path, e))?;
    let ours = (meta.dev(), meta.ino());
    let changed = || {
        io_at(
            "hand over PID file",
            pid_path,
            io::Error::other("it is no longer the file this guard wrote; left it untouched"),
        )
    };
    match crate::sys::exchange(tmp.path(), pid_path) {
        Ok(true) => {
            // The temp name now holds what was at the PID path.
            let (file, tmp_path) = tmp.into_parts();
            let tmp_path = tmp_path
                .keep()
                .map_err(|e| io_at("keep temp file", pid_path, e.error))?;
            if dev_ino(&tmp_path) == Some(old) {
                remove_if_same(&tmp_path, old, "remove the old PID file")?;
                return Ok((file, ours));
            }
            // Someone else's file was there: give it its place back.
            let undo = crate::sys::exchange(&tmp_path, pid_path);
            let _ = remove_if_same(&tmp_path, ours, "remove new PID file");
            undo.map_err(|e| io_at("restore PID file", pid_path, e))?;
            Err(changed())
        }
        Ok(false) => {
            if dev_ino(pid_path) != Some(old) {
                return Err(changed());
            }
            tmp.persist(pid_path)
                .map(|file| (file, ours))
                .map_err(|e| io_at("rename new PID file over", pid_path, e.error))
        }
        // The temp file is removed on drop.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(changed()),
        Err(e) => Err(io_at("hand over PID file", pid_path, e)),
    }
}

/// A complete PID file for this process that is not yet at its path.
enum Fresh {
    /// Linux `O_TMPFILE`: no name at all until placed, so a crash leaves
    /// nothing behind.
    Unnamed(File),
    /// Elsewhere: a temp file beside the PID file, removed on drop.
    Named(NamedTempFile),
}

impl Fresh {
    fn new(pid_path: &Path, pid: u32) -> Result<Fresh> {
        match Self::new_in_existing_dir(pid_path, pid) {
            // The directory is almost always there: create it only when the
            // first try says it is missing (one failing call, instead of a
            // stat on every start).
            Err(LifecycleError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                ensure_dir(parent_dir(pid_path))?;
                Self::new_in_existing_dir(pid_path, pid)
            }
            other => other,
        }
    }

    fn new_in_existing_dir(pid_path: &Path, pid: u32) -> Result<Fresh> {
        let dir = parent_dir(pid_path);
        match crate::sys::unnamed_file_in(dir) {
            Ok(Some(mut file)) => {
                write_pid(&mut file, pid_path, pid)?;
                Ok(Fresh::Unnamed(file))
            }
            Ok(None) => temp_file_beside(pid_path, pid).map(Fresh::Named),
            Err(e) => Err(io_at("create PID file", pid_path, e)),
        }
    }

    fn file(&self) -> &File {
        match self {
            Fresh::Unnamed(f) => f,
            Fresh::Named(t) => t.as_file(),
        }
    }

    /// Links the file in at `path` unless something is already there
    /// (`AlreadyExists`, and the file comes back for another try).
    fn place(self, path: &Path) -> std::result::Result<File, (Fresh, io::Error)> {
        match self {
            Fresh::Unnamed(f) => match crate::sys::link_unnamed(&f, path) {
                Ok(()) => Ok(f),
                Err(e) => Err((Fresh::Unnamed(f), e)),
            },
            Fresh::Named(t) => t
                .persist_noclobber(path)
                .map_err(|e| (Fresh::Named(e.file), e.error)),
        }
    }
}

/// Opens the file at `pid_path` and takes its exclusive flock without
/// blocking, then checks the path still names the inode it locked.
///
/// - `Ok(Some((file, dev_ino)))`: locked, and it is the file at the path: any
///   previous holder is dead.
/// - `Ok(None)`: no file, or the path changed under us; look again.
/// - `Err(AlreadyRunning)`: a live process holds the lock. Nothing was
///   changed: the file is opened read-only.
pub(crate) fn lock_existing(pid_path: &Path) -> Result<Option<(File, (u64, u64))>> {
    let Some(file) = open_pid_file(pid_path)? else {
        return Ok(None);
    };
    match lock_past_probes(&file) {
        Ok(true) => {}
        Ok(false) => return Err(LifecycleError::AlreadyRunning),
        Err(e) => return Err(io_at("lock PID file", pid_path, e)),
    }
    let meta = file
        .metadata()
        .map_err(|e| io_at("examine PID file", pid_path, e))?;
    let id = (meta.dev(), meta.ino());
    if dev_ino(pid_path) != Some(id) {
        return Ok(None); // we locked a file that is no longer at the path
    }
    Ok(Some((file, id)))
}

/// How long a claim waits for shared flocks on an existing PID file to go
/// before it counts them as a holder.
const PROBE_GRACE: Duration = Duration::from_millis(500);

/// Takes the exclusive flock on `file` without blocking: `Ok(true)` when
/// taken, `Ok(false)` when a holder has it.
///
/// A claim is always an exclusive flock; a shared one is a look, not a
/// holder: [`running_pid`]'s trial lock, or a copy of it that a child forked
/// by another thread of the looking process keeps until its `exec(2)`
/// (under load, milliseconds). Counting a look as a holder would make a
/// daemon starting beside a status poll exit "already running" with nothing
/// running. So when the exclusive lock is refused, a shared one is tried
/// too: refused as well, an exclusive holder exists; granted, only looks
/// hold the file, and the exclusive lock is tried again with backoff for up
/// to [`PROBE_GRACE`]. Shared holders that stay longer (`flock -s` on the
/// file) count as a holder. No `/proc` is needed: `flock(2)` itself tells.
fn lock_past_probes(file: &File) -> io::Result<bool> {
    let deadline = Instant::now() + PROBE_GRACE;
    let mut nap = Duration::from_micros(100);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(true),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(e),
        }
        match file.try_lock_shared() {
            // Someone holds it exclusively: a live holder (or a racer that
            // is reclaiming this stale file and will win).
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(e)) => return Err(e),
            // Only shared holders; let ours go at once so that it never
            // keeps a racer from the exclusive lock for longer than this.
            Ok(()) => file.unlock()?,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        std::thread::sleep(nap.min(left));
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

/// A temp file (mode 0600) beside `pid_path` holding the PID. Removed on
/// drop unless persisted.
fn temp_file_beside(pid_path: &Path, pid: u32) -> Result<NamedTempFile> {
    let dir = parent_dir(pid_path);
    let name = pid_path
        .file_name()
        .ok_or_else(|| LifecycleError::InvalidArgument {
            what: "PID file path",
            reason: format!("{} has no file name", pid_path.display()),
        })?;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| io_at("create temp file for PID file", pid_path, e))?;
    write_pid(tmp.as_file_mut(), pid_path, pid)?;
    Ok(tmp)
}

/// Writes the PID's decimal digits, with no newline (FreeBSD pidfile(3)'s
/// format, which libbsd's `pidfile_read` insists on), with one `write(2)`.
fn write_pid(f: &mut File, pid_path: &Path, pid: u32) -> Result<()> {
    f.write_all(pid_file_bytes(pid).as_bytes())
        .map_err(|e| io_at("write new PID file", pid_path, e))
}

/// What a PID file written by this crate holds: the PID in decimal digits.
pub(crate) fn pid_file_bytes(pid: u32) -> String {
    pid.to_string()
}

/// Opens a PID file for reading without following a symlink or blocking on a
/// FIFO, and checks it is a regular file. `None` when it does not exist.
fn open_pid_file(pid_path: &Path) -> Result<Option<File>> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(pid_path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // ELOOP (a symlink, O_NOFOLLOW), ENXIO (a socket), …: say what is there.
        Err(e) => {
            return Err(match lstat_opt(pid_path) {
                Ok(Some(m)) if !m.is_file() => {
                    wrong_type(pid_path, FileKind::Regular, FileKind::of(m.file_type()))
                }
                _ => io_at("open PID file", pid_path, e),
            })
        }
    };
    let meta = file
        .metadata()
        .map_err(|e| io_at("examine PID file", pid_path, e))?;
    if !meta.is_file() {
        return Err(wrong_type(
            pid_path,
            FileKind::Regular,
            FileKind::of(meta.file_type()),
        ));
    }
    Ok(Some(file))
}

fn parse_file(file: &mut File, pid_path: &Path) -> Result<u32> {
    let mut buf = Vec::with_capacity(MAX_PID_FILE_LEN as usize + 1);
    file.take(MAX_PID_FILE_LEN + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_at("read PID file", pid_path, e))?;
    parse_pid(&buf).map_err(|what| invalid_pid_file(pid_path, &what))
}

/// Parses PID file content: one decimal number in `1..=i32::MAX`, optionally
/// surrounded by ASCII whitespace. The error says what was found instead.
pub(crate) fn parse_pid(bytes: &[u8]) -> std::result::Result<u32, String> {
    if bytes.len() as u64 > MAX_PID_FILE_LEN {
        return Err(format!(
            "over {MAX_PID_FILE_LEN} bytes; a PID file holds one number"
        ));
    }
    if bytes.contains(&0) {
        return Err("contains a NUL byte".into());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "is not UTF-8".to_string())?;
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    if t.is_empty() {
        return Err("is empty".into());
    }
    // The content is shown quoted, with ':' escaped too, so a message never
    // holds ": " but the one after the path (see `invalid_pid_file`).
    let shown = format!("\"{}\"", t.escape_debug()).replace(':', "\\u{3a}");
    if t.contains(|c: char| c.is_ascii_whitespace()) {
        return Err(format!("holds more than one value, {shown}"));
    }
    if t.starts_with('-') {
        return Err(format!("holds a negative number {shown}"));
    }
    if t.starts_with("0x") || t.starts_with("0X") {
        return Err(format!("holds hexadecimal {shown}; expected a decimal PID"));
    }
    if !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("holds {shown}; expected one decimal PID"));
    }
    let max = i32::MAX as u32;
    let beyond = || {
        format!(
            "holds {t}, beyond pid_t's maximum {max} (as a pid_t it would be negative, \
             and kill(-1, ...) signals every process)"
        )
    };
    let n: u64 = t.parse().map_err(|_| beyond())?;
    match n {
        0 => Err(
            "holds 0, which is not a process (kill(0, ...) signals the whole process group)".into(),
        ),
        n if n > u64::from(max) => Err(beyond()),
        n => Ok(n as u32),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_pid, pid_file_bytes, MAX_PID_FILE_LEN};
    use proptest::prelude::*;

    /// Cases per property: the parser is pure and fast, so many.
    const CASES: u32 = 10_000;

    /// Up to four ASCII whitespace characters.
    fn whitespace() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            proptest::sample::select(&[' ', '\t', '\r', '\n'][..]),
            0..=4,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        /// Any bytes: a clean Ok or Err (never a panic), and an Ok is always
        /// a PID a `pid_t` can hold, never 0 or negative, from digits only.
        #[test]
        fn any_bytes_give_a_clean_answer_and_never_a_pid_out_of_range(
            bytes in proptest::collection::vec(any::<u8>(), 0..=80)
        ) {
            match parse_pid(&bytes) {
                Ok(pid) => {
                    prop_assert!((1..=i32::MAX as u32).contains(&pid), "{pid}");
                    let text = std::str::from_utf8(&bytes).unwrap();
                    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
                    prop_assert!(t.bytes().all(|b| b.is_ascii_digit()), "{text:?}");
                    prop_assert_eq!(t.parse::<u64>().unwrap(), u64::from(pid));
                }
                Err(why) => prop_assert!(!why.is_empty()),
            }
        }

        /// Text that looks like a PID file (digits, signs, spaces, `x`):
        /// the same, on inputs that reach the number parsing far more often.
        #[test]
        fn pid_like_text_gives_a_clean_answer(
            chars in proptest::collection::vec(
                proptest::sample::select(&b" \t\r\n-+0x123456789"[..]),
                0..=24,
            )
        ) {
            if let Ok(pid) = parse_pid(&chars) {
                prop_assert!((1..=i32::MAX as u32).contains(&pid), "{chars:?} -> {pid}");
            }
        }

        /// Every valid PID round-trips: as written (digits only), with the
        /// newline other tools add, and with any surrounding whitespace.
        #[test]
        fn every_valid_pid_round_trips(
            pid in 1..=i32::MAX as u32,
            before in whitespace(),
            after in whitespace(),
        ) {
            prop_assert_eq!(parse_pid(pid_file_bytes(pid).as_bytes()), Ok(pid));
            prop_assert_eq!(parse_pid(format!("{pid}\n").as_bytes()), Ok(pid));
            let padded = format!("{before}{pid}{after}");
            prop_assert_eq!(parse_pid(padded.as_bytes()), Ok(pid));
        }

        /// Every u64 is accepted exactly when it is a positive `pid_t`, with
        /// any leading zeros that fit the 64-byte bound.
        #[test]
        fn numbers_are_accepted_exactly_in_1_to_i32_max(n in any::<u64>(), zeros in 0usize..40) {
            let text = format!("{}{n}", "0".repeat(zeros));
            let fits = text.len() as u64 <= MAX_PID_FILE_LEN;
            let expected = (fits && (1..=u64::from(i32::MAX as u32)).contains(&n)).then_some(n as u32);
            prop_assert_eq!(parse_pid(text.as_bytes()).ok(), expected, "{}", text);
        }
    }

    #[test]
    fn accepted_pid_file_contents() {
        for (text, pid) in [
            (&b"1"[..], 1),
            (b"42\n", 42),
            (b"  42  \n", 42),
            (b"\t7\r\n", 7),
            (b"007\n", 7),
            (b"2147483647\n", 2147483647),
        ] {
            assert_eq!(
                parse_pid(text),
                Ok(pid),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn rejected_pid_file_contents_say_what_was_found() {
        for (text, says) in [
            (&b""[..], "empty"),
            (b" \n\t", "empty"),
            (b"0\n", "holds 0"),
            (b"-1\n", "negative"),
            (b"-42", "negative"),
            (b"2147483648\n", "beyond pid_t"),
            (b"4294967295\n", "beyond pid_t"),
            (b"99999999999999999999999\n", "beyond pid_t"),
            (b"0x1f\n", "hexadecimal"),
            (b"12 34\n", "more than one value"),
            (b"12\n34\n", "more than one value"),
            (b"+5", "expected one decimal PID"),
            (b"12abc", "expected one decimal PID"),
            (b"1.5", "expected one decimal PID"),
            (b"42\0", "NUL"),
            (b"\xff\xfe42", "not UTF-8"),
            (&[b'1'; 65][..], "over 64 bytes"),
            ("\u{0663}".as_bytes(), "expected one decimal PID"),
        ] {
            let err = parse_pid(text).expect_err(&format!("{text:?} must be rejected"));
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
