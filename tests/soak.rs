//! A fault-injection soak in the spirit of Jepsen, on one machine.
//!
//! Over 400 lines: the driver, the nemesis, the log it writes and the checker that reads it are
//! one experiment, changed together (the harness the other test files share is in `tests/common`).
//!
//! A driver starts copies of one instance — the library (`examples/soak_holder.rs`) and the CLI
//! (`unique-instance run NAME -- soak_holder --command`) — each with a randomly drawn
//! environment (scope by option, by `UNIQUE_INSTANCE_SCOPE` or not at all; backend auto or lock
//! file; a session bus that is live, dead or unset; a system bus live or dead; `XDG_RUNTIME_DIR`
//! unset, empty, or with a `bus` socket; `INVOCATION_ID` or not). A nemesis meanwhile SIGKILLs
//! holders and waiters, SIGSTOPs and SIGCONTs them, kills and restarts the private bus, deletes
//! the lock file or its whole directory, and floods the name with short-lived copies.
//!
//! Every copy appends what it believes (`acquired`, `lost`, `releasing`) with a
//! `CLOCK_MONOTONIC` time — one clock for every process — to one log, one line per `write` on an
//! `O_APPEND` file; the driver appends what it did (spawned, signalled, deleted, saw exit) to the
//! same log. The checker then reads the log and demands:
//!
//! 1. **Never two believers at once.** A belief runs from a copy's `acquired` line to its
//!    `releasing` line, its `lost … still_exclusive=false` line, or its death, whichever comes
//!    first; for a SIGKILLed copy the death is taken at the moment the driver sent the signal (a
//!    lower bound), for `run`'s COMMAND the moment its wrapper was SIGKILLed (COMMAND's keeper
//!    stops it after that, never before). A SIGSTOPped copy believes on while stopped —
//!    its kernel lock and bus name still exclude. Two beliefs that overlap are a violation,
//!    unless the overlap is one the library cannot prevent and only reports: the nemesis
//!    deleted the lock file (or its directory) of one of the two after it began trying (for
//!    `run`, after its wrapper started), and the two did not both hold the name on the same
//!    live bus. Whose lock a deletion took is known from the record in the deleted file (read
//!    through a descriptor checked to be the path's file, or after the directory was renamed
//!    away): that copy's (or its wrapper's), none yet, or a dead holder's count as that copy's;
//!    a live *other* holder's does not — then a copy claimed a lock file already deleted under
//!    its holder. Those explained overlaps are counted and shown, not hidden; and the copy whose
//!    lock was taken must report the loss (`lost`, `lost-at-release`, `releasing why=lost`; for
//!    COMMAND its wrapper's SIGTERM or exit 69) or be SIGKILLed before it could: one that ends
//!    its belief with a clean `released` is a violation (see `loss_told`).
//! 2. **Every refused copy named a holder that was alive**: the PID it named belongs to a copy
//!    the driver had started and not yet seen exit at some moment between the refused copy's
//!    attempt and its refusal ("holder unknown" is counted, not failed). A `run` wrapper counts
//!    as alive until its stderr closes: its keeper and COMMAND hold a duplicate of the lock, and
//!    end a moment after a SIGKILLed wrapper (the keeper stops COMMAND, then exits). So does the
//!    keeper, which names itself in the record once its wrapper died, and says so on the
//!    wrapper's stderr.
//! 3. **No copy crashed**: no panic (exit 101), no death by a signal the driver did not send.
//! 4. **No false error**: no copy exits with an error status but 69 (70, an I/O or bus error;
//!    64, "not a lock file"; 77; 78, an unsafe path). Under any of these faults the
//!    only right answers are "acquired" or "already running" (or, after a loss, stopping); each
//!    one is counted by cause (a lock-file error, a bus error, another) and fails the run.
//!
//! The schedule is a pure function of the seed (`UNIQUE_INSTANCE_SOAK_SEED`, printed on
//! failure): each step acts on a numbered slot or on the bus or lock directory, so a failing
//! seed replays the same schedule (the interleavings the kernel picks still vary, which is the
//! point of running it long). Bounded by `UNIQUE_INSTANCE_SOAK_STEPS` and
//! `UNIQUE_INSTANCE_SOAK_SECS`; `UNIQUE_INSTANCE_SOAK_LOG` keeps the log at a given path. The
//! pauses between steps are part of the drawn schedule (its pace), not synchronisation: nothing
//! waits for an outcome by sleeping.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BusConfig, DbusDaemon, example_path, unique_name};
use rustix::process::{Pid, Signal};

/// Steps and seconds of the run `cargo test` does (CI): well under a minute of schedule.
const DEFAULT_STEPS: u64 = 1500;
const DEFAULT_SECS: u64 = 30;
/// Numbered places for long-lived copies; the nemesis acts on them by number.
const SLOTS: usize = 6;
/// At most this many short-lived churn copies at once.
const MAX_CHURN: usize = 24;

// ---------------------------------------------------------------------------------------------
// Time, randomness, the log.

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process on the machine.
fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}

/// splitmix64: small, seedable, and the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The shared log, as the driver writes it: the same format as `soak_holder`'s lines.
#[derive(Clone)]
struct Log(Arc<File>);

impl Log {
    fn create(path: &Path) -> Log {
        // A log given by path starts empty: a replay must not read an earlier run's lines.
        let _ = std::fs::remove_file(path);
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot create the soak log {}: {e}", path.display()));
        Log(Arc::new(file))
    }

    /// One line, one `write`, with the time given (taken by the caller at the right moment).
    fn at(&self, t: u64, event: &str) {
        let line = format!(
            "{}.{:09} {} {}\n",
            t / 1_000_000_000,
            t % 1_000_000_000,
            std::process::id(),
            event
        );
        let n = rustix::io::write(&*self.0, line.as_bytes()).expect("write the soak log");
        assert_eq!(n, line.len(), "short write to the soak log");
    }
}

// ---------------------------------------------------------------------------------------------
// The schedule: a pure function of the seed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BusChoice {
    Unset,
    Live,
    Dead,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RuntimeDir {
    Unset,
    Empty,
    WithBus,
}

/// One copy's environment and options.
#[derive(Clone, Copy, Debug)]
struct Env {
    /// Scope given as an option (`--scope`, `--user`/`--system`).
    scope_option: Option<&'static str>,
    /// Scope given through `UNIQUE_INSTANCE_SCOPE`.
    scope_env: Option<&'static str>,
    backend: &'static str,
    session: BusChoice,
    /// Never unset: the machine's own system bus must stay out of the soak.
    system_live: bool,
    runtime_dir: RuntimeDir,
    invocation_id: bool,
}

