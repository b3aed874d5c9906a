//! PID files: atomic writes of the bare PID (digits, no newline, as FreeBSD
//! pidfile(3)) with an exact mode that never follow a symlink, strict bounded
//! reads that never hang, and idempotent cleanup that removes only regular
//! files.
//!
//! Tests that spawn children or hold a guard are `#[serial]`: a child forked
//! by a parallel test holds a copy of every fd until it execs.

#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use common::{
    assert_wrong_type, child_main, chmod, dir_names, env_path, is_cloexec, mode_of, open_fds,
    report, tree_snapshot, wait_for_stdin_eof, ChildSpec, FileSnapshot, NOBODY, PID_ENV,
};
use historia_lifecycle::{
    cleanup_pid_file, read_pid_file, write_pid_file, DaemonGuard, FileKind, LifecycleError,
    SignalMode, PID_FILE_MODE,
};
use nix::sys::stat::Mode;
use serial_test::serial;

/// For `write_under_umasks`: the directory to write into.
const DIR_ENV: &str = "HISTORIA_DIR";
/// For `write_under_umasks`: the umasks, octal and comma separated.
const UMASKS_ENV: &str = "HISTORIA_UMASKS";

// ---------------------------------------------------------------------------
// Child roles (see `common`).
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        // Writes one PID file per umask into its dir, as pid-<umask>.
        "write_under_umasks" => {
            let dir = env_path(DIR_ENV);
            for text in std::env::var(UMASKS_ENV).unwrap().split(',') {
                let mask = u32::from_str_radix(text, 8).unwrap();
                nix::sys::stat::umask(Mode::from_bits_truncate(mask));
                let pid = write_pid_file(&dir.join(format!("pid-{text}"))).unwrap();
                assert_eq!(pid, std::process::id());
            }
        }
        // Rewrites the PID file until the parent closes stdin; then reports
        // how many writes it made.
        "rewrite_loop" => {
            let path = env_path(PID_ENV);
            write_pid_file(&path).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            thread::spawn(move || {
                wait_for_stdin_eof();
                flag.store(true, Ordering::SeqCst);
            });
            report("READY");
            let mut writes = 1u64;
            while !stop.load(Ordering::SeqCst) {
                write_pid_file(&path).unwrap();
                writes += 1;
            }
            report(format!("WRITES {writes}"));
        }
        "read_fifo" => {
            let path = env_path(PID_ENV);
            let e = read_pid_file(&path).unwrap_err();
            assert_wrong_type(&path, FileKind::Regular, FileKind::Fifo, e);
        }
        // As 65534 in a sticky dir: the temp file is created, but the rename
        // over root's PID file is refused.
        "write_denied" => {
            assert_eq!(
                nix::unistd::geteuid().as_raw(),
                NOBODY,
                "must not run as root"
            );
            let path = env_path(PID_ENV);
            let e = write_pid_file(&path).unwrap_err();
            assert!(
                matches!(&e, LifecycleError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied),
                "expected Io(PermissionDenied), got {e:?}"
            );
            assert_eq!(e.path(), Some(path.as_path()));
            // Only a failure after the temp file exists tests its removal.
            assert!(e.to_string().starts_with("cannot rename"), "{e}");
        }
        // Reports the device and inode of each open fd.
        "list_fds" => {
            for fd in open_fds() {
                if let Ok(m) = fs::metadata(format!("/proc/self/fd/{fd}")) {
                    report(format!("FD {fd} {} {}", m.dev(), m.ino()));
                }
            }
        }
        other => panic!("unknown child role {other:?}"),
    });
}

/// The descriptors of this process open on the file with this device and
/// inode (found through `/proc/self/fd`, which follows to the open file
/// whatever name it had or has).
fn fds_on(dev_ino: (u64, u64)) -> Vec<i32> {
    open_fds()
        .into_iter()
        .filter(|fd| {
            fs::metadata(format!("/proc/self/fd/{fd}")).is_ok_and(|m| (m.dev(), m.ino()) == dev_ino)
        })
        .collect()
}

