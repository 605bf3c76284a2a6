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
//!
//! This file is the harness (its configuration and the order of the runs); each measured kind
//! is a module of its own below, as are the statistics, the report and the plot.

#[path = "../../tests/common/mod.rs"]
mod common;

mod acquire;
mod idle;
mod plot;
mod report;
mod stats;
mod storm;
mod takeover;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::acquire::acquire;
use crate::idle::idle_and_memory;
use crate::report::Report;
use crate::storm::storm;
use crate::takeover::takeover;

/// Set in the re-run child: the private bus is already in place.
const INNER_ENV: &str = "UNIQUE_INSTANCE_BENCH_INNER";
/// Exit status of a refused copy (the CLI's default for "already running").
pub(crate) const EXIT_CONFLICT: i32 = 75;

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
pub(crate) fn fs_name(path: &Path) -> &'static str {
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
pub(crate) struct Config {
    /// Rounds of interleaved in-process acquisitions, and acquisitions per round and kind.
    pub(crate) acquire_rounds: usize,
    pub(crate) acquire_batch: usize,
    pub(crate) takeover_trials: usize,
    pub(crate) storm_rounds: usize,
    pub(crate) storm_copies: usize,
    pub(crate) idle: Duration,
    pub(crate) cli: PathBuf,
    pub(crate) server: PathBuf,
    pub(crate) sdbus_ref: PathBuf,
    pub(crate) flock_ref: PathBuf,
    pub(crate) flock_checked_ref: PathBuf,
    /// A static-pie build of the CLI (see scripts/bench), measured in the storm when given.
    pub(crate) static_cli: Option<PathBuf>,
    pub(crate) flock: PathBuf,
    pub(crate) work: tempfile::TempDir,
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