impl Env {
    fn draw(rng: &mut Rng) -> Env {
        let scope_option = rng.pick(&[None, Some("user"), Some("system"), Some("auto")]);
        let scope_env = rng.pick(&[None, None, Some("user"), Some("system"), Some("auto")]);
        Env {
            scope_option,
            scope_env,
            backend: rng.pick(&["auto", "auto", "lockfile"]),
            session: rng.pick(&[
                BusChoice::Unset,
                BusChoice::Live,
                BusChoice::Live,
                BusChoice::Dead,
            ]),
            system_live: rng.below(2) == 0,
            runtime_dir: rng.pick(&[RuntimeDir::Unset, RuntimeDir::Empty, RuntimeDir::WithBus]),
            invocation_id: rng.below(4) == 0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Wait {
    No,
    Forever,
    Ms(u64),
}

#[derive(Clone, Copy, Debug)]
enum Action {
    /// A library copy in a slot (no-op when the slot's copy is still alive).
    Library {
        slot: usize,
        env: Env,
        wait: Wait,
        hold_ms: Option<u64>,
        blocking: bool,
    },
    /// `unique-instance run` in a slot.
    Cli {
        slot: usize,
        env: Env,
        wait: Wait,
    },
    /// Close the slot's stdin: its copy releases (a waiter, once it holds).
    Release {
        slot: usize,
    },
    Kill {
        slot: usize,
    },
    Stop {
        slot: usize,
    },
    Cont {
        slot: usize,
    },
    BusKill,
    BusRestart,
    RemoveLockFile,
    RemoveLockDir,
    /// Renames the lock directory away, then deletes it: not in the default set (see
    /// [`fault_enabled`]).
    MoveLockDir,
    Churn {
        envs: [Env; 4],
        count: usize,
        hold_ms: u64,
    },
    Nothing,
}

impl Action {
    fn draw(rng: &mut Rng) -> Action {
        let slot = rng.below(SLOTS as u64) as usize;
        let wait = match rng.below(6) {
            0 | 1 => Wait::Forever,
            2 => Wait::Ms(rng.below(300)),
            _ => Wait::No,
        };
        match rng.below(100) {
            0..=21 => Action::Library {
                slot,
                env: Env::draw(rng),
                wait,
                hold_ms: (rng.below(2) == 0).then(|| rng.below(200)),
                blocking: rng.below(3) == 0,
            },
            22..=33 => Action::Cli {
                slot,
                env: Env::draw(rng),
                wait,
            },
            34..=43 => Action::Release { slot },
            44..=51 => Action::Kill { slot },
            52..=56 => Action::Stop { slot },
            57..=63 => Action::Cont { slot },
            64..=65 => Action::BusKill,
            66..=68 => Action::BusRestart,
            69..=70 => Action::RemoveLockFile,
            71 => Action::RemoveLockDir,
            76 => Action::MoveLockDir,
            72..=75 => Action::Churn {
                envs: [
                    Env::draw(rng),
                    Env::draw(rng),
                    Env::draw(rng),
                    Env::draw(rng),
                ],
                count: 2 + rng.below(5) as usize,
                hold_ms: rng.below(4),
            },
            _ => Action::Nothing,
        }
    }
}

/// The nemesis's faults, by name: `kill,stop,bus,rm-lock,rm-dir,churn` unless
/// `UNIQUE_INSTANCE_SOAK_FAULTS` lists others, to tell which fault a violation needs. A disabled
/// fault's steps do nothing, so the rest of the schedule stays the seed's. `mv-dir` (the lock
/// directory renamed away, as `mv` or a deploy would, then deleted) is opt-in: it goes beyond
/// "the lock file or its directory deleted".
fn fault_enabled(action: Action) -> bool {
    let name = match action {
        Action::Kill { .. } => "kill",
        Action::Stop { .. } | Action::Cont { .. } => "stop",
        Action::BusKill | Action::BusRestart => "bus",
        Action::RemoveLockFile => "rm-lock",
        Action::RemoveLockDir => "rm-dir",
        Action::MoveLockDir => "mv-dir",
        Action::Churn { .. } => "churn",
        _ => return true,
    };
    match std::env::var("UNIQUE_INSTANCE_SOAK_FAULTS") {
        Ok(list) => list.split(',').any(|f| f.trim() == name),
        Err(_) => name != "mv-dir",
    }
}

/// The pause after a step: mostly short, sometimes long enough for things to settle.
fn draw_pause(rng: &mut Rng) -> Duration {
    match rng.below(20) {
        0 => Duration::from_millis(20 + rng.below(60)),
        _ => Duration::from_millis(rng.below(8)),
    }
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// One process the driver started.
struct Spawned {
    pid: u32,
    pidfd: OwnedFd,
    stdin: Option<ChildStdin>,
    exited: Arc<AtomicBool>,
    stopped: bool,
}

impl Spawned {
    fn alive(&self) -> bool {
        !self.exited.load(Ordering::SeqCst)
    }
}

/// A private bus of the soak, and the runtime directory whose `bus` leads to it.
struct Bus {
    id: usize,
    daemon: DbusDaemon,
    socket: PathBuf,
    runtime_dir: PathBuf,
}

struct Driver {
    name: String,
    dir: PathBuf,
    lock_dir: PathBuf,
    log_path: PathBuf,
    log: Log,
    holder: PathBuf,
    cli: PathBuf,
    bus: Option<Bus>,
    buses_started: usize,
    empty_runtime_dir: PathBuf,
    slots: Vec<Option<Spawned>>,
    churn: Vec<Spawned>,
    reapers: Vec<std::thread::JoinHandle<()>>,
}

/// The `"pid":N` of a lock file's record.
/// The files a nemesis step removed: whose record each held (the PID, or `?` for none or an
/// unreadable one), and which file each was (`DEV:INO`): a record can still name the holder
/// before while a copy that has just taken the file over has not written its own yet (a long
/// run blamed such a removal on a stopped copy), so the checker also matches the file itself
/// against the file each copy says it acquired.
#[derive(Default)]
struct Removed {
    holders: Vec<String>,
    files: Vec<String>,
}

impl Removed {
    /// Notes the file at `path`, renamed out of the lock directory: nobody can open it by name
    /// there any more, so what is read is what was removed.
    fn note(&mut self, path: &Path) {
        let record = std::fs::read_to_string(path).unwrap_or_default();
        self.holders
            .push(record_pid(&record).unwrap_or_else(|| "?".into()));
        if let Ok(st) = rustix::fs::stat(path) {
            self.files.push(format!("{}:{}", st.st_dev, st.st_ino));
        }
    }

    fn extend(&mut self, other: Removed) {
        self.holders.extend(other.holders);
        self.files.extend(other.files);
    }

    /// `holders=... files=...` for the log line.
    fn fields(&self) -> String {
        format!(
            "holders={} files={}",
            self.holders.join(","),
            self.files.join(",")
        )
    }
}

fn record_pid(record: &str) -> Option<String> {
    let (_, rest) = record.split_once("\"pid\":")?;
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!pid.is_empty()).then_some(pid)
}

/// A bus address that nothing serves.
fn dead_address(dir: &Path) -> String {
    format!("unix:path={}", dir.join("no-bus-here").display())
}

impl Driver {
    fn new(dir: &Path, log_path: &Path) -> Driver {
        let lock_dir = dir.join("locks");
        let empty_runtime_dir = dir.join("runtime-empty");
        std::fs::create_dir(&empty_runtime_dir).expect("mkdir");
        Driver {
            name: unique_name("soak"),
            dir: dir.to_owned(),
            lock_dir,
            log_path: log_path.to_owned(),
            log: Log::create(log_path),
            holder: example_path("soak_holder"),
            cli: common::cli_path(),
            bus: None,
            buses_started: 0,
            empty_runtime_dir,
            slots: (0..SLOTS).map(|_| None).collect(),
            churn: Vec::new(),
            reapers: Vec::new(),
        }
    }

    fn start_bus(&mut self) {
        let t = now_ns();
        let daemon = DbusDaemon::start(BusConfig::Open);
        let socket = PathBuf::from(
            daemon
                .address
                .strip_prefix("unix:path=")
                .and_then(|rest| rest.split(',').next())
                .expect("a unix:path= bus address"),
        );
        let id = self.buses_started;
        self.buses_started += 1;
        let runtime_dir = self.dir.join(format!("runtime-{id}"));
        std::fs::create_dir(&runtime_dir).expect("mkdir");
        std::os::unix::fs::symlink(&socket, runtime_dir.join("bus")).expect("symlink");
        self.log
            .at(t, &format!("bus-start bus={id} pid={}", daemon.pid()));
        self.bus = Some(Bus {
            id,
            daemon,
            socket,
            runtime_dir,
        });
    }

    fn kill_bus(&mut self) {
        if let Some(mut bus) = self.bus.take() {
            self.log.at(now_ns(), &format!("bus-kill bus={}", bus.id));
            bus.daemon.kill();
            let _ = std::fs::remove_file(&bus.socket);
        }
    }

    /// The command line and environment for `env`, and the bus its copy will try (for the
    /// checker: `-` when none), following the library's documented choice; `scope_option` is the
    /// scope the copy is given as an option, if its command line can say it.
    fn environment(&self, cmd: &mut Command, env: &Env, scope_option: Option<&str>) -> String {
        let live = self.bus.as_ref();
        let dead = dead_address(&self.dir);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNIQUE_INSTANCE_LOCK_DIR", &self.lock_dir)
            .env("RUST_LOG", "warn");
        let address = |choice_live: bool| match (choice_live, live) {
            (true, Some(bus)) => (bus.daemon.address.clone(), Some(bus.id)),
            _ => (dead.clone(), None),
        };
        let session = match env.session {
            BusChoice::Unset => None,
            BusChoice::Live => Some(address(true)),
            BusChoice::Dead => Some(address(false)),
        };
        if let Some((a, _)) = &session {
            cmd.env("DBUS_SESSION_BUS_ADDRESS", a);
        }
        let system = address(env.system_live);
        cmd.env("DBUS_SYSTEM_BUS_ADDRESS", &system.0);
        let runtime_bus = match (env.runtime_dir, live) {
            (RuntimeDir::Unset, _) => None,
            (RuntimeDir::WithBus, Some(bus)) => {
                cmd.env("XDG_RUNTIME_DIR", &bus.runtime_dir);
                Some(Some(bus.id))
            }
            (RuntimeDir::Empty | RuntimeDir::WithBus, _) => {
                cmd.env("XDG_RUNTIME_DIR", &self.empty_runtime_dir);
                None
            }
        };
        if let Some(scope) = env.scope_env {
            cmd.env("UNIQUE_INSTANCE_SCOPE", scope);
        }
        if env.invocation_id {
            cmd.env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
        }
        // Which bus the library will choose (README, "Scopes and backends"): by bus number,
        // `dead` for an address nothing serves, `-` for none.
        let scope = scope_option.or(env.scope_env).unwrap_or("auto");
        let session_bus = match &session {
            Some((_, id)) => Some(*id),
            None => runtime_bus,
        };
        let chosen = if env.backend == "lockfile" {
            None
        } else {
            match scope {
                "user" => session_bus,
                "system" => Some(system.1),
                _ => session_bus.or(env.invocation_id.then_some(system.1)),
            }
        };
        match chosen {
            None => "-".into(),
            Some(None) => "dead".into(),
            Some(Some(id)) => id.to_string(),
        }
    }

    fn library_command(
        &self,
        env: &Env,
        wait: Wait,
        hold_ms: Option<u64>,
        blocking: bool,
    ) -> (Command, String) {
        let mut cmd = Command::new(&self.holder);
        let bus = self.environment(&mut cmd, env, env.scope_option);
        cmd.arg(&self.name).arg("--log").arg(&self.log_path);
        cmd.args(["--backend", env.backend]);
        if let Some(scope) = env.scope_option {
            cmd.args(["--scope", scope]);
        }
        match wait {
            Wait::No => {}
            Wait::Forever => {
                cmd.args(["--wait", "forever"]);
            }
            Wait::Ms(ms) => {
                cmd.args(["--wait", &ms.to_string()]);
            }
        }
        if let Some(ms) = hold_ms {
            cmd.args(["--hold-ms", &ms.to_string()]);
        }
        if blocking {
            cmd.arg("--blocking");
        }
        let what = format!(
            "kind=lib bus={bus} backend={} scope={:?}/{:?} wait={wait:?} hold={hold_ms:?} blocking={blocking} env={env:?}",
            env.backend, env.scope_option, env.scope_env
        );
        (cmd, what)
    }

    fn cli_command(&self, env: &Env, wait: Wait) -> (Command, String) {
        let mut cmd = Command::new(&self.cli);
        // `run` has no option for auto: then UNIQUE_INSTANCE_SCOPE decides.
        let bus = self.environment(&mut cmd, env, env.scope_option.filter(|s| *s != "auto"));
        cmd.arg("run").args(["--backend", env.backend]);
        match env.scope_option {
            Some("user") => {
                cmd.arg("--user");
            }
            Some("system") => {
                cmd.arg("--system");
            }
            _ => {}
        }
        match wait {
            Wait::No => {}
            Wait::Forever => {
                cmd.arg("--wait");
            }
            Wait::Ms(ms) => {
                cmd.arg(format!("--wait={}", ms as f64 / 1000.0));
            }
        }
        cmd.arg(&self.name)
            .arg("--")
            .arg(&self.holder)
            .arg("--command")
            .arg("--log")
            .arg(&self.log_path);
        let what = format!(
            "kind=cli bus={bus} backend={} scope={:?}/{:?} wait={wait:?} env={env:?}",
            env.backend, env.scope_option, env.scope_env
        );
        (cmd, what)
    }

    /// Starts `cmd`, logs it, and leaves a thread to log its exit (before reaping it, so its
    /// PID cannot be reused before the line is written).
    fn spawn(&mut self, mut cmd: Command, what: &str) -> Spawned {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Each copy a process group of its own, as a shell's jobs are. In the driver's group,
            // a `run` COMMAND's exit (its parent, the keeper, is in another group) could leave
            // that group orphaned, and the kernel then sends SIGHUP and SIGCONT to every process
            // in it that has a stopped member: a copy the nemesis had stopped ran on unseen (a
            // long run, seed 20261213, reported the overlap that followed).
            .process_group(0);
        let t = now_ns();
        let mut child: Child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let pid = child.id();
        let pidfd = rustix::process::pidfd_open(
            Pid::from_raw(pid as i32).expect("pid"),
            rustix::process::PidfdFlags::empty(),
        )
        .expect("pidfd_open (Linux >= 5.3)");
        self.log.at(t, &format!("spawn pid={pid} {what}"));
        let stdin = child.stdin.take();
        let mut stderr = child.stderr.take().expect("stderr");
        let exited = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&exited);
        let log = self.log.clone();
        self.reapers.push(std::thread::spawn(move || {
            let status = loop {
                match rustix::process::waitid(
                    rustix::process::WaitId::Pid(Pid::from_raw(pid as i32).expect("pid")),
                    rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
                ) {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) => {}
                    Err(rustix::io::Errno::INTR) => {}
                    Err(_) => break None,
                }
            };
            let t = now_ns();
            let how = match status {
                Some(s) if s.exited() => format!("code={}", s.exit_status().unwrap_or(-1)),
                Some(s) => format!("signal={}", s.terminating_signal().unwrap_or(-1)),
                None => "unknown".into(),
            };
            log.at(t, &format!("exit pid={pid} {how}"));
            flag.store(true, Ordering::SeqCst);
            let _ = child.wait();
            // Whatever it said (a refusal naming the holder, an error, a panic), after its exit;
            // COMMAND may hold the pipe a little longer.
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            // Every process that shared its stderr is gone now: for `run`, its COMMAND too, which
            // holds the lock as long as it lives (it dies of PR_SET_PDEATHSIG after a SIGKILLed
            // wrapper, a moment later).
            log.at(now_ns(), &format!("eof pid={pid}"));
            let text = text.trim();
            if !text.is_empty() {
                log.at(
                    now_ns(),
                    &format!("stderr pid={pid} text={}", text.replace('\n', " | ")),
                );
            }
        }));
        Spawned {
            pid,
            pidfd,
            stdin,
            exited,
            stopped: false,
        }
    }

    /// Removes the files in the lock directory, and says whose record each held (the PID, or
    /// `?` for none or an unreadable one): the checker needs to know whose lock went away. Each
    /// is first renamed out of the lock directory (next to it, on the same file system), which
    /// takes exactly the file the path named then, and its record is read from there: a record
    /// read at the path and a removal by name could be two files (a long run blamed a deletion
    /// on a `run` wrapper releasing at that instant, whose file the path no longer named, and
    /// found a copy's loss unexplained).
    fn remove_lock_files(&self) -> Removed {
        let mut removed = Removed::default();
        let Ok(entries) = std::fs::read_dir(&self.lock_dir) else {
            return removed;
        };
        let Some(aside_dir) = self.lock_dir.parent() else {
            return removed;
        };
        for entry in entries.flatten() {
            let aside = aside_dir.join(format!(".removed.{}", entry.file_name().to_string_lossy()));
            if std::fs::rename(entry.path(), &aside).is_err() {
                continue;
            }
            removed.note(&aside);
            let _ = std::fs::remove_file(&aside);
        }
        removed
    }

    fn signal(&self, copy: &Spawned, sig: Signal, word: &str) {
        let t = now_ns();
        // A pidfd: never a reused PID, even if the copy exited a moment ago.
        if rustix::process::pidfd_send_signal(copy.pidfd.as_fd(), sig).is_ok() {
            self.log.at(t, &format!("{word} pid={}", copy.pid));
        }
    }

    fn slot_alive(&self, slot: usize) -> bool {
        self.slots[slot].as_ref().is_some_and(Spawned::alive)
    }

    fn step(&mut self, action: Action) {
        // Finished reapers are joined as we go: a long run starts tens of thousands of them.
        if self
            .reapers
            .iter()
            .any(std::thread::JoinHandle::is_finished)
        {
            let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reapers)
                .into_iter()
                .partition(std::thread::JoinHandle::is_finished);
            self.reapers = running;
            for reaper in done {
                let _ = reaper.join();
            }
        }
        if !fault_enabled(action) {
            return;
        }
        match action {
            Action::Library {
                slot,
                env,
                wait,
                hold_ms,
                blocking,
            } => {
                if !self.slot_alive(slot) {
                    let (cmd, what) = self.library_command(&env, wait, hold_ms, blocking);
                    let copy = self.spawn(cmd, &format!("slot={slot} {what}"));
                    self.slots[slot] = Some(copy);
                }
            }
            Action::Cli { slot, env, wait } => {
                if !self.slot_alive(slot) {
                    let (cmd, what) = self.cli_command(&env, wait);
                    let copy = self.spawn(cmd, &format!("slot={slot} {what}"));
                    self.slots[slot] = Some(copy);
                }
            }
            Action::Release { slot } => {
                if let Some(copy) = self.slots[slot].as_mut()
                    && copy.stdin.take().is_some()
                {
                    self.log.at(now_ns(), &format!("release pid={}", copy.pid));
                }
            }
            Action::Kill { slot } => {
                if let Some(copy) = &self.slots[slot]
                    && copy.alive()
                {
                    self.signal(copy, Signal::KILL, "kill");
                }
            }
            Action::Stop { slot } => {
                if let Some(copy) = &self.slots[slot]
                    && copy.alive()
                    && !copy.stopped
                {
                    self.signal(copy, Signal::STOP, "stop");
                    self.slots[slot].as_mut().expect("slot").stopped = true;
                }
            }
            Action::Cont { slot } => {
                if let Some(copy) = &self.slots[slot]
                    && copy.stopped
                {
                    self.signal(copy, Signal::CONT, "cont");
                    self.slots[slot].as_mut().expect("slot").stopped = false;
                }
            }
            Action::BusKill => self.kill_bus(),
            Action::BusRestart => {
                self.kill_bus();
                self.start_bus();
            }
            Action::RemoveLockFile => {
                let t = now_ns();
                let removed = self.remove_lock_files();
                let ended = fmt_t(now_ns());
                self.log
                    .at(t, &format!("rm-lock ended={ended} {}", removed.fields()));
            }
            Action::RemoveLockDir => {
                // `rm -rf`: each file (its record read first), then the directory; a file a copy
                // created meanwhile is removed (and recorded) on the next round.
                let t = now_ns();
                let mut files = Removed::default();
                let mut removed = false;
                for _ in 0..100 {
                    files.extend(self.remove_lock_files());
                    match rustix::fs::rmdir(&self.lock_dir) {
                        Ok(()) => {
                            removed = true;
                            break;
                        }
                        Err(rustix::io::Errno::NOTEMPTY) => {}
                        Err(_) => break,
                    }
                }
                let ended = fmt_t(now_ns());
                self.log.at(
                    t,
                    &format!("rm-dir ended={ended} removed={removed} {}", files.fields()),
                );
            }
            Action::MoveLockDir => {
                // Renamed away in one step (then deleted), so the files read afterwards are
                // exactly the ones that were in it.
                let trash = self.dir.join(format!("trash-{}", now_ns()));
                let t = now_ns();
                let removed = std::fs::rename(&self.lock_dir, &trash).is_ok();
                let ended = fmt_t(now_ns());
                let mut files = Removed::default();
                if removed {
                    for entry in std::fs::read_dir(&trash).into_iter().flatten().flatten() {
                        files.note(&entry.path());
                    }
                    let _ = std::fs::remove_dir_all(&trash);
                }
                self.log.at(
                    t,
                    &format!("mv-dir ended={ended} removed={removed} {}", files.fields()),
                );
            }
            Action::Churn {
                envs,
                count,
                hold_ms,
            } => {
                self.churn.retain(Spawned::alive);
                for i in 0..count {
                    if self.churn.len() >= MAX_CHURN {
                        break;
                    }
                    let (cmd, what) =
                        self.library_command(&envs[i % envs.len()], Wait::No, Some(hold_ms), false);
                    let copy = self.spawn(cmd, &format!("churn {what}"));
                    self.churn.push(copy);
                }
            }
            Action::Nothing => {}
        }
    }

