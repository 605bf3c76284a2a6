//! Test harness: private `dbus-daemon`s (or `dbus-broker`s, with
//! `UNIQUE_INSTANCE_TEST_BUS=dbus-broker`), spawned processes, and lines read with timeouts.
//!
//! Over 400 lines: the whole harness every test file shares (buses, processes, lines read with
//! timeouts, pidfds, test hooks).
#![allow(dead_code, unreachable_pub)]

mod broker;
pub use broker::{BusImplementation, bus_implementation};

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

/// Generous: these machines are shared and slow; a timeout here means a hang, not slowness.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// A name unique to this test, this process and this call.
pub fn unique_name(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "org.uniqueinstance.Test.{}.p{}_{}",
        test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Finds a program on PATH, or fails the test saying what to install.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{program}` is not installed, and this test needs it: install it with \
         `apt-get install -y {package}` (the test does not skip)"
    );
}

/// The bus configurations tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusConfig {
    /// Anyone may own any name (a session bus).
    Open,
    /// Nobody may own any name (`<deny own="*"/>`), as on a system bus without a policy file.
    DenyOwn,
}

/// A private bus, killed when dropped: a `dbus-daemon`, or a `dbus-broker` when
/// `UNIQUE_INSTANCE_TEST_BUS=dbus-broker` (see [`bus_implementation`]).
pub struct DbusDaemon {
    child: Child,
    pub address: String,
    /// Set for a broker: its launcher's log, for failure messages, and its process group.
    broker: Option<broker::Broker>,
    _dir: tempfile::TempDir,
}

impl DbusDaemon {
    pub fn start(config: BusConfig) -> Self {
        Self::start_with(config, "")
    }

    /// Starts one with extra `<policy>`/`<includedir>` XML appended to the configuration.
    pub fn start_with(config: BusConfig, extra_xml: &str) -> Self {
        Self::start_listening(config, extra_xml, None, "<auth>EXTERNAL</auth>")
    }

    /// Starts one listening on `listen` (a D-Bus server address; default: a socket file in a
    /// temporary directory), with the `<auth>`/`<allow_anonymous/>` elements in `auth`.
    pub fn start_listening(
        config: BusConfig,
        extra_xml: &str,
        listen: Option<&str>,
        auth: &str,
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bus");
        let listen =
            listen.map_or_else(|| format!("unix:path={}", socket.display()), str::to_owned);
        let own = match config {
            BusConfig::Open => r#"<allow own="*"/>"#,
            BusConfig::DenyOwn => r#"<deny own="*"/>"#,
        };
        let conf = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{listen}</listen>
  {auth}
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow user="*"/>
    {own}
  </policy>
  {extra_xml}
</busconfig>
"#
        );
        Self::spawn(dir, &conf, &listen, auth, false)
    }

    /// Starts one configured like a distribution's system bus: nobody may own a name or call a
    /// method unless a policy says so, and `policy` (a generated `dbus/NAME.conf`) is included.
    /// Its socket is reachable by every user, so tests can connect as other users.
    pub fn start_system_like(policy: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let socket = dir.path().join("system_bus_socket");
        let conf = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <include>{}</include>
</busconfig>
"#,
            socket.display(),
            policy.display()
        );
        let listen = format!("unix:path={}", socket.display());
        Self::spawn(dir, &conf, &listen, "<auth>EXTERNAL</auth>", true)
    }

    /// Starts the bus implementation the environment chose, listening on `listen`.
    fn spawn(dir: tempfile::TempDir, conf: &str, listen: &str, auth: &str, system: bool) -> Self {
        if bus_implementation() == BusImplementation::DbusBroker {
            return broker::start(dir, conf, listen, auth, system);
        }
        let daemon = require_program("dbus-daemon", "dbus");
        let conf_path = dir.path().join("bus.conf");
        std::fs::write(&conf_path, conf).expect("write bus config");
        let mut child = Command::new(daemon)
            .arg(format!("--config-file={}", conf_path.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dbus-daemon");
        // The daemon prints its address once it listens: that line is the readiness signal.
        let stdout = child.stdout.take().expect("stdout");
        let lines = line_channel(stdout);
        let address = match lines.recv_timeout(TIMEOUT) {
            Ok(line) => line.trim().to_owned(),
            Err(_) => {
                let _ = child.kill();
                panic!("dbus-daemon did not print its address within {TIMEOUT:?}");
            }
        };
        DbusDaemon {
            child,
            address,
            broker: None,
            _dir: dir,
        }
    }

    /// The bus's process: the `dbus-daemon`, or the broker's launcher.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the bus: it keeps its sockets but answers
    /// nothing, as a frozen or deadlocked bus does. A broker: its launcher and broker together.
    #[allow(dead_code)]
    pub fn freeze(&self, frozen: bool) {
        use rustix::process::{Pid, Signal, kill_process, kill_process_group};
        let signal = if frozen { Signal::STOP } else { Signal::CONT };
        let pid = Pid::from_raw(self.child.id() as i32).expect("a live bus has a pid");
        if self.broker.is_some() {
            kill_process_group(pid, signal).expect("signal the broker's group");
        } else {
            kill_process(pid, signal).expect("signal dbus-daemon");
        }
    }

    /// SIGKILLs the daemon (a broker: its launcher and the broker together) and reaps it.
    pub fn kill(&mut self) {
        if self.broker.is_some() {
            // The launcher and its broker share a process group of their own: one signal for
            // both, so the bus is gone for everyone at once, not when the orphan notices.
            broker::kill_group(self.child.id());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads lines from `reader` on a thread, into a channel.
pub fn line_channel(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A spawned process whose stdout is read line by line, killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    seen_stderr: Vec<String>,
    stderr: Receiver<String>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(cmd: Command) -> Self {
        Self::spawn_with_stderr(cmd, Stdio::piped())
    }

    /// [`Proc::spawn`] with `stderr` as given (a pipe nobody reads, `/dev/full`) instead of a
    /// pipe read here; when not piped, no stderr line is ever seen.
    pub fn spawn_with_stderr(mut cmd: Command, stderr: Stdio) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = match child.stderr.take() {
            Some(stderr) => line_channel(stderr),
            // Closed at once: no line will come.
            None => channel().1,
        };
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            lines: line_channel(stdout),
            seen: Vec::new(),
            seen_stderr: Vec::new(),
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line, or a panic naming what was awaited.
    pub fn next_line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => {
                self.seen.push(line.clone());
                line
            }
            Err(RecvTimeoutError::Timeout) => panic!(
                "timed out after {TIMEOUT:?} waiting for {what}; stdout so far: {:?}; stderr: {:?}",
                self.seen,
                self.stderr_lines()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "stdout closed while waiting for {what}; stdout: {:?}; stderr: {:?}; status: {:?}",
                self.seen,
                self.stderr_lines(),
                self.child.try_wait()
            ),
        }
    }

    /// Waits for a line starting with `prefix`, skipping others.
    pub fn line_starting(&mut self, prefix: &str) -> String {
        loop {
            let line = self.next_line(prefix);
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Asserts that the next stdout line is `expected`; a mismatch shows the wrapper's stderr
    /// (why it did what it did: a loss it saw, a signal it got) along with stdout so far.
    pub fn expect_line(&mut self, expected: &str) {
        let line = self.next_line(expected);
        if line != expected {
            // What it says up to a pause: the reason is often its last line, said as it exits.
            let stderr: Vec<String> =
                std::iter::from_fn(|| self.stderr.recv_timeout(Duration::from_secs(3)).ok())
                    .collect();
            panic!(
                "expected {expected:?}, got {line:?}; stdout so far: {:?}; stderr: {stderr:?}",
                self.seen
            );
        }
    }

    /// The next stdout line if one comes within `within`.
    pub fn try_line(&mut self, within: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(within).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Every stderr line, once the process has closed stderr (normally: exited).
    pub fn stderr_until_closed(&self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.stderr.recv_timeout(TIMEOUT) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => return lines,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stderr not closed within {TIMEOUT:?}: {lines:?}")
                }
            }
        }
    }

    /// Waits up to `within` for a stderr line containing `needle`, skipping others; `None` when
    /// none came (the test then goes on, and fails on what follows, saying why).
    pub fn try_stderr_line_containing(&mut self, needle: &str, within: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(line) => self.seen_stderr.push(line),
                Err(_) => return None,
            }
        }
    }

    /// Waits for a stderr line containing `needle`, skipping others.
    pub fn stderr_line_containing(&mut self, needle: &str) -> String {
        self.stderr_line_containing_any(&[needle])
    }

    /// Waits for a stderr line containing any of `needles`, skipping others.
    pub fn stderr_line_containing_any(&mut self, needles: &[&str]) -> String {
        loop {
            match self.stderr.recv_timeout(TIMEOUT) {
                Ok(line) if needles.iter().any(|n| line.contains(n)) => return line,
                Ok(line) => self.seen_stderr.push(line),
                Err(e) => panic!(
                    "no stderr line containing any of {needles:?} ({e:?}); stderr so far: {:?}; \
                     stdout: {:?}",
                    self.seen_stderr, self.seen
                ),
            }
        }
    }

    /// Waits until every holder of the stdout pipe has closed it (normally: all exited), and
    /// returns the lines that were still unread.
    pub fn stdout_until_closed(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.lines.recv_timeout(TIMEOUT) {
                Ok(line) => lines.push(line),
                Err(RecvTimeoutError::Disconnected) => return lines,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stdout still open after {TIMEOUT:?}; unread: {lines:?}")
                }
            }
        }
    }

    /// The stderr lines read so far, without waiting: for a failure's message. Not for what a
    /// test asserts once the process has exited: its last lines may still be on their way from
    /// the reading thread (a CI run saw `status`'s message missing); use
    /// [`Proc::stderr_until_closed`] there.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Closes stdin (the holder's signal to release and exit).
    pub fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits for exit, with a timeout (a blocking `waitpid` on a thread, no polling).
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let status = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            let _ = tx.send(status);
        });
        match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(Some((_, status)))) => {
                use std::os::unix::process::ExitStatusExt;
                let status = ExitStatus::from_raw(status.as_raw());
                self.status = Some(status);
                status
            }
            Ok(other) => panic!("waitpid failed: {other:?}"),
            Err(_) => {
                let _ = self.child.kill();
                panic!(
                    "process did not exit within {TIMEOUT:?}; stdout: {:?}; stderr: {:?}",
                    self.seen,
                    self.stderr_lines()
                );
            }
        }
    }

    /// Waits for exit and returns the code (panics on death by signal).
    pub fn exit_code(&mut self) -> i32 {
        let status = self.wait();
        status.code().unwrap_or_else(|| {
            panic!(
                "killed by a signal: {status:?}; stdout: {:?}; stderr: {:?}",
                self.seen,
                self.stderr_lines()
            )
        })
    }

    /// SIGKILLs the process and reaps it.
    pub fn sigkill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.wait();
        }
    }

    /// SIGSTOPs the process and returns once it has stopped (all its threads), as `waitpid`
    /// reports it to us, its parent: from then on it runs no code until SIGCONT.
    pub fn stop(&self) {
        self.signal(rustix::process::Signal::STOP);
        self.wait_stopped("after SIGSTOP");
    }

    /// Returns once the process has stopped (by [`Proc::stop`]'s signal, or by its own at a test
    /// hook), as `waitpid` reports it to us, its parent; panics naming `what` if it does not
    /// within [`TIMEOUT`].
    pub fn wait_stopped(&self, what: &str) {
        use rustix::process::{Pid, WaitOptions, waitpid};
        let pid = Pid::from_raw(self.child.id() as i32).expect("pid");
        let (tx, rx) = channel();
        // Waited for on a thread, so that a process that never stops fails the test, not hangs it.
        std::thread::spawn(move || {
            let _ = tx.send(waitpid(Some(pid), WaitOptions::UNTRACED));
        });
        match rx.recv_timeout(TIMEOUT) {
            Ok(Ok(Some((_, status)))) if status.stopped() => {}
            other => panic!("the process did not stop {what}: {other:?}"),
        }
    }

    /// Waits until the process has stopped itself at the test hook `hook` of debug builds (it
    /// sends itself SIGSTOP there), as `waitpid` reports it to us, its parent. Panics if it
    /// does not within [`TIMEOUT`], or if it prints a line on stdout first: it went on instead
    /// of stopping there, and the line says what it did.
    pub fn stopped_at(&mut self, hook: &str) {
        use rustix::process::{Pid, WaitOptions, waitpid};
        let pid = Pid::from_raw(self.child.id() as i32).expect("pid");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let _ = tx.send(waitpid(Some(pid), WaitOptions::UNTRACED));
        });
        // Two channels to wait on: each in turn, briefly, up to the timeout.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Ok(Some((_, status)))) if status.stopped() => return,
                Err(RecvTimeoutError::Timeout) => {}
                other => panic!(
                    "the process did not stop at {hook}: {other:?}; stdout: {:?}; stderr: {:?}",
                    self.seen,
                    self.stderr_lines()
                ),
            }
            if let Some(line) = self.try_line(Duration::from_millis(10)) {
                panic!(
                    "the process went on instead of stopping at {hook}: it printed {line:?}; \
                     stderr: {:?}",
                    self.stderr_lines()
                );
            }
        }
        self.sigkill();
        panic!("the process did not stop at {hook} within {TIMEOUT:?}")
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only a process not yet reaped is ours to kill: a reaped PID may belong to another.
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What `./scripts/test` passes to cargo so that the binaries the tests spawn have the test
/// hooks; said by [`arm_test_hook`] when they do not.
pub const TEST_HOOKS_BUILD: &str = "run ./scripts/test (it builds them with the feature), or \
     `cargo build --workspace --bins --examples --features \
     unique-instance/test-hooks,unique-instance-cli/test-hooks` and then \
     `cargo test -p unique-instance --features test-hooks --test ...`";

/// Sets the test hook `var` on `cmd` (its program stops itself there), after making sure the
/// program has the test hooks at all (the `test-hooks` cargo feature, which its `--version`
/// names): without them it would ignore `var`, and the test would prove nothing, so it fails
/// here, saying how to build them.
pub fn arm_test_hook(cmd: &mut Command, var: &str) {
    let program = cmd.get_program().to_owned();
    let mut version = Command::new(&program);
    version.arg("--version").stdin(Stdio::null());
    let output = version
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", program.display()));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && said.contains("(with test hooks)"),
        "{} was built without its test hooks (the `test-hooks` cargo feature; its --version \
         says {:?}), so it would ignore {var} and this test would prove nothing: {TEST_HOOKS_BUILD}",
        Path::new(&program).display(),
        said.trim(),
    );
    cmd.env(var, "1");
}

/// Runs `cmd` to completion as `Command::output` does (stdout and stderr captured, stdin the
/// null device), killing it after [`TIMEOUT`].
pub fn output_within_timeout(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("waiting for {cmd:?}: {e}"),
        Err(_) => {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            panic!("{cmd:?} did not finish within {TIMEOUT:?}")
        }
    }
}

/// Runs `cmd` to completion with its own stdio settings, killing it after [`TIMEOUT`].
pub fn status_within_timeout(mut cmd: Command) -> ExitStatus {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => panic!("waiting for {cmd:?}: {e}"),
        Err(_) => {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            panic!("{cmd:?} did not finish within {TIMEOUT:?}")
        }
    }
}

/// Where cargo puts examples: next to this test's deps directory.
pub fn example_path(name: &str) -> PathBuf {
    let path = profile_dir().join("examples").join(name);
    assert!(
        path.is_file(),
        "example `{name}` is not built at {}; `cargo test` builds examples, or run `cargo build --examples`",
        path.display()
    );
    // `cargo test --test X` does not rebuild examples: refuse to test a stale binary.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let own = root.join("examples").join(format!("{name}.rs"));
    if let Some(newer) = newer_source(&path, &[root.join("src"), own]) {
        panic!(
            "example `{name}` is older than {}: run plain `cargo test` (it builds examples) \
             or `cargo build --examples` first",
            newer.display()
        );
    }
    path
}

/// The `unique-instance` binary, built by the CLI's own package (cli/) into the same target
/// directory. Cargo only tells a package's tests of that package's binaries, so it is found
/// next to this test's deps directory, and refused when missing or older than its sources.
pub fn cli_path() -> PathBuf {
    let path = profile_dir().join("unique-instance");
    assert!(
        path.is_file(),
        "the CLI is not built at {}; ./scripts/test builds it, or run \
         `cargo build --workspace --bins --examples` first",
        path.display()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(newer) = newer_source(&path, &[root.join("src"), root.join("cli/src")]) {
        panic!(
            "the CLI at {} is older than {}: run ./scripts/test (it builds it) or \
             `cargo build --workspace --bins --examples` first",
            path.display(),
            newer.display()
        );
    }
    path
}

/// `target/<profile>`: this test runs as `target/<profile>/deps/NAME-HASH`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The newest of `sources` (files, or directories searched whole) when it is newer than `built`.
fn newer_source(built: &Path, sources: &[PathBuf]) -> Option<PathBuf> {
    let built = std::fs::metadata(built)
        .and_then(|m| m.modified())
        .expect("mtime");
    sources
        .iter()
        .filter_map(|source| {
            if source.is_dir() {
                newest_source(source)
            } else {
                let t = std::fs::metadata(source).and_then(|m| m.modified()).ok()?;
                Some((t, source.clone()))
            }
        })
        .filter(|(t, _)| *t > built)
        .max_by_key(|(t, _)| *t)
        .map(|(_, path)| path)
}

fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

/// A command with a clean environment: only PATH, the given bus, and the lock directory; and
/// the default disposition of the signals the tool passes on. A signal ignored by whoever
/// started the test run (`nohup`, a non-interactive shell's `&`: SIGINT and SIGQUIT) would
/// otherwise stay ignored in the tool, as it should for a user, and the tests that send it one
/// would wait in vain. (A test that wants one ignored starts the tool through `sh -c 'trap ...'`.)
pub fn clean_command(program: &Path, bus: Option<&str>, lock_dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    default_signals(&mut cmd);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNIQUE_INSTANCE_LOCK_DIR", lock_dir)
        // HOLDER_LOG=debug shows the library's reasoning in a failing test's stderr.
        .env(
            "RUST_LOG",
            std::env::var("HOLDER_LOG").unwrap_or_else(|_| "warn".into()),
        );
    if let Some(address) = bus {
        cmd.env("DBUS_SESSION_BUS_ADDRESS", address);
    }
    cmd
}

/// Gives `cmd` the default disposition of SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1 and SIGUSR2:
/// see [`clean_command`].
#[allow(unsafe_code)]
pub fn default_signals(cmd: &mut Command) {
    use nix::sys::signal::{SigHandler, Signal, signal};
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec, only `sigaction` (async-signal-safe) is called.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [
                Signal::SIGHUP,
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGTERM,
                Signal::SIGUSR1,
                Signal::SIGUSR2,
            ] {
                signal(sig, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// The `holder` example with `args`, on `bus` (none: no session bus at all).
pub fn holder(bus: Option<&str>, lock_dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = clean_command(&example_path("holder"), bus, lock_dir);
    cmd.args(args);
    Proc::spawn(cmd)
}

/// The unique names that own or are queued for `name` on the bus at `address`, the owner first
/// (`ListQueuedOwners`); empty when nobody owns it.
pub fn queued_owners(address: &str, name: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .expect("connect");
        match conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "ListQueuedOwners",
                &(name,),
            )
            .await
        {
            Ok(reply) => reply.body().deserialize().expect("names"),
            // NameHasNoOwner: nobody, not even queued.
            Err(_) => Vec::new(),
        }
    })
}

/// Waits until `count` connections own or are queued for `name` on the bus at `address`: the
/// moment a copy that waits for the name is known to be waiting. Panics after [`TIMEOUT`].
pub fn wait_for_queued_owners(address: &str, name: &str, count: usize) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let queued = queued_owners(address, name);
        if queued.len() >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} owners of {name} expected within {TIMEOUT:?}; the bus lists {queued:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that `path` is still the user's file described by `before` (same inode, mode and
/// owner), and empty: `what` says which case failed.
pub fn assert_same_empty_file(path: &Path, before: &std::fs::Metadata, what: &str) {
    use std::os::unix::fs::MetadataExt;
    let after = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{what}: the user's file was removed: {e}"));
    assert_eq!(
        (
            after.ino(),
            after.mode(),
            after.uid(),
            after.gid(),
            after.len()
        ),
        (before.ino(), before.mode(), before.uid(), before.gid(), 0),
        "{what}: the same file, still empty"
    );
}

/// The uid and gid of `nobody`, the unprivileged "other user" of the tests.
pub const NOBODY: u32 = 65534;

/// `cmd`, to be run as `uid`/`gid` with no supplementary groups (through `setpriv`, which
/// keeps the environment `cmd` was given).
pub fn as_user(uid: u32, gid: u32, cmd: &Command) -> Command {
    let mut setpriv = Command::new(require_program("setpriv", "util-linux"));
    setpriv
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--");
    wrapped(setpriv, cmd)
}

/// `wrapper` (a program and its first arguments, such as `setpriv ... --`) running `cmd`: its
/// program and arguments follow, and it gets `cmd`'s environment and nothing else, and the
/// default signal dispositions of [`clean_command`] (a `Command`'s `pre_exec` cannot be copied,
/// and a run under `nohup` would otherwise pass its ignored SIGHUP on to `cmd`).
pub fn wrapped(mut wrapper: Command, cmd: &Command) -> Command {
    default_signals(&mut wrapper);
    wrapper
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_clear();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            wrapper.env(key, value);
        }
    }
    wrapper
}

/// Unmounts what it names when dropped, so a failing test leaves no mount behind.
pub struct Mounted(pub PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let umount = require_program("umount", "mount");
        let _ = status_within_timeout({
            let mut cmd = Command::new(umount);
            cmd.arg(&self.0);
            cmd
        });
    }
}

/// The `holder` example as `uid`, with the environment of [`holder`].
pub fn holder_as(uid: u32, gid: u32, bus: Option<&str>, lock_dir: &Path, args: &[&str]) -> Proc {
    let mut cmd = clean_command(&example_path("holder"), bus, lock_dir);
    cmd.args(args);
    Proc::spawn(as_user(uid, gid, &cmd))
}

/// The `unique-instance` binary with `args`, on `bus` (none: no session bus at all).
pub fn cli(bus: Option<&str>, lock_dir: &Path, args: &[&str]) -> Proc {
    Proc::spawn(cli_command(bus, lock_dir, args))
}

/// The command line of [`cli`], to adjust before spawning.
pub fn cli_command(bus: Option<&str>, lock_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = clean_command(&cli_path(), bus, lock_dir);
    cmd.args(args);
    cmd
}

/// Parses `key=value` out of an event line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A copy of the `holder` example that must be refused now, on the lock file alone (exit 75),
/// naming `holder_pid`; `what` says which case failed.
pub fn assert_refused_naming(lock_dir: &Path, name: &str, holder_pid: u32, what: &str) {
    let mut newcomer = holder(None, lock_dir, &[name, "--backend", "lockfile"]);
    let line = newcomer.next_line("a newcomer");
    assert!(
        line.starts_with("already-running"),
        "{what}: a newcomer was not refused: {line}"
    );
    assert_eq!(
        field(&line, "holder_pid"),
        Some(holder_pid.to_string().as_str()),
        "{what}: {line}"
    );
    assert_eq!(newcomer.exit_code(), 75, "{what}");
}

/// Waits until process `pid` has an inotify instance with a watch in it (its `fdinfo` lists
/// `inotify wd:` lines): its lock-file watch is in place.
pub fn wait_until_watching(pid: u32) {
    wait_for_a_watch(pid, "any directory", |_| true);
}

/// Waits until process `pid` has an inotify watch on the directory `dir` (a line of its
/// `fdinfo` names `dir`'s inode): its lock-file watch covers that directory, not only the first
/// one it added.
pub fn wait_until_watching_dir(pid: u32, dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(
        " ino:{:x} ",
        std::fs::metadata(dir).expect("the directory").ino()
    );
    wait_for_a_watch(pid, &dir.display().to_string(), |line| line.contains(&ino));
}

/// Waits until the lock-file watch thread of process `pid` (named `unique-instance-watch`, cut
/// to `unique-instance`) sleeps in `poll`, as its `wchan` shows: it has read what was queued and
/// looked at the path, so a change made now is one it reads as an event. Up to [`TIMEOUT`];
/// where `wchan` tells nothing (`0`, a kernel that hides it), it returns at once.
pub fn wait_until_watch_polls(pid: u32) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut told = false;
        let polling = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the holder's tasks")
            .filter_map(Result::ok)
            .any(|task| {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
                told |= !wchan.is_empty() && wchan != "0";
                comm.trim() == "unique-instance" && wchan.contains("poll")
            });
        if polling || !told {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watch of process {pid} never slept in poll within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits (up to [`TIMEOUT`]) until an `inotify wd:` line of process `pid`'s `fdinfo` passes
/// `this`; `what` names the directory for the failure.
fn wait_for_a_watch(pid: u32, what: &str, this: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let watching = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
            .expect("the holder's fdinfo")
            .filter_map(Result::ok)
            .any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|info| {
                    info.lines()
                        .any(|line| line.starts_with("inotify wd:") && this(line))
                })
            });
        if watching {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} set up no inotify watch on {what} within {TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every inotify instance of process `pid` has an empty queue (its watch has read
/// what was queued): a duplicate of each (`pidfd_getfd`) is asked `FIONREAD`.
pub fn wait_until_events_read(pid: u32) {
    let p = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    let pidfd =
        rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).expect("pidfd_open");
    let fds: Vec<rustix::fd::OwnedFd> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .expect("fdinfo")
        .filter_map(Result::ok)
        .filter(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|info| info.contains("inotify wd:"))
        })
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .map(|fd| {
            rustix::process::pidfd_getfd(
                &pidfd,
                rustix::fd::RawFd::from(fd),
                rustix::process::PidfdGetfdFlags::empty(),
            )
            .expect("pidfd_getfd")
        })
        .collect();
    assert!(!fds.is_empty(), "process {pid} has no inotify instance");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while fds
        .iter()
        .any(|fd| rustix::io::ioctl_fionread(fd).expect("FIONREAD") > 0)
    {
        assert!(std::time::Instant::now() < deadline, "events never read");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Another copy of `name` (the lock file alone, no bus) starts in `lock_dir`, acquires, and
/// releases cleanly: the copy that runs while a holder is stopped or looking away.
pub fn another_copy_comes_and_goes(lock_dir: &Path, name: &str, mode: &[&str]) {
    let mut other = holder(None, lock_dir, &[name, "--backend", "lockfile"]);
    assert!(
        other.next_line("other copy").starts_with("acquired"),
        "{mode:?}"
    );
    other.close_stdin();
    assert_eq!(other.stdout_until_closed(), ["released"], "{mode:?}");
    assert_eq!(other.exit_code(), 0);
}

/// A holder of `name`'s bus name that has exited, leaving the name to its forked child, which
/// keeps the connection's socket open until its stdin closes, and leaving in the lock file a
/// record that names it, unlocked: the bus still lists a dead holder, whose connection was made
/// by a process that is gone (see `newcomer_waits_for_the_bus_to_drop_the_previous_lock_holder`
/// in tests/crash_and_bus.rs). Returns the child's parent.
pub fn dead_holder_on_the_bus(address: &str, lock_dir: &Path, name: &str) -> Proc {
    let mut cmd = clean_command(&example_path("fork_release"), Some(address), lock_dir);
    cmd.args([name, "--backend", "dbus", "--child-asks"]);
    let mut old = Proc::spawn(cmd);
    let acquired = old.next_line("acquired");
    let pid: u32 = field(&acquired, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{acquired}"));
    assert!(old.next_line("forked").starts_with("forked child="));
    assert!(old.wait().success());
    let record = format!(
        "{{\"pid\":{pid},\"uid\":0,\"start_time\":null,\"backend\":[\"lock-file\",\"dbus\"],\"bus\":\"session\",\"bus_unique_name\":null,\"executable\":null,\"hostname\":null}}\n",
    );
    std::fs::write(lock_dir.join(format!("{name}.lock")), record).expect("stale record");
    old
}

/// Takes (or with `F_UNLCK` lets go of) an OFD lock of `l_type` (`F_RDLCK`, `F_WRLCK`) on the
/// whole of `file`, held until its open file description is closed; waiting for it when
/// `wait`.
pub fn ofd_lock(file: impl std::os::fd::AsFd, l_type: nix::libc::c_int, wait: bool) {
    let lock = nix::libc::flock {
        l_type: l_type as nix::libc::c_short,
        l_whence: nix::libc::SEEK_SET as nix::libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let arg = if wait {
        nix::fcntl::FcntlArg::F_OFD_SETLKW(&lock)
    } else {
        nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)
    };
    nix::fcntl::fcntl(file.as_fd(), arg).expect("OFD lock");
}

/// The PID of a process of this host that has exited and been reaped: one a record can name as
/// a holder that is gone (reused only after the kernel has gone round every other PID).
pub fn gone_pid() -> u32 {
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let pid = gone.id();
    assert!(gone.wait().expect("reap true").success());
    pid
}
