//! Acquires an instance, forks, and drops the guard in the child, for the fork-safety test.
//!
//! ```text
//! fork_release NAME
//! ```
//!
//! Uses the lock-file backend alone (the lock directory comes from `UNIQUE_INSTANCE_LOCK_DIR`).
//! Prints `acquired pid=N`, then forks; the child drops its copy of the guard and exits 0; the
//! parent reaps it and prints `child-dropped status=S`, then holds the instance until stdin
//! closes, releases it and prints `released`. The child shares the parent's open file
//! description of the lock file, and with it the lock: dropping the guard there must neither
//! remove the file nor unlock it.

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
    // SAFETY: this process has a single thread here (the lock-file backend alone, with no
    // watch and no waiting, starts none), so the child may run any code, not only
    // async-signal-safe functions.
    match unsafe { nix::libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid as u32)),
    }
}

fn main() {
    let Some(name) = std::env::args().nth(1) else {
        eprintln!("usage: fork_release NAME");
        std::process::exit(64);
    };
    let guard = match InstanceOptions::new(&name)
        .backend(Backend::LockFile)
        .watch_lock_file(false)
        .notify_ready(false)
        .acquire()
    {
        Ok(guard) => guard,
        Err(e) => {
            say(&format!("error {}", e.to_string().replace('\n', " ")));
            std::process::exit(e.exit_code().into());
        }
    };
    say(&format!("acquired pid={}", std::process::id()));
    let child = match fork() {
        Ok(Some(child)) => child,
        Ok(None) => {
            // The child: its guard shares the parent's lock; dropping it must leave both alone.
            drop(guard);
            std::process::exit(0);
        }
        Err(e) => {
            say(&format!("error fork: {e}"));
            std::process::exit(70);
        }
    };
    let status = rustix::process::Pid::from_raw(child as i32)
        .ok_or_else(|| std::io::Error::other("fork returned pid 0"))
        .and_then(|pid| {
            rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                .map_err(std::io::Error::from)
        });
    match status {
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