    /// Lets everything finish: continue the stopped, release the holders, wait for every exit
    /// (SIGKILL, logged, for any that does not within the bound), stop the bus.
    fn finish(&mut self) -> Vec<String> {
        let mut stuck = Vec::new();
        let copies: Vec<Spawned> = self
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .chain(self.churn.drain(..))
            .collect();
        for copy in &copies {
            if copy.stopped {
                self.signal(copy, Signal::CONT, "cont");
            }
        }
        let t = now_ns();
        let mut copies = copies;
        for copy in &mut copies {
            if copy.stdin.take().is_some() && copy.alive() {
                self.log.at(t, &format!("release pid={}", copy.pid));
            }
        }
        let deadline = Instant::now() + common::TIMEOUT;
        for copy in &copies {
            // The reaper threads tell: poll the pidfd (readable once the process exited).
            let mut fds = [rustix::event::PollFd::new(
                &copy.pidfd,
                rustix::event::PollFlags::IN,
            )];
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = rustix::time::Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let ready = rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0);
            if ready == 0 {
                stuck.push(format!(
                    "pid {} did not exit within {:?} of being released",
                    copy.pid,
                    common::TIMEOUT
                ));
                self.signal(copy, Signal::KILL, "kill");
            }
        }
        for reaper in self.reapers.drain(..) {
            let _ = reaper.join();
        }
        self.kill_bus();
        stuck
    }
}

