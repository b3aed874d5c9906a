//! Criterion benches: every operation next to its floor (the same syscalls
//! done by hand with std or nix) and next to the peer crates, in one run, so
//! the ratios come from the same machine state.
//!
//! Groups (each has `ours` and a `floor_*` or the peers):
//! - `check_singleton_absent`: the check on an empty path vs one `lstat(2)`.
//! - `check_singleton_live`: the check on a listening socket vs a raw
//!   non-blocking `socket` + `connect` + `close`.
//! - `check_singleton_stale`: the check on a stale socket (it removes it).
//!   Measured twice: the check plus re-creating the stale socket, with the
//!   re-create timed alone to subtract; and the check alone, timed per call
//!   with the re-create outside the timed region.
//! - `pid_file`: `write_pid_file` + `read_pid_file` vs `std::fs::write` +
//!   `std::fs::read`.
//! - `acquire_drop`: `DaemonGuard` acquire + drop (`SignalMode::Off` and the
//!   default `Exit`) vs the by-hand floor and the peers pidlock,
//!   single-instance and pidfile-rs.
//!
//! Every group runs in the temp dir and again on /dev/shm (tmpfs, as
//! `$XDG_RUNTIME_DIR` usually is) when that is another filesystem; group
//! names start with the filesystem (`ext4.`, `tmpfs.`).
//!
//! Criterion measures one function after the other, so on a shared, noisy
//! machine a load change between `ours` and its floor skews their ratio.
//! After criterion (on a plain `cargo bench` without a filter), a paired pass
//! therefore runs each comparison interleaved, A B B A ..., timing every call,
//! and the final Markdown table gives both ratios: criterion medians, and
//! medians of the paired samples.
//!
//! Run: `cargo bench -p historia-lifecycle-benches --bench lifecycle` from the
//! repository root (`bench.sh` runs it with the rest).
//! `HISTORIA_BENCH_DIRS=dir1:dir2` picks the directories,
//! `HISTORIA_PAIRED_SECS` the paired time per comparison (default 1.5).

use std::hint::black_box;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use criterion::Criterion;
use historia_lifecycle::{
    check_singleton, ensure_running, read_pid_file, write_pid_file, DaemonGuard, PidFileGuard,
    SignalMode, SingletonCheck,
};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

#[path = "examples/shared/bench_util.rs"]
mod bench_util;

/// Short runs: the whole `bench.sh` must fit in 10 minutes on 2 cores.
fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30)
}

// ------------------------------------------------------------ the operations

/// A fresh directory with the socket and PID paths a daemon would use.
struct Paths {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    pid: PathBuf,
    me: u32,
}

fn paths(base: &Base) -> Paths {
    let dir = tempfile::tempdir_in(&base.dir).expect("tempdir");
    let sock = dir.path().join("daemon.sock");
    let pid = dir.path().join("daemon.pid");
    Paths {
        _dir: dir,
        sock,
        pid,
        me: std::process::id(),
    }
}

fn absent_ours(p: &Paths) {
    assert_eq!(
        check_singleton(black_box(&p.sock)),
        SingletonCheck::Available
    );
}

