//! `unique-instance`: run a command as the only running copy of a name, or ask who runs it.
//!
//! A thin layer over the library: parsing, messages and exit codes here; exclusion there.

// Our own `main` below, not std's start-up, where std reads the arguments without it (glibc):
// see `main`.
#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

// First: its macro is used by the modules below.
#[macro_use]
mod say;

mod cli;
mod deploy;
mod generate;
mod keeper;
mod logging;
mod run;
mod status;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};

/// Usage errors (`EX_USAGE`), whatever clap would have used.
const EXIT_USAGE: u8 = 64;
/// Internal errors (`EX_SOFTWARE`).
const EXIT_INTERNAL: u8 = 70;

/// A process exit status. Not std's `ExitCode`: only std's start-up, which `main` leaves out,
/// can turn that into a number on stable Rust.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExitCode(u8);

impl ExitCode {
    pub(crate) const SUCCESS: ExitCode = ExitCode(0);
}

impl From<u8> for ExitCode {
    fn from(code: u8) -> Self {
        ExitCode(code)
    }
}

/// The exit status of a panic that unwinds out of a command, as std's start-up gives it.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
const EXIT_PANIC: u8 = 101;

/// The process's entry point, in place of std's `lang_start`. std's start-up finds the main
/// thread's stack guard by parsing `/proc/self/maps` (about 100k instructions, a sixth of a
/// refused copy's whole work and as much again for the keeper's `exec`: BENCHMARKS.md, section
/// 5). What else it does that matters here is done here: descriptors 0, 1 and 2 are made open
/// (or the lock file could become stderr), SIGPIPE is ignored (a closed stdout or stderr is an
/// error, not a death: `say!`), and a panic is exit 101. What is left out is the stack-overflow
/// message: an overflow still kills the process, by SIGSEGV. `std::env::args` needs no start-up
/// on glibc (it reads them from `.init_array`); elsewhere std's start-up stays. (The unit tests
/// have the test harness's `main`.)
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    standard_descriptors_open();
    ignore_file_size_signal();
    // SAFETY: no other thread exists yet, and SIG_IGN runs no code of ours.
    if unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .is_err()
    {
        std::process::abort();
    }
    let code = std::panic::catch_unwind(unique_instance_main).unwrap_or(ExitCode(EXIT_PANIC));
    // What is left to say, said: by now the instance is released and COMMAND's tree is gone
    // (see say.rs).
    say::drain();
    // Flushes stdout, as returning from std's main would.
    std::process::exit(code.0.into())
}

/// std's start-up, where std needs it to read the arguments (not glibc).
#[cfg(all(not(all(target_os = "linux", target_env = "gnu")), not(test)))]
fn main() -> std::process::ExitCode {
    ignore_file_size_signal();
    let code = unique_instance_main();
    say::drain();
    std::process::ExitCode::from(code.0)
}

/// Opens `/dev/null` on each of descriptors 0, 1 and 2 that is closed, as std's start-up does:
/// otherwise the first files opened (the lock file) would take their numbers, and a message
/// meant for stderr would be written into the lock file. Aborts when it cannot, as std does.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[allow(unsafe_code)]
fn standard_descriptors_open() {
    for fd in 0..=2 {
        // SAFETY: only asks whether `fd` is open; the borrow ends with the call.
        let closed = rustix::io::fcntl_getfd(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
            == Err(rustix::io::Errno::BADF);
        if closed {
            // The lowest free number is `fd`: those below it are open.
            // Not close-on-exec (as std's own `open` would be): it must reach COMMAND.
            let null = rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDWR,
                rustix::fs::Mode::empty(),
            );
            match null {
                Ok(null) if std::os::fd::AsRawFd::as_raw_fd(&null) == fd => {
                    std::mem::forget(null);
                }
                _ => std::process::abort(),
            }
        }
    }
}

#[cfg_attr(test, allow(dead_code))]
fn unique_instance_main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(keeper::SUBCOMMAND)) {
        return match cli::KeeperArgs::try_parse_from(std::env::args_os().skip(1)) {
            Ok(args) => {
                logging::init();
                keeper::keeper(args)
            }
            Err(e) => {
                let _ = e.print();
                ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 })
            }
        };
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; anything else is a usage error.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    logging::init();
    if matches!(cli.command, Command::Run(_) | Command::Status(_))
        && let Err(message) = enough_descriptors()
    {
        return fail(EXIT_INTERNAL, format_args!("{message}"));
    }
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status(args) => status::status(args),
        Command::Generate(args) => generate::generate(args),
        Command::Man { out_dir } => print_man_page(out_dir),
        Command::Completions { shell } => print_completions(shell),
    }
}

