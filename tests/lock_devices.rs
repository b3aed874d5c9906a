//! `running_pid` on filesystems whose `stat(2)` device is not the one
//! `/proc/locks` prints: a btrfs subvolume (its own anonymous `st_dev`) and
//! overlayfs (the upper layer's `st_dev`), with tmpfs as the plain case. Each
//! runs on a real mount, made in a private mount namespace (`unshare --mount`,
//! root only) so nothing outlives the test: btrfs on a loop-mounted image
//! made with `mkfs.btrfs` (btrfs-progs; skipped with a message only if the
//! kernel has no btrfs).
//!
//! The lock holders are real processes: `flock(1)` holding an empty file
//! (only the lock table can name it; the file names nobody), and a
//! `PidFileGuard` in a child of this test binary.

#![cfg(target_os = "linux")]

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::examples::require_tool;
use common::{child_main, env_path, report, wait_for_stdin_eof, ChildSpec, PID_ENV};
use historia_lifecycle::{running_pid, PidFileGuard, SignalMode};
use serial_test::serial;

/// For `fs-scenario`: which filesystem to mount.
const FS_ENV: &str = "HISTORIA_TEST_FS";
/// For `fs-scenario`: the (host) directory to mount things under.
const BASE_ENV: &str = "HISTORIA_TEST_BASE";

#[test]
fn child_process_entry() {
    child_main(|role| match role {
        "fs-scenario" => scenario(),
        "hold-pid" => {
            let pid = env_path(PID_ENV);
            let g = PidFileGuard::builder(&pid)
                .signals(SignalMode::Off)
                .acquire()
                .expect("acquire");
            report(format!("READY {}", g.pid()));
            wait_for_stdin_eof();
            drop(g);
        }
        other => panic!("unknown child role {other:?}"),
    });
}

fn sh(program: &Path, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    assert!(
        out.status.success(),
        "{} {args:?}: {}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts the filesystem named in `FS_ENV` under `base` and returns the
/// directory to put the PID file in; `None` when the kernel lacks it.
fn mount(fs: &str, base: &Path) -> Option<PathBuf> {
    let mount = require_tool("mount", "mount");
    let dir = |name: &str| {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    match fs {
        "tmpfs" => {
            let m = dir("m");
            sh(&mount, &["-t", "tmpfs", "hist-tmpfs", &s(&m)]);
            Some(m)
        }
        "overlay" => {
            let (lower, layers, m) = (dir("lower"), dir("layers"), dir("m"));
            sh(&mount, &["-t", "tmpfs", "hist-lower", &s(&lower)]);
            sh(&mount, &["-t", "tmpfs", "hist-layers", &s(&layers)]);
            let (upper, work) = (layers.join("upper"), layers.join("work"));
            std::fs::create_dir(&upper).unwrap();
            std::fs::create_dir(&work).unwrap();
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                s(&lower),
                s(&upper),
                s(&work)
            );
            sh(
                &mount,
                &["-t", "overlay", "hist-overlay", "-o", &opts, &s(&m)],
            );
            Some(m)
        }
        "btrfs" => {
            let mkfs = require_tool("mkfs.btrfs", "btrfs-progs");
            let btrfs = require_tool("btrfs", "btrfs-progs");
            let known = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
            if !known.contains("btrfs") {
                // The module may just not be loaded yet.
                let _ = Command::new("modprobe").arg("btrfs").status();
                let known = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
                if !known.contains("btrfs") {
                    return None;
                }
            }
            let img = base.join("btrfs.img");
            std::fs::File::create(&img)
                .unwrap()
                .set_len(256 << 20)
                .unwrap();
            sh(&mkfs, &["-q", &s(&img)]);
            let m = dir("m");
            sh(&mount, &["-o", "loop", &s(&img), &s(&m)]);
            let sub = m.join("subvol");
            sh(&btrfs, &["-q", "subvolume", "create", &s(&sub)]);
            Some(sub)
        }
        other => panic!("unknown filesystem {other}"),
    }
}

/// `major:minor` under which `/proc/locks` lists the exclusive flock of
/// process `pid`.
fn lock_table_dev(pid: u32) -> String {
    let find = |locks: &str| {
        locks
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&"FLOCK")
                    && f.get(3) == Some(&"WRITE")
                    && f.get(4) == Some(&&*pid.to_string())
            })
            .map(str::to_owned)
    };
    // /proc/locks longer than a page comes in several read(2)s, and lines
    // shift between them while other processes lock and unlock (another test
    // suite running beside this one): a line can be skipped. The lock is
    // held throughout, so read again.
    let mut locks = String::new();
    let line = (0..100)
        .find_map(|_| {
            locks = std::fs::read_to_string("/proc/locks").unwrap();
            find(&locks)
        })
        .unwrap_or_else(|| panic!("no flock of {pid} in /proc/locks:\n{locks}"));
    let id = line.split_whitespace().nth(5).unwrap();
    let mut parts = id.split(':');
    let major = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
    let minor = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
    format!("{major}:{minor}")
}

