//! The benchmark suite: unique-instance against the references people would use instead
//! (libsystemd's sd-bus, a C `open`+`flock`, util-linux `flock(1)`), measured in the same run,
//! interleaved, and reported as ratios.
//!
//! ```text
//! ./scripts/bench            # full run (~10 minutes): prints the table, writes BENCHMARKS.md
//!                            # and benches/takeover.svg
//! ./scripts/bench --quick    # a few iterations of everything; checks the harness's own
//!                            # invariants (exactly one copy ran in each storm, ...), never timings
//! ```
//!
//! The harness starts its own `dbus-daemon` and re-runs itself with that bus as the session bus,
//! so nothing of yours is touched. See BENCHMARKS.md for what each figure means.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use unique_instance::{Backend, InstanceOptions};

/// Set in the re-run child: the private bus is already in place.
const INNER_ENV: &str = "UNIQUE_INSTANCE_BENCH_INNER";
/// Exit status of a refused copy (the CLI's default for "already running").
const EXIT_CONFLICT: i32 = 75;

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; anything we do not know is ignored like libtest would.
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::var_os(INNER_ENV).is_none() {
        return run_outer();
    }
    let config = Config::new(quick)?;
    let report = run_all(&config)?;
    print!("{}", report.table());
    if quick {
        println!("quick run: invariants held; timings are not checked, and nothing was written");
    } else {
        report.write_files(&config)?;
    }
    Ok(())
}

/// Starts a private bus and lock directory, and runs this program again inside them.
fn run_outer() -> Result<()> {
    let bus = common::DbusDaemon::start(common::BusConfig::Open);
    // Lock directories live on tmpfs in real deployments (/run/user/UID, /run/lock). On a disk
    // file system, creating and removing the lock file waits for the journal whenever something
    // else writes to the disk (a build next door made acquisition 10x slower and noisy).
    let lock_dir = tempfile::Builder::new()
        .prefix("unique-instance-bench")
        .tempdir_in(tmpfs_dir())?;
    let status = Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(INNER_ENV, "1")
        .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
        .env("UNIQUE_INSTANCE_LOCK_DIR", lock_dir.path())
        .env_remove("RUST_LOG")
        .status()
        .context("cannot run the benchmark under the private bus")?;
    ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}

/// `/dev/shm` when it is a tmpfs, else the usual temporary directory.
fn tmpfs_dir() -> PathBuf {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let shm = Path::new("/dev/shm");
    match fs_type(shm) {
        Some(TMPFS_MAGIC) => shm.to_owned(),
        _ => std::env::temp_dir(),
    }
}

/// The file system type of `path`, for the report.
fn fs_name(path: &Path) -> &'static str {
    match fs_type(path) {
        Some(0x0102_1994) => "tmpfs",
        Some(0xEF53) => "ext2/3/4",
        Some(0x5846_5342) => "xfs",
        Some(0x9123_683E) => "btrfs",
        Some(0x794C_7630) => "overlayfs",
        _ => "another file system",
    }
}

// `f_type` is i64 here and narrower on other architectures.
#[allow(clippy::unnecessary_cast)]
fn fs_type(path: &Path) -> Option<i64> {
    rustix::fs::statfs(path).ok().map(|fs| fs.f_type as i64)
}

/// Iteration counts, the programs under test and the references.
struct Config {
    /// Rounds of interleaved in-process acquisitions, and acquisitions per round and kind.
    acquire_rounds: usize,
    acquire_batch: usize,
    takeover_trials: usize,
    storm_rounds: usize,
    storm_copies: usize,
    idle: Duration,
    cli: PathBuf,
    server: PathBuf,
    sdbus_ref: PathBuf,
    flock_ref: PathBuf,
    flock_checked_ref: PathBuf,
    /// A static-pie build of the CLI (see scripts/bench), measured in the storm when given.
    static_cli: Option<PathBuf>,
    flock: PathBuf,
    work: tempfile::TempDir,
}

