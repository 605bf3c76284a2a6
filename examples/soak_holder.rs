//! A copy for the fault-injection soak (`tests/soak.rs`): it records what it believes, with a
//! system-wide monotonic time, in a shared log that a checker reads afterwards.
//!
//! ```text
//! soak_holder NAME --log FILE [--backend auto|lockfile] [--scope auto|user|system]
//!             [--wait forever|MS] [--hold-ms N] [--blocking]
//! soak_holder --command --log FILE      # as COMMAND of `unique-instance run`
//! ```
//!
//! Each event is one line, `SECONDS.NANOS PID EVENT [key=value...]`, appended with a single
//! `write` to a file opened with `O_APPEND`, so lines from many processes never interleave:
//! `attempt`, `acquired backends=[..] bus=..`, `lost reason=.. still_exclusive=..`,
//! `releasing` (the belief ends here, before the release starts), `released`,
//! `refused holder=PID|unknown`, `timed-out`, `error exit=N msg=..`. `CLOCK_MONOTONIC` is the
//! same clock in every process, so the times of different copies compare.
//!
//! A library copy holds until stdin closes (or for `--hold-ms`), and stops believing, releases
//! and exits when a loss says exclusion no longer holds (as a careful program would). As COMMAND
//! it believes from its start until SIGTERM (the wrapper's "stop") or stdin's end.

use std::fs::File;
use std::io::BufRead;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use unique_instance::{Backend, Error, InstanceGuard, InstanceOptions, Scope, Wait};

#[derive(Default)]
struct Args {
    name: String,
    log: PathBuf,
    command: bool,
    /// `None`: every backend that applies (the default).
    backend: Option<Backend>,
    scope: Option<Scope>,
    wait: Option<Wait>,
    hold: Option<Duration>,
    blocking: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--log" => args.log = value()?.into(),
            "--command" => args.command = true,
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "auto" => None,
                    "lockfile" => Some(Backend::LockFile),
                    "dbus" => Some(Backend::Dbus),
                    other => return Err(format!("unknown backend {other}")),
                }
            }
            "--scope" => {
                args.scope = Some(match value()?.as_str() {
                    "auto" => Scope::Auto,
                    "user" => Scope::User,
                    "system" => Scope::System,
                    other => return Err(format!("unknown scope {other}")),
                })
            }
            "--wait" => {
                let v = value()?;
                args.wait = Some(if v == "forever" {
                    Wait::Forever
                } else {
                    Wait::Timeout(Duration::from_millis(
                        v.parse().map_err(|_| format!("bad --wait {v}"))?,
                    ))
                })
            }
            "--hold-ms" => {
                args.hold = Some(Duration::from_millis(
                    value()?.parse().map_err(|_| "bad --hold-ms")?,
                ))
            }
            "--blocking" => args.blocking = true,
            name if !name.starts_with("--") && args.name.is_empty() => args.name = name.to_owned(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.log.as_os_str().is_empty() {
        return Err("--log FILE is required".into());
    }
    if !args.command && args.name.is_empty() {
        return Err("NAME is required".into());
    }
    Ok(args)
}

/// The shared event log.
struct Log(File);

impl Log {
    fn open(path: &std::path::Path) -> std::io::Result<Self> {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map(Log)
    }

    /// Appends `SECONDS.NANOS PID EVENT` in one `write`: the time is taken as late as possible,
    /// so a belief's start is never logged before it began.
    fn event(&self, event: &str) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let line = format!(
            "{}.{:09} {} {}\n",
            now.tv_sec,
            now.tv_nsec,
            std::process::id(),
            event.replace('\n', " ")
        );
        // One write to an O_APPEND file: the line lands whole, after every earlier one.
        match rustix::io::write(&self.0, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            other => {
                eprintln!("soak_holder: short or failed log write {other:?}: {line}");
                std::process::exit(70);
            }
        }
    }
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak_holder: {e}");
            std::process::exit(64);
        }
    };
    let log = match Log::open(&args.log) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("soak_holder: cannot open {}: {e}", args.log.display());
            std::process::exit(70);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log.event(&format!("error exit=70 msg=cannot start a runtime: {e}"));
            std::process::exit(70);
        }
    };
    let code = if args.command {
        runtime.block_on(as_command(&log))
    } else if args.blocking {
        drop(runtime);
        blocking(&args, &log)
    } else {
        runtime.block_on(library(&args, &log))
    };
    std::process::exit(code);
}

/// COMMAND of `run`: the wrapper acquired before starting us, so we believe from the start.
async fn as_command(log: &Log) -> i32 {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log.event(&format!("error exit=70 msg=cannot catch SIGTERM: {e}"));
            return 70;
        }
    };
    let lock_fd = std::env::var("UNIQUE_INSTANCE_LOCK_FD").ok();
    // The file the inherited descriptor is open on (`/proc/self/fd/N` leads to it).
    let file = lock_fd
        .as_deref()
        .and_then(|fd| rustix::fs::stat(format!("/proc/self/fd/{fd}").as_str()).ok())
        .map_or_else(|| "-".into(), |st| format!("{}:{}", st.st_dev, st.st_ino));
    log.event(&format!(
        "acquired via=run wrapper={} lock_fd={} file={file}",
        wrapper_pid(),
        lock_fd.as_deref().unwrap_or("none"),
    ));
    let stdin_closed = tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count());
    tokio::select! {
        _ = term.recv() => log.event("releasing why=SIGTERM"),
        _ = stdin_closed => log.event("releasing why=stdin"),
    }
    0
}

