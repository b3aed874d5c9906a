//! Resources a `DaemonGuard` holds: file descriptors and threads (the change
//! in the entries of /proc/self/fd and /proc/self/task), the RSS change of
//! holding one (VmRSS in /proc/self/status), and the fd, thread and RSS
//! counts around 10^5 acquire/drop cycles, which must be flat. Linux only.
//!
//! ```text
//! cargo run --release -p historia-lifecycle-benches --example resources                  # in $TMPDIR
//! cargo run --release -p historia-lifecycle-benches --example resources -- --cycles 1000000 --dir /dev/shm
//! ```
//!
//! `resources profile <ours-off|ours-exit|pid-guard|floor|ours-lose|floor-lose> N [DIR]`
//! only runs N acquire/drop cycles of one kind, for `strace -c -f` or
//! callgrind (bench.sh uses it to count the syscalls per cycle). The `-lose`
//! kinds are N attempts that lose against a claim this process holds.
//!
//! Exits 1 when a check fails: more than one helper thread, a descriptor
//! left after a drop, or fd/thread counts that grow over the cycles.

use std::path::{Path, PathBuf};
use std::time::Instant;

use historia_lifecycle::{DaemonGuard, LifecycleError, PidFileGuard, SignalMode};

#[path = "shared/bench_util.rs"]
mod bench_util;

const DEFAULT_CYCLES: usize = 100_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("profile") {
        return profile(&args[1..]);
    }
    let (cycles, dir) =
        bench_util::count_and_dir(&args, "--cycles", DEFAULT_CYCLES).unwrap_or_else(|| usage());
    std::process::exit(run(cycles, &dir));
}

fn usage() -> ! {
    eprintln!(
        "usage: resources [--cycles N] [--dir DIR]\n       \
         resources profile <ours-off|ours-exit|pid-guard|floor|ours-lose|floor-lose> N [DIR]"
    );
    std::process::exit(64);
}

/// Open descriptors, threads, and resident set size in kB.
#[derive(Clone, Copy, Debug)]
struct Usage {
    fds: i64,
    threads: i64,
    rss_kb: i64,
}

fn usage_now() -> Usage {
    let count = |dir: &str| std::fs::read_dir(dir).expect(dir).count() as i64;
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    Usage {
        // read_dir holds one descriptor of its own while counting, the same
        // one in every measurement, so deltas are exact.
        fds: count("/proc/self/fd"),
        threads: count("/proc/self/task"),
        rss_kb,
    }
}

struct Checks {
    failed: bool,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: &str) {
        if ok {
            println!("  ok: {what}");
        } else {
            self.failed = true;
            println!("  !!!!!!!! FAILED: {what} !!!!!!!!");
        }
    }
}

fn row(what: &str, from: Usage, to: Usage) {
    println!(
        "| {what} | {:+} | {:+} | {:+} kB |",
        to.fds - from.fds,
        to.threads - from.threads,
        to.rss_kb - from.rss_kb
    );
}