fn stat_dev(path: &Path) -> String {
    let dev = std::fs::metadata(path).unwrap().dev();
    format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// In a private mount namespace: mount, then have `flock(1)` and a guard
/// hold a PID file there, and check `running_pid` names each.
fn scenario() {
    let fs = std::env::var(FS_ENV).unwrap();
    let base = env_path(BASE_ENV);
    let Some(dir) = mount(&fs, &base) else {
        report("SKIP the kernel has no btrfs (not in /proc/filesystems, modprobe failed)");
        return;
    };
    let pid = dir.join("daemon.pid");

    // flock(1) creates the file empty and holds it: only the lock table can
    // name the holder.
    let mut flock = Command::new(require_tool("flock", "util-linux"))
        .arg(&pid)
        .args(["sh", "-c", "echo LOCKED; exec cat >/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn flock");
    let mut line = String::new();
    BufReader::new(flock.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "LOCKED");
    report(format!(
        "DEVICES stat {} lock-table {}",
        stat_dev(&pid),
        lock_table_dev(flock.id())
    ));
    let named = running_pid(&pid);
    report(format!("FLOCK {named:?} expected Ok(Some({}))", flock.id()));
    assert_eq!(named.unwrap(), Some(flock.id()), "{fs}: flock(1) not named");
    drop(flock.stdin.take());
    assert!(flock.wait().unwrap().success());
    std::fs::remove_file(&pid).unwrap();

    // Our own guard, in another process.
    let mut holder = ChildSpec::new("hold-pid").env(PID_ENV, &pid).spawn();
    let ready = holder.expect_prefixed("READY ");
    assert_eq!(ready, holder.pid().to_string());
    assert_eq!(running_pid(&pid).unwrap(), Some(holder.pid()), "{fs}");
    holder.stop();
    assert_eq!(running_pid(&pid).unwrap(), None, "{fs}");
    report("OK");
}

/// Runs the scenario for `fs` in a private mount namespace; returns the
/// stat and lock-table devices it saw, or `None` when skipped.
fn run_scenario(fs: &str) -> Option<(String, String)> {
    let base = tempfile::tempdir().unwrap();
    let unshare = require_tool("unshare", "util-linux");
    let lines = ChildSpec::new("fs-scenario")
        .env(FS_ENV, fs)
        .env(BASE_ENV, base.path())
        .deadline(Duration::from_secs(60))
        .via([
            unshare.display().to_string(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
        ])
        .run();
    if let Some(skip) = lines.first().filter(|l| l.starts_with("SKIP")) {
        eprintln!("{fs}: skipped: {skip}");
        return None;
    }
    assert_eq!(lines.last().map(String::as_str), Some("OK"), "{lines:?}");
    let devices = lines[0].strip_prefix("DEVICES stat ").unwrap();
    let (stat, table) = devices.split_once(" lock-table ").unwrap();
    Some((stat.to_string(), table.to_string()))
}

#[test]
#[serial]
fn on_a_btrfs_subvolume_the_lock_table_device_differs_and_the_holder_is_still_named() {
    if let Some((stat, table)) = run_scenario("btrfs") {
        assert_ne!(stat, table, "a subvolume's st_dev is its own");
    }
}

#[test]
#[serial]
fn on_overlayfs_the_lock_table_device_differs_and_the_holder_is_still_named() {
    let (stat, table) = run_scenario("overlay").expect("overlayfs is always there");
    assert_ne!(stat, table, "overlayfs reports the upper layer's st_dev");
}

#[test]
#[serial]
fn on_tmpfs_the_devices_agree_and_the_holder_is_named() {
    let (stat, table) = run_scenario("tmpfs").expect("tmpfs is always there");
    assert_eq!(stat, table);
}