// ---------------------------------------------------------------------------------------------
// The checker.

#[derive(Clone, Debug)]
struct Line {
    t: u64,
    pid: u32,
    event: String,
    rest: String,
    raw: String,
}

/// A log line's time, `SECONDS.NANOSECONDS`, in nanoseconds.
fn parse_t(t: &str) -> Option<u64> {
    let (s, ns) = t.split_once('.')?;
    Some(s.parse::<u64>().ok()? * 1_000_000_000 + ns.parse::<u64>().ok()?)
}

fn parse_log(text: &str) -> (Vec<Line>, Vec<String>) {
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for raw in text.lines() {
        let mut parts = raw.splitn(4, ' ');
        let parsed = (|| {
            let t = parse_t(parts.next()?)?;
            let pid = parts.next()?.parse().ok()?;
            let event = parts.next()?.to_owned();
            let rest = parts.next().unwrap_or("").to_owned();
            Some(Line {
                t,
                pid,
                event,
                rest,
                raw: raw.to_owned(),
            })
        })();
        match parsed {
            Some(line) => lines.push(line),
            None => bad.push(raw.to_owned()),
        }
    }
    // Stable: lines of one time keep the order they were written in.
    lines.sort_by_key(|l| l.t);
    (lines, bad)
}

/// The PID of the keeper that speaks, in a `run` wrapper's stderr, once the wrapper died (see
/// `cli/src/keeper/`): it names itself in the record first, whether it then holds the
/// instance ("its keeper (pid K) holds the instance") or finds the lock file gone ("keeper
/// (pid K): the lock file ... was removed or replaced").
fn keeper_named_in(stderr: &str) -> Option<u32> {
    let at = stderr.find("keeper (pid ")? + "keeper (pid ".len();
    let digits: String = stderr[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn field<'a>(rest: &'a str, key: &str) -> Option<&'a str> {
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Library,
    Cli,
    Command,
}

/// One life of one PID.
#[derive(Debug)]
struct Incarnation {
    pid: u32,
    kind: Kind,
    /// Spawned (driver-started) or first line (COMMAND).
    born: u64,
    /// The driver saw it exit (driver-started only).
    exit: Option<u64>,
    exit_how: Option<String>,
    /// When its stderr closed: every process sharing it (for `run`, COMMAND) had exited.
    eof: Option<u64>,
    /// When the driver SIGKILLed it.
    killed: Option<u64>,
    /// SIGSTOP/SIGCONT times.
    stops: Vec<(u64, &'static str)>,
    /// The bus it tries: a bus number, `dead`, or `-`.
    bus: String,
    /// For COMMAND: its wrapper's incarnation.
    wrapper: Option<usize>,
    attempt: Option<u64>,
    acquired: Option<u64>,
    /// The lock file it acquired, `DEV:INO` (for `run`'s COMMAND, its wrapper's).
    file: Option<String>,
    holds_name: bool,
    belief_end: Option<(u64, String)>,
    refused: Option<(u64, String)>,
    stderr: Option<String>,
    lines: Vec<String>,
}

/// Lock files the nemesis removed.
struct Deletion<'a> {
    /// When it began removing, and when it was done.
    began: u64,
    ended: u64,
    /// The PIDs the removed files' records named (None: no record).
    holders: Vec<Option<u32>>,
    /// The removed files, `DEV:INO` (logs from before they were written: none).
    files: Vec<&'a str>,
    /// Which fault it was: rm-lock, rm-dir or mv-dir.
    kind: &'a str,
}

struct Belief {
    who: usize,
    start: u64,
    end: u64,
    /// From when a deletion of its lock file can explain an overlap: its attempt (for COMMAND,
    /// its wrapper's start), since when it locked is not logged.
    since: u64,
    /// When its copy began trying: the start of what a failure message shows.
    attempt: u64,
    /// The live bus it holds the name on, if any.
    bus: Option<usize>,
}

#[derive(Default)]
struct Report {
    violations: Vec<String>,
    /// Overlaps the nemesis's deletions explain: (first, second, overlap ns, first reported a loss).
    explained: Vec<(usize, usize, u64, bool)>,
    /// How many of those each fault explains (the latest that does: rm-lock, rm-dir, mv-dir),
    /// apart when the holder it took the lock of was SIGSTOPped then. A lock file removed alone
    /// is re-created by its holder, so rm-lock explains only the overlaps where the holder was
    /// stopped, or another copy made the new file first.
    explained_by: BTreeMap<String, u64>,
    stats: BTreeMap<String, u64>,
    incarnations: Vec<Incarnation>,
}

/// Did copy `who`, whose lock file the nemesis took at `at`, say so: a `lost` line (the
/// library's watch), a `lost-at-release` one (its release found it), `releasing why=lost`, or,
/// for `run`'s COMMAND, a SIGTERM from its wrapper (which stops COMMAND on a loss: the driver
/// sends none) or the wrapper's exit 69 (a loss seen once COMMAND had ended); or was it SIGKILLed
/// (it, or its wrapper) before it could (not after a clean `released`).
fn loss_told(incs: &[Incarnation], who: usize, at: u64) -> bool {
    let inc = &incs[who];
    let told = inc.lines.iter().any(|raw| {
        let mut words = raw.split_whitespace();
        let t = words.next().and_then(parse_t).unwrap_or(0);
        let event = words.nth(1).unwrap_or("");
        let rest: Vec<&str> = words.collect();
        t >= at
            && (matches!(event, "lost" | "lost-at-release")
                || (event == "releasing"
                    && rest
                        .iter()
                        .any(|w| matches!(*w, "why=lost" | "why=SIGTERM"))))
    });
    let wrapper_said = inc
        .wrapper
        .is_some_and(|w| incs[w].exit_how.as_deref() == Some("code=69"));
    let released_cleanly = inc
        .lines
        .iter()
        .any(|raw| raw.split_whitespace().nth(2) == Some("released"));
    told || wrapper_said || (inc.killed.is_some() && !released_cleanly)
}

fn fmt_t(t: u64) -> String {
    format!("{}.{:09}", t / 1_000_000_000, t % 1_000_000_000)
}