/// [`tree_snapshot`] without `root`'s own entry.
fn tree_below(root: &Path) -> BTreeMap<PathBuf, FileSnapshot> {
    let mut t = tree_snapshot(root);
    t.remove(root);
    t
}

// ---------------------------------------------------------------------------
// Point 4: write_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn write_pid_file_writes_the_bare_pid_and_replaces_by_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let me = std::process::id();

    assert_eq!(write_pid_file(&path).unwrap(), me);
    assert_eq!(fs::read(&path).unwrap(), me.to_string().into_bytes());
    assert_eq!(read_pid_file(&path).unwrap(), Some(me));

    // Over an existing file: a new inode is renamed in; the old one is never
    // written in place (a hard link to it keeps the old bytes).
    fs::write(&path, b"garbage").unwrap();
    let old = dir.path().join("old-link");
    fs::hard_link(&path, &old).unwrap();
    let old_ino = fs::metadata(&old).unwrap().ino();
    write_pid_file(&path).unwrap();
    assert_eq!(fs::read(&path).unwrap(), me.to_string().into_bytes());
    assert_ne!(fs::metadata(&path).unwrap().ino(), old_ino);
    assert_eq!(fs::read(&old).unwrap(), b"garbage");
    assert_eq!(
        dir_names(dir.path()),
        ["daemon.pid", "old-link"],
        "temp file left"
    );
}

#[test]
fn write_pid_file_never_follows_or_replaces_a_non_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    let link = dir.path().join("link.pid");
    symlink(&victim, &link).unwrap();
    let dangling = dir.path().join("dangling.pid");
    symlink(dir.path().join("created-through-link"), &dangling).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let fifo = dir.path().join("fifo.pid");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    let before = tree_snapshot(dir.path());

    for (path, kind) in [
        (&link, FileKind::Symlink),
        (&dangling, FileKind::Symlink),
        (&sub, FileKind::Directory),
        (&fifo, FileKind::Fifo),
    ] {
        assert_wrong_type(
            path,
            FileKind::Regular,
            kind,
            write_pid_file(path).unwrap_err(),
        );
    }
    // Victim byte-identical, links still links, no temp files, nothing made
    // at the dangling link's target.
    assert_eq!(tree_snapshot(dir.path()), before);
}

#[test]
#[serial]
fn pid_file_mode_is_exactly_0644_under_any_umask() {
    let dir = tempfile::tempdir().unwrap();
    // A pre-existing world-writable file must not pass its mode on.
    let loose = dir.path().join("pid-077");
    fs::write(&loose, b"1\n").unwrap();
    chmod(&loose, 0o666);

    // umask is process-wide, so a child sets it.
    let umasks = ["077", "000", "022", "777"];
    let mut child = ChildSpec::new("write_under_umasks")
        .env(DIR_ENV, dir.path())
        .env(UMASKS_ENV, umasks.join(","))
        .spawn();
    let child_pid = child.pid();
    child.close_stdin();
    child.finish();

    for mask in umasks {
        let path = dir.path().join(format!("pid-{mask}"));
        let mode = mode_of(&path);
        assert_eq!(mode, PID_FILE_MODE, "umask {mask}: mode {mode:04o}");
        assert_eq!(mode & 0o022, 0, "group/world-writable under umask {mask}");
        assert_eq!(fs::read_to_string(&path).unwrap(), child_pid.to_string());
    }
    assert_eq!(PID_FILE_MODE, 0o644);
    let mut expected: Vec<String> = umasks.iter().map(|m| format!("pid-{m}")).collect();
    expected.sort();
    assert_eq!(dir_names(dir.path()), expected, "temp files left behind");
}

