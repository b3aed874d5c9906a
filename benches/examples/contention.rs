//! Contention harness and stress runner: R rounds of N processes racing to
//! acquire the same `DaemonGuard`. Every round must have exactly one winner.
//!
//! ```text
//! cargo run --release -p historia-lifecycle-benches --example contention                         # N = 2, 8, 32, 64, default rounds
//! cargo run --release -p historia-lifecycle-benches --example contention -- --rounds 2000 --n 8  # the stress run
//! cargo run --release -p historia-lifecycle-benches --example contention -- --n 2,64 --rounds 50 --dir /dev/shm --no-floor
//! cargo run --release -p historia-lifecycle-benches --example contention -- --n 64 --runtime-dir exists
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
//! Both kinds run twice (`--runtime-dir both`, the default): with the
//! directory of the two files already there (a daemon's usual start), and
//! missing, so every racer must create it (`DaemonGuard` does that itself;
//! the floor racer then does one `mkdir(2)` first). Creating entries in one
//! parent directory takes that directory's lock, so the second setup shows
//! what a crowd of `mkdir`s costs on its own.
//!
//! Each racer also reports its context switches during the claim
//! (`getrusage(RUSAGE_THREAD)`), so the second table can say whether a slow
//! loser slept in the kernel (a voluntary switch: it waited for a lock) or
//! was preempted, and splits the losers by whether they started after the
//! winner's claim was complete (the refusal alone).
//!
//! Any round with a winner count other than 1, a racer error, a wrong PID in
//! the file or files left behind is printed loudly, and the program exits 1.
//! A watchdog kills a round's racers after 60 s, which fails that round.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use historia_lifecycle::{read_pid_file, DaemonGuard, LifecycleError};
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[path = "shared/bench_util.rs"]
mod bench_util;
use bench_util::{mono_ns, pct, say, sorted, Watchdog};

/// Default rounds per N. With the floor rounds and both directory setups,
/// the default run takes about 40 s on 2 cores (spawning processes is most
/// of it).
const DEFAULTS: [(usize, usize); 4] = [(2, 500), (8, 300), (32, 150), (64, 100)];
const ROUND_DEADLINE: Duration = Duration::from_secs(60);
/// A loser decision slower than this is looked at: did it sleep or was it
/// preempted?
const SLOW: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// `DaemonGuard::acquire`.
    Ours,
    /// open(O_CREAT) + flock(LOCK_EX|LOCK_NB) by hand.
    Floor,
}

/// Whether the directory of the socket and PID file exists when the racers
/// start (a daemon's usual start) or must be created by them (the first
/// start: every racer's `mkdir` of it goes through the parent directory's
/// lock).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DirSetup {
    Exists,
    Missing,
}

/// What one round measures.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Kind {
    mode: Mode,
    dir: DirSetup,
}

impl Kind {
    /// The racer's role argument.
    fn role(self) -> &'static str {
        match (self.mode, self.dir) {
            // DaemonGuard::acquire creates a missing directory itself.
            (Mode::Ours, _) => "racer",
            (Mode::Floor, DirSetup::Exists) => "racer-floor",
            (Mode::Floor, DirSetup::Missing) => "racer-floor-mkdir",
        }
    }

    fn label(self) -> &'static str {
        match (self.mode, self.dir) {
            (Mode::Ours, _) => "DaemonGuard::acquire",
            (Mode::Floor, DirSetup::Exists) => "floor: open+flock",
            (Mode::Floor, DirSetup::Missing) => "floor: mkdir+open+flock",
        }
    }

    fn dir_label(self) -> &'static str {
        match self.dir {
            DirSetup::Exists => "exists",
            DirSetup::Missing => "created by the racers",
        }
    }
}