fn absent_floor(p: &Paths) {
    let e = std::fs::symlink_metadata(black_box(&p.sock)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

fn live_ours(p: &Paths) {
    assert_eq!(
        check_singleton(black_box(&p.sock)),
        SingletonCheck::AlreadyRunning
    );
}

/// The floor of a live-listener check: a raw non-blocking connect.
fn live_floor(p: &Paths) {
    let addr = UnixAddr::new(black_box(&p.sock)).expect("address");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .expect("socket");
    connect(fd.as_raw_fd(), &addr).expect("connect");
    drop(fd); // close(2)
}

/// Accepts (and closes) every pending connection, outside the timed region,
/// so the listener's backlog never fills and turns the probe into `Busy`.
fn drain(listener: &UnixListener) {
    loop {
        match listener.accept() {
            Ok(conn) => drop(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Leaves a stale socket at `path`: a socket file nobody listens on, as a
/// crashed daemon does. socket + bind + close.
fn make_stale_socket(path: &Path) {
    drop(UnixListener::bind(path).expect("bind stale socket"));
}

fn stale_ours(p: &Paths) {
    assert_eq!(
        check_singleton(black_box(&p.sock)),
        SingletonCheck::StaleSocketCleaned
    );
}

fn pid_ours(p: &Paths) {
    write_pid_file(black_box(&p.pid)).expect("write");
    assert_eq!(read_pid_file(&p.pid).expect("read"), Some(p.me));
}

fn pid_floor(p: &Paths) {
    std::fs::write(black_box(&p.pid), format!("{}\n", p.me)).expect("write");
    let bytes = std::fs::read(&p.pid).expect("read");
    let pid: u32 = std::str::from_utf8(&bytes)
        .expect("utf8")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(pid, p.me);
}

fn acquire_off(p: &Paths) {
    let guard = DaemonGuard::builder(&p.sock, &p.pid)
        .signals(SignalMode::Off)
        .acquire()
        .expect("acquire");
    drop(black_box(guard));
}

fn acquire_exit(p: &Paths) {
    let guard = DaemonGuard::acquire(&p.sock, &p.pid).expect("acquire");
    drop(black_box(guard));
}

/// The PID-file-only guard, default signal handling: the fair comparison
/// with the peers, which bind no socket either.
fn pid_guard_exit(p: &Paths) {
    let guard = PidFileGuard::acquire(&p.pid).expect("acquire");
    drop(black_box(guard));
}

/// The client's connect to a running daemon (`ensure_running` finds it at
/// the first connect; the command is never run).
fn client_ours(p: &Paths) {
    let mut never_run = std::process::Command::new("/bin/false");
    let conn = ensure_running(
        black_box(&p.sock),
        &p.pid,
        &mut never_run,
        Duration::from_secs(1),
    )
    .expect("connect");
    drop(black_box(conn));
}

/// Its floor: std's `UnixStream::connect` and close.
fn client_floor(p: &Paths) {
    drop(black_box(
        std::os::unix::net::UnixStream::connect(black_box(&p.sock)).expect("connect"),
    ));
}

/// The floor of acquire + drop, by hand (shared with the `resources`
/// example's profile loop).
fn acquire_floor(p: &Paths) {
    bench_util::floor_acquire_drop(black_box(&p.sock), &p.pid, p.me);
}

/// pidlock 0.2: stat, O_CREAT|O_EXCL PID file, write; no lock, no socket;
/// release unlinks.
fn peer_pidlock(p: &Paths) {
    let mut lock = pidlock::Pidlock::new_validated(black_box(&p.pid)).expect("pidlock");
    lock.acquire().expect("acquire");
    lock.release().expect("release");
}

/// single-instance 0.3 on Linux: bind an abstract Unix socket; drop closes.
/// No file and no PID at all.
fn peer_single_instance(name: &str) {
    let one = single_instance::SingleInstance::new(black_box(name)).expect("new");
    assert!(one.is_single());
    drop(one);
}

/// pidfile-rs 0.3 as documented: open(O_CREAT) + flock + stat re-check, then
/// write() (truncate, write, fdatasync); drop re-checks and unlinks.
fn peer_pidfile_rs(p: &Paths) {
    let mut f = pidfile_rs::Pidfile::new(black_box(&p.pid), std::fs::Permissions::from_mode(0o644))
        .expect("pidfile");
    f.write().expect("write");
    drop(f);
}

/// pidfile-rs without write(): the lock only, no PID in the file and no
/// fdatasync. Not equivalent (tools see an empty file); for context.
fn peer_pidfile_rs_no_write(p: &Paths) {
    let f = pidfile_rs::Pidfile::new(black_box(&p.pid), std::fs::Permissions::from_mode(0o644))
        .expect("pidfile");
    drop(f);
}

fn single_instance_name(base: &Base) -> String {
    // Abstract socket names are machine-wide: make ours unique.
    format!("historia-bench-{}-{}", std::process::id(), base.label)
}

// --------------------------------------------------------- criterion groups

fn check_absent(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let mut g = c.benchmark_group(base.group("check_singleton_absent"));
    g.bench_function("ours", |b| b.iter(|| absent_ours(&p)));
    g.bench_function("floor_lstat", |b| b.iter(|| absent_floor(&p)));
    g.finish();
}

/// Connections are drained every `BATCH` probes, untimed; a batch stays well
/// below any listen backlog.
const BATCH: u64 = 16;

fn check_live(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let listener = UnixListener::bind(&p.sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut g = c.benchmark_group(base.group("check_singleton_live"));
    for (name, op) in [
        ("ours", live_ours as fn(&Paths)),
        ("floor_raw_connect", live_floor),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| batched(&p, &listener, op, iters))
        });
    }
    g.finish();
}

/// Runs `op` `iters` times against a listener, draining its backlog every
/// [`BATCH`] calls outside the timed region; the time spent in `op`.
fn batched(p: &Paths, listener: &UnixListener, op: fn(&Paths), iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(BATCH);
        let t = Instant::now();
        for _ in 0..n {
            op(p);
        }
        total += t.elapsed();
        drain(listener);
        left -= n;
    }
    total
}

fn client_connect(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let listener = UnixListener::bind(&p.sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut g = c.benchmark_group(base.group("client_connect"));
    for (name, op) in [
        ("ours_ensure_running", client_ours as fn(&Paths)),
        ("floor_std_connect", client_floor),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| batched(&p, &listener, op, iters))
        });
    }
    g.finish();
}

fn check_stale(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let mut g = c.benchmark_group(base.group("check_singleton_stale"));
    // The check removes the stale socket, so every iteration re-creates it.
    g.bench_function("ours_plus_recreate", |b| {
        make_stale_socket(&p.sock);
        b.iter(|| {
            stale_ours(&p);
            make_stale_socket(&p.sock);
        });
        std::fs::remove_file(&p.sock).expect("remove");
    });
    // The re-create alone, to subtract from the line above. The path must be
    // free before each bind, so the unlink happens outside the timed region.
    let unlink = || std::fs::remove_file(&p.sock).expect("remove");
    g.bench_function("recreate_only", |b| {
        b.iter_custom(|iters| time_each(iters, || {}, || make_stale_socket(&p.sock), unlink))
    });
    // The check alone, timed per call: a cross-check of the subtraction.
    g.bench_function("ours_only", |b| {
        b.iter_custom(|iters| {
            time_each(
                iters,
                || make_stale_socket(&p.sock),
                || stale_ours(&p),
                || {},
            )
        })
    });
    g.finish();
}

/// Runs `before`, `op`, `after` `iters` times and gives the total time spent
/// in `op` alone.
fn time_each(
    iters: u64,
    mut before: impl FnMut(),
    mut op: impl FnMut(),
    mut after: impl FnMut(),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        before();
        let t = Instant::now();
        op();
        total += t.elapsed();
        after();
    }
    total
}