#[test]
#[serial]
fn failed_write_after_the_temp_file_leaves_no_temp_file() {
    // A sticky, world-writable dir: 65534 may create its temp file there but
    // may not rename it over root's PID file.
    let base = tempfile::Builder::new()
        .prefix("historia-pid-")
        .tempdir_in("/tmp")
        .unwrap();
    chmod(base.path(), 0o1777);
    let path = base.path().join("daemon.pid");
    fs::write(&path, b"1\n").unwrap();
    // The dir's own times change (the temp file came and went); its
    // contents must not.
    let before = tree_below(base.path());

    ChildSpec::new("write_denied")
        .env(PID_ENV, &path)
        .user(NOBODY)
        .run();

    assert_eq!(
        tree_below(base.path()),
        before,
        "temp file left or PID file changed"
    );
}

#[test]
#[serial]
fn guard_descriptors_are_close_on_exec() {
    let dir = tempfile::tempdir().unwrap();
    let pid_path = dir.path().join("daemon.pid");
    let guard = DaemonGuard::builder(dir.path().join("d.sock"), &pid_path)
        .signals(SignalMode::Off)
        .acquire()
        .unwrap();

    // The claim's fd (the lock is on the PID file's inode), and the
    // listener's.
    let pid_meta = fs::metadata(&pid_path).unwrap();
    let pid_fds = fds_on((pid_meta.dev(), pid_meta.ino()));
    assert!(!pid_fds.is_empty(), "the guard holds no fd on its PID file");
    let listener_fd = guard.listener().unwrap().as_raw_fd();
    for fd in pid_fds.iter().copied().chain([listener_fd]) {
        assert!(is_cloexec(fd), "fd {fd} lacks FD_CLOEXEC");
    }

    // And after an exec, a child holds neither.
    let socket_meta = fs::metadata(format!("/proc/self/fd/{listener_fd}")).unwrap();
    let socket = format!("{} {}", socket_meta.dev(), socket_meta.ino());
    let pid_file = format!("{} {}", pid_meta.dev(), pid_meta.ino());
    let fds = ChildSpec::new("list_fds").run();
    assert!(
        fds.iter().any(|l| l.starts_with("FD 0 ")),
        "the child listed no fds: {fds:?}"
    );
    for line in &fds {
        assert!(
            !line.ends_with(&format!(" {pid_file}")) && !line.ends_with(&format!(" {socket}")),
            "a child inherited the guard's fd: {line}"
        );
    }
    guard.close().unwrap();
}

#[test]
#[serial]
fn concurrent_reader_never_sees_a_torn_pid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let mut writer = ChildSpec::new("rewrite_loop").env(PID_ENV, &path).spawn();
    assert_eq!(writer.expect_line(), "READY");
    let expected = writer.pid().to_string();

    for i in 0..3000 {
        let raw = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {i}: the PID file vanished: {e}"));
        assert_eq!(raw, expected, "read {i} saw a torn or empty PID file");
        assert_eq!(
            read_pid_file(&path).unwrap(),
            Some(writer.pid()),
            "read {i}"
        );
    }
    writer.close_stdin();
    let report = writer.finish();
    let writes: u64 = match report.as_slice() {
        [line] => line.strip_prefix("WRITES ").and_then(|n| n.parse().ok()),
        _ => None,
    }
    .unwrap_or_else(|| panic!("writer did not report its writes: {report:?}"));
    // The reads overlapped real rewrites, not just the first write.
    assert!(writes > 1, "writer wrote only {writes} times");
    assert_eq!(
        dir_names(dir.path()),
        ["daemon.pid"],
        "temp files left behind"
    );
}

// ---------------------------------------------------------------------------
// Point 5: read_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn read_pid_file_accepts_exactly_one_decimal_pid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    for (content, pid) in [
        (&b"1"[..], 1),
        (b"42\n", 42),
        (b"  42 \n", 42),
        (b"2147483647", 2147483647),
    ] {
        fs::write(&path, content).unwrap();
        assert_eq!(
            read_pid_file(&path).unwrap(),
            Some(pid),
            "{:?}",
            String::from_utf8_lossy(content)
        );
    }
}

