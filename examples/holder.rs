//! A scriptable instance holder, used by the test suite (and handy for experiments).
//!
//! ```text
//! holder NAME [--backend auto|dbus|lockfile] [--scope auto|user|system] [--lock-file PATH]
//!             [--wait forever|SECONDS] [--allow-replacement] [--recheck-ms N]
//!             [--watch | --no-watch]
//!             [--blocking [--drop-in-runtime]]
//!             [--go-on-stdin] [--critical FILE --hold-ms N] [--remove-lock-file-at-once]
//!             [--serve]
//! holder --version
//! ```
//!
//! Prints one line per event on stdout (`acquired ...`, `already-running ...`, `lost ...`,
//! `released`), holds the instance until stdin closes (or, with `--hold-ms`, for that long), and
//! exits 0, or 75 (already running / timed out), 64, 77, 69, 78, 70 as the CLI does. With
//! `--critical FILE` it creates FILE exclusively while it holds the instance and exits 99 if
//! FILE already exists: two holders at once are caught, not assumed away. `--version` says
//! whether the library was built with its test hooks (the `test-hooks` feature), which the
//! tests check before they rely on them. `--serve` serves an object (`/org/example/Holder`) on
//! the bus connection, so that a peer's `org.freedesktop.DBus.Peer.Ping` is answered: once it
//! is, the holder has read everything sent to it before.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use unique_instance::{Backend, Error, InstanceGuard, InstanceOptions, Scope, Wait};

#[derive(Default)]
struct Args {
    name: String,
    /// `None`: every backend that applies (the default).
    backend: Option<Backend>,
    scope: Option<Scope>,
    lock_file: Option<PathBuf>,
    wait: Option<Wait>,
    allow_replacement: bool,
    recheck: Option<Duration>,
    /// `None`: the library's default (watched).
    watch: Option<bool>,
    blocking: bool,
    drop_in_runtime: bool,
    go_on_stdin: bool,
    critical: Option<PathBuf>,
    hold: Option<Duration>,
    /// Removes the lock file the moment the acquisition returns, before anything else runs.
    remove_at_once: bool,
    serve: bool,
}

/// What `--serve` serves: nothing but zbus's standard interfaces (`Peer` among them).
struct Served;

