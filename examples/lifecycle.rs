//! Acquisition lifecycles that tests must watch from outside the process: waits that end,
//! cancellations, the blocking API inside runtimes, and the order of release.
//!
//! ```text
//! lifecycle SCENARIO NAME [--backend auto|dbus|lockfile] [--flavor current|multi]
//!           [--in block-on|task] [--async] [--wait-ms N]
//! ```
//!
//! Scenarios (each prints one line per step on stdout, and exits 0 when every step behaved):
//! - `timed-out-wait`: counts this process's threads and descriptors (all, and all but
//!   sockets), waits up to `--wait-ms` for NAME (held by another process) and times out,
//!   counts again (`counts ...`), prints
//!   `parked` and stays alive, touching nothing, until stdin closes.
//! - `blocking-in-runtime`: inside a runtime of `--flavor`, in `--in` (its `block_on`, or a
//!   spawned task), calls `acquire()`, `LossWatcher::next_blocking`,
//!   `InstanceGuard::wait_next_loss` and `release()`, printing each outcome.
//! - `cancel-queued`: on a current-thread runtime, starts `acquire_async()` with
//!   `Wait::Forever` and cancels it after `--wait-ms` (a timeout), prints `cancelled`, then leaves
//!   the runtime idle until stdin closes.
//! - `release-order`: acquires (`--async`: with `acquire_async` on a runtime of `--flavor`),
//!   prints `acquired`, waits for a line on stdin, releases as `--in` says (`drop-in-runtime`:
//!   dropped inside the runtime's `block_on`; `drop-outside`: dropped outside it after it went
//!   idle; `release`: `release()`; `release-async-in-runtime`: `release_async()` in the
//!   acquiring runtime's `block_on`, which was idle since the acquisition;
//!   `release-async-elsewhere`: `release_async()` on another, new, current-thread runtime while
//!   the acquiring one is idle), prints `released ok` or `released err ...`, and waits for
//!   stdin to close. With `--allow-replacement` the name may be taken over meanwhile. With
//!   `--keep-connection` it keeps a clone of the guard's connection (as a program serving
//!   objects on it does) until it exits, and prints `kept UNIQUE` (its unique name) once released;
//!   with `--drop-runtime` it drops the acquiring runtime (and zbus's tasks on it) before the
//!   release; with `--watcher` a thread waits on a `LossWatcher` meanwhile, and once released
//!   it prints `watcher ended` when that returned `None` within 10 s, else `watcher waits`.
//! - `settle-yields`: on a current-thread runtime, acquires NAME (`acquire_async`) while a
//!   task of the same runtime waits until this process has a `unique-instance-grace` thread
//!   (an acquisition waiting on a thread of its own, its runtime free meanwhile), then removes
//!   the file `--remove PATH`; prints `acquired` or `err ...`.
//! - `release-leftovers`: `--rounds` times acquires and releases (with `release()`), counting
//!   right after each release what is left of the acquisition: descriptors of the lock
//!   directory, eventfds and `unique-instance-watch` threads, more than before the first; prints
//!   `leftovers rounds=N dir_fds=A eventfds=B watch_threads=C` (the most seen after any round),
//!   then `threads gone` once no watch thread is left (within 10 s; else `threads stay`).

use std::io::{BufRead, Write};
use std::time::Duration;

use unique_instance::{Backend, InstanceGuard, InstanceOptions, Wait};

