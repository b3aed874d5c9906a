//! Contention harness and stress runner: R rounds of N processes racing to
//! acquire the same `DaemonGuard`. Every round must have exactly one winner.
//!
//! ```text
//! cargo run --release --example contention                         # N = 2, 8, 32, 64, default rounds
//! cargo run --release --example contention -- --rounds 2000 --n 8  # the stress run
//! cargo run --release --example contention -- --n 2,64 --rounds 50 --dir /dev/shm --no-floor
//! ```
//!
//! Each round, in a fresh temp dir:
//! 1. The parent spawns N copies of this program in the `racer` role. All of
//!    them share one start pipe as stdin; each prints `ready` and blocks
//!    reading it.
//! 2. Once all N are ready, the parent closes the pipe's write end: every
//!    racer reads EOF at once (one wake-up for all, not N writes).
//! 3. Each racer times `DaemonGuard::acquire` from just before the call to its
//!    result, and reports `win`/`lost` with that time and the CLOCK_MONOTONIC
//!    instant of the result (the same clock in every process, so the parent
//!    also gets the time from its release instant, wake-up included).
//! 4. The winner keeps its guard (so a late racer cannot win after it) until
//!    the parent has every report and has checked that the PID file names it;
//!    then the parent sends SIGTERM, and the default `SignalMode::Exit`
//!    removes the files. The parent checks that the winner died of SIGTERM,
//!    every loser exited 0, and both files are gone.
//!
//! Unless `--no-floor` is given, every round is followed by a floor round
//! under the same load: N racers doing only the deciding syscalls by hand
//! (`open(O_CREAT)` the PID file, `flock(LOCK_EX|LOCK_NB)`, write the PID on a
//! win). It shows how much of the tail is the machine (N processes on this
//! many cores) rather than the library.
//!
//! Any round with a winner count other than 1, a racer error, a wrong PID in
//! the file or files left behind is printed loudly, and the program exits 1.
//! A watchdog kills a round's racers after 60 s, which fails that round.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use historia_lifecycle::{read_pid_file, DaemonGuard, LifecycleError};
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Default rounds per N. With the floor rounds, the default run takes about
/// a minute on 2 cores (spawning processes is most of it).
const DEFAULTS: [(usize, usize); 4] = [(2, 500), (8, 300), (32, 150), (64, 100)];
const ROUND_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `DaemonGuard::acquire`.
    Ours,
    /// open(O_CREAT) + flock(LOCK_EX|LOCK_NB) by hand.
    Floor,
}

impl Mode {
    fn role(self) -> &'static str {
        match self {
            Mode::Ours => "racer",
            Mode::Floor => "racer-floor",
        }
    }
}

struct Options {
    ns: Vec<usize>,
    rounds: Option<usize>,
    floor: bool,
    dir: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("racer") => return racer(Mode::Ours, Path::new(&args[1]), Path::new(&args[2])),
        Some("racer-floor") => return racer(Mode::Floor, Path::new(&args[1]), Path::new(&args[2])),
        _ => {}
    }
    let opts = parse_args(&args);
    std::process::exit(run(&opts));
}

fn usage() -> ! {
    eprintln!(
        "usage: contention [--n N[,N...]] [--rounds R] [--no-floor] [--dir DIR]\n  \
         default: N = 2,8,32,64 with (N, rounds) = {DEFAULTS:?}, a floor round after each \
         round, temp dirs in $TMPDIR"
    );
    std::process::exit(64);
}

fn parse_args(args: &[String]) -> Options {
    let mut o = Options {
        ns: Vec::new(),
        rounds: None,
        floor: true,
        dir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--n" => {
                for part in value().split(',') {
                    match part.trim().parse::<usize>() {
                        Ok(n) if n >= 1 => o.ns.push(n),
                        _ => usage(),
                    }
                }
            }
            "--rounds" => match value().parse::<usize>() {
                Ok(r) if r >= 1 => o.rounds = Some(r),
                _ => usage(),
            },
            "--no-floor" => o.floor = false,
            "--dir" => o.dir = Some(PathBuf::from(value())),
            _ => usage(),
        }
    }
    if o.ns.is_empty() {
        o.ns = DEFAULTS.iter().map(|&(n, _)| n).collect();
    }
    o
}

/// CLOCK_MONOTONIC in ns: the same clock in every process, so instants taken
/// in the racers compare with the parent's release instant.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------- racer role