impl Config {
    fn new(quick: bool) -> Result<Self> {
        // The CLI is another package's binary (cli/), built into the same target directory:
        // `target/<profile>/`, above this benchmark's `deps/`.
        let profile_dir = std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("the benchmark runs outside target/<profile>/deps")?
            .to_path_buf();
        let cli = profile_dir.join("unique-instance");
        ensure!(
            cli.is_file(),
            "{} is missing: build it first, in this profile, with `cargo build -p unique-instance-cli` \
             (./scripts/bench does)",
            cli.display()
        );
        let server = profile_dir.join("examples").join("server");
        ensure!(
            server.is_file(),
            "{} is missing: build it first with `cargo build --release --example server` \
             (./scripts/bench does)",
            server.display()
        );
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/reference");
        let sdbus_ref = build_c(
            &refs.join("sdbus_acquire.c"),
            &out.join("sdbus_acquire"),
            true,
        )?;
        let flock_ref = build_c(
            &refs.join("flock_acquire.c"),
            &out.join("flock_acquire"),
            false,
        )?;
        let flock_checked_ref = build_c(
            &refs.join("flock_checked.c"),
            &out.join("flock_checked"),
            false,
        )?;
        let static_cli = std::env::var_os("UNIQUE_INSTANCE_BENCH_STATIC_CLI").map(PathBuf::from);
        let flock = common::require_program("flock", "util-linux");
        common::require_program("sh", "dash");
        common::require_program("sleep", "coreutils");
        common::require_program("strip", "binutils");
        Ok(Config {
            acquire_rounds: if quick { 2 } else { 100 },
            acquire_batch: if quick { 5 } else { 25 },
            takeover_trials: if quick { 5 } else { 250 },
            storm_rounds: if quick { 2 } else { 30 },
            storm_copies: 64,
            idle: Duration::from_secs(if quick { 2 } else { 30 }),
            cli,
            server,
            sdbus_ref,
            flock_ref,
            flock_checked_ref,
            static_cli,
            flock,
            work: tempfile::Builder::new()
                .prefix("unique-instance-bench")
                .tempdir_in(tmpfs_dir())?,
        })
    }
}

/// Compiles a C reference with the system compiler (and libsystemd when asked).
fn build_c(source: &Path, out: &Path, libsystemd: bool) -> Result<PathBuf> {
    common::require_program("cc", "gcc");
    let mut cmd = Command::new("cc");
    cmd.args(["-O2", "-Wall", "-o"]).arg(out).arg(source);
    if libsystemd {
        common::require_program("pkg-config", "pkg-config");
        let flags = Command::new("pkg-config")
            .args(["--cflags", "--libs", "libsystemd"])
            .output()?;
        ensure!(
            flags.status.success(),
            "pkg-config cannot find libsystemd: install it with `apt-get install -y libsystemd-dev`"
        );
        cmd.args(String::from_utf8(flags.stdout)?.split_whitespace());
    }
    let status = cmd.status()?;
    ensure!(status.success(), "cannot compile {}", source.display());
    Ok(out.to_owned())
}

// ---------------------------------------------------------------------------------------------
// Statistics

/// A set of samples, in nanoseconds.
#[derive(Debug, Clone, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as f64);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        // Nearest rank: the smallest sample with at least q of the samples at or below it.
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    }

    fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    fn p99(&self) -> f64 {
        self.quantile(0.99)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns.is_nan() {
        "-".into()
    } else if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

// ---------------------------------------------------------------------------------------------
// The report

/// One line of the table: a measured series, and the reference it is compared with.
struct Row {
    section: &'static str,
    what: String,
    ours: Samples,
    reference: Option<(String, Samples)>,
    /// The goal, as text, and whether it holds (None: reported only).
    goal: Option<(String, bool)>,
}

/// A line of the idle/memory/size tables: free text cells.
struct Fact {
    what: String,
    value: String,
    reference: String,
    goal: Option<(String, bool)>,
}

struct Report {
    rows: Vec<Row>,
    facts: Vec<Fact>,
    takeover: Vec<(String, Samples)>,
    notes: Vec<String>,
    started: std::time::SystemTime,
    elapsed: Duration,
}

impl Report {
    fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| measurement | ours: median | p99 | reference | ref: median | p99 | ratio (median) | goal |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let (ref_name, ref_med, ref_p99, ratio) = match &row.reference {
                Some((name, r)) => (
                    name.as_str(),
                    fmt_ns(r.median()),
                    fmt_ns(r.p99()),
                    format!("{:.2}×", row.ours.median() / r.median()),
                ),
                None => ("", "-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                s,
                "| {}: {} (n={}) | {} | {} | {} | {} | {} | {} | {} |",
                row.section,
                row.what,
                row.ours.len(),
                fmt_ns(row.ours.median()),
                fmt_ns(row.ours.p99()),
                ref_name,
                ref_med,
                ref_p99,
                ratio,
                goal_cell(&row.goal),
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "| measurement | ours | reference | goal |");
        let _ = writeln!(s, "|---|---|---|---|");
        for f in &self.facts {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                f.what,
                f.value,
                f.reference,
                goal_cell(&f.goal)
            );
        }
        for note in &self.notes {
            let _ = writeln!(s, "\n{note}");
        }
        s
    }

    fn write_files(&self, config: &Config) -> Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let svg = plot_takeover(&self.takeover);
        std::fs::write(root.join("benches/takeover.svg"), svg)?;
        let template = std::fs::read_to_string(root.join("benches/BENCHMARKS.md.in"))?;
        let machine = machine_description();
        let text = template
            .replace("@DATE@", &rfc3339(self.started))
            .replace("@MACHINE@", &machine)
            .replace(
                "@DURATION@",
                &format!("{:.0} s", self.elapsed.as_secs_f64()),
            )
            .replace(
                "@SETTINGS@",
                &format!(
                    "{} rounds × {} in-process acquisitions per kind, {} take-over trials per \
                     series, {} storms of {} copies per tool, {} s idle; lock files on {}",
                    config.acquire_rounds,
                    config.acquire_batch,
                    config.takeover_trials,
                    config.storm_rounds,
                    config.storm_copies,
                    config.idle.as_secs(),
                    fs_name(config.work.path()),
                ),
            )
            .replace("@TABLE@", &self.table());
        std::fs::write(root.join("BENCHMARKS.md"), text)?;
        println!("wrote BENCHMARKS.md and benches/takeover.svg");
        Ok(())
    }
}