#[test]
fn read_pid_file_rejects_everything_else_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    let huge = vec![b'7'; 10 * 1024 * 1024];
    // A valid PID padded past the 64-byte bound: only the bound rejects it.
    let mut padded = b"42".to_vec();
    padded.resize(10 * 1024 * 1024, b' ');
    let cases: [&[u8]; 17] = [
        b"",
        b" \n",
        b"0",
        b"-1",
        b"2147483648",
        b"4294967295",
        b"0x1f",
        b"12 34",
        b"1\n2",
        b"42\0",
        b"\0",
        b"\xff\xfe42",
        b"+5",
        &huge,
        &huge[..65],
        &padded,
        &padded[..65],
    ];
    for content in cases {
        fs::write(&path, content).unwrap();
        let shown = String::from_utf8_lossy(&content[..content.len().min(16)]).into_owned();
        match read_pid_file(&path) {
            Err(LifecycleError::PidFile(msg)) => assert!(
                msg.contains(&path.display().to_string()),
                "{shown:?}: message does not name the path: {msg}"
            ),
            other => panic!(
                "{shown:?} ({} bytes): expected PidFile, got {other:?}",
                content.len()
            ),
        }
        // Reading never changes the file.
        assert_eq!(fs::metadata(&path).unwrap().len(), content.len() as u64);
    }
}

#[test]
fn read_pid_file_of_a_missing_file_is_none() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(read_pid_file(&dir.path().join("daemon.pid")).unwrap(), None);
    assert_eq!(
        read_pid_file(&dir.path().join("no/such/daemon.pid")).unwrap(),
        None
    );
}

#[test]
fn read_pid_file_refuses_non_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.pid");
    fs::write(&real, b"42\n").unwrap();
    let link = dir.path().join("link.pid");
    symlink(&real, &link).unwrap();
    let dangling = dir.path().join("dangling.pid");
    symlink(dir.path().join("nowhere"), &dangling).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let sock = dir.path().join("sock.pid");
    drop(UnixListener::bind(&sock).unwrap());
    let before = tree_snapshot(dir.path());

    for (path, kind) in [
        (&link, FileKind::Symlink),
        (&dangling, FileKind::Symlink),
        (&sub, FileKind::Directory),
        (&sock, FileKind::Socket),
    ] {
        assert_wrong_type(
            path,
            FileKind::Regular,
            kind,
            read_pid_file(path).unwrap_err(),
        );
    }
    assert_eq!(tree_snapshot(dir.path()), before);
}

#[test]
#[serial]
fn read_pid_file_of_a_fifo_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("daemon.pid");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).unwrap();
    // A blocking open would wait forever for a writer: the watchdog catches it.
    ChildSpec::new("read_fifo").env(PID_ENV, &fifo).run();
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

// ---------------------------------------------------------------------------
// Point 6 (PID half): cleanup_pid_file.
// ---------------------------------------------------------------------------

#[test]
fn cleanup_pid_file_is_idempotent_and_removes_only_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("daemon.pid");
    cleanup_pid_file(&path).unwrap();
    cleanup_pid_file(&path).unwrap();

    write_pid_file(&path).unwrap();
    cleanup_pid_file(&path).unwrap();
    assert!(fs::symlink_metadata(&path).is_err(), "PID file not removed");
    cleanup_pid_file(&path).unwrap();

    let victim = dir.path().join("victim");
    fs::write(&victim, b"precious\n").unwrap();
    symlink(&victim, &path).unwrap();
    let sub = dir.path().join("dir.pid");
    fs::create_dir(&sub).unwrap();
    let before = tree_snapshot(dir.path());
    assert_wrong_type(
        &path,
        FileKind::Regular,
        FileKind::Symlink,
        cleanup_pid_file(&path).unwrap_err(),
    );
    assert_wrong_type(
        &sub,
        FileKind::Regular,
        FileKind::Directory,
        cleanup_pid_file(&sub).unwrap_err(),
    );
    assert_eq!(tree_snapshot(dir.path()), before);
}