fn pid_file(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let mut g = c.benchmark_group(base.group("pid_file"));
    g.bench_function("ours_write_read", |b| b.iter(|| pid_ours(&p)));
    g.bench_function("floor_std_write_read", |b| b.iter(|| pid_floor(&p)));
    g.finish();
}

fn acquire_drop(c: &mut Criterion, base: &Base) {
    let p = paths(base);
    let name = single_instance_name(base);
    let mut g = c.benchmark_group(base.group("acquire_drop"));
    g.bench_function("ours_signals_off", |b| b.iter(|| acquire_off(&p)));
    g.bench_function("ours_signals_exit", |b| b.iter(|| acquire_exit(&p)));
    g.bench_function("ours_pid_guard_exit", |b| b.iter(|| pid_guard_exit(&p)));
    g.bench_function("floor_by_hand", |b| b.iter(|| acquire_floor(&p)));
    g.bench_function("peer_pidlock", |b| b.iter(|| peer_pidlock(&p)));
    g.bench_function("peer_single_instance", |b| {
        b.iter(|| peer_single_instance(&name))
    });
    g.bench_function("peer_pidfile_rs", |b| b.iter(|| peer_pidfile_rs(&p)));
    g.bench_function("peer_pidfile_rs_no_write", |b| {
        b.iter(|| peer_pidfile_rs_no_write(&p))
    });
    g.finish();
    assert!(
        !p.pid.exists() && !p.sock.exists(),
        "a bench left files behind"
    );
}