struct Options {
    ns: Vec<usize>,
    rounds: Option<usize>,
    floor: bool,
    dirs: Vec<DirSetup>,
    dir: Option<PathBuf>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let racer_role = match args.first().map(String::as_str) {
        Some("racer") => Some((Mode::Ours, false)),
        Some("racer-floor") => Some((Mode::Floor, false)),
        Some("racer-floor-mkdir") => Some((Mode::Floor, true)),
        _ => None,
    };
    if let Some((mode, mkdir)) = racer_role {
        return racer(mode, mkdir, Path::new(&args[1]), Path::new(&args[2]));
    }
    let opts = parse_args(&args);
    std::process::exit(run(&opts));
}

fn usage() -> ! {
    eprintln!(
        "usage: contention [--n N[,N...]] [--rounds R] [--no-floor] \
         [--runtime-dir exists|missing|both] [--dir DIR]\n  \
         default: N = 2,8,32,64 with (N, rounds) = {DEFAULTS:?}, the runtime dir both existing \
         and missing, a floor round after each round, temp dirs in $TMPDIR"
    );
    std::process::exit(64);
}

fn parse_args(args: &[String]) -> Options {
    let mut o = Options {
        ns: Vec::new(),
        rounds: None,
        floor: true,
        dirs: vec![DirSetup::Exists, DirSetup::Missing],
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
            "--runtime-dir" => {
                o.dirs = match value().as_str() {
                    "exists" => vec![DirSetup::Exists],
                    "missing" => vec![DirSetup::Missing],
                    "both" => vec![DirSetup::Exists, DirSetup::Missing],
                    _ => usage(),
                }
            }
            "--dir" => o.dir = Some(PathBuf::from(value())),
            _ => usage(),
        }
    }
    if o.ns.is_empty() {
        o.ns = DEFAULTS.iter().map(|&(n, _)| n).collect();
    }
    o
}

// ---------------------------------------------------------------- racer role

/// One racer: waits for the start, then claims; `mkdir` (floor only) first
/// creates the directory of the PID file, as `DaemonGuard` does for itself.
fn racer(mode: Mode, mkdir: bool, sock: &Path, pid: &Path) {
    say("ready");
    // The start barrier: blocks until the parent closes the pipe (EOF).
    let mut byte = [0u8; 1];
    let n = std::io::stdin().read(&mut byte).expect("read start pipe");
    assert_eq!(n, 0, "the start pipe carries no data, only EOF");

    let cs = ctx_switches();
    let t = Instant::now();
    let held: Result<Box<dyn std::any::Any>, String> = match mode {
        Mode::Ours => match DaemonGuard::acquire(sock, pid) {
            Ok(guard) => Ok(Box::new(guard)),
            Err(LifecycleError::AlreadyRunning) => Err("lost".into()),
            Err(e) => Err(format!("error {e}")),
        },
        Mode::Floor => floor_claim(pid, mkdir),
    };
    let took = t.elapsed().as_nanos();
    let end = mono_ns();
    let (vol, invol) = ctx_switches();
    let (vol, invol) = (vol - cs.0, invol - cs.1);
    match held {
        Ok(_held) => {
            say(&format!("win {took} {end} {vol} {invol}"));
            // Hold the claim until the parent's SIGTERM. In Mode::Ours the
            // default SignalMode::Exit removes the files and ends the process;
            // the floor just dies.
            loop {
                std::thread::park();
            }
        }
        Err(lost) if lost == "lost" => say(&format!("lost {took} {end} {vol} {invol}")),
        Err(e) => {
            say(&e);
            std::process::exit(3);
        }
    }
}

/// This thread's (voluntary, involuntary) context switches so far: a
/// voluntary one means it slept (e.g. on a kernel lock), an involuntary one
/// that it was preempted.
fn ctx_switches() -> (u64, u64) {
    // SAFETY: getrusage fills the struct we own; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    (ru.ru_nvcsw as u64, ru.ru_nivcsw as u64)
}