fn goal_cell(goal: &Option<(String, bool)>) -> String {
    match goal {
        Some((text, true)) => format!("{text}: **met**"),
        Some((text, false)) => format!("{text}: **not met**"),
        None => "-".into(),
    }
}

/// `2026-11-23T10:00:00Z`: the run's date as the library writes a holder's start time.
fn rfc3339(time: std::time::SystemTime) -> String {
    let mut holder = unique_instance::Holder::default();
    holder.since = Some(time);
    holder.since_rfc3339().unwrap_or_default()
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let uname = rustix::system::uname();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let dbus = Command::new("dbus-daemon")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores; Linux {}; {dbus}; load average at the end: {}",
        uname.release().to_string_lossy(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Everything

fn run_all(config: &Config) -> Result<Report> {
    let started = std::time::SystemTime::now();
    let t0 = Instant::now();
    let mut report = Report {
        rows: Vec::new(),
        facts: Vec::new(),
        takeover: Vec::new(),
        notes: Vec::new(),
        started,
        elapsed: Duration::ZERO,
    };
    eprintln!("== acquire (in process)");
    acquire(config, &mut report)?;
    eprintln!("== take-over");
    takeover(config, &mut report)?;
    eprintln!("== start-up storm");
    storm(config, &mut report)?;
    eprintln!("== idle cost, memory, size");
    idle_and_memory(config, &mut report)?;
    report.elapsed = t0.elapsed();
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// 1-3. Acquire, in process

/// Runs a C reference for `n` iterations and collects its per-iteration times.
fn run_reference(program: &Path, args: &[&str]) -> Result<Samples> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "{} failed", program.display());
    let mut samples = Samples::default();
    for line in String::from_utf8(out.stdout)?.lines() {
        samples.push(Duration::from_nanos(line.trim().parse()?));
    }
    Ok(samples)
}

fn acquire(config: &Config, report: &mut Report) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sdbus = Samples::default();
    let mut dbus_async = Samples::default();
    let mut dbus_blocking = Samples::default();
    let mut auto_async = Samples::default();
    let mut auto_blocking = Samples::default();
    let mut c_flock = Samples::default();
    let mut c_checked = Samples::default();
    let mut lock_blocking = Samples::default();
    let n = config.acquire_batch;
    let c_lock_path = config.work.path().join("c-reference.lock");
    let c_lock_path = c_lock_path.to_str().context("non-UTF-8 temp path")?;
    let c_lock_dir = config.work.path().to_str().context("non-UTF-8 temp path")?;
    // Untimed warm-up of every path, so that first-use costs (page faults, the dynamic
    // loader's lazy binding) are not charged to whichever kind runs first.
    for round in 0..=config.acquire_rounds {
        let sink = |samples: &mut Samples, s: Samples| {
            if round > 0 {
                samples.0.extend(s.0);
            }
        };
        let prefix = format!("org.uibench.Acquire.r{round}");
        sink(
            &mut sdbus,
            run_reference(&config.sdbus_ref, &[&n.to_string(), &format!("{prefix}.c")])?,
        );
        sink(
            &mut dbus_async,
            in_process(&rt, n, &format!("{prefix}.da"), Some(Backend::Dbus), false)?,
        );
        sink(
            &mut auto_async,
            in_process(&rt, n, &format!("{prefix}.aa"), None, false)?,
        );
        sink(
            &mut dbus_blocking,
            in_process(&rt, n, &format!("{prefix}.db"), Some(Backend::Dbus), true)?,
        );
        sink(
            &mut auto_blocking,
            in_process(&rt, n, &format!("{prefix}.ab"), None, true)?,
        );
        sink(
            &mut c_flock,
            run_reference(&config.flock_ref, &[&n.to_string(), c_lock_path])?,
        );
        sink(
            &mut lock_blocking,
            in_process(
                &rt,
                n,
                &format!("{prefix}.lb"),
                Some(Backend::LockFile),
                true,
            )?,
        );
        sink(
            &mut c_checked,
            run_reference(
                &config.flock_checked_ref,
                &[&n.to_string(), c_lock_dir, "c-checked.lock"],
            )?,
        );
    }
    let sd = "sd-bus (C): sd_bus_open_user + sd_bus_request_name";
    let ratio = |a: &Samples, b: &Samples| a.median() / b.median();
    let goal_dbus = ratio(&dbus_async, &sdbus) <= 1.0;
    report.rows.push(Row {
        section: "1. acquire, D-Bus",
        what: "acquire_async() (tokio current-thread runtime already running)".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: Some(("median ≤ 1.0× sd-bus".into(), goal_dbus)),
        ours: dbus_async,
    });
    report.rows.push(Row {
        section: "1. acquire, D-Bus",
        what: "acquire() (blocking: starts the guard's runtime too)".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: None,
        ours: dbus_blocking,
    });
    let goal_auto = ratio(&auto_async, &sdbus) <= 1.1;
    report.rows.push(Row {
        section: "2. acquire, Auto",
        what: "acquire_async(): lock file + bus name".into(),
        reference: Some((sd.into(), sdbus.clone())),
        goal: Some(("median ≤ 1.1× sd-bus".into(), goal_auto)),
        ours: auto_async,
    });
    report.rows.push(Row {
        section: "2. acquire, Auto",
        what: "acquire() (blocking)".into(),
        reference: Some((sd.into(), sdbus)),
        goal: None,
        ours: auto_blocking,
    });
    let goal_lock = ratio(&lock_blocking, &c_flock) <= 3.0 && lock_blocking.median() < 25_000.0;
    report.rows.push(Row {
        section: "3. acquire, lock file",
        what: "acquire() (no runtime is started for it)".into(),
        reference: Some(("C: open + flock + close".into(), c_flock)),
        goal: Some(("median ≤ 3× C and < 25 µs".into(), goal_lock)),
        ours: lock_blocking.clone(),
    });
    report.rows.push(Row {
        section: "3. acquire, lock file",
        what: "acquire(), against the same checks and record in C".into(),
        reference: Some((
            "C: the same system calls (flock_checked.c)".into(),
            c_checked,
        )),
        goal: None,
        ours: lock_blocking,
    });
    Ok(())
}