/// Reads the log and checks the three properties (module docs).
fn check(text: &str, driver_pid: u32) -> Report {
    let (lines, bad) = parse_log(text);
    let mut report = Report::default();
    for b in bad {
        report
            .violations
            .push(format!("unreadable log line (torn write?): {b:?}"));
    }
    let mut incs: Vec<Incarnation> = Vec::new();
    let mut current: HashMap<u32, usize> = HashMap::new();
    let mut deletions: Vec<Deletion> = Vec::new();
    // bus number -> when it was killed
    let mut bus_killed: HashMap<usize, u64> = HashMap::new();
    let new_inc = |pid, kind, born, bus: String, wrapper| Incarnation {
        pid,
        kind,
        born,
        exit: None,
        exit_how: None,
        eof: None,
        killed: None,
        stops: Vec::new(),
        bus,
        wrapper,
        attempt: None,
        acquired: None,
        file: None,
        holds_name: false,
        belief_end: None,
        refused: None,
        stderr: None,
        lines: Vec::new(),
    };
    let bump = |report: &mut Report, key: String| *report.stats.entry(key).or_default() += 1;

    for line in &lines {
        if line.pid == driver_pid {
            let target = field(&line.rest, "pid").and_then(|p| p.parse::<u32>().ok());
            match line.event.as_str() {
                "spawn" => {
                    let pid = target.expect("spawn pid");
                    let kind = if field(&line.rest, "kind") == Some("cli") {
                        Kind::Cli
                    } else {
                        Kind::Library
                    };
                    let bus = field(&line.rest, "bus").unwrap_or("-").to_owned();
                    incs.push(new_inc(pid, kind, line.t, bus, None));
                    current.insert(pid, incs.len() - 1);
                    bump(&mut report, format!("spawned {kind:?}"));
                }
                "rm-lock" | "rm-dir" | "mv-dir" => {
                    let holders = field(&line.rest, "holders").unwrap_or("");
                    let holders: Vec<Option<u32>> = holders
                        .split(',')
                        .filter(|h| !h.is_empty())
                        .map(|h| h.parse().ok())
                        .collect();
                    // Logs from before `ended=` was written: the removal as one instant.
                    let ended = field(&line.rest, "ended")
                        .and_then(parse_t)
                        .unwrap_or(line.t);
                    deletions.push(Deletion {
                        began: line.t,
                        ended,
                        holders,
                        files: field(&line.rest, "files")
                            .unwrap_or("")
                            .split(',')
                            .filter(|f| !f.is_empty())
                            .collect(),
                        kind: line.event.as_str(),
                    });
                    bump(&mut report, format!("nemesis {}", line.event));
                }
                "bus-kill" => {
                    if let Some(id) = field(&line.rest, "bus").and_then(|b| b.parse().ok()) {
                        bus_killed.insert(id, line.t);
                    }
                    bump(&mut report, "nemesis bus-kill".into());
                }
                "bus-start" => {}
                other => {
                    let Some(&i) = target.and_then(|p| current.get(&p)) else {
                        continue;
                    };
                    let inc = &mut incs[i];
                    inc.lines.push(line.raw.clone());
                    match other {
                        "exit" => {
                            inc.exit = Some(line.t);
                            // `pid=N code=C` or `pid=N signal=S`: keep the second word.
                            inc.exit_how = line.rest.split_whitespace().nth(1).map(str::to_owned);
                        }
                        "kill" => {
                            inc.killed.get_or_insert(line.t);
                            bump(&mut report, "nemesis kill".into());
                        }
                        "stop" => inc.stops.push((line.t, "stop")),
                        "cont" => inc.stops.push((line.t, "cont")),
                        "stderr" => inc.stderr = Some(line.rest.clone()),
                        "eof" => inc.eof = Some(line.t),
                        _ => {}
                    }
                }
            }
            continue;
        }
        // A copy's own line.
        let i = if line.event == "acquired" && field(&line.rest, "via") == Some("run") {
            let wrapper = field(&line.rest, "wrapper")
                .and_then(|w| w.parse::<u32>().ok())
                .and_then(|w| current.get(&w).copied());
            let bus = wrapper.map_or("-".to_owned(), |w| incs[w].bus.clone());
            let born = wrapper.map_or(line.t, |w| incs[w].born);
            incs.push(new_inc(line.pid, Kind::Command, born, bus, wrapper));
            current.insert(line.pid, incs.len() - 1);
            incs.len() - 1
        } else if let Some(&i) = current.get(&line.pid) {
            i
        } else {
            report.violations.push(format!(
                "a line from a process the soak did not start: {:?}",
                line.raw
            ));
            continue;
        };
        let inc = &mut incs[i];
        inc.lines.push(line.raw.clone());
        match line.event.as_str() {
            "attempt" => inc.attempt = Some(line.t),
            "acquired" => {
                if inc.acquired.is_some() {
                    report.violations.push(format!(
                        "pid {} logged `acquired` twice: {:?}",
                        line.pid, inc.lines
                    ));
                }
                inc.acquired = Some(line.t);
                inc.file = field(&line.rest, "file")
                    .filter(|f| *f != "-")
                    .map(str::to_owned);
                inc.holds_name = match inc.kind {
                    Kind::Library => line.rest.contains("Dbus"),
                    // `run` does not say; it holds the name when its bus was up when it started.
                    _ => inc.bus.parse::<usize>().is_ok(),
                };
                bump(&mut report, format!("acquired {:?}", inc.kind));
            }
            "lost" => {
                bump(
                    &mut report,
                    format!(
                        "lost {} still_exclusive={}",
                        field(&line.rest, "reason").unwrap_or("?"),
                        field(&line.rest, "still_exclusive").unwrap_or("?")
                    ),
                );
                if field(&line.rest, "still_exclusive") == Some("false") && inc.belief_end.is_none()
                {
                    inc.belief_end = Some((line.t, "lost".into()));
                }
            }
            "releasing" if inc.belief_end.is_none() => {
                inc.belief_end = Some((line.t, "releasing".into()));
            }
            "refused" => {
                inc.refused = Some((
                    line.t,
                    field(&line.rest, "holder").unwrap_or("unknown").to_owned(),
                ));
                bump(&mut report, "refused".into());
            }
            "timed-out" => bump(&mut report, "timed out".into()),
            "error" | "release-error" => bump(
                &mut report,
                format!(
                    "{} exit={} {}",
                    line.event,
                    field(&line.rest, "exit").unwrap_or("?"),
                    field(&line.rest, "kind")
                        .map(|k| k.split(['{', ' ']).next().unwrap_or(k))
                        .unwrap_or("")
                ),
            ),
            _ => {}
        }
    }

    // COMMAND's keeper stops it when the wrapper is gone: it dies no earlier than its wrapper
    // was SIGKILLed.
    for i in 0..incs.len() {
        if incs[i].kind == Kind::Command
            && let Some(w) = incs[i].wrapper
        {
            let wrapper_killed = incs[w].killed;
            let wrapper_exit = incs[w].exit;
            let inc = &mut incs[i];
            inc.killed = inc.killed.or(wrapper_killed);
            inc.exit = inc.exit.or(wrapper_exit);
        }
    }

    // A copy is alive from its spawn to its exit; the holder a record names lives on in `run`'s
    // COMMAND, which holds a duplicate of the lock, until the wrapper's stderr closes. So does
    // the keeper of a `run` whose wrapper died: it names itself in the record then, and says so
    // on the wrapper's stderr ("its keeper (pid K) holds the instance").
    let lives: HashMap<u32, Vec<(u64, u64)>> = incs.iter().fold(HashMap::new(), |mut m, inc| {
        let end = match (inc.exit, inc.eof) {
            (Some(exit), Some(eof)) if inc.kind == Kind::Cli => exit.max(eof),
            (exit, _) => exit.unwrap_or(u64::MAX),
        };
        m.entry(inc.pid).or_default().push((inc.born, end));
        if inc.kind == Kind::Cli
            && let Some(keeper) = inc.stderr.as_deref().and_then(keeper_named_in)
        {
            m.entry(keeper).or_default().push((inc.born, end));
        }
        m
    });
    // The beliefs.
    let mut beliefs = Vec::new();
    for (i, inc) in incs.iter().enumerate() {
        let Some(start) = inc.acquired else { continue };
        let mut end = u64::MAX;
        for c in [inc.belief_end.as_ref().map(|b| b.0), inc.killed, inc.exit]
            .into_iter()
            .flatten()
        {
            end = end.min(c);
        }
        // SIGKILL sent a moment before the copy logged `acquired`: it believed for an instant.
        let end = end.max(start);
        if end == u64::MAX {
            report.violations.push(format!(
                "pid {} ({:?}) acquired and never ended, exited or was killed: {:?}",
                inc.pid, inc.kind, inc.lines
            ));
            continue;
        }
        let bus = inc
            .bus
            .parse::<usize>()
            .ok()
            .filter(|_| inc.holds_name)
            .filter(|id| bus_killed.get(id).is_none_or(|&k| k > start));
        beliefs.push(Belief {
            who: i,
            start,
            end,
            since: inc.attempt.unwrap_or(inc.born),
            attempt: inc.attempt.unwrap_or(inc.born),
            bus,
        });
    }
    beliefs.sort_by_key(|b| b.start);
    for (n, a) in beliefs.iter().enumerate() {
        for b in &beliefs[n + 1..] {
            if b.start >= a.end {
                continue;
            }
            // b began believing while a still did.
            // A deletion explains it when it took the lock of one of the two, after that one
            // began trying: the deleted file's record named it (or `run`'s wrapper), or nobody
            // alive (no record yet: a copy between locking and recording, which may be either;
            // a dead holder's). The second one's counts too: it may have locked before the
            // deletion and logged after (for COMMAND, its wrapper acquired before COMMAND could
            // say so) — a loss to report, not a claim on a file already gone. What is left is a
            // copy claiming a lock file whose deletion took a live *other* holder's lock, or no
            // deletion at all.
            let alive_at = |pid: u32, t: u64| {
                lives
                    .get(&pid)
                    .is_some_and(|ls| ls.iter().any(|&(b, e)| b <= t && t <= e))
            };
            let took = |who: &Belief| {
                let inc = &incs[who.who];
                let pids = [Some(inc.pid), inc.wrapper.map(|w| incs[w].pid)];
                // A removal takes time (a directory's files one by one, each renamed aside and
                // read): it may have taken this copy's file if the two overlapped in time, so it
                // counts if it ended after the copy began trying and began before the second
                // copy acquired. Three long runs found overlaps whose removal began a fraction
                // of a millisecond before the victim's attempt was logged, and ended after.
                deletions.iter().rfind(|d| {
                    d.ended >= who.since
                        && d.began <= b.start
                        && (inc.file.as_deref().is_some_and(|f| d.files.contains(&f))
                            || d.holders.is_empty()
                            || d.holders.iter().any(|h| match h {
                                None => true,
                                Some(pid) => pids.contains(&Some(*pid)) || !alive_at(*pid, d.began),
                            }))
                })
            };
            // The deletion, and whether the copy whose lock it took (its `run` wrapper, which
            // watches the file) was SIGSTOPped then: a stopped holder cannot re-create its file.
            let stopped_at = |who: &Belief, t: u64| {
                let inc = &incs[who.who];
                let watcher = inc.wrapper.map_or(inc, |w| &incs[w]);
                watcher
                    .stops
                    .iter()
                    .rfind(|(at, _)| *at <= t)
                    .is_some_and(|(_, what)| *what == "stop")
            };
            // The deletion's kind, whether its victim was stopped then, the victim, and when; for
            // each of the two whose lock it may have taken (both, when the record did not say:
            // a file not yet recorded, or a dead holder's).
            let took_a = took(a).map(|d| (d.kind, stopped_at(a, d.began), a, d.began));
            let took_b = took(b).map(|d| (d.kind, stopped_at(b, d.began), b, d.began));
            let deleted = took_a.or(took_b);
            let same_live_bus = a.bus.is_some()
                && a.bus == b.bus
                && a.bus
                    .and_then(|id| bus_killed.get(&id))
                    .is_none_or(|&k| k > b.start);
            let overlap = a.end.min(b.end).saturating_sub(b.start);
            if let Some((kind, stopped, victim, at)) = deleted.filter(|_| !same_live_bus) {
                // The library cannot prevent such an overlap, but it must not let it pass
                // unsaid: the copy whose lock was taken reports the loss (or dies first). When
                // the record left it open which of the two that was, one of them does.
                let reported = [took_a, took_b]
                    .iter()
                    .flatten()
                    .any(|(_, _, v, d)| loss_told(&incs, v.who, *d));
                if !reported {
                    let iv = &incs[victim.who];
                    let mut v = format!(
                        "A TAKEN LOCK NEVER REPORTED: the nemesis took pid {} ({:?})'s lock file \
                         at {} ({kind}) and pid {} acquired while it believed, but pid {} \
                         ended its belief without reporting a loss (no `lost`, no \
                         `lost-at-release`, no SIGTERM from its wrapper, no exit 69) and was \
                         not killed before it could.\n",
                        iv.pid,
                        iv.kind,
                        fmt_t(at),
                        incs[if victim.who == a.who { b.who } else { a.who }].pid,
                        iv.pid,
                    );
                    let _ = write!(v, "    its history: {}", iv.lines.join("\n            "));
                    report.violations.push(v);
                }
                report.explained.push((a.who, b.who, overlap, reported));
                let key = if stopped {
                    format!("{kind}, its holder stopped")
                } else {
                    kind.to_owned()
                };
                *report.explained_by.entry(key).or_default() += 1;
                continue;
            }
            let (ia, ib) = (&incs[a.who], &incs[b.who]);
            let mut v = format!(
                "TWO HOLDERS AT ONCE for {:.3} ms: pid {} ({:?}, bus {}) believed from {} to {}, and \
                 pid {} ({:?}, bus {}) acquired at {}{}.\n",
                overlap as f64 / 1e6,
                ia.pid,
                ia.kind,
                ia.bus,
                fmt_t(a.start),
                fmt_t(a.end),
                ib.pid,
                ib.kind,
                ib.bus,
                fmt_t(b.start),
                if same_live_bus {
                    " — both on the same live bus"
                } else {
                    " — no deletion took either one's lock file after it began trying: one of them \
                     claimed a lock file that was already gone (its holder was someone else)"
                }
            );
            let _ = writeln!(v, "    first:  {}", ia.lines.join("\n            "));
            let _ = writeln!(v, "    second: {}", ib.lines.join("\n            "));
            let between: Vec<&str> = lines
                .iter()
                .filter(|l| {
                    l.pid == driver_pid && l.t >= a.attempt.min(b.attempt) && l.t <= b.start
                })
                .filter(|l| !matches!(l.event.as_str(), "spawn" | "exit" | "stderr" | "release"))
                .map(|l| l.raw.as_str())
                .collect();
            let _ = write!(v, "    nemesis in between: {between:?}");
            report.violations.push(v);
        }
    }

    // Refusals name a live holder.
    for inc in &incs {
        let refusal = match inc.kind {
            Kind::Library => inc
                .refused
                .as_ref()
                .map(|(t, h)| (inc.attempt.unwrap_or(inc.born), *t, h.clone())),
            Kind::Cli => {
                let code75 = inc.exit_how.as_deref() == Some("code=75");
                let named = inc.stderr.as_deref().and_then(|s| {
                    let at = s.find("already running (pid ")? + "already running (pid ".len();
                    let digits: String = s[at..].chars().take_while(char::is_ascii_digit).collect();
                    Some(digits)
                });
                match (code75, named, inc.stderr.as_deref()) {
                    (true, Some(pid), _) => Some((inc.born, inc.exit.unwrap_or(u64::MAX), pid)),
                    (true, None, Some(s)) if s.contains("already running") => {
                        Some((inc.born, inc.exit.unwrap_or(u64::MAX), "unknown".into()))
                    }
                    _ => None,
                }
            }
            Kind::Command => None,
        };
        let Some((from, to, named)) = refusal else {
            continue;
        };
        let Ok(named_pid) = named.parse::<u32>() else {
            bump(&mut report, "refused naming no holder (unknown)".into());
            continue;
        };
        let alive = lives
            .get(&named_pid)
            .is_some_and(|ls| ls.iter().any(|&(b, e)| b <= to && e >= from));
        if !alive {
            report.violations.push(format!(
                "REFUSED NAMING A HOLDER THAT WAS NOT ALIVE: pid {} ({:?}) was refused between {} and {} \
                 naming pid {named_pid}, which {}: {:?}",
                inc.pid,
                inc.kind,
                fmt_t(from),
                fmt_t(to),
                if lives.contains_key(&named_pid) {
                    "was not alive then"
                } else {
                    "the soak never started"
                },
                inc.lines
            ));
        }
    }

    // No crash.
    for inc in &incs {
        let how = inc.exit_how.as_deref().unwrap_or("");
        let crashed = how == "code=101" || (how.starts_with("signal=") && inc.killed.is_none());
        if crashed {
            report.violations.push(format!(
                "CRASHED: pid {} ({:?}) exited with {how} (no SIGKILL from the soak): {:?}",
                inc.pid, inc.kind, inc.lines
            ));
        }
        if let Some(how) = &inc.exit_how {
            bump(&mut report, format!("exit {:?} {how}", inc.kind));
        }
        // No false error under churn: an error status (64 to 78) is never a right answer here,
        // where every copy may only acquire or be refused (75), or stop after a loss or find
        // no usable backend with the bus killed (69): not 70 (an I/O or bus error), nor 64
        // ("not a lock file", a review saw one under churn), 77 or 78 (an unsafe path). COMMAND
        // (`soak_holder --command`) has no status of that range but 70.
        let false_code = how
            .strip_prefix("code=")
            .and_then(|code| code.parse::<i32>().ok())
            .filter(|&code| match inc.kind {
                Kind::Command => code == 70,
                _ => (64..=78).contains(&code) && code != 69 && code != 75,
            });
        if let Some(code) = false_code {
            let said = format!(
                "{} {}",
                inc.lines.join(" "),
                inc.stderr.as_deref().unwrap_or("")
            );
            let cause = if said.contains("bus") {
                "a bus error"
            } else if said.contains("lock file") || said.contains("lock directory") {
                "a lock-file error"
            } else {
                "another error"
            };
            bump(&mut report, format!("false error (exit {code}): {cause}"));
            report.violations.push(format!(
                "FALSE ERROR: pid {} ({:?}) exited {code} ({cause}), where the only right \
                 answers are acquired or already running: {:?}; stderr: {}",
                inc.pid,
                inc.kind,
                inc.lines,
                inc.stderr.as_deref().unwrap_or("")
            ));
        }
    }
    report.incarnations = incs;
    report
}