fn print_man_page(out_dir: Option<std::path::PathBuf>) -> ExitCode {
    let written = match &out_dir {
        // One page per command: unique-instance.1, unique-instance-run.1, ...
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .and_then(|()| std::io::Write::flush(&mut out))
        }
    };
    match (written, &out_dir) {
        (Ok(()), _) => ExitCode::SUCCESS,
        // Where the pages go is the caller's choice: an I/O error, named, not an internal one.
        (Err(e), Some(dir)) => fail(
            EXIT_IO,
            format_args!(
                "cannot write the man pages into {}: {e}; give --out-dir an existing directory \
                 you can write",
                dir.display()
            ),
        ),
        (Err(e), None) => fail(EXIT_IO, format_args!("cannot write the man page: {e}")),
    }
}

/// Writing an output failed (`EX_IOERR`).
const EXIT_IO: u8 = 74;

fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    // Made in memory first: clap_complete panics when its writer fails.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "unique-instance", &mut script);
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, &script)
        .and_then(|()| std::io::Write::flush(&mut out))
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(EXIT_IO, format_args!("cannot write the completions: {e}")),
    }
}

/// Descriptors `run` and `status` may need at once: the runtime (epoll, its waker, the signal
/// pipes), the lock directory and file, inotify, the bus socket, the signal stream, COMMAND's
/// pipes while it starts, with room to spare. (About 16 were measured.)
const DESCRIPTORS_NEEDED: u64 = 24;

/// Refuses to start, saying why, when the open-file limit (`ulimit -n`) leaves fewer than
/// [`DESCRIPTORS_NEEDED`] descriptors free. Running out midway is reported too, but tokio
/// panics when it cannot make its signal pipe, and an unclear error or a panic is no answer.
fn enough_descriptors() -> Result<(), String> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    // Listing /proc/self/fd itself takes a descriptor, counted among the entries.
    let open = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries.count() as u64,
        // No /proc: the limit alone is checked.
        Err(e) if e.raw_os_error() != Some(rustix::io::Errno::MFILE.raw_os_error()) => 0,
        Err(_) => limit,
    };
    if limit.saturating_sub(open) < DESCRIPTORS_NEEDED {
        return Err(format!(
            "too few file descriptors: the open-file limit (RLIMIT_NOFILE, `ulimit -n`) is \
             {limit} and {open} are open, but {DESCRIPTORS_NEEDED} free ones are needed; raise \
             the limit (e.g. `ulimit -n 1024`)"
        ));
    }
    Ok(())
}

/// SIGXFSZ had its default action (death) when this process started: it is ignored here, and
/// the processes we start get it back (see [`restore_file_size_signal`]).
static FILE_SIZE_SIGNAL_WAS_DEFAULT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Ignores SIGXFSZ: a write past the file size limit (`ulimit -f`) then fails with `EFBIG`, an
/// error said and answered by its exit status, instead of killing the process without a word.
/// It killed the wrapper writing its record (status 153, which reads as COMMAND's death by a
/// signal), and the wrapper or the keeper writing a message to a stderr that is a log file
/// over the limit (the keeper then never stopped COMMAND's tree: reviews).
#[allow(unsafe_code)]
#[cfg_attr(test, allow(dead_code))]
fn ignore_file_size_signal() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: no other thread exists yet, and SIG_IGN runs no code of ours.
    if let Ok(before) = unsafe { sigaction(Signal::SIGXFSZ, &ignore) }
        && matches!(before.handler(), SigHandler::SigDfl)
    {
        FILE_SIZE_SIGNAL_WAS_DEFAULT.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// In a child between `fork` and `exec` (async-signal-safe: an atomic load and `sigaction`):
/// SIGXFSZ as our caller left it, so that COMMAND (through the keeper, which does the same)
/// dies of a write past the limit as it would have without us.
#[allow(unsafe_code)]
pub(crate) fn restore_file_size_signal() -> std::io::Result<()> {
    if FILE_SIZE_SIGNAL_WAS_DEFAULT.load(std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: SIG_DFL runs no code of ours.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGXFSZ,
                nix::sys::signal::SigHandler::SigDfl,
            )
        }?;
    }
    Ok(())
}

/// Prints `unique-instance: MESSAGE` on stderr and returns `code`.
fn fail(code: u8, message: std::fmt::Arguments<'_>) -> ExitCode {
    say!("unique-instance: {message}");
    ExitCode::from(code)
}