/// Acquires `n` distinct names in this process, timing each acquisition; releases untimed.
fn in_process(
    rt: &tokio::runtime::Runtime,
    n: usize,
    prefix: &str,
    // `None`: every backend that applies (the default).
    backend: Option<Backend>,
    blocking: bool,
) -> Result<Samples> {
    let mut samples = Samples::default();
    for i in 0..n {
        let mut options = InstanceOptions::new(format!("{prefix}.i{i}"));
        if let Some(backend) = backend {
            options = options.backend(backend);
        }
        if blocking {
            let start = Instant::now();
            let guard = options.acquire()?;
            samples.push(start.elapsed());
            ensure!(guard.backends().len() == expected_backends(backend));
            guard.release()?;
        } else {
            rt.block_on(async {
                let start = Instant::now();
                let guard = options.acquire_async().await?;
                samples.push(start.elapsed());
                ensure!(guard.backends().len() == expected_backends(backend));
                guard.release_async().await?;
                anyhow::Ok(())
            })?;
        }
    }
    Ok(samples)
}

fn expected_backends(backend: Option<Backend>) -> usize {
    if backend.is_none() { 2 } else { 1 }
}

// ---------------------------------------------------------------------------------------------
// 4. Take-over

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Series {
    LockFile,
    Dbus,
    Auto,
    Flock,
}

impl Series {
    fn label(self) -> &'static str {
        match self {
            Series::LockFile => "unique-instance run --backend lockfile",
            Series::Dbus => "unique-instance run --backend dbus",
            Series::Auto => "unique-instance run (auto: lock file + bus)",
            Series::Flock => "flock(1) -w",
        }
    }

    fn backend_arg(self) -> &'static str {
        match self {
            Series::LockFile => "lockfile",
            Series::Dbus => "dbus",
            _ => "auto",
        }
    }
}

