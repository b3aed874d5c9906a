//! Directories: `ensure_dir` (mkdir -p with private new dirs) and
//! `runtime_dir` (a private per-user dir that is refused, never repaired,
//! when someone else could have planted it).
//!
//! umask and the environment are process-wide, so every check that depends on
//! them runs in a child process (the test binary re-run with a role).

#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use historia_lifecycle::{ensure_dir, runtime_dir, FileKind, LifecycleError};
use nix::sys::stat::Mode;
use nix::unistd::{chown, Gid, Uid};
use serial_test::serial;

/// The other user some planted directories belong to.
const NOBODY: u32 = 65534;
const APP: &str = "histapp";

// ---------------------------------------------------------------------------
// Child roles. The test binary re-runs itself with HISTORIA_CHILD=<role>.
// ---------------------------------------------------------------------------

#[test]
fn child_entry() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // an ordinary test run: nothing to do
    };
    match role.as_str() {
        // For each umask in HISTORIA_UMASKS (octal, comma separated):
        // ensure_dir(HISTORIA_DIR/u<umask>/a/b/c).
        "ensure_dir_umask" => {
            let dir = env_path("HISTORIA_DIR");
            for text in std::env::var("HISTORIA_UMASKS").unwrap().split(',') {
                let mask = u32::from_str_radix(text, 8).unwrap();
                nix::sys::stat::umask(Mode::from_bits_truncate(mask));
                ensure_dir(&dir.join(format!("u{text}/a/b/c"))).unwrap();
            }
        }
        // HISTORIA_CASES: lines "<app>=<expectation>", the expectation being
        // ok:<path>, insecure, invalid or error.
        "runtime_dir" => {
            for line in std::env::var("HISTORIA_CASES").unwrap().lines() {
                let (app, expect) = line.split_once('=').unwrap();
                let got = runtime_dir(app);
                match expect {
                    "insecure" => assert!(
                        matches!(got, Err(LifecycleError::InsecureDir { .. })),
                        "{app:?}: expected InsecureDir, got {got:?}"
                    ),
                    "invalid" => assert!(
                        matches!(got, Err(LifecycleError::InvalidArgument { .. })),
                        "{app:?}: expected InvalidArgument, got {got:?}"
                    ),
                    "error" => assert!(got.is_err(), "{app:?}: expected an error, got {got:?}"),
                    ok => {
                        let want = Path::new(ok.strip_prefix("ok:").unwrap());
                        assert_eq!(got.unwrap(), want, "{app:?}");
                        // A second call finds the same, now existing, dir.
                        assert_eq!(runtime_dir(app).unwrap(), want, "{app:?} again");
                    }
                }
            }
        }
        other => panic!("unknown child role {other:?}"),
    }
    println!("{CHILD_OK}");
}

// ---------------------------------------------------------------------------
// Point 7: ensure_dir.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn ensure_dir_creates_every_missing_parent_with_mode_0700() {
    let dir = tempfile::tempdir().unwrap();
    let umasks = ["022", "077", "000"];
    let mut cmd = child("ensure_dir_umask");
    cmd.env("HISTORIA_DIR", dir.path())
        .env("HISTORIA_UMASKS", umasks.join(","));
    run(cmd).assert_ok();

    for mask in umasks {
        let mut p = dir.path().join(format!("u{mask}"));
        for component in ["", "a", "b", "c"] {
            if !component.is_empty() {
                p.push(component);
            }
            let m = fs::symlink_metadata(&p).unwrap();
            assert!(m.is_dir(), "{}", p.display());
            assert_eq!(m.mode() & 0o7777, 0o700, "umask {mask}: {}", p.display());
        }
    }
}

#[test]
fn ensure_dir_leaves_existing_dirs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing");
    let mid = existing.join("mid");
    fs::create_dir_all(&mid).unwrap();
    chmod(&existing, 0o751);
    chmod(&mid, 0o755);
    let link = dir.path().join("link");
    symlink(&existing, &link).unwrap();

    ensure_dir(&existing).unwrap();
    ensure_dir(&link).unwrap(); // a symlink to a directory is accepted
    ensure_dir(&mid.join("new/leaf")).unwrap();

    assert_eq!(mode(&existing), 0o751);
    assert_eq!(mode(&mid), 0o755);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    for created in [mid.join("new"), mid.join("new/leaf")] {
        assert!(created.is_dir());
        // 0700 less whatever the umask takes: never group or other bits.
        assert_eq!(mode(&created) & 0o077, 0, "{}", created.display());
    }
}

