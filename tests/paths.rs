//! Directories: `ensure_dir` (mkdir -p with private new dirs) and
//! `runtime_dir` (a private per-user dir that is refused, never repaired,
//! when someone else could have planted it).
//!
//! umask and the environment are process-wide, so every check that depends on
//! them runs in a child process (the test binary re-run with a role).

#![cfg(target_os = "linux")]

mod common;

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;

use common::{
    child_main, chmod, dir_names, env_path, mode_of, private_tempdir, tree_snapshot, ChildSpec,
    NOBODY,
};
use historia_lifecycle::{ensure_dir, runtime_dir, FileKind, LifecycleError};
use nix::sys::stat::Mode;
use nix::unistd::{chown, Gid, Uid};
use serial_test::serial;

const APP: &str = "histapp";
/// For `ensure_dir_umask`: the directory to create in.
const DIR_ENV: &str = "HISTORIA_DIR";
/// For `ensure_dir_umask`: the umasks, octal and comma separated.
const UMASKS_ENV: &str = "HISTORIA_UMASKS";
/// For `runtime_dir`: lines "<app>=<expectation>".
const CASES_ENV: &str = "HISTORIA_CASES";

// ---------------------------------------------------------------------------
// Child roles (see `common`).
// ---------------------------------------------------------------------------

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        // For each umask: ensure_dir(<dir>/u<umask>/a/b/c).
        "ensure_dir_umask" => {
            let dir = env_path(DIR_ENV);
            for text in std::env::var(UMASKS_ENV).unwrap().split(',') {
                let mask = u32::from_str_radix(text, 8).unwrap();
                nix::sys::stat::umask(Mode::from_bits_truncate(mask));
                ensure_dir(&dir.join(format!("u{text}/a/b/c"))).unwrap();
            }
        }
        // Each case line "<app>=<expectation>", the expectation being
        // ok:<path>, insecure, invalid or error.
        "runtime_dir" => {
            for line in std::env::var(CASES_ENV).unwrap().lines() {
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
    });
}

// ---------------------------------------------------------------------------
// Point 7: ensure_dir.
// ---------------------------------------------------------------------------

#[test]
#[serial]
fn ensure_dir_creates_every_missing_parent_with_mode_0700() {
    let dir = tempfile::tempdir().unwrap();
    let umasks = ["022", "077", "000"];
    ChildSpec::new("ensure_dir_umask")
        .env(DIR_ENV, dir.path())
        .env(UMASKS_ENV, umasks.join(","))
        .run();

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

    assert_eq!(mode_of(&existing), 0o751);
    assert_eq!(mode_of(&mid), 0o755);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    for created in [mid.join("new"), mid.join("new/leaf")] {
        assert!(created.is_dir());
        // 0700 less whatever the umask takes: never group or other bits.
        assert_eq!(mode_of(&created) & 0o077, 0, "{}", created.display());
    }
}

#[test]
fn ensure_dir_over_a_regular_file_is_refused_and_the_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, b"keep me").unwrap();
    let before = tree_snapshot(dir.path());

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

    assert_eq!(
        tree_snapshot(dir.path()),
        before,
        "the file or its dir changed"
    );
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
    runtime_dir_child(
        Some(xdg.path().as_os_str()),
        tmp.path(),
        &[(APP, ok(&want))],
    )
    .run();

    assert_private_dir(&want);
    assert_eq!(
        dir_names(tmp.path()),
        Vec::<String>::new(),
        "used TMPDIR too"
    );
}

#[test]
#[serial]
fn runtime_dir_without_xdg_is_app_dash_uid_in_the_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let want = tmp.path().join(format!("{APP}-{}", nix::unistd::geteuid()));
    runtime_dir_child(None, tmp.path(), &[(APP, ok(&want))]).run();
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
    let (open_before, foreign_before) = (tree_snapshot(open.path()), tree_snapshot(foreign.path()));

    for xdg in [
        open.path().as_os_str(),
        foreign.path().as_os_str(),
        "relative/run".as_ref(),
    ] {
        runtime_dir_child(Some(xdg), tmp.path(), &[(APP, ok(&want))]).run();
        assert_private_dir(&want);
    }
    assert_eq!(
        tree_snapshot(open.path()),
        open_before,
        "wrote into a group/world-open XDG dir"
    );
    assert_eq!(
        tree_snapshot(foreign.path()),
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

    let before = (
        tree_snapshot(xdg.path()),
        tree_snapshot(elsewhere.path()),
        tree_snapshot(tmp.path()),
    );
    let cases = [
        ("loose", "insecure".to_string()),
        ("group", "insecure".to_string()),
        ("foreign", "insecure".to_string()),
        ("link", "insecure".to_string()),
        ("dangling", "error".to_string()),
    ];
    runtime_dir_child(Some(xdg.path().as_os_str()), tmp.path(), &cases).run();
    // The classic /tmp plant, in the fallback location.
    runtime_dir_child(None, tmp.path(), &[(APP, "insecure".to_string())]).run();

    let after = (
        tree_snapshot(xdg.path()),
        tree_snapshot(elsewhere.path()),
        tree_snapshot(tmp.path()),
    );
    assert_eq!(after, before, "a refused runtime dir was changed");
    assert!(!target.exists());
}

#[test]
#[serial]
fn runtime_dir_rejects_app_names_that_leave_the_base() {
    let xdg = private_tempdir();
    let tmp = tempfile::tempdir().unwrap();
    let before = (tree_snapshot(xdg.path()), tree_snapshot(tmp.path()));
    let cases: Vec<(&str, String)> = ["a/b", "../escape", "/abs", "", ".", ".."]
        .into_iter()
        .map(|app| (app, "invalid".to_string()))
        .collect();
    runtime_dir_child(Some(xdg.path().as_os_str()), tmp.path(), &cases).run();
    assert_eq!(
        (tree_snapshot(xdg.path()), tree_snapshot(tmp.path())),
        before
    );

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
) -> ChildSpec {
    let child = ChildSpec::new("runtime_dir");
    let child = match xdg {
        Some(x) => child.env("XDG_RUNTIME_DIR", x),
        None => child.env_remove("XDG_RUNTIME_DIR"),
    };
    let lines: Vec<String> = cases.iter().map(|(app, e)| format!("{app}={e}")).collect();
    child.env("TMPDIR", tmp).env(CASES_ENV, lines.join("\n"))
}

fn assert_private_dir(path: &Path) {
    let m = fs::symlink_metadata(path).unwrap();
    assert!(m.is_dir(), "{} is not a real dir", path.display());
    assert_eq!(m.mode() & 0o7777, 0o700, "{}", path.display());
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
}