/// Kills the child (SIGKILL) and reaps it; for clean-up paths.
fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn takeover(config: &Config, report: &mut Report) -> Result<()> {
    let series = [Series::Flock, Series::LockFile, Series::Dbus, Series::Auto];
    let mut samples: Vec<Samples> = vec![Samples::default(); series.len()];
    let bus = BusProbe::new()?;
    for trial in 0..config.takeover_trials {
        for (i, s) in series.iter().enumerate() {
            let d = takeover_once(config, &bus, *s, trial)
                .with_context(|| format!("take-over trial {trial} of {s:?}"))?;
            samples[i].push(d);
        }
    }
    let flock = samples[0].clone();
    for (i, s) in series.iter().enumerate().skip(1) {
        let ours = samples[i].clone();
        let holds = ours.median() <= 1.5 * flock.median() && ours.p99() <= 10e6;
        report.rows.push(Row {
            section: "4. take-over",
            what: format!("{}: holder SIGKILLed → waiter runs its command", s.label()),
            reference: Some((Series::Flock.label().into(), flock.clone())),
            goal: Some(("p50 ≤ 1.5× flock(1), p99 ≤ 10 ms".into(), holds)),
            ours,
        });
    }
    for (i, s) in series.iter().enumerate() {
        report
            .takeover
            .push((s.label().to_owned(), samples[i].clone()));
    }
    Ok(())
}

/// Asks the bus who is queued for a name, to know that a D-Bus waiter is waiting.
struct BusProbe {
    rt: tokio::runtime::Runtime,
    proxy: zbus::fdo::DBusProxy<'static>,
}

impl BusProbe {
    fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let proxy = rt.block_on(async {
            let conn = zbus::Connection::session().await?;
            zbus::fdo::DBusProxy::new(&conn).await
        })?;
        Ok(BusProbe { rt, proxy })
    }

    fn queued(&self, name: &str) -> usize {
        let Ok(name) = zbus::names::BusName::try_from(name) else {
            return 0;
        };
        self.rt
            .block_on(
                self.proxy
                    .list_queued_owners(name.try_into().expect("well-known")),
            )
            .map_or(0, |v| v.len())
    }
}

/// The system calls a waiter blocks in, as `/proc/PID/syscall` shows them: `flock` (flock(1))
/// and `fcntl(fd, F_OFD_SETLKW, ...)` (F_OFD_SETLKW is 38).
#[cfg(target_arch = "x86_64")]
const SYS_FLOCK: &str = "73";
#[cfg(target_arch = "x86_64")]
const SYS_FCNTL: &str = "72";
#[cfg(target_arch = "aarch64")]
const SYS_FLOCK: &str = "32";
#[cfg(target_arch = "aarch64")]
const SYS_FCNTL: &str = "25";

/// Is any thread of `pid` blocked waiting for a file lock?
fn blocked_on_lock(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        let call = std::fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
        let mut fields = call.split_whitespace();
        match (fields.next(), fields.nth(1)) {
            (Some(SYS_FLOCK), _) => true,
            (Some(SYS_FCNTL), Some(cmd)) => cmd == "0x26",
            _ => false,
        }
    })
}

/// Does `pid` have an inotify watch on `file` (a unique-instance waiter: it sleeps until inotify
/// reports the lock's release, see `wait_for_release`)? Read from `/proc/PID/fdinfo`, where each
/// watch is a line `inotify wd:N ino:HEX sdev:HEX ...`.
fn watches_file(pid: u32, file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = std::fs::metadata(file).map(|m| m.ino()) else {
        return false;
    };
    let needle = format!(" ino:{ino:x} ");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_to_string(fd.path()).is_ok_and(|info| {
            info.lines()
                .any(|l| l.starts_with("inotify") && l.contains(&needle))
        })
    })
}

/// Polls `ready` every 200 µs until it holds, for at most 30 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + common::TIMEOUT;
    while !ready() {
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

fn read_line(reader: &mut impl BufRead, what: &str) -> Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    ensure!(n > 0, "end of output while waiting for {what}");
    Ok(line.trim_end().to_owned())
}