// ---------------------------------------------------------------- the dirs

/// A directory the benches run in, labelled by its filesystem: the cost of
/// creating, renaming and unlinking files depends on it (ext4 journals them
/// and may flush data, tmpfs only touches memory).
struct Base {
    dir: PathBuf,
    label: String,
}

impl Base {
    fn new(dir: PathBuf) -> Self {
        let label = bench_util::fs_label(&dir);
        Base { dir, label }
    }

    fn group(&self, name: &str) -> String {
        format!("{}.{name}", self.label)
    }
}

/// The temp dir (`$TMPDIR`, else /tmp) and, where it is another filesystem,
/// /dev/shm. `HISTORIA_BENCH_DIRS` (colon-separated) overrides.
fn bases() -> Vec<Base> {
    if let Some(dirs) = std::env::var_os("HISTORIA_BENCH_DIRS") {
        return std::env::split_paths(&dirs).map(Base::new).collect();
    }
    let mut out = vec![Base::new(std::env::temp_dir())];
    let shm = Base::new(PathBuf::from("/dev/shm"));
    if shm.dir.is_dir() && shm.label != out[0].label {
        out.push(shm);
    }
    out
}

fn main() {
    let started = SystemTime::now();
    let mut c = config().configure_from_args();
    let bases = bases();
    for base in &bases {
        check_absent(&mut c, base);
        check_live(&mut c, base);
        client_connect(&mut c, base);
        check_stale(&mut c, base);
        pid_file(&mut c, base);
        acquire_drop(&mut c, base);
    }
    c.final_summary();
    if !full_run() {
        return;
    }
    let paired: Vec<Vec<Paired>> = bases.iter().map(paired_pass).collect();
    summary(started, &bases, &paired);
}

/// Whether this is a plain `cargo bench` (criterion measured everything):
/// not `--test`/`--list`/`--profile-time`, and no name filter.
fn full_run() -> bool {
    const WITH_VALUE: [&str; 14] = [
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
        "--output-format",
        "--color",
        "--plotting-backend",
    ];
    let mut args = std::env::args().skip(1);
    let mut bench = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => bench = true,
            "--test" | "--list" | "--profile-time" => return false,
            a if WITH_VALUE.contains(&a) => {
                args.next();
            }
            a if a.starts_with('-') => {}
            _ => return false, // a name filter
        }
    }
    bench
}

// --------------------------------------------------------------- paired pass

/// Medians (ns) of interleaved per-call samples of two operations.
#[derive(Clone, Copy)]
struct Paired {
    key: &'static str,
    a: f64,
    b: f64,
}