fn racer(mode: Mode, sock: &Path, pid: &Path) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")
        .and_then(|()| out.flush())
        .expect("report ready");
    // The start barrier: blocks until the parent closes the pipe (EOF).
    let mut byte = [0u8; 1];
    let n = std::io::stdin().read(&mut byte).expect("read start pipe");
    assert_eq!(n, 0, "the start pipe carries no data, only EOF");

    let t = Instant::now();
    let held: Result<Box<dyn std::any::Any>, String> = match mode {
        Mode::Ours => match DaemonGuard::acquire(sock, pid) {
            Ok(guard) => Ok(Box::new(guard)),
            Err(LifecycleError::AlreadyRunning) => Err("lost".into()),
            Err(e) => Err(format!("error {e}")),
        },
        Mode::Floor => floor_claim(pid),
    };
    let took = t.elapsed().as_nanos();
    let end = mono_ns();
    match held {
        Ok(_held) => {
            writeln!(out, "win {took} {end}")
                .and_then(|()| out.flush())
                .expect("report");
            // Hold the claim until the parent's SIGTERM. In Mode::Ours the
            // default SignalMode::Exit removes the files and ends the process;
            // the floor just dies.
            loop {
                std::thread::park();
            }
        }
        Err(lost) if lost == "lost" => {
            writeln!(out, "lost {took} {end}")
                .and_then(|()| out.flush())
                .expect("report");
        }
        Err(e) => {
            let _ = writeln!(out, "{e}");
            std::process::exit(3);
        }
    }
}

/// The deciding syscalls by hand: open(O_CREAT) + flock(LOCK_EX|LOCK_NB);
/// the winner writes its PID.
fn floor_claim(pid: &Path) -> Result<Box<dyn std::any::Any>, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(pid)
        .map_err(|e| format!("error open: {e}"))?;
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            "lost".into()
        } else {
            format!("error flock: {e}")
        });
    }
    writeln!(file, "{}", std::process::id()).map_err(|e| format!("error write: {e}"))?;
    Ok(Box::new(file))
}

// ---------------------------------------------------------------- parent role

