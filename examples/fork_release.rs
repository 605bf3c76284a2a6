//! Acquires an instance, forks, and drops the guard in the child, for the fork-safety test.
//!
//! ```text
//! fork_release NAME [--backend lockfile|auto|dbus] [--async] [--parent-drops | --child-asks]
//! ```
//!
//! Uses the lock-file backend alone by default (the lock directory comes from
//! `UNIQUE_INSTANCE_LOCK_DIR`); `--backend auto` or `dbus` owns the bus name too, and `--async`
//! acquires with `acquire_async` on a current-thread runtime instead of the blocking API.
//! Prints `acquired pid=N`, then forks; the child drops its copy of the guard and exits 0; the
//! parent reaps it and prints `child-dropped status=S`, then holds the instance until stdin
//! closes, releases it and prints `released`. The child shares the parent's open file
//! description of the lock file, and with it the lock, and the socket of the bus connection:
//! dropping the guard there must neither remove the file nor unlock it, nor release the name
//! or end the connection. A child still in its drop after 20 s is ended by `SIGALRM`.
//!
//! With `--parent-drops` it is the other way round: the child keeps its copy of the guard until
//! its stdin (shared with the parent) closes, then exits; the parent releases its guard at once,
//! prints `parent-released child=PID`, then reaps the child and prints `child-exited status=S`.
//! The lock file is the child's to keep: the parent's release must not remove it.
//!
//! With `--child-asks` the parent daemonises: it prints `forked child=PID` and exits at once,
//! leaving its guard to the child, which prints `exclusive=true|false` (`is_exclusive()`) for
//! every line read on stdin, and exits when stdin closes.

use std::io::{BufRead, Write};

use unique_instance::{Backend, InstanceOptions};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// Examples are not the library: `fork` needs `unsafe`, and it stays in this one function.
#[allow(unsafe_code)]
fn fork() -> std::io::Result<Option<u32>> {
    // SAFETY: with the lock-file backend alone (no watch, no waiting) this process has a single
    // thread here, so the child may run any code. With a bus name it has the thread servicing
    // the connection too: the child then runs only the guard's drop, which in a process other
    // than the acquiring one is made for that (it waits for no thread and takes no lock of the
    // runtimes), and exits.
    match unsafe { nix::libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid as u32)),
    }
}

#[allow(unsafe_code)]
fn alarm(seconds: u32) {
    // SAFETY: `alarm` has no preconditions.
    unsafe { nix::libc::alarm(seconds) };
}

/// Waits for the child `child` to end.
fn reap(
    child: u32,
) -> std::io::Result<Option<(rustix::process::Pid, rustix::process::WaitStatus)>> {
    rustix::process::Pid::from_raw(child as i32)
        .ok_or_else(|| std::io::Error::other("fork returned pid 0"))
        .and_then(|pid| {
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                .map_err(std::io::Error::from)
        })
}

fn usage() -> ! {
    eprintln!(
        "usage: fork_release NAME [--backend lockfile|auto|dbus] [--async] [--parent-drops | --child-asks]"
    );
    std::process::exit(64);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else { usage() };
    // `None`: Auto, the default.
    let (mut backend, mut use_async, mut parent_drops) = (Some(Backend::LockFile), false, false);
    let mut child_asks = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => {
                backend = match args.next().as_deref() {
                    Some("lockfile") => Some(Backend::LockFile),
                    Some("auto") => None,
                    Some("dbus") => Some(Backend::Dbus),
                    _ => usage(),
                }
            }
            "--async" => use_async = true,
            "--parent-drops" => parent_drops = true,
            "--child-asks" => child_asks = true,
            _ => usage(),
        }
    }
    let mut options = InstanceOptions::new(&name)
        .watch_lock_file(false)
        .notify_ready(false);
    if let Some(backend) = backend {
        options = options.backend(backend);
    }
    // Kept for the guard's life: an async guard's connection is serviced by it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            say(&format!("error runtime: {e}"));
            std::process::exit(70);
        });
    let acquired = if use_async {
        rt.block_on(options.acquire_async())
    } else {
        options.acquire()
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(e) => {
            say(&format!("error {}", e.to_string().replace('\n', " ")));
            std::process::exit(e.exit_code().into());
        }
    };
    say(&format!("acquired pid={}", std::process::id()));
    let child = match fork() {
        Ok(Some(child)) if child_asks => {
            // Daemonised: the parent leaves without running the guard's drop.
            say(&format!("forked child={child}"));
            std::process::exit(0);
        }
        Ok(None) if child_asks => {
            alarm(120);
            for _ in std::io::stdin().lock().lines() {
                say(&format!("exclusive={}", guard.is_exclusive()));
            }
            drop(guard);
            std::process::exit(0);
        }
        Ok(Some(child)) => child,
        Ok(None) if parent_drops => {
            // The child keeps the instance, through the open file description it shares with
            // the parent, until stdin closes. Ended by `SIGALRM` should nobody close it.
            alarm(120);
            let _ = std::io::stdin().lock().lines().count();
            drop(guard);
            std::process::exit(0);
        }
        Ok(None) => {
            // The child: its guard shares the parent's lock and bus connection; dropping it must
            // leave them alone.
            alarm(20);
            drop(guard);
            std::process::exit(0);
        }
        Err(e) => {
            say(&format!("error fork: {e}"));
            std::process::exit(70);
        }
    };
    if parent_drops {
        // The parent, which acquired, lets go while its child still holds.
        match guard.release() {
            Ok(()) => say(&format!("parent-released child={child}")),
            Err(e) => {
                say(&format!(
                    "error release: {}",
                    e.to_string().replace('\n', " ")
                ));
                std::process::exit(70);
            }
        }
        match reap(child) {
            Ok(Some((_, status))) => say(&format!("child-exited status={}", status.as_raw())),
            other => {
                say(&format!("error waitpid: {other:?}"));
                std::process::exit(70);
            }
        }
        return;
    }
    match reap(child) {
        Ok(Some((_, status))) => say(&format!("child-dropped status={}", status.as_raw())),
        other => {
            say(&format!("error waitpid: {other:?}"));
            std::process::exit(70);
        }
    }
    // The parent still holds the instance: until stdin closes.
    let _ = std::io::stdin().lock().lines().count();
    match guard.release() {
        Ok(()) => say("released"),
        Err(e) => {
            say(&format!(
                "error release: {}",
                e.to_string().replace('\n', " ")
            ));
            std::process::exit(70);
        }
    }
}
