//! Measurement helpers shared by the benchmark programs (examples
//! `contention`, `signal_latency` and `resources`, and
//! `benches/lifecycle.rs`): the by-hand floor of acquire + drop, percentiles
//! and their formatting, a monotonic clock shared across processes, a
//! watchdog for child processes, the filesystem label of a directory, and the
//! `[--count N] [--dir DIR]` command line.
//!
//! Included with `#[path = "shared/bench_util.rs"] mod bench_util;` (from
//! `benches/lifecycle.rs`: `#[path = "examples/shared/bench_util.rs"]`), so
//! each program compiles its own copy (and can inline the floors). All of
//! them belong to the workspace member `historia-lifecycle-benches`.

// Each includer uses a different subset of these helpers; the rest would be
// reported as dead code in that program only.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};
use nix::unistd::Pid;

// ------------------------------------------------------------------ floors

/// The floor of `DaemonGuard` acquire + drop, by hand: `open(O_CREAT)` the
/// PID file, `flock(LOCK_EX|LOCK_NB)`, `socket` + `bind` + `listen`, one
/// `write` of the PID; then unlink the socket, unlink the PID file, close
/// both. Ten syscalls, and none of the guarantees (no stale-socket proof, no
/// dev/ino re-check, no exact modes, the PID file visible before it is
/// written).
pub fn floor_acquire_drop(sock: &Path, pid: &Path, me: u32) {
    let mut file = floor_open_and_lock(pid)
        .expect("open pid")
        .expect("flock: the claim must be free");
    let addr = UnixAddr::new(sock).expect("address");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &addr).expect("bind");
    listen(&fd, Backlog::new(128).expect("backlog")).expect("listen");
    // One write(2), as a by-hand claim would do it.
    file.write_all(format!("{me}\n").as_bytes())
        .expect("write pid");
    std::fs::remove_file(sock).expect("unlink socket");
    std::fs::remove_file(pid).expect("unlink pid");
    drop(fd);
    drop(file);
}

/// The deciding syscalls of a by-hand claim: `open(O_CREAT)` the PID file
/// (mode 0644, not truncated) and `flock(LOCK_EX|LOCK_NB)` it. `Ok(None)`
/// when another open file holds the lock (the descriptor is closed again).
pub fn floor_open_and_lock(pid: &Path) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(pid)?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        e => Err(e),
    }
}

// --------------------------------------------------------------- statistics

/// The values, sorted ascending.
pub fn sorted(v: impl IntoIterator<Item = u64>) -> Vec<u64> {
    let mut v: Vec<u64> = v.into_iter().collect();
    v.sort_unstable();
    v
}

/// Nearest-rank percentile of sorted data; `None` when there is none.
pub fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Nanoseconds as microseconds with `decimals` digits after the point, or
/// `-` for no value.
pub fn us(ns: Option<u64>, decimals: usize) -> String {
    ns.map_or_else(
        || "-".into(),
        |ns| format!("{:.*} µs", decimals, ns as f64 / 1000.0),
    )
}

/// CLOCK_MONOTONIC in ns: the same clock in every process, so an instant
/// taken in a child compares with one taken in the parent (which
/// `Instant` does not promise).
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ----------------------------------------------------------------- processes

/// Sends SIGKILL to every PID in its list if it is not dropped within the
/// deadline, so a hung child fails a run instead of hanging it. Dropping it
/// in time disarms it at once (no polling interval to wait out).
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms it for the PIDs in `pids`, which may still grow (children spawned
    /// after arming are covered).
    pub fn arm(pids: Arc<Mutex<Vec<i32>>>, deadline: Duration) -> Self {
        let (disarm, disarmed) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fired);
        let thread = std::thread::spawn(move || {
            // A message or a dropped sender both mean "disarmed".
            if let Err(RecvTimeoutError::Timeout) = disarmed.recv_timeout(deadline) {
                f.store(true, Ordering::Release);
                for &p in pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
            }
        });
        Watchdog {
            disarm: Some(disarm),
            fired,
            thread: Some(thread),
        }
    }

    /// Whether the deadline passed and the children were killed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes one line to stdout and flushes it at once: the way a child reports
/// to its parent, which reads line by line.
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .expect("report to the parent");
}

// ------------------------------------------------------------- environment

/// The filesystem of `dir` as a short label (`ext4`, `tmpfs`, else
/// `fs<magic>`): the cost of creating, renaming and unlinking files depends
/// on it (ext4 journals them, tmpfs only touches memory).
pub fn fs_label(dir: &Path) -> String {
    match nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type()) {
        Ok(nix::sys::statfs::TMPFS_MAGIC) => "tmpfs".to_string(),
        Ok(nix::sys::statfs::EXT4_SUPER_MAGIC) => "ext4".to_string(),
        Ok(t) => format!("fs{t:?}")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect(),
        Err(_) => "unknown".to_string(),
    }
}

/// Parses `[COUNT_FLAG N] [--dir DIR]` (e.g. `--runs`, `--cycles`); `None`
/// on anything else, for the caller's usage message. The directory defaults
/// to the temp dir.
pub fn count_and_dir(
    args: &[String],
    count_flag: &str,
    default: usize,
) -> Option<(usize, PathBuf)> {
    let mut count = default;
    let mut dir = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next()?;
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(value)),
            a if a == count_flag => count = value.parse().ok()?,
            _ => return None,
        }
    }
    Some((count, dir.unwrap_or_else(std::env::temp_dir)))
}
