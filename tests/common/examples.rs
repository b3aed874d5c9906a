//! Running the example programs (`daemon`, `ctl`) and outside tools as real
//! processes: build the examples once, run a command under a watchdog with
//! its output captured, keep a daemon alive until the test ends, talk to it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::Paths;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Generous bound on every wait: start-up, exit, a reply. Only a hang gets
/// near it.
pub const WATCHDOG: Duration = Duration::from_secs(10);

/// The path of an example binary, built once per test run.
///
/// `cargo test` builds examples before integration tests, but
/// `cargo test --test e2e` does not, and a stale binary would test old code;
/// so we build the examples the tests run once ourselves. It is a quick no-op
/// when they are fresh (cargo holds no lock while tests run).
pub fn example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("path of the test binary");
        // <target>/<profile>/deps/e2e-<hash> → <target>/<profile>/examples
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let out = Command::new(env!("CARGO"))
            // Only ours: a broken unrelated example must not fail these tests.
            .args(["build", "--quiet", "--profile", profile])
            .args(["--example", "daemon", "--example", "ctl"])
            .args(["--example", "crash_point", "--example", "forking"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build of the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        profile_dir.join("examples")
    });
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A command for an example with the override variables cleared, so the
/// developer's environment cannot redirect a test.
pub fn command(name: &str) -> Command {
    let mut cmd = Command::new(example(name));
    cmd.env_remove("HISTORIA_DEMO_SOCKET")
        .env_remove("HISTORIA_DEMO_PID")
        .stdin(Stdio::null());
    cmd
}

/// `daemon --socket … --pid …` for these paths.
pub fn daemon_cmd(p: &Paths) -> Command {
    let mut cmd = command("daemon");
    cmd.arg("--socket").arg(&p.sock).arg("--pid").arg(&p.pid);
    cmd
}

/// Waits for `child` with the watchdog; kills it and fails when it fires.
pub fn wait_with_watchdog(child: &mut Child, what: &str) -> ExitStatus {
    let deadline = Instant::now() + WATCHDOG;
    loop {
        match child.try_wait().expect("try_wait") {
            Some(status) => return status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {WATCHDOG:?}; killed it");
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A finished short-lived process.
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion under the watchdog. Output goes to anonymous
/// temp files, not pipes, so a chatty child can never block on a full pipe.
pub fn run(mut cmd: Command) -> Ran {
    let mut out = tempfile::tempfile().expect("temp file");
    let mut err = tempfile::tempfile().expect("temp file");
    let mut child = cmd
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .expect("spawn");
    let status = wait_with_watchdog(&mut child, &format!("{cmd:?}"));
    let read = |f: &mut File| {
        let mut s = String::new();
        f.rewind().expect("rewind");
        f.read_to_string(&mut s).expect("read output");
        s
    };
    Ran {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// `ctl --socket … --pid … <args>` for these paths.
pub fn ctl(p: &Paths, args: &[&str]) -> Ran {
    let mut cmd = command("ctl");
    cmd.arg("--socket")
        .arg(&p.sock)
        .arg("--pid")
        .arg(&p.pid)
        .args(args);
    run(cmd)
}

/// A running daemon. Dropping it kills it, so a failing test leaves no
/// process behind.
pub struct Daemon {
    pub child: Child,
    /// stdout and stderr, interleaved in one file.
    log: tempfile::NamedTempFile,
}

impl Daemon {
    /// Spawns the daemon and waits until it prints "ready".
    pub fn start(cmd: Command) -> Daemon {
        let mut d = Daemon::spawn(cmd);
        d.wait_for_line("ready");
        d
    }

    pub fn spawn(mut cmd: Command) -> Daemon {
        super::default_signals(&mut cmd);
        let log = tempfile::NamedTempFile::new().expect("log file");
        // O_APPEND on both handles, so lines from stdout and stderr never
        // overwrite each other.
        let open = || {
            OpenOptions::new()
                .append(true)
                .open(log.path())
                .expect("open log")
        };
        let child = cmd
            .stdout(open())
            .stderr(open())
            .spawn()
            .expect("spawn daemon");
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("read daemon log")
    }

    /// Waits until the daemon has printed `line` as a whole line.
    pub fn wait_for_line(&mut self, line: &str) {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let out = self.output();
            if out.lines().any(|l| l == line) {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("daemon exited ({status}) before printing {line:?}:\n{out}");
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not print {line:?} within {WATCHDOG:?}:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits pid_t"));
        kill(pid, sig).expect("signal the daemon");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_with_watchdog(&mut self.child, "daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Already reaped, or already dead: both fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one command line over the socket; returns the reply line.
pub fn send(socket: &Path, line: &str) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the daemon");
    request_on(&mut stream, line)
}

/// Sends `line` on an open connection and reads one reply line, under the
/// watchdog.
pub fn request_on(stream: &mut UnixStream, line: &str) -> String {
    stream.set_read_timeout(Some(WATCHDOG)).expect("timeout");
    // The daemon may answer and hang up without reading everything (a client
    // over the cap, an over-long line), so the write can fail with EPIPE; the
    // reply, already queued for us, says what happened.
    let _ = writeln!(stream, "{line}");
    read_reply(stream)
}

pub fn read_reply(stream: &UnixStream) -> String {
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .expect("reply within the watchdog");
    reply.trim_end().to_owned()
}

pub fn assert_socket(path: &Path) {
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{} missing: {e}", path.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
}

pub fn pid_in_file(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .expect("read PID file")
        .trim()
        .parse()
        .expect("PID file holds a number")
}

/// Kills and reaps a helper process when a test ends, passing or failing.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of an outside tool the tests run (searched in `PATH`, then
/// `/usr/sbin` and `/sbin`).
///
/// # Panics
/// When it is missing, naming the Debian package that has it: a missing
/// tool fails the test instead of skipping it silently. `.ci/run` installs
/// every one of them.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: apt-get install {package} (.ci/run installs it)")
        })
}

/// `start-stop-daemon --stop --retry 5 --pidfile <pid>`: SIGTERM to the
/// PID the file names, then waits (up to 5 s) for it to go.
pub fn ssd_stop(ssd: &Path, pid: &Path) -> Ran {
    let mut stop = Command::new(ssd);
    stop.args(["--stop", "--retry", "5", "--pidfile"])
        .arg(pid)
        .stdin(Stdio::null());
    run(stop)
}

/// Polls `done` every 2 ms until it holds, failing after [`WATCHDOG`].
pub fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + WATCHDOG;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {WATCHDOG:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