#[test]
fn ensure_dir_over_a_regular_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"keep me").unwrap();
    let before = tree(dir.path());

    let e = ensure_dir(&file).unwrap_err();
    assert!(
        matches!(
            &e,
            LifecycleError::UnexpectedFileType {
                expected: FileKind::Directory,
                found: FileKind::Regular,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.path(), Some(file.as_path()));
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");

    // A file as a parent component: an I/O error, and the file stays a file.
    let e = ensure_dir(&file.join("sub")).unwrap_err();
    assert!(matches!(e, LifecycleError::Io(_)), "{e:?}");

    assert_eq!(tree(dir.path()), before, "the file or its dir changed");
}

// ---------------------------------------------------------------------------
// Point 7: runtime_dir.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn runtime_dir_is_app_under_a_private_xdg_runtime_dir() {
    let xdg = private_tempdir(); // 0700 and ours, as XDG requires
    let tmp = tempfile::tempdir().unwrap();
    let want = xdg.path().join(APP);
    run(runtime_dir_child(
        Some(xdg.path().as_os_str()),
        tmp.path(),
        &[(APP, ok(&want))],
    ))
    .assert_ok();

    assert_private_dir(&want);
    assert_eq!(names(tmp.path()), Vec::<String>::new(), "used TMPDIR too");
}

#[test]
#[serial]
fn runtime_dir_without_xdg_is_app_dash_uid_in_the_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tmp.path().join(format!("{APP}-{}", nix::unistd::geteuid()));
    run(runtime_dir_child(None, tmp.path(), &[(APP, ok(&want))])).assert_ok();
    assert_private_dir(&want);
}

#[test]
#[serial]
fn runtime_dir_falls_back_when_xdg_runtime_dir_is_unusable() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tmp.path().join(format!("{APP}-{}", nix::unistd::geteuid()));

    let open = tempfile::tempdir().unwrap();
    chmod(open.path(), 0o755);
    let foreign = private_tempdir();
    chown(
        foreign.path(),
        Some(Uid::from_raw(NOBODY)),
        Some(Gid::from_raw(NOBODY)),
    )
    .unwrap();
    let (open_before, foreign_before) = (tree(open.path()), tree(foreign.path()));

    for xdg in [
        open.path().as_os_str(),
        foreign.path().as_os_str(),
        "relative/run".as_ref(),
    ] {
        run(runtime_dir_child(
            Some(xdg),
            tmp.path(),
            &[(APP, ok(&want))],
        ))
        .assert_ok();
        assert_private_dir(&want);
    }
    assert_eq!(
        tree(open.path()),
        open_before,
        "wrote into a group/world-open XDG dir"
    );
    assert_eq!(
        tree(foreign.path()),
        foreign_before,
        "wrote into someone else's XDG dir"
    );
}

#[test]
#[serial]
fn runtime_dir_refuses_an_insecure_app_dir_and_changes_nothing() {
    let xdg = private_tempdir();
    let elsewhere = private_tempdir();

    let loose = xdg.path().join("loose");
    fs::create_dir(&loose).unwrap();
    fs::write(loose.join("planted.sock"), b"").unwrap();
    chmod(&loose, 0o777);
    let group = xdg.path().join("group");
    fs::create_dir(&group).unwrap();
    chmod(&group, 0o750);
    let foreign = xdg.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    chmod(&foreign, 0o700);
    chown(
        &foreign,
        Some(Uid::from_raw(NOBODY)),
        Some(Gid::from_raw(NOBODY)),
    )
    .unwrap();
    // A symlink to a perfectly private dir: still refused.
    symlink(elsewhere.path(), xdg.path().join("link")).unwrap();
    // A dangling symlink must not lead to a dir made at its target.
    let target = elsewhere.path().join("made-through-link");
    symlink(&target, xdg.path().join("dangling")).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let tmp_loose = tmp.path().join(format!("{APP}-{}", nix::unistd::geteuid()));
    fs::create_dir(&tmp_loose).unwrap();
    chmod(&tmp_loose, 0o777);

    let before = (tree(xdg.path()), tree(elsewhere.path()), tree(tmp.path()));
    let cases = [
        ("loose", "insecure".to_string()),
        ("group", "insecure".to_string()),
        ("foreign", "insecure".to_string()),
        ("link", "insecure".to_string()),
        ("dangling", "error".to_string()),
    ];
    run(runtime_dir_child(
        Some(xdg.path().as_os_str()),
        tmp.path(),
        &cases,
    ))
    .assert_ok();
    // The classic /tmp plant, in the fallback location.
    run(runtime_dir_child(
        None,
        tmp.path(),
        &[(APP, "insecure".to_string())],
    ))
    .assert_ok();

    let after = (tree(xdg.path()), tree(elsewhere.path()), tree(tmp.path()));
    assert_eq!(after, before, "a refused runtime dir was changed");
    assert!(!target.exists());
}