impl Report {
    fn summary(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.stats {
            let _ = writeln!(s, "  {k}: {v}");
        }
        let false_errors: u64 = self
            .stats
            .iter()
            .filter(|(k, _)| k.starts_with("false error"))
            .map(|(_, v)| v)
            .sum();
        let _ = writeln!(
            s,
            "  false errors (exit 64 to 78 but 69 and 75), all causes: {false_errors}"
        );
        let max = self.explained.iter().map(|e| e.2).max().unwrap_or(0);
        let unreported = self.explained.iter().filter(|e| !e.3).count();
        let _ = writeln!(
            s,
            "  overlaps explained by a deleted lock file: {} (longest {:.3} ms; {unreported} whose \
             first holder ended its belief without having reported a loss)",
            self.explained.len(),
            max as f64 / 1e6
        );
        for (kind, n) in &self.explained_by {
            let _ = writeln!(s, "    of which after {kind}: {n}");
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The tests.

fn env_u64(key: &str) -> Option<u64> {
    let v = std::env::var(key).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{key}={v:?} is not a number")),
    )
}

/// The soak itself: `UNIQUE_INSTANCE_SOAK_SEED`, `_STEPS`, `_SECS`, `_LOG` (see module docs).
#[test]
fn soak_never_two_holders_and_refusals_name_live_holders() {
    // `UNIQUE_INSTANCE_SOAK_CHECK=LOG`: check a kept log again (a newer checker, an old run).
    if let Some(kept) = std::env::var_os("UNIQUE_INSTANCE_SOAK_CHECK") {
        let text = std::fs::read_to_string(&kept).expect("read the log to check");
        let driver = parse_log(&text)
            .0
            .iter()
            .find(|l| l.event == "spawn")
            .map(|l| l.pid)
            .expect("a soak log: no `spawn` line");
        let report = check(&text, driver);
        eprintln!("soak: {}\n{}", Path::new(&kept).display(), report.summary());
        assert!(
            report.violations.is_empty(),
            "{} violation(s) in {}:\n\n{}",
            report.violations.len(),
            Path::new(&kept).display(),
            report.violations.join("\n\n")
        );
        return;
    }
    let seed = env_u64("UNIQUE_INSTANCE_SOAK_SEED").unwrap_or_else(|| {
        // A fresh seed each run explores more; it is printed, so any run can be replayed.
        now_ns() ^ u64::from(std::process::id()).rotate_left(32)
    });
    let steps = env_u64("UNIQUE_INSTANCE_SOAK_STEPS").unwrap_or(DEFAULT_STEPS);
    let secs = env_u64("UNIQUE_INSTANCE_SOAK_SECS").unwrap_or(DEFAULT_SECS);
    let dir = tempfile::Builder::new()
        .prefix("unique-instance-soak-")
        .tempdir()
        .expect("tempdir");
    let log_path = std::env::var_os("UNIQUE_INSTANCE_SOAK_LOG")
        .map_or_else(|| dir.path().join("soak.log"), PathBuf::from);
    let faults = std::env::var("UNIQUE_INSTANCE_SOAK_FAULTS")
        .map(|f| format!("UNIQUE_INSTANCE_SOAK_FAULTS={f} "))
        .unwrap_or_default();
    let replay = format!(
        "{faults}UNIQUE_INSTANCE_SOAK_SEED={seed} UNIQUE_INSTANCE_SOAK_STEPS={steps} \
         UNIQUE_INSTANCE_SOAK_SECS={secs} ./scripts/test --test soak -- --nocapture"
    );
    eprintln!(
        "soak: seed {seed}, up to {steps} steps / {secs} s; log {}",
        log_path.display()
    );

    let mut driver = Driver::new(dir.path(), &log_path);
    driver.start_bus();
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut done = 0u64;
    while done < steps && started.elapsed() < Duration::from_secs(secs) {
        let action = Action::draw(&mut rng);
        let pause = draw_pause(&mut rng);
        driver.step(action);
        done += 1;
        if done.is_multiple_of(10_000) {
            eprintln!("soak: {done} steps, {:?}", started.elapsed());
        }
        std::thread::sleep(pause);
    }
    let stuck = driver.finish();
    let text = std::fs::read_to_string(&log_path).expect("read the soak log");
    let report = check(&text, std::process::id());
    eprintln!(
        "soak: seed {seed}: {done} steps in {:?}\n{}",
        started.elapsed(),
        report.summary()
    );
    // Without any action the soak proves nothing: it must have exercised the instance.
    assert!(
        report.stats.get("acquired Library").copied().unwrap_or(0) > 0
            && report.stats.get("refused").copied().unwrap_or(0) > 0,
        "the soak did not exercise the instance (seed {seed}):\n{}",
        report.summary()
    );
    if !report.violations.is_empty() || !stuck.is_empty() {
        let kept = dir.keep();
        panic!(
            "soak found {} violation(s) with seed {seed} after {done} steps.\nReplay: {replay}\n\
             Log: {} (kept in {})\n\n{}\n{}\n\nSummary:\n{}",
            report.violations.len() + stuck.len(),
            log_path.display(),
            kept.display(),
            report.violations.join("\n\n"),
            stuck.join("\n"),
            report.summary()
        );
    }
}

/// The checker is not blind: two real copies locking *different* files (a lock directory each,
/// no bus) both believe at once, and the checker says so. Against the same directory it finds
/// nothing.
#[test]
fn checker_catches_two_real_holders_of_different_lock_files() {
    for separate in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("soak.log");
        let mut driver = Driver::new(dir.path(), &log_path);
        let env = Env {
            scope_option: Some("user"),
            scope_env: None,
            backend: "lockfile",
            session: BusChoice::Unset,
            system_live: false,
            runtime_dir: RuntimeDir::Unset,
            invocation_id: false,
        };
        for i in 0..2 {
            let (mut cmd, what) = driver.library_command(&env, Wait::No, None, false);
            if separate {
                cmd.env(
                    "UNIQUE_INSTANCE_LOCK_DIR",
                    dir.path().join(format!("locks-{i}")),
                );
            }
            let copy = driver.spawn(cmd, &what);
            driver.slots[i] = Some(copy);
            // The first holds before the second starts: wait for its line in the log.
            wait_for_lines(&log_path, i + 1, &["acquired", "refused"]);
        }
        let _ = driver.finish();
        let report = check(
            &std::fs::read_to_string(&log_path).expect("log"),
            std::process::id(),
        );
        if separate {
            assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
            assert!(
                report.violations[0].starts_with("TWO HOLDERS AT ONCE"),
                "{}",
                report.violations[0]
            );
        } else {
            assert!(report.violations.is_empty(), "{:#?}", report.violations);
            assert_eq!(
                report.stats.get("refused"),
                Some(&1),
                "{}",
                report.summary()
            );
        }
    }
}

/// Waits (inotify on the log, no sleeping) until `count` lines with one of `events` are in it.
fn wait_for_lines(log: &Path, count: usize, events: &[&str]) {
    use rustix::fs::inotify;
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC).expect("inotify");
    inotify::add_watch(&fd, log, inotify::WatchFlags::MODIFY).expect("watch the log");
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let seen = text
            .lines()
            .filter(|l| l.split(' ').nth(2).is_some_and(|e| events.contains(&e)))
            .count();
        if seen >= count {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {count} of {events:?} in the log within {:?}:\n{text}",
            common::TIMEOUT
        );
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&fd, &mut buf);
        let _ = reader.next();
    }
}