struct Args {
    scenario: String,
    name: String,
    /// `None`: every backend that applies (the default).
    backend: Option<Backend>,
    multi: bool,
    in_task: bool,
    how: String,
    use_async: bool,
    wait: Duration,
    keep_connection: bool,
    drop_runtime: bool,
    watcher: bool,
    rounds: usize,
    allow_replacement: bool,
    remove: Option<std::path::PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let scenario = it.next().ok_or("no scenario")?;
    let name = it.next().ok_or("no name")?;
    let mut args = Args {
        scenario,
        name,
        backend: None,
        multi: false,
        in_task: false,
        how: String::new(),
        use_async: false,
        wait: Duration::from_millis(300),
        keep_connection: false,
        drop_runtime: false,
        watcher: false,
        rounds: 1,
        allow_replacement: false,
        remove: None,
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => {
                args.backend = match value()?.as_str() {
                    "auto" => None,
                    "dbus" => Some(Backend::Dbus),
                    "lockfile" => Some(Backend::LockFile),
                    other => return Err(format!("unknown backend {other}")),
                }
            }
            "--flavor" => args.multi = value()? == "multi",
            "--in" => {
                args.how = value()?;
                args.in_task = args.how == "task";
            }
            "--async" => args.use_async = true,
            "--keep-connection" => args.keep_connection = true,
            "--drop-runtime" => args.drop_runtime = true,
            "--watcher" => args.watcher = true,
            "--allow-replacement" => args.allow_replacement = true,
            "--remove" => args.remove = Some(value()?.into()),
            "--rounds" => args.rounds = value()?.parse().map_err(|_| "bad --rounds")?,
            "--wait-ms" => {
                args.wait = Duration::from_millis(value()?.parse().map_err(|_| "bad --wait-ms")?)
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn one_line(e: &unique_instance::Error) -> String {
    e.to_string().replace('\n', " ")
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

/// This process's descriptors that are not sockets: a bus connection ended by a cancelled or
/// failed acquisition is closed only when its runtime next runs (see the README), but nothing
/// else of it may stay.
fn count_fds_but_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|entry| {
                std::fs::read_link(entry.path())
                    .is_ok_and(|target| !target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

fn runtime(multi: bool) -> tokio::runtime::Runtime {
    let mut builder = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder.enable_all().build().expect("runtime")
}

fn wait_for_stdin_to_close() {
    let _ = std::io::stdin().lock().lines().count();
}

fn options(args: &Args) -> InstanceOptions {
    let options = InstanceOptions::new(&args.name).allow_replacement(args.allow_replacement);
    match args.backend {
        Some(backend) => options.backend(backend),
        None => options,
    }
}

fn timed_out_wait(args: &Args) {
    let options = options(args).wait(Wait::Timeout(args.wait));
    // Built before the first count: its own threads are not the wait's.
    let rt = args.use_async.then(|| runtime(args.multi));
    // tokio makes a process-wide signal pipe with the first runtime: made before counting.
    drop(runtime(false));
    let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
    let others = count_fds_but_sockets();
    let outcome = match &rt {
        Some(rt) => rt.block_on(options.acquire_async()),
        None => options.acquire(),
    };
    match outcome {
        Err(unique_instance::Error::TimedOut { .. }) => {}
        Err(e) => return say(&format!("unexpected {}", one_line(&e))),
        Ok(_) => return say("unexpected acquired"),
    }
    say(&format!(
        "counts threads_before={threads} threads_after={} fds_before={fds} fds_after={} \
         others_before={others} others_after={}",
        count("/proc/self/task"),
        count("/proc/self/fd"),
        count_fds_but_sockets()
    ));
    say("parked");
    wait_for_stdin_to_close();
    drop(rt);
}

/// Every blocking call of the API, made from wherever this thread is.
fn blocking_calls(args: &Args) {
    let mut guard = match options(args).acquire() {
        Ok(guard) => guard,
        Err(e) => return say(&format!("acquire err {}", one_line(&e))),
    };
    say("acquire ok");
    let mut watcher = guard.loss_watcher();
    say(&format!(
        "next_blocking {:?}",
        watcher.next_blocking(Some(Duration::from_millis(10)))
    ));
    say(&format!(
        "wait_next_loss {:?}",
        guard.wait_next_loss(Some(Duration::from_millis(10)))
    ));
    match guard.release() {
        Ok(()) => say("release ok"),
        Err(e) => say(&format!("release err {}", one_line(&e))),
    }
}

fn blocking_in_runtime(args: &Args) {
    let rt = runtime(args.multi);
    if args.in_task {
        let task_args = Args {
            scenario: args.scenario.clone(),
            name: args.name.clone(),
            how: args.how.clone(),
            remove: None,
            ..*args
        };
        let task = rt.spawn(async move { blocking_calls(&task_args) });
        if let Err(e) = rt.block_on(task) {
            say(&format!("task failed {e}"));
        }
    } else {
        rt.block_on(async { blocking_calls(args) });
    }
    say("done");
}

fn cancel_queued(args: &Args) {
    let rt = runtime(false);
    let options = options(args).wait(Wait::Forever);
    let outcome =
        rt.block_on(async { tokio::time::timeout(args.wait, options.acquire_async()).await });
    match outcome {
        Err(_) => say("cancelled"),
        Ok(Ok(_)) => say("unexpected acquired"),
        Ok(Err(e)) => say(&format!("unexpected {}", one_line(&e))),
    }
    // The runtime is kept, idle: nothing it owns runs again.
    wait_for_stdin_to_close();
    drop(rt);
}

fn release_order(args: &Args) {
    let mut rt = args.use_async.then(|| runtime(args.multi));
    let guard: InstanceGuard = match &rt {
        Some(rt) => rt.block_on(options(args).acquire_async()),
        None => options(args).acquire(),
    }
    .expect("acquire");
    let kept = args
        .keep_connection
        .then(|| guard.connection().expect("a bus connection").clone());
    let watcher = args.watcher.then(|| {
        let mut watcher = guard.loss_watcher();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(watcher.next_blocking(None));
        });
        rx
    });
    say("acquired");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if args.drop_runtime {
        drop(rt.take());
    }
    let result = match (args.how.as_str(), &rt) {
        ("drop-in-runtime", Some(rt)) => {
            rt.block_on(async move { drop(guard) });
            Ok(())
        }
        ("release-in-runtime", Some(rt)) => rt.block_on(async move { guard.release() }),
        ("release-async-in-runtime", Some(rt)) => rt.block_on(guard.release_async()),
        ("release", _) => guard.release(),
        ("release-async-elsewhere", _) => runtime(false).block_on(guard.release_async()),
        _ => {
            drop(guard);
            Ok(())
        }
    };
    match result {
        Ok(()) => say("released ok"),
        Err(e) => say(&format!("released err {}", one_line(&e))),
    }
    if let Some(kept) = &kept {
        say(&format!(
            "kept {}",
            kept.unique_name()
                .map_or("none".to_owned(), |n| n.to_string())
        ));
    }
    if let Some(watcher) = watcher {
        match watcher.recv_timeout(Duration::from_secs(10)) {
            Ok(None) => say("watcher ended"),
            Ok(Some(loss)) => say(&format!("watcher lost {loss}")),
            Err(_) => say("watcher waits"),
        }
    }
    wait_for_stdin_to_close();
    drop(kept);
    drop(rt);
}

fn settle_yields(args: &Args) {
    let remove = args.remove.clone().expect("--remove PATH");
    let result = runtime(false).block_on(async {
        let remover = tokio::spawn(async move {
            // Busy, but on the acquisition's own runtime: it runs only while that waits.
            while !has_grace_thread() {
                tokio::task::yield_now().await;
            }
            std::fs::remove_file(&remove).expect("remove the file");
        });
        let result = options(args).acquire_async().await;
        remover.abort();
        result
    });
    match result {
        Ok(guard) => {
            say("acquired");
            drop(guard);
        }
        Err(e) => say(&format!("err {}", one_line(&e))),
    }
}

/// Whether a thread of this process is named `unique-instance-grace` (cut to the 15 bytes a
/// thread's name keeps, as the watch thread's is: none runs before an acquisition returns).
fn has_grace_thread() -> bool {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .any(|comm| comm.trim() == "unique-instance")
}

/// What of an acquisition is left in this process: (descriptors of `dir`, eventfds, watch
/// threads).
fn leftovers(dir: &std::path::Path) -> (usize, usize, usize) {
    let links = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect::<Vec<_>>();
    let dir_fds = links.iter().filter(|l| l.as_path() == dir).count();
    let eventfds = links
        .iter()
        .filter(|l| l.to_string_lossy().contains("eventfd"))
        .count();
    let watch_threads = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        // "unique-instance-watch", cut to the 15 bytes a thread's name keeps.
        .filter(|comm| comm.trim() == "unique-instance")
        .count();
    (dir_fds, eventfds, watch_threads)
}

fn release_leftovers(args: &Args) {
    let dir = std::env::var_os("UNIQUE_INSTANCE_LOCK_DIR")
        .map(std::path::PathBuf::from)
        .expect("UNIQUE_INSTANCE_LOCK_DIR");
    let dir = dir.canonicalize().expect("the lock directory");
    let before = leftovers(&dir);
    let mut most = (0, 0, 0);
    for _ in 0..args.rounds {
        let guard = options(args).acquire().expect("acquire");
        guard.release().expect("release");
        let (d, e, t) = leftovers(&dir);
        most = (
            most.0.max(d.saturating_sub(before.0)),
            most.1.max(e.saturating_sub(before.1)),
            most.2.max(t.saturating_sub(before.2)),
        );
    }
    say(&format!(
        "leftovers rounds={} dir_fds={} eventfds={} watch_threads={}",
        args.rounds, most.0, most.1, most.2
    ));
    // The thread ends once its inotify instance is closed (an RCU grace period): waited for
    // here, as long as any machine needs, polling /proc.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while leftovers(&dir).2 > before.2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    say(if leftovers(&dir).2 > before.2 {
        "threads stay"
    } else {
        "threads gone"
    });
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("lifecycle: {e}");
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
    match args.scenario.as_str() {
        "timed-out-wait" => timed_out_wait(&args),
        "blocking-in-runtime" => blocking_in_runtime(&args),
        "cancel-queued" => cancel_queued(&args),
        "release-order" => release_order(&args),
        "release-leftovers" => release_leftovers(&args),
        "settle-yields" => settle_yields(&args),
        other => {
            eprintln!("lifecycle: unknown scenario {other}");
            std::process::exit(64);
        }
    }
}