/// Runs `a` and `b` alternately (A B B A, so neither always goes first) for
/// `secs`, each returning the time of its own timed region, and gives their
/// medians.
fn pair(
    key: &'static str,
    secs: f64,
    mut a: impl FnMut() -> Duration,
    mut b: impl FnMut() -> Duration,
) -> Paired {
    // Warm-up, untimed.
    for _ in 0..20 {
        a();
        b();
    }
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut flip = false;
    while Instant::now() < until || xs.len() < 50 {
        if flip {
            ys.push(b());
            xs.push(a());
        } else {
            xs.push(a());
            ys.push(b());
        }
        flip = !flip;
    }
    Paired {
        key,
        a: median(&mut xs),
        b: median(&mut ys),
    }
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort_unstable();
    v[v.len() / 2].as_nanos() as f64
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn paired_pass(base: &Base) -> Vec<Paired> {
    let secs: f64 = std::env::var("HISTORIA_PAIRED_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.5);
    println!("paired pass on {} ({secs} s per comparison)", base.label);
    let p = paths(base);
    let mut out = vec![pair(
        "absent",
        secs,
        || timed(|| absent_ours(&p)),
        || timed(|| absent_floor(&p)),
    )];

    let listener = UnixListener::bind(&p.sock).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let live = |op: fn(&Paths)| {
        let t = timed(|| op(&p));
        drain(&listener);
        t
    };
    out.push(pair("live", secs, || live(live_ours), || live(live_floor)));
    out.push(pair(
        "client",
        secs,
        || live(client_ours),
        || live(client_floor),
    ));
    drop(listener);
    std::fs::remove_file(&p.sock).expect("remove");

    out.push(pair(
        "pid_file",
        secs,
        || timed(|| pid_ours(&p)),
        || timed(|| pid_floor(&p)),
    ));
    std::fs::remove_file(&p.pid).expect("remove");

    let name = single_instance_name(base);
    let exit = || timed(|| acquire_exit(&p));
    out.push(pair(
        "off/floor",
        secs,
        || timed(|| acquire_off(&p)),
        || timed(|| acquire_floor(&p)),
    ));
    out.push(pair("exit/floor", secs, exit, || {
        timed(|| acquire_floor(&p))
    }));
    out.push(pair("exit/pidlock", secs, exit, || {
        timed(|| peer_pidlock(&p))
    }));
    out.push(pair("exit/single_instance", secs, exit, || {
        timed(|| peer_single_instance(&name))
    }));
    out.push(pair("exit/pidfile_rs", secs, exit, || {
        timed(|| peer_pidfile_rs(&p))
    }));
    out.push(pair("exit/pidfile_rs_no_write", secs, exit, || {
        timed(|| peer_pidfile_rs_no_write(&p))
    }));
    let pg = || timed(|| pid_guard_exit(&p));
    out.push(pair("pidguard/pidlock", secs, pg, || {
        timed(|| peer_pidlock(&p))
    }));
    out.push(pair("pidguard/single_instance", secs, pg, || {
        timed(|| peer_single_instance(&name))
    }));
    out.push(pair("pidguard/pidfile_rs", secs, pg, || {
        timed(|| peer_pidfile_rs(&p))
    }));
    out.push(pair("pidguard/pidfile_rs_no_write", secs, pg, || {
        timed(|| peer_pidfile_rs_no_write(&p))
    }));
    out
}

// ------------------------------------------------------------------ summary

/// Where criterion writes its results, found as criterion finds it.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(target).join("criterion");
    }
    // <target>/release/deps/lifecycle-<hash>
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).map_or_else(
        || PathBuf::from("target/criterion"),
        |t| t.join("criterion"),
    )
}