/// The checker's rules on hand-written logs: an overlap with no deletion is reported with both
/// histories; one after a deletion, with no shared live bus, is explained; a refusal naming a
/// PID that had exited is reported; a panic is reported.
#[test]
fn checker_rules_on_written_logs() {
    let d = 1;
    let log = |lines: &[&str]| lines.join("\n") + "\n";
    let two = log(&[
        "1.000000000 1 spawn pid=10 kind=lib bus=-",
        "1.100000000 10 attempt",
        "1.200000000 10 acquired backends=[LockFile] bus=None",
        "1.300000000 1 spawn pid=11 kind=lib bus=-",
        "1.400000000 11 attempt",
        "1.500000000 11 acquired backends=[LockFile] bus=None",
        "1.600000000 10 releasing why=done",
        "1.700000000 11 releasing why=done",
        "1.800000000 1 exit pid=10 code=0",
        "1.900000000 1 exit pid=11 code=0",
    ]);
    let r = check(&two, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("TWO HOLDERS AT ONCE for 100.000 ms"),
        "{}",
        r.violations[0]
    );
    assert!(r.violations[0].contains("pid 10") && r.violations[0].contains("pid 11"));

    // The first one's lock file deleted: explained, as long as it tells the loss (here its
    // release finds it).
    let unreported = two.replace(
        "1.300000000 1 spawn",
        "1.250000000 1 rm-lock holders=10\n1.300000000 1 spawn",
    );
    let deleted = unreported.replace(
        "1.600000000 10 releasing why=done",
        "1.600000000 10 releasing why=done\n1.650000000 10 lost-at-release msg=lost",
    );
    let r = check(&deleted, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    assert_eq!(r.explained.len(), 1);
    // Never told, though not killed: the deletion explains the overlap, not the silence.
    let r = check(&unreported, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("A TAKEN LOCK NEVER REPORTED")
            && r.violations[0].contains("pid 10"),
        "{}",
        r.violations[0]
    );
    // Told by the watch (`lost`), or killed before it could: fine. Killed only after a clean
    // release: not.
    for (told, ok) in [
        (
            "1.550000000 10 lost reason=LockFileRemoved still_exclusive=false",
            true,
        ),
        ("1.550000000 1 kill pid=10", true),
        ("1.650000000 10 released\n1.700000000 1 kill pid=10", false),
        // A loss told before the deletion is another loss.
        (
            "1.210000000 10 lost reason=BusConnectionClosed still_exclusive=true",
            false,
        ),
    ] {
        let log = unreported.replace(
            "1.600000000 10 releasing why=done",
            &format!("{told}\n1.600000000 10 releasing why=done"),
        );
        let r = check(&log, d);
        assert_eq!(r.violations.is_empty(), ok, "{told}: {:#?}", r.violations);
    }

    // A record naming nobody, or a dead copy, leaves it to the first one too.
    for holders in ["?", "", "99"] {
        let r = check(
            &deleted.replace("holders=10", &format!("holders={holders}")),
            d,
        );
        assert!(r.violations.is_empty(), "{holders}: {:#?}", r.violations);
    }
    // The deleted file was a live third copy's: the first one's lock was not taken, so the
    // second claimed a lock it should not have.
    let third = deleted.replace("holders=10", "holders=12").replace(
        "1.100000000 10 attempt",
        "1.050000000 1 spawn pid=12 kind=lib bus=-\n1.100000000 10 attempt",
    ) + "1.950000000 1 exit pid=12 code=0\n";
    let r = check(&third, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("TWO HOLDERS AT ONCE"),
        "{}",
        r.violations[0]
    );

    // The second one's own lock, taken before it logged `acquired`: a loss, not a claim.
    let seconds = deleted.replace("holders=10", "holders=11").replace(
        "1.250000000 1 rm-lock holders=11\n1.300000000 1 spawn pid=11 kind=lib bus=-\n1.400000000 11 attempt",
        "1.300000000 1 spawn pid=11 kind=lib bus=-\n1.400000000 11 attempt\n1.450000000 1 rm-lock holders=11",
    );
    assert!(
        seconds.contains("1.450000000 1 rm-lock holders=11"),
        "{seconds}"
    );
    let r = check(&seconds, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("A TAKEN LOCK NEVER REPORTED")
            && r.violations[0].contains("pid 11"),
        "{}",
        r.violations[0]
    );
    let seconds_told = seconds.replace(
        "1.700000000 11 releasing why=done",
        "1.700000000 11 releasing why=done\n1.750000000 11 lost-at-release msg=lost",
    );
    let r = check(&seconds_told, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);

    // Both on bus 0, which lived on: the bus should have refused one of them.
    let same_bus = deleted
        .replace("bus=-", "bus=0")
        .replace("backends=[LockFile]", "backends=[LockFile, Dbus]");
    let r = check(&same_bus, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("same live bus"),
        "{}",
        r.violations[0]
    );

    // SIGKILLed: the belief ends when the signal was sent, not at the exit.
    let killed = two.replace(
        "1.300000000 1 spawn",
        "1.250000000 1 kill pid=10\n1.300000000 1 spawn",
    );
    let r = check(&killed, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);

    // A COMMAND of `run` believes until its wrapper is killed.
    let command = log(&[
        "1.000000000 1 spawn pid=20 kind=cli bus=-",
        "1.100000000 21 acquired via=run wrapper=20 lock_fd=none",
        "1.200000000 1 spawn pid=30 kind=lib bus=-",
        "1.300000000 30 attempt",
        "1.400000000 30 acquired backends=[LockFile] bus=None",
        "1.500000000 1 kill pid=20",
        "1.600000000 1 exit pid=20 signal=9",
        "1.700000000 30 releasing why=done",
        "1.800000000 1 exit pid=30 code=0",
    ]);
    let r = check(&command, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("pid 21 (Command"),
        "{}",
        r.violations[0]
    );

    // A COMMAND whose lock file (its wrapper's record) was taken: told by its wrapper's SIGTERM
    // or, once it had ended, by the wrapper's exit 69; not by a clean exit 0.
    let taken_command = log(&[
        "1.000000000 1 spawn pid=20 kind=cli bus=-",
        "1.100000000 21 acquired via=run wrapper=20 lock_fd=3",
        "1.150000000 1 rm-lock holders=20",
        "1.200000000 1 spawn pid=30 kind=lib bus=-",
        "1.300000000 30 attempt",
        "1.400000000 30 acquired backends=[LockFile] bus=None",
        "1.500000000 21 releasing why=stdin",
        "1.600000000 30 releasing why=done",
        "1.700000000 1 exit pid=20 code=0",
        "1.800000000 1 exit pid=30 code=0",
    ]);
    let r = check(&taken_command, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("A TAKEN LOCK NEVER REPORTED")
            && r.violations[0].contains("pid 21"),
        "{}",
        r.violations[0]
    );
    for told in [
        taken_command.replace("pid=20 code=0", "pid=20 code=69"),
        taken_command.replace("why=stdin", "why=SIGTERM"),
    ] {
        let r = check(&told, d);
        assert!(r.violations.is_empty(), "{told}: {:#?}", r.violations);
    }

    let stale = log(&[
        "1.000000000 1 spawn pid=10 kind=lib bus=-",
        "1.100000000 1 exit pid=10 code=0",
        "1.200000000 1 spawn pid=11 kind=lib bus=-",
        "1.300000000 11 attempt",
        "1.400000000 11 refused holder=10",
        "1.500000000 1 exit pid=11 code=75",
    ]);
    let r = check(&stale, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(r.violations[0].contains("NOT ALIVE"), "{}", r.violations[0]);

    // A SIGKILLed wrapper's record names it while its COMMAND, holding a duplicate of the lock,
    // is still dying: the holder named lives on until the wrapper's stderr closes.
    let wrapper_gone = log(&[
        "1.000000000 1 spawn pid=20 kind=cli bus=-",
        "1.100000000 21 acquired via=run wrapper=20 lock_fd=3",
        "1.200000000 1 kill pid=20",
        "1.300000000 1 exit pid=20 signal=9",
        "1.310000000 1 spawn pid=30 kind=lib bus=-",
        "1.350000000 30 attempt",
        "1.360000000 30 refused holder=20",
        "1.400000000 1 eof pid=20",
        "1.500000000 1 exit pid=30 code=75",
    ]);
    let r = check(&wrapper_gone, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let r = check(
        &wrapper_gone.replace("1.400000000 1 eof", "1.340000000 1 eof"),
        d,
    );
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);

    // Its keeper, which names itself in the record once the wrapper died and says so on the
    // wrapper's stderr, counts as alive as long as the wrapper does; another PID does not.
    let keeper_named = wrapper_gone
        .replace("refused holder=20", "refused holder=25")
        .replace(
            "1.400000000 1 eof pid=20",
            "1.400000000 1 stderr pid=20 text=unique-instance: the wrapper is gone; its keeper \
             (pid 25) holds the instance while it stops COMMAND\n1.400000000 1 eof pid=20",
        );
    let r = check(&keeper_named, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let r = check(&keeper_named.replace("(pid 25)", "(pid 26)"), d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    // Or one that named itself, then found the lock file gone (in the soak: removed by the
    // nemesis just as the wrapper was killed) and said only that.
    let keeper_found_it_gone = keeper_named.replace(
        "the wrapper is gone; its keeper (pid 25) holds the instance while it stops COMMAND",
        "keeper (pid 25): the lock file /x.lock was removed or replaced and is not re-created",
    );
    let r = check(&keeper_found_it_gone, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);

    let panicked = log(&[
        "1.000000000 1 spawn pid=10 kind=lib bus=-",
        "1.100000000 1 exit pid=10 code=101",
    ]);
    let r = check(&panicked, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(r.violations[0].contains("CRASHED"), "{}", r.violations[0]);

    // An error where only "acquired" or "already running" is right: counted, and a failure.
    let false_error = log(&[
        "1.000000000 1 spawn pid=10 kind=lib bus=-",
        "1.100000000 10 attempt",
        "1.200000000 10 error exit=70 kind=Io msg=cannot open lock file /x/y.lock: No such file",
        "1.300000000 1 exit pid=10 code=70",
    ]);
    let r = check(&false_error, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("FALSE ERROR"),
        "{}",
        r.violations[0]
    );
    assert_eq!(
        r.stats.get("false error (exit 70): a lock-file error"),
        Some(&1),
        "{}",
        r.summary()
    );
    // "Not a lock file" (64) or an unsafe path (78) is as false; 69 (stopped after a loss, or
    // no backend with the bus killed) is not.
    for (code, false_error) in [(64, true), (78, true), (69, false)] {
        let ended = log(&[
            "1.000000000 1 spawn pid=10 kind=lib bus=-",
            "1.100000000 10 attempt",
            format!("1.200000000 10 error exit={code} kind=X msg=lock file /x/y.lock").as_str(),
            format!("1.300000000 1 exit pid=10 code={code}").as_str(),
        ]);
        let r = check(&ended, d);
        assert_eq!(
            r.violations.iter().any(|v| v.contains("FALSE ERROR")),
            false_error,
            "exit {code}: {:#?}",
            r.violations
        );
    }
}

/// A removal takes time: one that began just before a copy's attempt was logged and ended
/// after it may have taken that copy's file, and explains the overlap that follows (three long
/// runs reported such overlaps as unexplained while the removal was taken as its first
/// instant). One that had ended before the copy began trying explains nothing.
#[test]
fn checker_takes_a_removal_as_the_time_it_took() {
    let d = 1;
    let log = |lines: &[&str]| lines.join("\n") + "\n";
    let during_attempt = log(&[
        "1.000000000 1 spawn pid=11 kind=lib bus=-",
        "1.390000000 1 rm-dir ended=1.420000000 removed=true holders=11",
        "1.400000000 11 attempt",
        "1.410000000 11 acquired backends=[LockFile] bus=None",
        "1.420000000 1 spawn pid=12 kind=lib bus=-",
        "1.430000000 12 attempt",
        "1.440000000 12 acquired backends=[LockFile] bus=None",
        "1.450000000 11 lost msg=LockFileRemoved",
        "1.460000000 11 releasing why=lost",
        "1.500000000 12 releasing why=done",
        "1.600000000 1 exit pid=11 code=69",
        "1.700000000 1 exit pid=12 code=0",
    ]);
    let r = check(&during_attempt, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    assert_eq!(r.explained.len(), 1, "{}", r.summary());

    // Ended before the copy's attempt: it cannot have taken the file the copy then made.
    let before_attempt = during_attempt.replace("ended=1.420000000", "ended=1.395000000");
    let r = check(&before_attempt, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("TWO HOLDERS AT ONCE"),
        "{}",
        r.violations[0]
    );
    // A log without `ended=` (written before it was) reads the removal as one instant.
    let instant = during_attempt.replace("ended=1.420000000 ", "");
    let r = check(&instant, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
}

/// A removal whose file's record still named the copy before (alive: a stopped holder) took the
/// lock of a copy that had just taken that file over and not written its own record yet: the
/// file itself (`DEV:INO`, logged by the nemesis and by each copy at its acquisition) says whose
/// it was (a long run, seed 20261213, reported such an overlap as two holders at once).
#[test]
fn checker_knows_a_removed_file_by_its_inode_too() {
    let d = 1;
    let log = |lines: &[&str]| lines.join("\n") + "\n";
    let taken_over = log(&[
        "1.000000000 1 spawn pid=10 kind=lib bus=-",
        "1.010000000 10 attempt",
        "1.020000000 10 acquired backends=[LockFile] bus=None file=5:100",
        "1.030000000 1 stop pid=10",
        "1.040000000 1 spawn pid=11 kind=lib bus=-",
        "1.050000000 11 attempt",
        "1.060000000 1 spawn pid=12 kind=lib bus=-",
        "1.070000000 12 attempt",
        "1.100000000 1 rm-lock ended=1.100100000 holders=10 files=5:200",
        "1.101000000 11 acquired backends=[LockFile] bus=None file=5:200",
        "1.102000000 12 acquired backends=[LockFile] bus=None file=5:300",
        "1.150000000 11 lost reason=LockFileReplaced still_exclusive=false",
        "1.151000000 11 releasing why=lost",
        "1.160000000 1 kill pid=10",
        "1.170000000 1 exit pid=10 signal=9",
        "1.200000000 12 releasing why=done",
        "1.300000000 1 exit pid=11 code=0",
        "1.400000000 1 exit pid=12 code=0",
    ]);
    let r = check(&taken_over, d);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    // 10 (stopped, by its record) with each of 11 and 12; 11 (by its file) with 12.
    assert_eq!(r.explained.len(), 3, "{}", r.summary());
    // Another file removed: nothing explains the overlap.
    let other_file = taken_over.replace("files=5:200", "files=5:999");
    let r = check(&other_file, d);
    assert_eq!(r.violations.len(), 1, "{:#?}", r.violations);
    assert!(
        r.violations[0].contains("TWO HOLDERS AT ONCE"),
        "{}",
        r.violations[0]
    );
}
