//! The client side, measured: a cold start through `ensure_running` against
//! the naive client (spawn the same daemon by hand, then connect every 1 ms
//! until it answers), in one run, interleaved; and racing rounds of N client
//! threads on nothing running, counting daemon starts (0 double spawns is a
//! check, not a figure) and reporting the clients' p50/p99.
//!
//! ```text
//! cargo build --release --example daemon        # the daemon it starts (root crate)
//! cargo run --release -p historia-lifecycle-benches --example client_start -- \
//!     [--daemon PATH] [--runs N] [--rounds N] [--clients N] [--dir DIR]
//! ```
//!
//! Exits 1 if any round started more than one daemon or a client failed.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use historia_lifecycle::{stop, Launcher, Started, Stopped};

#[path = "shared/bench_util.rs"]
mod bench_util;
use bench_util::{pct, sorted};

struct Opts {
    daemon: PathBuf,
    runs: usize,
    rounds: usize,
    clients: usize,
    dir: PathBuf,
}

fn opts() -> Opts {
    let me = std::env::current_exe().expect("current_exe");
    // <target>/release/examples/client_start → <target>/release/examples/daemon
    let mut o = Opts {
        daemon: me.with_file_name("daemon"),
        runs: 30,
        rounds: 20,
        clients: 32,
        dir: std::env::temp_dir(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--daemon" => o.daemon = val().into(),
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--rounds" => o.rounds = val().parse().expect("--rounds N"),
            "--clients" => o.clients = val().parse().expect("--clients N"),
            "--dir" => o.dir = val().into(),
            other => panic!("unknown argument {other:?}"),
        }
    }
    assert!(
        o.daemon.is_file(),
        "{} missing: cargo build --release --example daemon",
        o.daemon.display()
    );
    o
}

fn daemon_cmd(o: &Opts, sock: &Path, pid: &Path) -> Command {
    let mut cmd = Command::new(&o.daemon);
    cmd.arg("--socket").arg(sock).arg("--pid").arg(pid);
    cmd
}

fn stop_it(pid: &Path) {
    match stop(pid, Duration::from_secs(5), Duration::from_secs(2)) {
        Ok(Stopped::Stopped { .. } | Stopped::Killed { .. }) => {}
        other => panic!("stop: {other:?}"),
    }
}

/// ensure_running on nothing running → connected.
fn cold_ours(o: &Opts) -> Duration {
    let dir = tempfile::tempdir_in(&o.dir).unwrap();
    let (sock, pid) = (dir.path().join("d.sock"), dir.path().join("d.pid"));
    let t = Instant::now();
    let conn = Launcher::new(&sock, &pid)
        .timeout(Duration::from_secs(10))
        .connect_or_spawn(&mut daemon_cmd(o, &sock, &pid))
        .expect("start");
    let took = t.elapsed();
    assert!(matches!(conn.started, Started::Spawned { .. }));
    drop(conn);
    stop_it(&pid);
    took
}

/// The naive client: spawn by hand, connect every 1 ms until it answers.
fn cold_naive(o: &Opts) -> Duration {
    let dir = tempfile::tempdir_in(&o.dir).unwrap();
    let (sock, pid) = (dir.path().join("d.sock"), dir.path().join("d.pid"));
    let t = Instant::now();
    let mut child = daemon_cmd(o, &sock, &pid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let conn = loop {
        if let Ok(c) = UnixStream::connect(&sock) {
            break c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "naive start timed out"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = t.elapsed();
    drop(conn);
    stop_it(&pid);
    let _ = child.wait();
    took
}

/// One round: `clients` threads released together on nothing running.
/// Returns each client's time and how many daemons started.
fn race_round(o: &Opts) -> (Vec<Duration>, usize, usize) {
    let dir = tempfile::tempdir_in(&o.dir).unwrap();
    let (sock, pid) = (dir.path().join("d.sock"), dir.path().join("d.pid"));
    let log = dir.path().join("daemon.log");
    let barrier = Arc::new(Barrier::new(o.clients));
    let handles: Vec<_> = (0..o.clients)
        .map(|_| {
            let (sock, pid, log, barrier) =
                (sock.clone(), pid.clone(), log.clone(), barrier.clone());
            let mut cmd = daemon_cmd(o, &sock, &pid);
            std::thread::spawn(move || {
                barrier.wait();
                let t = Instant::now();
                let r = Launcher::new(&sock, &pid)
                    .timeout(Duration::from_secs(20))
                    .log_file(&log)
                    .connect_or_spawn(&mut cmd);
                (t.elapsed(), r.map(|c| c.started))
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failed = 0;
    for h in handles {
        let (t, r) = h.join().unwrap();
        match r {
            Ok(_) => times.push(t),
            Err(e) => {
                eprintln!("client failed: {e}");
                failed += 1;
            }
        }
    }
    // Every start of the daemon prints "pid N" to its log, even a loser.
    let starts = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("socket "))
        .count();
    stop_it(&pid);
    (times, starts, failed)
}

fn ms(ns: Option<u64>) -> String {
    ns.map_or("-".into(), |n| format!("{:.2} ms", n as f64 / 1e6))
}

fn main() {
    let o = opts();
    println!(
        "client_start: daemon {}, dir {} ({})",
        o.daemon.display(),
        o.dir.display(),
        bench_util::fs_label(&o.dir)
    );
    let (mut ours, mut naive) = (Vec::new(), Vec::new());
    for i in 0..o.runs {
        // Interleaved, alternating who goes first.
        if i % 2 == 0 {
            ours.push(cold_ours(&o));
            naive.push(cold_naive(&o));
        } else {
            naive.push(cold_naive(&o));
            ours.push(cold_ours(&o));
        }
    }
    let ns = |v: Vec<Duration>| sorted(v.into_iter().map(|d| d.as_nanos() as u64));
    let (ours, naive) = (ns(ours), ns(naive));
    println!("\n| cold start, {} runs each | p50 | p99 | max |", o.runs);
    println!("|---|---|---|---|");
    for (name, v) in [
        ("ensure_running (readiness pipe)", &ours),
        ("naive: spawn + connect every 1 ms", &naive),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            ms(pct(v, 50.0)),
            ms(pct(v, 99.0)),
            ms(v.last().copied())
        );
    }

    let mut all = Vec::new();
    let (mut doubles, mut failures) = (0, 0);
    let started = Instant::now();
    for round in 0..o.rounds {
        let (times, starts, failed) = race_round(&o);
        if starts != 1 {
            eprintln!("round {round}: {starts} daemon starts");
            doubles += 1;
        }
        failures += failed;
        all.extend(times);
    }
    let all = ns(all);
    println!(
        "\nracing: {} rounds x {} clients in {:.1?}: daemon starts != 1 in {doubles} rounds, \
         {failures} failed clients; client time p50 {} p99 {} max {}",
        o.rounds,
        o.clients,
        started.elapsed(),
        ms(pct(&all, 50.0)),
        ms(pct(&all, 99.0)),
        ms(all.last().copied()),
    );
    if doubles > 0 || failures > 0 {
        std::process::exit(1);
    }
}