/// One trial: a holder, a waiter that is verifiably waiting, SIGKILL to the holder, and the time
/// until the waiter's command prints.
fn takeover_once(
    config: &Config,
    bus: &BusProbe,
    series: Series,
    trial: usize,
) -> Result<Duration> {
    let name = format!("org.uibench.Takeover.{:?}.t{trial}", series);
    let flock_file = config.work.path().join(format!("{name}.flock"));
    let mut holder = match series {
        Series::Flock => {
            // The flock(1) idiom: the lock is on the shell's descriptor 9, which `sleep` keeps.
            let script = format!(
                "exec 9>>'{}'; {} 9; echo ready; exec sleep 600",
                flock_file.display(),
                config.flock.display()
            );
            let mut c = Command::new("sh");
            c.args(["-c", &script]);
            c
        }
        _ => {
            let mut c = Command::new(&config.cli);
            c.args(["run", "--backend", series.backend_arg(), &name, "--"])
                .args(["sh", "-c", "echo ready; exec sleep 600"]);
            c
        }
    }
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()?;
    let mut holder_out = BufReader::new(holder.stdout.take().context("stdout")?);
    let result = (|| {
        ensure!(read_line(&mut holder_out, "the holder")? == "ready");
        let mut waiter = match series {
            Series::Flock => {
                let mut c = Command::new(&config.flock);
                c.args(["-w", "30"])
                    .arg(&flock_file)
                    .args(["echo", "acquired"]);
                c
            }
            _ => {
                let mut c = Command::new(&config.cli);
                c.args([
                    "run",
                    "--wait",
                    "--backend",
                    series.backend_arg(),
                    &name,
                    "--",
                ])
                .args(["echo", "acquired"]);
                c
            }
        }
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
        let mut waiter_out = BufReader::new(waiter.stdout.take().context("stdout")?);
        let waited = (|| {
            let pid = waiter.id();
            match series {
                Series::Dbus => {
                    wait_until("the waiter is queued on the bus", || bus.queued(&name) >= 2)?
                }
                Series::Flock => {
                    wait_until("the waiter blocks on the lock", || blocked_on_lock(pid))?
                }
                _ => {
                    let lock_file = InstanceOptions::new(&name)
                        .backend(Backend::LockFile)
                        .plan()?
                        .lock_file
                        .context("no lock file planned")?;
                    wait_until("the waiter watches the lock file", || {
                        watches_file(pid, &lock_file)
                    })?
                }
            }
            let start = Instant::now();
            holder.kill()?;
            let line = read_line(&mut waiter_out, "the waiter's command")?;
            let elapsed = start.elapsed();
            ensure!(line == "acquired", "unexpected waiter output {line:?}");
            let status = waiter.wait()?;
            ensure!(status.success(), "the waiter failed: {status}");
            Ok(elapsed)
        })();
        kill(&mut waiter);
        waited
    })();
    kill(&mut holder);
    result
}

// ---------------------------------------------------------------------------------------------
// 5. Storm

fn storm(config: &Config, report: &mut Report) -> Result<()> {
    let mut auto = Samples::default();
    let mut lockfile = Samples::default();
    let mut flock = Samples::default();
    let mut static_auto = Samples::default();
    for round in 0..config.storm_rounds {
        flock.push(storm_once(config, &config.cli, None, round)?);
        auto.push(storm_once(config, &config.cli, Some("auto"), round)?);
        lockfile.push(storm_once(config, &config.cli, Some("lockfile"), round)?);
        if let Some(static_cli) = &config.static_cli {
            static_auto.push(storm_once(config, static_cli, Some("static"), round)?);
        }
    }
    let reference = format!("{} × flock -n FILE CMD", config.storm_copies);
    let mut kinds = vec![("--backend auto", auto), ("--backend lockfile", lockfile)];
    if config.static_cli.is_some() {
        kinds.push(("(static-pie build) --backend auto", static_auto));
    }
    for (what, ours) in kinds {
        let holds = ours.median() <= 1.5 * flock.median();
        report.rows.push(Row {
            section: "5. storm",
            what: format!(
                "{} × unique-instance run {what} NAME CMD: until all decided",
                config.storm_copies
            ),
            reference: Some((reference.clone(), flock.clone())),
            goal: Some(("median ≤ 1.5× flock(1)".into(), holds)),
            ours,
        });
    }
    Ok(())
}

/// Launches the copies at once; returns the time until every loser has exited and the winner's
/// command has started. Checks that exactly one ran and every other was refused.
fn storm_once(config: &Config, cli: &Path, kind: Option<&str>, round: usize) -> Result<Duration> {
    let name = format!("org.uibench.Storm.{}.r{round}", kind.unwrap_or("flock"));
    // "static" is the static build with the default backends.
    let backend = kind.map(|k| if k == "static" { "auto" } else { k });
    let flock_file = config.work.path().join(format!("{name}.flock"));
    // The winner's command says so, then holds until we close its stdin: every copy is refused
    // for as long as the storm lasts, so "exactly one ran" is a real check.
    let (stdin_read, stdin_write) = std::io::pipe()?;
    let (mut out_read, out_write) = std::io::pipe()?;
    let command = ["sh", "-c", "echo ran; read _ || true"];
    let conflict = if backend.is_some() { EXIT_CONFLICT } else { 1 };
    let mut children = Vec::with_capacity(config.storm_copies);
    let start = Instant::now();
    for _ in 0..config.storm_copies {
        let mut cmd = match backend {
            Some(b) => {
                let mut c = Command::new(cli);
                c.args(["run", "-q", "--backend", b, &name, "--"]);
                c
            }
            None => {
                let mut c = Command::new(&config.flock);
                c.arg("-n").arg(&flock_file);
                c
            }
        };
        cmd.args(command)
            .stdin(stdin_read.try_clone()?)
            .stdout(out_write.try_clone()?)
            .stderr(Stdio::null());
        children.push(cmd.spawn()?);
    }
    drop((stdin_read, out_write));
    // Losers exit; the winner prints "ran". Reap in exit order (wait for any child).
    let mut ran_at = None;
    let mut out = BufReader::new(out_read.try_clone()?);
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        let got = out.read_line(&mut line).ok().filter(|&n| n > 0);
        (got.map(|_| Instant::now()), line)
    });
    let mut refused = 0;
    let mut last_exit = start;
    while refused < config.storm_copies - 1 {
        let status = rustix::process::wait(rustix::process::WaitOptions::empty())?
            .context("no child left")?
            .1;
        let code = status.exit_status().context("a copy died of a signal")?;
        ensure!(
            code == conflict,
            "a copy exited {code} while the winner held the instance (expected {conflict})"
        );
        refused += 1;
        last_exit = Instant::now();
    }
    if let Ok((at, line)) = reader.join() {
        ensure!(line.trim() == "ran", "the winner printed {line:?}");
        ran_at = at;
    }
    let ran_at = ran_at.context("no copy ran")?;
    let decided = ran_at.max(last_exit) - start;
    // Let the winner go, and check that it was the only one that ran its command.
    drop(stdin_write);
    let status = rustix::process::wait(rustix::process::WaitOptions::empty())?
        .context("the winner is gone")?
        .1;
    ensure!(status.exit_status() == Some(0), "the winner failed");
    let mut rest = String::new();
    out_read.read_to_string(&mut rest)?;
    ensure!(rest.is_empty(), "more than one copy ran: {rest:?}");
    // Every child was reaped through wait(); the Child handles have nothing left to do.
    drop(children);
    Ok(decided)
}