/// The deciding syscalls by hand: open(O_CREAT) + flock(LOCK_EX|LOCK_NB);
/// the winner writes its PID. With `mkdir`, one mkdir(2) of the directory
/// first (`EEXIST` is fine).
fn floor_claim(pid: &Path, mkdir: bool) -> Result<Box<dyn std::any::Any>, String> {
    if mkdir {
        let dir = pid.parent().expect("the PID file has a directory");
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("error mkdir: {e}"))
            }
            _ => {}
        }
    }
    let Some(mut file) =
        bench_util::floor_open_and_lock(pid).map_err(|e| format!("error open+flock: {e}"))?
    else {
        return Err("lost".into());
    };
    // One write(2), as in the by-hand floor of acquire + drop.
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(|e| format!("error write: {e}"))?;
    Ok(Box::new(file))
}

// ---------------------------------------------------------------- parent role

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
    /// The decision times of the losers that called `acquire` only after the
    /// winner's `acquire` had returned: with the claim already in place they
    /// measure the refusal alone; the others may have raced the winner's
    /// creation of the file.
    loser_after_win: Vec<u64>,
    /// Losers whose decision took over [`SLOW`], and how many of those slept
    /// (a voluntary context switch during `acquire`) or were preempted (an
    /// involuntary one, and no voluntary one).
    slow_losers: usize,
    slow_slept: usize,
    slow_preempted: usize,
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
    /// Context switches during `acquire`: (voluntary, involuntary).
    switches: (u64, u64),
}