/// The `run` wrapper's PID: our parent is its keeper (`unique-instance internal-keeper`), whose
/// parent is the wrapper. Once the wrapper is gone (SIGKILLed as it started us: we run until its
/// death signal reaches us), the keeper's parent is init: then our process group's, which `run`
/// puts us in and the soak makes the wrapper's own (a seed's checker found a COMMAND it could not
/// tie to its wrapper, "wrapper=1", and so to its end). 0 when neither tells.
fn wrapper_pid() -> i32 {
    let by_parents = wrapper_by_parents();
    if by_parents > 1 {
        return by_parents;
    }
    let group = rustix::process::getpgrp().as_raw_nonzero().get();
    if group != std::process::id() as i32 {
        group
    } else {
        0
    }
}

/// [`wrapper_pid`] by our parent and its parent; 1 or 0 when the wrapper is gone.
fn wrapper_by_parents() -> i32 {
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
    if cmdline.split(|&b| b == 0).nth(1) != Some(b"internal-keeper".as_slice()) {
        return parent;
    }
    // `PID (COMM) STATE PPID ...`: the fields are counted from the last `)`.
    std::fs::read_to_string(format!("/proc/{parent}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn options(args: &Args) -> InstanceOptions {
    let mut o = InstanceOptions::new(&args.name);
    if let Some(b) = args.backend {
        o = o.backend(b);
    }
    if let Some(s) = args.scope {
        o = o.scope(s);
    }
    if let Some(w) = args.wait {
        o = o.wait(w);
    }
    o
}

fn acquired(log: &Log, guard: &InstanceGuard) {
    log.event(&format!(
        "acquired backends={:?} bus={:?} file={}",
        guard.backends(),
        guard.bus_kind(),
        file_id(guard.lock_file_descriptor())
    ));
}

/// `DEV:INO` of the file a lock descriptor is open on (`-` for none): which lock file a copy
/// holds, for the checker to tell whose file the nemesis removed (a record can still name the
/// copy before, while the new one has locked the file and not written its own yet).
fn file_id(fd: Option<std::os::fd::BorrowedFd<'_>>) -> String {
    fd.and_then(|fd| rustix::fs::fstat(fd).ok())
        .map_or_else(|| "-".into(), |st| format!("{}:{}", st.st_dev, st.st_ino))
}

/// Logs a failed acquisition and returns the exit code (the CLI's).
fn failed(log: &Log, e: &Error) -> i32 {
    match e {
        Error::AlreadyRunning { .. } => {
            let holder = e
                .holder()
                .and_then(|h| h.pid)
                .map_or("unknown".to_owned(), |p| p.to_string());
            log.event(&format!("refused holder={holder}"));
            75
        }
        Error::TimedOut { .. } => {
            log.event("timed-out");
            75
        }
        other => {
            let code = i32::from(other.exit_code());
            log.event(&format!("error exit={code} kind={other:?} msg={other}"));
            code
        }
    }
}

fn loss_line(loss: &unique_instance::Loss) -> String {
    format!(
        "lost reason={:?} still_exclusive={}",
        loss.reason, loss.still_exclusive
    )
}

async fn library(args: &Args, log: &Log) -> i32 {
    log.event("attempt");
    let mut guard = match options(args).acquire_async().await {
        Ok(g) => g,
        Err(e) => return failed(log, &e),
    };
    acquired(log, &guard);
    let done = async {
        match args.hold {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                let _ =
                    tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count()).await;
            }
        }
    };
    tokio::pin!(done);
    let mut why = "done";
    loop {
        tokio::select! {
            _ = &mut done => break,
            loss = guard.next_loss() => {
                log.event(&loss_line(&loss));
                if !loss.still_exclusive {
                    // Another copy may start now: a careful program stops its work here.
                    why = "lost";
                    break;
                }
            }
        }
    }
    log.event(&format!("releasing why={why}"));
    released(log, guard.release_async().await)
}

/// Logs how the release went, and returns the exit status.
fn released(log: &Log, result: Result<(), Error>) -> i32 {
    match result {
        Ok(()) => {
            log.event("released");
            0
        }
        Err(e @ Error::LostBeforeRelease { .. }) => {
            // A loss the program was not told of before the release (the copy was stopped
            // while its file went, or the loss came as it released): a loss, 69.
            log.event(&format!("lost-at-release msg={e}"));
            69
        }
        Err(e) => {
            log.event(&format!("release-error msg={e}"));
            70
        }
    }
}

fn blocking(args: &Args, log: &Log) -> i32 {
    log.event("attempt");
    let guard = match options(args).acquire() {
        Ok(g) => g,
        Err(e) => return failed(log, &e),
    };
    acquired(log, &guard);
    // The end of the hold and each loss come to this thread over one channel.
    enum Event {
        Done,
        Lost(unique_instance::Loss),
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let done = tx.clone();
    let hold = args.hold;
    std::thread::spawn(move || {
        match hold {
            Some(d) => std::thread::sleep(d),
            None => {
                let _ = std::io::stdin().lock().lines().count();
            }
        }
        let _ = done.send(Event::Done);
    });
    let mut watcher = guard.loss_watcher();
    std::thread::scope(|scope| {
        // Each loss is logged by the thread the library hands it to, at once, whatever this
        // thread is doing then (releasing, say): the log says what the program was told. The
        // scope waits for it, so nothing it was given goes unlogged; it ends once the guard is
        // released and every loss read.
        scope.spawn(move || {
            while let Some(loss) = watcher.next_blocking(None) {
                log.event(&loss_line(&loss));
                if tx.send(Event::Lost(loss)).is_err() {
                    break;
                }
            }
        });
        let mut why = "done";
        while let Ok(Event::Lost(loss)) = rx.recv() {
            if !loss.still_exclusive {
                why = "lost";
                break;
            }
        }
        log.event(&format!("releasing why={why}"));
        released(log, guard.release())
    })
}