/// The median time per iteration, in ns, of `group/bench` from this run
/// (results older than `since` are ignored).
fn median_ns(since: SystemTime, group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let meta = std::fs::metadata(&path).ok()?;
    if meta.modified().ok()? < since {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    // {"mean":{...},"median":{"confidence_interval":{...},"point_estimate":X,...
    let rest = &text[text.find("\"median\":")?..];
    let rest = &rest[rest.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

fn fmt_ns(ns: Option<f64>) -> String {
    match ns {
        None => "-".into(),
        Some(ns) if ns >= 1000.0 => format!("{:.2} µs", ns / 1000.0),
        Some(ns) => format!("{ns:.0} ns"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// Prints the ratio table as Markdown: criterion medians, and the paired
/// pass's medians.
fn summary(since: SystemTime, bases: &[Base], paired: &[Vec<Paired>]) {
    println!("\n## Ratios (this run)\n");
    println!(
        "| fs | operation | compared with | ours | theirs | ratio (criterion) | \
         ratio (paired) | paired ours / theirs | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (base, paired) in bases.iter().zip(paired) {
        let m = |g: &str, b: &str| median_ns(since, &base.group(g), b);
        let pr = |key: &str| paired.iter().find(|p| p.key == key).copied();
        let fs = &base.label;
        let row = |op: &str,
                   what: &str,
                   ours: Option<f64>,
                   theirs: Option<f64>,
                   key: Option<&str>,
                   target: &str| {
            let p = key.and_then(pr);
            println!(
                "| {fs} | {op} | {what} | {} | {} | {} | {} | {} | {target} |",
                fmt_ns(ours),
                fmt_ns(theirs),
                ratio(ours, theirs),
                p.map_or("-".into(), |p| ratio(Some(p.a), Some(p.b))),
                p.map_or("-".into(), |p| format!(
                    "{} / {}",
                    fmt_ns(Some(p.a)),
                    fmt_ns(Some(p.b))
                )),
            )
        };
        row(
            "check_singleton: no file",
            "floor: lstat",
            m("check_singleton_absent", "ours"),
            m("check_singleton_absent", "floor_lstat"),
            Some("absent"),
            "",
        );
        row(
            "check_singleton: live listener",
            "floor: socket+connect+close",
            m("check_singleton_live", "ours"),
            m("check_singleton_live", "floor_raw_connect"),
            Some("live"),
            "<= 1.2x",
        );
        row(
            "client connect to a running daemon (ensure_running)",
            "floor: UnixStream::connect + close",
            m("client_connect", "ours_ensure_running"),
            m("client_connect", "floor_std_connect"),
            Some("client"),
            "<= 1.1x",
        );
        let with = m("check_singleton_stale", "ours_plus_recreate");
        let recreate = m("check_singleton_stale", "recreate_only");
        row(
            "check_singleton: stale socket",
            "(check+re-create) − re-create  vs  check timed alone",
            with.zip(recreate).map(|(a, b)| a - b),
            m("check_singleton_stale", "ours_only"),
            None,
            "",
        );
        row(
            "write_pid_file + read_pid_file",
            "floor: std::fs::write + read",
            m("pid_file", "ours_write_read"),
            m("pid_file", "floor_std_write_read"),
            Some("pid_file"),
            "",
        );
        let floor_what = "floor: open+flock+socket+bind+listen+write+unlink×2+close×2";
        let floor = m("acquire_drop", "floor_by_hand");
        let off = m("acquire_drop", "ours_signals_off");
        let exit = m("acquire_drop", "ours_signals_exit");
        row(
            "acquire+drop, SignalMode::Off",
            floor_what,
            off,
            floor,
            Some("off/floor"),
            "<= 1.5x",
        );
        row(
            "acquire+drop, SignalMode::Exit (default)",
            floor_what,
            exit,
            floor,
            Some("exit/floor"),
            "<= 1.5x",
        );
        for (bench, key, what, target) in [
            (
                "peer_pidlock",
                "exit/pidlock",
                "pidlock 0.2 acquire+release",
                "<= 1.0x",
            ),
            (
                "peer_single_instance",
                "exit/single_instance",
                "single-instance 0.3 new+drop",
                "<= 1.0x",
            ),
            (
                "peer_pidfile_rs",
                "exit/pidfile_rs",
                "pidfile-rs 0.3 new+write+drop",
                "<= 1.0x",
            ),
            (
                "peer_pidfile_rs_no_write",
                "exit/pidfile_rs_no_write",
                "pidfile-rs 0.3 new+drop, no PID written (context)",
                "",
            ),
        ] {
            row(
                "acquire+drop, SignalMode::Exit (default)",
                what,
                exit,
                m("acquire_drop", bench),
                Some(key),
                target,
            );
        }
        let pg = m("acquire_drop", "ours_pid_guard_exit");
        for (bench, key, what, target) in [
            (
                "peer_pidlock",
                "pidguard/pidlock",
                "pidlock 0.2 acquire+release (no lock: O_EXCL; stale check by kill(pid, 0))",
                "<= 1.0x",
            ),
            (
                "peer_single_instance",
                "pidguard/single_instance",
                "single-instance 0.3 new+drop (an abstract socket: no file, no PID)",
                "<= 1.0x",
            ),
            (
                "peer_pidfile_rs",
                "pidguard/pidfile_rs",
                "pidfile-rs 0.3 new+write+drop (truncate+write in place, fdatasync)",
                "<= 1.0x",
            ),
            (
                "peer_pidfile_rs_no_write",
                "pidguard/pidfile_rs_no_write",
                "pidfile-rs 0.3 new+drop, no PID written (context)",
                "",
            ),
        ] {
            row(
                "PidFileGuard acquire+drop (Exit)",
                what,
                pg,
                m("acquire_drop", bench),
                Some(key),
                target,
            );
        }
    }
}