fn run(o: &Options) -> i32 {
    let exe = std::env::current_exe().expect("current_exe");
    let base = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "contention: racers in {} ({}), {} cores",
        base.display(),
        bench_util::fs_label(&base),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let started = Instant::now();
    // Markdown rows, printed as each N finishes and again as one table.
    let mut rows: Vec<String> = Vec::new();
    let mut split_rows: Vec<String> = Vec::new();
    let (mut total_rounds, mut total_racers, mut total_violations) = (0, 0, 0);
    let mut failed = false;
    for &n in &o.ns {
        let r = o.rounds.unwrap_or_else(|| {
            DEFAULTS
                .iter()
                .find(|&&(dn, _)| dn == n)
                .map_or(50, |&(_, r)| r)
        });
        let mut kinds: Vec<Kind> = Vec::new();
        for &dir in &o.dirs {
            kinds.push(Kind {
                mode: Mode::Ours,
                dir,
            });
            if o.floor {
                kinds.push(Kind {
                    mode: Mode::Floor,
                    dir,
                });
            }
        }
        let mut stats: Vec<Stats> = kinds.iter().map(|_| Stats::new()).collect();
        for i in 0..r {
            // Interleaved, so ours and the floor see the same machine load.
            for (&kind, st) in kinds.iter().zip(&mut stats) {
                let t = Instant::now();
                if let Err(msg) = round(&exe, &base, n, kind, st) {
                    st.violations += 1;
                    failed = true;
                    eprintln!("\n!!!!!!!! VIOLATION: N={n} {kind:?} round {i}: {msg} !!!!!!!!\n");
                }
                st.rounds += 1;
                st.elapsed += t.elapsed();
            }
        }
        for (&kind, st) in kinds.iter().zip(&stats) {
            let row = table_row(n, kind, st);
            println!("{row}");
            rows.push(row);
            split_rows.push(split_row(n, kind, st));
            total_rounds += st.rounds;
            total_racers += n * st.rounds;
            total_violations += st.violations;
        }
    }
    println!("\n{TABLE_HEADER}");
    for row in &rows {
        println!("{row}");
    }
    println!("\n{SPLIT_HEADER}");
    for row in &split_rows {
        println!("{row}");
    }
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

const TABLE_HEADER: &str = "\
| N | racers | runtime dir | rounds | winners/round | violations | loser decision p50 | p99 | max | \
winner decision p50 | loser from release p50 | p99 | time |
|---|---|---|---|---|---|---|---|---|---|---|---|---|";

const SPLIT_HEADER: &str = "\
| N | racers | runtime dir | losers | started after the winner's acquire returned | their decision p50 | p99 | \
the other losers | their p50 | p99 | losers over 1 ms | of which slept | preempted |
|---|---|---|---|---|---|---|---|---|---|---|---|---|";

/// One Markdown row of the loser decision times split by when the loser
/// started: after the winner's claim was complete (the refusal alone), or
/// while the winner may still have been creating it.
fn split_row(n: usize, kind: Kind, st: &Stats) -> String {
    let after = sorted(st.loser_after_win.iter().copied());
    // Everything in `after` is also in `loser_decision`; take it out once.
    let mut rest = st.loser_decision.clone();
    for x in &after {
        if let Some(i) = rest.iter().position(|y| y == x) {
            rest.swap_remove(i);
        }
    }
    let rest = sorted(rest);
    format!(
        "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        kind.label(),
        kind.dir_label(),
        st.loser_decision.len(),
        after.len(),
        us(pct(&after, 50.0)),
        us(pct(&after, 99.0)),
        rest.len(),
        us(pct(&rest, 50.0)),
        us(pct(&rest, 99.0)),
        st.slow_losers,
        st.slow_slept,
        st.slow_preempted,
    )
}

/// One Markdown row of the results table.
fn table_row(n: usize, kind: Kind, st: &Stats) -> String {
    let (l, w, f) = (
        sorted(st.loser_decision.iter().copied()),
        sorted(st.winner_decision.iter().copied()),
        sorted(st.loser_from_release.iter().copied()),
    );
    format!(
        "| {n} | {} | {} | {} | {}..{} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
        kind.label(),
        kind.dir_label(),
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
    )
}

fn us(ns: Option<u64>) -> String {
    bench_util::us(ns, 0)
}

/// One round: spawn N racers, release them together, collect and check.
fn round(exe: &Path, base: &Path, n: usize, kind: Kind, st: &mut Stats) -> Result<(), String> {
    let dir = tempfile::tempdir_in(base).map_err(|e| format!("tempdir: {e}"))?;
    let sock = dir.path().join("run/daemon.sock");
    let pid = dir.path().join("run/daemon.pid");
    if kind.dir == DirSetup::Exists {
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
                    .arg(kind.role())
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
    if kind.mode == Mode::Ours && (sock.exists() || pid.exists()) {
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
        read_report(out, i, &mut line)?;
        if line.trim() != "ready" {
            return Err(format!("racer {i} said {line:?} instead of ready"));
        }
    }
    let release = mono_ns();
    drop(start_w); // EOF for every racer at once

    let mut reports = Vec::with_capacity(outs.len());
    for (i, out) in outs.iter_mut().enumerate() {
        read_report(out, i, &mut line)?;
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
            switches: (num(3)?, num(4)?),
        });
    }

    let winners: Vec<usize> = (0..reports.len()).filter(|&i| reports[i].won).collect();
    st.winners_min = st.winners_min.min(winners.len());
    st.winners_max = st.winners_max.max(winners.len());
    // The instant the (single) winner's acquire returned.
    let win_end = match winners.as_slice() {
        [w] => reports[*w].end_mono,
        _ => u64::MAX,
    };
    for r in &reports {
        if r.won {
            st.winner_decision.push(r.took_ns);
        } else {
            st.loser_decision.push(r.took_ns);
            st.loser_from_release
                .push(r.end_mono.saturating_sub(release));
            if r.end_mono.saturating_sub(r.took_ns) > win_end {
                st.loser_after_win.push(r.took_ns);
            }
            if r.took_ns > SLOW.as_nanos() as u64 {
                st.slow_losers += 1;
                match r.switches {
                    (v, _) if v > 0 => st.slow_slept += 1,
                    (_, i) if i > 0 => st.slow_preempted += 1,
                    _ => {}
                }
            }
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

/// Reads racer `i`'s next report line into `line` (replacing its content).
fn read_report(
    out: &mut BufReader<ChildStdout>,
    i: usize,
    line: &mut String,
) -> Result<(), String> {
    line.clear();
    out.read_line(line)
        .map(drop)
        .map_err(|e| format!("read racer {i}: {e}"))
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