fn run(cycles: usize, base: &Path) -> i32 {
    let tmp = tempfile::tempdir_in(base).expect("tempdir");
    let sock = tmp.path().join("daemon.sock");
    let pid = tmp.path().join("daemon.pid");
    let mut c = Checks { failed: false };
    println!("resources: guards in {}", tmp.path().display());

    // Touch the code paths once without signals, so the first measured
    // acquire does not count one-off allocations (std's lazy statics etc.).
    drop(
        DaemonGuard::builder(&sock, &pid)
            .signals(SignalMode::Off)
            .acquire()
            .expect("warm-up"),
    );

    println!("\n| step | fds | threads | RSS |");
    println!("|---|---|---|---|");
    let start = usage_now();

    let off = DaemonGuard::builder(&sock, &pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire Off");
    let held_off = usage_now();
    row("hold one guard, SignalMode::Off", start, held_off);
    drop(off);
    let after_off = usage_now();
    row("after its drop", start, after_off);

    let exit = DaemonGuard::acquire(&sock, &pid).expect("acquire Exit");
    let held_exit = usage_now();
    row(
        "hold one guard, SignalMode::Exit (first in the process: installs the helper thread and self-pipe)",
        start,
        held_exit,
    );
    drop(exit);
    let after_exit = usage_now();
    row(
        "after its drop (the helper thread and pipe stay, by design)",
        start,
        after_exit,
    );

    let exit2 = DaemonGuard::acquire(&sock, &pid).expect("acquire Exit again");
    let held_exit2 = usage_now();
    row(
        "hold one guard, SignalMode::Exit (helper already installed)",
        after_exit,
        held_exit2,
    );
    drop(exit2);

    let dirs: Vec<tempfile::TempDir> = (0..10)
        .map(|_| tempfile::tempdir_in(base).expect("tempdir"))
        .collect();
    let before_ten = usage_now();
    let ten: Vec<DaemonGuard> = dirs
        .iter()
        .map(|d| {
            DaemonGuard::builder(d.path().join("d.sock"), d.path().join("d.pid"))
                .signals(SignalMode::Graceful)
                .acquire()
                .expect("acquire one of ten")
        })
        .collect();
    let held_ten = usage_now();
    row(
        "hold ten guards at once (SignalMode::Graceful)",
        before_ten,
        held_ten,
    );
    drop(ten);
    let after_ten = usage_now();

    println!();
    c.expect(
        held_off.fds - start.fds == 2 && held_off.threads == start.threads,
        "a guard with SignalMode::Off holds 2 fds (flocked PID file, listener) and no thread",
    );
    c.expect(after_off.fds == start.fds, "dropping it closes both fds");
    c.expect(
        held_exit.threads - start.threads == 1,
        "SignalMode::Exit adds exactly 1 helper thread",
    );
    c.expect(
        held_exit.fds - start.fds == 4,
        "SignalMode::Exit holds 2 fds per guard plus the 2 ends of the self-pipe",
    );
    c.expect(
        after_exit.fds - start.fds == 2 && after_exit.threads - start.threads == 1,
        "after the drop only the process-wide pipe (2 fds) and the thread remain",
    );
    c.expect(
        held_ten.threads == before_ten.threads && held_ten.fds - before_ten.fds == 20,
        "ten guards: no new thread, 2 fds each",
    );
    c.expect(
        after_ten.fds == before_ten.fds,
        "dropping ten guards closes their 20 fds",
    );

    println!("\n{cycles} acquire/drop cycles (default SignalMode::Exit):");
    let before = usage_now();
    let t = Instant::now();
    for _ in 0..cycles {
        drop(DaemonGuard::acquire(&sock, &pid).expect("acquire in cycle"));
    }
    let took = t.elapsed();
    let after = usage_now();
    println!("\n| | fds | threads | RSS |");
    println!("|---|---|---|---|");
    println!(
        "| before | {} | {} | {} kB |",
        before.fds, before.threads, before.rss_kb
    );
    println!(
        "| after {cycles} cycles | {} | {} | {} kB |",
        after.fds, after.threads, after.rss_kb
    );
    println!(
        "\n{:.1} µs per cycle, {:.1} s",
        took.as_secs_f64() * 1e6 / cycles as f64,
        took.as_secs_f64()
    );
    c.expect(after.fds == before.fds, "fd count flat over the cycles");
    c.expect(
        after.threads == before.threads,
        "thread count flat over the cycles",
    );
    // RSS: the allocator may keep a few pages; a leak of even 16 bytes a
    // cycle would show as 1.6 MB here.
    c.expect(
        after.rss_kb - before.rss_kb < 512,
        "RSS flat over the cycles (grew < 512 kB)",
    );
    c.expect(
        !sock.exists() && !pid.exists(),
        "no files left after the cycles",
    );
    i32::from(c.failed)
}

/// N cycles of one kind of acquire + drop and nothing else, to profile.
fn profile(args: &[String]) {
    let (kind, n) = match args {
        [kind, n, ..] => (
            kind.as_str(),
            n.parse::<usize>().unwrap_or_else(|_| usage()),
        ),
        _ => usage(),
    };
    let base = args.get(2).map_or_else(std::env::temp_dir, PathBuf::from);
    let tmp = tempfile::tempdir_in(base).expect("tempdir");
    let sock = tmp.path().join("daemon.sock");
    let pid = tmp.path().join("daemon.pid");
    let me = std::process::id();
    // The losing kinds need a live claim to lose against. flock(2) locks
    // belong to the open file description, so this process's own next
    // attempt conflicts with it just as another process's would.
    let _held = kind.ends_with("-lose").then(|| {
        DaemonGuard::builder(&sock, &pid)
            .signals(SignalMode::Off)
            .acquire()
            .expect("hold the claim")
    });
    for _ in 0..n {
        match kind {
            "ours-off" => drop(
                DaemonGuard::builder(&sock, &pid)
                    .signals(SignalMode::Off)
                    .acquire()
                    .expect("acquire"),
            ),
            "ours-exit" => drop(DaemonGuard::acquire(&sock, &pid).expect("acquire")),
            "pid-guard" => drop(PidFileGuard::acquire(&pid).expect("acquire")),
            "floor" => bench_util::floor_acquire_drop(&sock, &pid, me),
            "ours-lose" => assert!(matches!(
                DaemonGuard::acquire(&sock, &pid),
                Err(LifecycleError::AlreadyRunning)
            )),
            "floor-lose" => floor_lose(&pid),
            _ => usage(),
        }
    }
}

/// The floor of losing: `open(O_CREAT)` + `flock(LOCK_EX|LOCK_NB)` failing
/// with `EWOULDBLOCK` + `close`.
fn floor_lose(pid: &Path) {
    let locked = bench_util::floor_open_and_lock(pid).expect("open pid");
    assert!(locked.is_none(), "the claim is held, so flock must fail");
}