// ---------------------------------------------------------------------------------------------
// 6-7. Idle cost, memory, size

/// Context switches (voluntary + involuntary, all threads) and CPU time (user + system) so far.
fn activity(pid: u32) -> Result<(u64, Duration)> {
    let mut switches = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>()?;
            }
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the 14th field overall.
    let after = stat.rsplit_once(')').context("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let hz = rustix::param::clock_ticks_per_second();
    Ok((switches, Duration::from_secs_f64(ticks as f64 / hz as f64)))
}

/// Peak resident set size (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmHWM")?
        .parse()?)
}

fn stripped_size(binary: &Path, work: &Path) -> Result<u64> {
    let copy = work.join(format!(
        "stripped-{}",
        binary
            .file_name()
            .context("no file name")?
            .to_string_lossy()
    ));
    let status = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(binary)
        .status()?;
    ensure!(status.success(), "strip failed on {}", binary.display());
    Ok(std::fs::metadata(&copy)?.len())
}

fn idle_and_memory(config: &Config, report: &mut Report) -> Result<()> {
    let flock_file = config.work.path().join("idle.flock");
    let ready_line = "echo ready; exec sleep 3600";
    let spawn = |mut c: Command| -> Result<(Child, BufReader<std::process::ChildStdout>)> {
        let mut child = c.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        Ok((child, out))
    };
    let mut wrapper_cmd = Command::new(&config.cli);
    wrapper_cmd.args([
        "run",
        "org.uibench.Idle.Wrapper",
        "--",
        "sh",
        "-c",
        ready_line,
    ]);
    let mut server_cmd = Command::new(&config.server);
    server_cmd.arg("org.uibench.Idle.Server");
    let mut flock_cmd = Command::new(&config.flock);
    flock_cmd.arg(&flock_file).args(["sh", "-c", ready_line]);
    let mut procs = vec![spawn(wrapper_cmd)?, spawn(server_cmd)?, spawn(flock_cmd)?];
    let result = (|| {
        for (_, out) in &mut procs {
            let line = read_line(out, "a ready line")?;
            ensure!(line.starts_with("ready"), "unexpected {line:?}");
        }
        // Let start-up finish (the wrapper's first records, the server's tracing output).
        std::thread::sleep(Duration::from_millis(300));
        let pids: Vec<u32> = procs.iter().map(|(c, _)| c.id()).collect();
        let before: Vec<_> = pids.iter().map(|&p| activity(p)).collect::<Result<_>>()?;
        std::thread::sleep(config.idle);
        let after: Vec<_> = pids.iter().map(|&p| activity(p)).collect::<Result<_>>()?;
        let rss: Vec<u64> = pids
            .iter()
            .map(|&p| peak_rss_kib(p))
            .collect::<Result<_>>()?;
        let secs = config.idle.as_secs();
        let describe = |i: usize| {
            format!(
                "{} wake-ups, {:.1} ms CPU",
                after[i].0 - before[i].0,
                (after[i].1 - before[i].1).as_secs_f64() * 1e3
            )
        };
        let flock_idle = describe(2);
        for (i, what) in [
            (0, "unique-instance run (auto)"),
            (1, "example server (auto, tokio)"),
        ] {
            report.facts.push(Fact {
                what: format!("6. idle {secs} s: {what}"),
                value: describe(i),
                reference: format!("flock(1): {flock_idle}"),
                goal: Some(("no periodic wake-ups".into(), after[i].0 == before[i].0)),
            });
        }
        report.facts.push(Fact {
            what: "7. peak RSS while holding: unique-instance run (auto)".into(),
            value: format!("{:.1} MiB", rss[0] as f64 / 1024.0),
            reference: format!("flock(1): {:.1} MiB", rss[2] as f64 / 1024.0),
            goal: Some(("≤ 8 MiB".into(), rss[0] <= 8 * 1024)),
        });
        report.facts.push(Fact {
            what: "7. peak RSS while holding: example server".into(),
            value: format!("{:.1} MiB", rss[1] as f64 / 1024.0),
            reference: String::new(),
            goal: None,
        });
        Ok(())
    })();
    for (child, _) in &mut procs {
        // SIGTERM first so that the holders release cleanly; then make sure.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(child.id() as i32).context("pid")?,
            rustix::process::Signal::TERM,
        );
    }
    for (child, _) in &mut procs {
        let _ = child.wait();
    }
    result?;
    let work = config.work.path();
    let cli_size = stripped_size(&config.cli, work)?;
    let server_size = stripped_size(&config.server, work)?;
    let flock_size = std::fs::metadata(&config.flock)?.len();
    let mib = |b: u64| format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0));
    report.facts.push(Fact {
        what: "7. stripped size: unique-instance (release profile)".into(),
        value: mib(cli_size),
        reference: format!("flock(1): {}", mib(flock_size)),
        goal: None,
    });
    if let Some(static_cli) = &config.static_cli {
        report.facts.push(Fact {
            what: "7. stripped size: unique-instance, static-pie build".into(),
            value: mib(stripped_size(static_cli, work)?),
            reference: format!("flock(1): {} (+ libc, shared)", mib(flock_size)),
            goal: None,
        });
    }
    report.facts.push(Fact {
        what: "7. stripped size: example server".into(),
        value: mib(server_size),
        reference: String::new(),
        goal: None,
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The plot

/// An SVG of the take-over latency distributions: one empirical CDF per series, log time axis.
fn plot_takeover(series: &[(String, Samples)]) -> String {
    let (w, h) = (820.0, 460.0);
    let (left, right, top, bottom) = (70.0, 40.0, 40.0, 150.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, s)| s.0.iter().copied())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    // A little room either side of the data, in log space.
    let (llo, lhi) = ((lo * 0.8).log10(), (hi * 1.25).log10());
    let x = |ns: f64| left + (ns.max(1.0).log10() - llo) / (lhi - llo) * pw;
    let y = |p: f64| top + (1.0 - p) * ph;
    let colours = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Take-over latency: holder SIGKILLed → waiter's command runs (ECDF)</text>"#,
        w / 2.0
    );
    // Axes and grid: one line per decade and at 2× and 5×.
    let mut decade = llo.floor();
    while decade <= lhi {
        for m in [1.0, 2.0, 5.0] {
            let ns = 10f64.powf(decade) * m;
            if ns.log10() > lhi || ns.log10() < llo {
                continue;
            }
            let xp = x(ns);
            let _ = writeln!(
                s,
                r##"<line x1="{xp:.1}" y1="{top}" x2="{xp:.1}" y2="{}" stroke="#dddddd"/>"##,
                top + ph
            );
            let _ = writeln!(
                s,
                r#"<text x="{xp:.1}" y="{}" text-anchor="middle">{}</text>"#,
                top + ph + 16.0,
                fmt_ns(ns)
            );
        }
        decade += 1.0;
    }
    for p in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let yp = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yp:.1}" x2="{}" y2="{yp:.1}" stroke="#dddddd"/>"##,
            left + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{p}</text>"#,
            left - 6.0,
            yp + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">latency (log scale)</text>"#,
        left + pw / 2.0,
        top + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">fraction of trials ≤ latency</text>"#,
        top + ph / 2.0
    );
    for (i, (label, samples)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let v = samples.sorted();
        let n = v.len() as f64;
        let mut path = String::new();
        for (k, ns) in v.iter().enumerate() {
            let (xp, y0, y1) = (x(*ns), y(k as f64 / n), y((k + 1) as f64 / n));
            let _ = write!(
                path,
                "{}{xp:.1},{y0:.1} L{xp:.1},{y1:.1} ",
                if k == 0 { "M" } else { "L" }
            );
        }
        let _ = writeln!(
            s,
            r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>"#
        );
        let ly = top + ph + 56.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            left + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{label}: p50 {}, p99 {} (n={})</text>"#,
            left + 32.0,
            ly + 4.0,
            fmt_ns(samples.median()),
            fmt_ns(samples.p99()),
            samples.len()
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}