/// Kills the round's racers if the round takes longer than its deadline, so a
/// hung racer fails the run instead of hanging it.
struct Watchdog {
    done: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(pids: Arc<Mutex<Vec<i32>>>, deadline: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (d, f) = (Arc::clone(&done), Arc::clone(&fired));
        let thread = std::thread::spawn(move || {
            let until = Instant::now() + deadline;
            while !d.load(Ordering::Acquire) {
                if Instant::now() >= until {
                    f.store(true, Ordering::Release);
                    for &p in pids.lock().unwrap().iter() {
                        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Watchdog {
            done,
            fired,
            thread: Some(thread),
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct Stats {
    rounds: usize,
    violations: usize,
    winners_min: usize,
    winners_max: usize,
    /// In-racer time from just before `acquire` to its result, ns.
    loser_decision: Vec<u64>,
    winner_decision: Vec<u64>,
    /// From the parent's release instant to the loser's result, ns: adds the
    /// wake-up and scheduling of N processes on this machine's cores.
    loser_from_release: Vec<u64>,
    elapsed: Duration,
}

impl Stats {
    fn new() -> Self {
        Stats {
            winners_min: usize::MAX,
            ..Stats::default()
        }
    }
}

struct Report {
    won: bool,
    took_ns: u64,
    end_mono: u64,
}

fn run(o: &Options) -> i32 {
    let exe = std::env::current_exe().expect("current_exe");
    let base = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "contention: racers in {} ({}), {} cores",
        base.display(),
        fs_name(&base),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    let mut all: Vec<(usize, Mode, Stats)> = Vec::new();
    let mut failed = false;
    for &n in &o.ns {
        let r = o.rounds.unwrap_or_else(|| {
            DEFAULTS
                .iter()
                .find(|&&(dn, _)| dn == n)
                .map_or(50, |&(_, r)| r)
        });
        let modes: &[Mode] = if o.floor {
            &[Mode::Ours, Mode::Floor]
        } else {
            &[Mode::Ours]
        };
        let mut stats: Vec<Stats> = modes.iter().map(|_| Stats::new()).collect();
        for i in 0..r {
            // Interleaved, so ours and the floor see the same machine load.
            for (&mode, st) in modes.iter().zip(&mut stats) {
                let t = Instant::now();
                if let Err(msg) = round(&exe, &base, n, mode, st) {
                    st.violations += 1;
                    failed = true;
                    eprintln!("\n!!!!!!!! VIOLATION: N={n} {mode:?} round {i}: {msg} !!!!!!!!\n");
                }
                st.rounds += 1;
                st.elapsed += t.elapsed();
            }
        }
        for (&mode, st) in modes.iter().zip(stats) {
            print_line(n, mode, &st);
            all.push((n, mode, st));
        }
    }
    println!();
    println!(
        "| N | racers | rounds | winners/round | violations | loser decision p50 | p99 | max | \
         winner decision p50 | loser from release p50 | p99 | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, mode, st) in &all {
        let (l, w, f) = (
            sorted(&st.loser_decision),
            sorted(&st.winner_decision),
            sorted(&st.loser_from_release),
        );
        println!(
            "| {n} | {} | {} | {}..{} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
            match mode {
                Mode::Ours => "DaemonGuard::acquire",
                Mode::Floor => "floor: open+flock",
            },
            st.rounds,
            st.winners_min,
            st.winners_max,
            st.violations,
            us(pct(&l, 50.0)),
            us(pct(&l, 99.0)),
            us(l.last().copied()),
            us(pct(&w, 50.0)),
            us(pct(&f, 50.0)),
            us(pct(&f, 99.0)),
            st.elapsed.as_secs_f64()
        );
    }
    let total_rounds: usize = all.iter().map(|(_, _, s)| s.rounds).sum();
    let total_racers: usize = all.iter().map(|(n, _, s)| n * s.rounds).sum();
    let total_violations: usize = all.iter().map(|(_, _, s)| s.violations).sum();
    println!(
        "\ntotal: {total_rounds} rounds, {total_racers} racer processes, \
         {total_violations} violations, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if failed {
        eprintln!(
            "!!!!!!!! FAILED: {total_violations} round(s) violated exactly-one-winner \
             or cleanup !!!!!!!!"
        );
        1
    } else {
        println!("OK: exactly one winner in every round");
        0
    }
}

fn fs_name(dir: &Path) -> &'static str {
    match nix::sys::statfs::statfs(dir).map(|s| s.filesystem_type()) {
        Ok(nix::sys::statfs::TMPFS_MAGIC) => "tmpfs",
        Ok(nix::sys::statfs::EXT4_SUPER_MAGIC) => "ext4",
        _ => "other fs",
    }
}

fn print_line(n: usize, mode: Mode, st: &Stats) {
    let l = sorted(&st.loser_decision);
    println!(
        "N={n:>3} {mode:?}: {} rounds, winners/round {}..{}, violations {}, \
         loser decision p50 {} p99 {}, {:.1} s",
        st.rounds,
        st.winners_min,
        st.winners_max,
        st.violations,
        us(pct(&l, 50.0)),
        us(pct(&l, 99.0)),
        st.elapsed.as_secs_f64()
    );
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// Nearest-rank percentile of sorted data.
fn pct(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn us(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".into(), |ns| format!("{:.0} µs", ns as f64 / 1000.0))
}

/// One round: spawn N racers, release them together, collect and check.
fn round(exe: &Path, base: &Path, n: usize, mode: Mode, st: &mut Stats) -> Result<(), String> {
    let dir = tempfile::tempdir_in(base).map_err(|e| format!("tempdir: {e}"))?;
    let sock = dir.path().join("run/daemon.sock");
    let pid = dir.path().join("run/daemon.pid");
    if mode == Mode::Floor {
        std::fs::create_dir(dir.path().join("run")).map_err(|e| format!("mkdir: {e}"))?;
    }
    let (start_r, start_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;

    let pids = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let watchdog = Watchdog::arm(Arc::clone(&pids), ROUND_DEADLINE);
    let mut children: Vec<Child> = Vec::with_capacity(n);
    let mut outs: Vec<BufReader<ChildStdout>> = Vec::with_capacity(n);
    let mut spawned = Ok(());
    for _ in 0..n {
        let child = start_r
            .try_clone()
            .map_err(|e| format!("dup: {e}"))
            .and_then(|stdin: OwnedFd| {
                Command::new(exe)
                    .arg(mode.role())
                    .arg(&sock)
                    .arg(&pid)
                    .stdin(stdin)
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("spawn racer: {e}"))
            });
        match child {
            Ok(mut child) => {
                pids.lock().unwrap().push(child.id() as i32);
                outs.push(BufReader::new(child.stdout.take().expect("piped")));
                children.push(child);
            }
            Err(e) => {
                spawned = Err(e);
                break;
            }
        }
    }
    drop(start_r);
    let result = spawned.and_then(|()| race(&mut outs, start_w, &pid, &children, st));

    // Whatever happened: end every racer still alive, reap them all.
    let mut statuses = Vec::with_capacity(n);
    for c in &mut children {
        if result.is_err() {
            let _ = c.kill();
        }
        statuses.push(c.wait().map_err(|e| format!("wait: {e}"))?);
    }
    let fired = watchdog.fired();
    drop(watchdog);
    if fired {
        return Err(format!("watchdog: round exceeded {ROUND_DEADLINE:?}"));
    }
    let reports = result?;
    for (i, (r, s)) in reports.iter().zip(&statuses).enumerate() {
        check_exit(i, r, s)?;
    }
    if mode == Mode::Ours && (sock.exists() || pid.exists()) {
        return Err(format!(
            "files left behind after the winner's SIGTERM: socket {}, PID file {}",
            sock.exists(),
            pid.exists()
        ));
    }
    Ok(())
}

/// Releases the racers, reads their reports, checks the winner count and the
/// PID file, then SIGTERMs the winner.
fn race(
    outs: &mut [BufReader<ChildStdout>],
    start_w: OwnedFd,
    pid_path: &Path,
    children: &[Child],
    st: &mut Stats,
) -> Result<Vec<Report>, String> {
    let mut line = String::new();
    for (i, out) in outs.iter_mut().enumerate() {
        line.clear();
        out.read_line(&mut line)
            .map_err(|e| format!("read racer {i}: {e}"))?;
        if line.trim() != "ready" {
            return Err(format!("racer {i} said {line:?} instead of ready"));
        }
    }
    let release = mono_ns();
    drop(start_w); // EOF for every racer at once

    let mut reports = Vec::with_capacity(outs.len());
    for (i, out) in outs.iter_mut().enumerate() {
        line.clear();
        out.read_line(&mut line)
            .map_err(|e| format!("read racer {i}: {e}"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let won = match f.first().copied() {
            Some("win") => true,
            Some("lost") => false,
            _ => return Err(format!("racer {i} reported {line:?}")),
        };
        let num = |k: usize| -> Result<u64, String> {
            f.get(k)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("racer {i}: bad report {line:?}"))
        };
        reports.push(Report {
            won,
            took_ns: num(1)?,
            end_mono: num(2)?,
        });
    }

    let winners: Vec<usize> = (0..reports.len()).filter(|&i| reports[i].won).collect();
    st.winners_min = st.winners_min.min(winners.len());
    st.winners_max = st.winners_max.max(winners.len());
    for r in &reports {
        if r.won {
            st.winner_decision.push(r.took_ns);
        } else {
            st.loser_decision.push(r.took_ns);
            st.loser_from_release
                .push(r.end_mono.saturating_sub(release));
        }
    }
    // While the winner still holds the claim, the PID file must name it.
    let pid_check = match winners.as_slice() {
        [w] => {
            let expected = children[*w].id();
            match read_pid_file(pid_path) {
                Ok(Some(p)) if p == expected => Ok(()),
                other => Err(format!(
                    "PID file holds {other:?} but the winner is {expected}"
                )),
            }
        }
        _ => Ok(()),
    };
    for &w in &winners {
        let _ = kill(Pid::from_raw(children[w].id() as i32), Signal::SIGTERM);
    }
    if winners.len() != 1 {
        return Err(format!(
            "{} winners (racers {winners:?}); exactly 1 expected",
            winners.len()
        ));
    }
    pid_check?;
    Ok(reports)
}

/// The winner must die of the SIGTERM (both modes); a loser must exit 0.
fn check_exit(i: usize, r: &Report, s: &ExitStatus) -> Result<(), String> {
    let ok = if r.won {
        s.signal() == Some(libc::SIGTERM)
    } else {
        s.code() == Some(0)
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "racer {i} ({}) ended with {s}",
            if r.won { "winner" } else { "loser" }
        ))
    }
}