#[test]
#[serial]
fn runtime_dir_rejects_app_names_that_leave_the_base() {
    let xdg = private_tempdir();
    let tmp = tempfile::tempdir().unwrap();
    let before = (tree(xdg.path()), tree(tmp.path()));
    let cases: Vec<(&str, String)> = ["a/b", "../escape", "/abs", "", ".", ".."]
        .into_iter()
        .map(|app| (app, "invalid".to_string()))
        .collect();
    run(runtime_dir_child(
        Some(xdg.path().as_os_str()),
        tmp.path(),
        &cases,
    ))
    .assert_ok();
    assert_eq!((tree(xdg.path()), tree(tmp.path())), before);

    // NUL cannot travel in an env var; the name is checked before the
    // environment is read, so this one runs here.
    assert!(matches!(
        runtime_dir("a\0b"),
        Err(LifecycleError::InvalidArgument { .. })
    ));
}

fn ok(path: &Path) -> String {
    format!("ok:{}", path.display())
}

/// A `runtime_dir` child with exactly this XDG_RUNTIME_DIR and TMPDIR.
fn runtime_dir_child(
    xdg: Option<&std::ffi::OsStr>,
    tmp: &Path,
    cases: &[(&str, String)],
) -> Command {
    let mut cmd = child("runtime_dir");
    match xdg {
        Some(x) => cmd.env("XDG_RUNTIME_DIR", x),
        None => cmd.env_remove("XDG_RUNTIME_DIR"),
    };
    let lines: Vec<String> = cases.iter().map(|(app, e)| format!("{app}={e}")).collect();
    cmd.env("TMPDIR", tmp)
        .env("HISTORIA_CASES", lines.join("\n"));
    cmd
}

fn assert_private_dir(path: &Path) {
    let m = fs::symlink_metadata(path).unwrap();
    assert!(m.is_dir(), "{} is not a real dir", path.display());
    assert_eq!(m.mode() & 0o7777, 0o700, "{}", path.display());
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
}

// ---------------------------------------------------------------------------
// Helpers (tests/common belongs to another file set; this file carries its own).
// ---------------------------------------------------------------------------

/// A tempdir that would pass as an XDG runtime dir: mode 0700, ours.
/// (tempfile leaves the mode to the umask.)
fn private_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o700);
    dir
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Sorted file names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Env var naming the role a re-executed test binary plays.
const ROLE: &str = "HISTORIA_CHILD";
/// Printed by a child that ran its role to the end, so a child that ran no
/// test at all (exit 0) cannot pass for one that succeeded.
const CHILD_OK: &str = "historia-child-ok";
/// Longest any child may take; it is killed after that.
const WATCHDOG: Duration = Duration::from_secs(20);

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .unwrap_or_else(|| panic!("{name} is not set"))
        .into()
}

/// A command re-running this test binary as `role`.
fn child(role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for `child` until the watchdog expires; kills it then.
fn wait_or_kill(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn assert_ok(&self) {
        assert!(
            self.status.success() && self.stdout.contains(CHILD_OK),
            "child failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

fn collect(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Runs `cmd` to completion under the watchdog.
fn run(mut cmd: Command) -> Finished {
    let mut c = cmd.spawn().unwrap();
    let out = collect(c.stdout.take().unwrap());
    let err = collect(c.stderr.take().unwrap());
    let status = wait_or_kill(&mut c);
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let status = status
        .unwrap_or_else(|| panic!("watchdog: child hung for {WATCHDOG:?}\n{stdout}\n{stderr}"));
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// What `lstat` and the content say about one path, to prove "untouched".
#[derive(Debug, PartialEq, Eq)]
struct Node {
    dev: u64,
    ino: u64,
    mode: u32,
    uid: u32,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    bytes: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

fn node(path: &Path) -> Node {
    let m = fs::symlink_metadata(path).unwrap();
    let ft = m.file_type();
    Node {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        nlink: m.nlink(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        bytes: ft.is_file().then(|| fs::read(path).unwrap()),
        link: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
    }
}

/// Every path under `root` (not following symlinks) with its [`Node`].
fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let n = node(&p);
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        out.insert(p, n);
    }
    out
}