#[zbus::interface(name = "org.example.Holder1")]
impl Served {
    /// Its process ID.
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

fn parse() -> Result<Args, String> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--version" => {
                let hooks = if cfg!(feature = "test-hooks") {
                    " (with test hooks)"
                } else {
                    ""
                };
                say(&format!("holder {}{hooks}", env!("CARGO_PKG_VERSION")));
                std::process::exit(0);
            }
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "auto" => None,
                    "dbus" => Some(Backend::Dbus),
                    "lockfile" => Some(Backend::LockFile),
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
            "--lock-file" => args.lock_file = Some(value()?.into()),
            "--wait" => {
                let v = value()?;
                args.wait = Some(if v == "forever" {
                    Wait::Forever
                } else {
                    Wait::Timeout(Duration::from_secs_f64(
                        v.parse().map_err(|_| format!("bad --wait {v}"))?,
                    ))
                })
            }
            "--allow-replacement" => args.allow_replacement = true,
            "--recheck-ms" => {
                args.recheck = Some(Duration::from_millis(
                    value()?.parse().map_err(|_| "bad --recheck-ms")?,
                ))
            }
            "--watch" => args.watch = Some(true),
            "--no-watch" => args.watch = Some(false),
            "--blocking" => args.blocking = true,
            "--drop-in-runtime" => args.drop_in_runtime = true,
            "--go-on-stdin" => args.go_on_stdin = true,
            "--remove-lock-file-at-once" => args.remove_at_once = true,
            "--serve" => args.serve = true,
            "--critical" => args.critical = Some(value()?.into()),
            "--hold-ms" => {
                args.hold = Some(Duration::from_millis(
                    value()?.parse().map_err(|_| "bad --hold-ms")?,
                ))
            }
            name if !name.starts_with("--") && args.name.is_empty() => args.name = name.to_owned(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn options(args: &Args) -> InstanceOptions {
    let mut o = InstanceOptions::new(&args.name).allow_replacement(args.allow_replacement);
    if let Some(b) = args.backend {
        o = o.backend(b);
    }
    if let Some(s) = args.scope {
        o = o.scope(s);
    }
    if let Some(p) = &args.lock_file {
        o = o.lock_file(p);
    }
    if let Some(w) = args.wait {
        o = o.wait(w);
    }
    if let Some(r) = args.recheck {
        o = o.recheck_lock_file(r);
    }
    if let Some(w) = args.watch {
        o = o.watch_lock_file(w);
    }
    if args.serve {
        o = o.serve_at("/org/example/Holder", Served);
    }
    o
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn report_error(e: &Error) -> i32 {
    let one_line = e.to_string().replace('\n', " ");
    let (word, code) = match e {
        Error::AlreadyRunning { .. } => ("already-running", 75),
        Error::TimedOut { .. } => ("timed-out", 75),
        Error::InvalidName { .. } => ("invalid-name", 64),
        Error::InvalidEnvironment { .. } => ("invalid-environment", 64),
        Error::InvalidOption { .. } => ("invalid-option", 64),
        Error::NotPermitted { .. } => ("not-permitted", 77),
        Error::NoUsableBackend { .. } => ("no-usable-backend", 69),
        Error::LostBeforeRelease { .. } => ("lost-before-release", 69),
        Error::UnsafeLockPath { .. } => ("unsafe-lock-path", 78),
        Error::NetworkFilesystem { .. } => ("network-filesystem", 78),
        Error::NotALockFile { .. } => ("not-a-lock-file", 64),
        _ => ("error", 70),
    };
    let pid = e
        .holder()
        .and_then(|h| h.pid)
        .map_or("unknown".to_owned(), |p| p.to_string());
    say(&format!("{word} holder_pid={pid} msg={one_line}"));
    code
}

/// `--remove-lock-file-at-once`: the lock file removed before the guard's watch had any chance
/// to run (no await, no other line of this program in between).
fn remove_at_once(args: &Args, guard: &InstanceGuard) {
    if args.remove_at_once
        && let Some(path) = guard.lock_file()
        && let Err(e) = std::fs::remove_file(path)
    {
        eprintln!("holder: cannot remove the lock file: {e}");
    }
}

fn acquired_line(guard: &InstanceGuard) -> String {
    format!(
        "acquired pid={} backends={:?} bus={:?} unique={}",
        std::process::id(),
        guard.backends(),
        guard.bus_kind(),
        guard.bus_unique_name().unwrap_or_default()
    )
}

fn critical_enter(args: &Args) {
    if let Some(path) = &args.critical
        && let Err(e) = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
    {
        say(&format!("overlap {e}"));
        std::process::exit(99);
    }
}

fn critical_leave(args: &Args) {
    if let Some(path) = &args.critical {
        let _ = std::fs::remove_file(path);
    }
}

fn main() {
    let args = match parse() {
        Ok(a) if !a.name.is_empty() || std::env::args().len() > 1 => a,
        Ok(_) => {
            eprintln!("usage: holder NAME [options]");
            std::process::exit(64);
        }
        Err(e) => {
            eprintln!("holder: {e}");
            std::process::exit(64);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let stdin = std::io::stdin();
    if args.go_on_stdin {
        let mut line = String::new();
        let _ = stdin.lock().read_line(&mut line);
    }
    let code = if args.blocking {
        run_blocking(&args)
    } else {
        match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run_async(&args)),
            Err(e) => {
                eprintln!("holder: {e}");
                70
            }
        }
    };
    std::process::exit(code);
}

fn run_blocking(args: &Args) -> i32 {
    let guard = match options(args).acquire() {
        Ok(g) => g,
        Err(e) => return report_error(&e),
    };
    remove_at_once(args, &guard);
    critical_enter(args);
    say(&acquired_line(&guard));
    // Losses are reported from a thread with a watcher; this thread keeps the guard.
    let mut watcher = guard.loss_watcher();
    let reporter = std::thread::spawn(move || {
        while let Some(loss) = watcher.next_blocking(None) {
            say(&format!(
                "lost reason={:?} still_exclusive={}",
                loss.reason, loss.still_exclusive
            ));
        }
    });
    match args.hold {
        Some(d) => std::thread::sleep(d),
        None => {
            let _ = std::io::stdin().lock().lines().count();
        }
    }
    critical_leave(args);
    let result = if args.drop_in_runtime {
        // Dropping a blocking guard inside another runtime's task must not panic.
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => {
                rt.block_on(async move { drop(guard) });
                Ok(())
            }
            Err(e) => {
                eprintln!("holder: {e}");
                return 70;
            }
        }
    } else {
        guard.release()
    };
    // The guard is gone: the watcher sees the end of its losses and the reporter ends.
    let _ = reporter.join();
    match result {
        Ok(()) => {
            say("released");
            0
        }
        Err(e) => report_error(&e),
    }
}

async fn run_async(args: &Args) -> i32 {
    let mut guard = match options(args).acquire_async().await {
        Ok(g) => g,
        Err(e) => return report_error(&e),
    };
    remove_at_once(args, &guard);
    critical_enter(args);
    say(&acquired_line(&guard));
    let done = async {
        match args.hold {
            Some(d) => tokio::time::sleep(d).await,
            None => {
                // stdin closing is the signal to release.
                let _ =
                    tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count()).await;
            }
        }
    };
    tokio::pin!(done);
    loop {
        tokio::select! {
            _ = &mut done => break,
            loss = guard.next_loss() => {
                say(&format!("lost reason={:?} still_exclusive={}", loss.reason, loss.still_exclusive));
            }
        }
    }
    critical_leave(args);
    match guard.release_async().await {
        Ok(()) => {
            say("released");
            0
        }
        Err(e) => report_error(&e),
    }
}
