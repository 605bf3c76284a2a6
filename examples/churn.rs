//! Acquires and releases one name in a tight loop, for the churn test (and experiments).
//!
//! ```text
//! churn NAME ACQUISITIONS CRITICAL_FILE
//! ```
//!
//! Uses the lock-file backend alone (the lock directory comes from `UNIQUE_INSTANCE_LOCK_DIR`)
//! and loops until it has acquired the instance ACQUISITIONS times. Every attempt must end in
//! "acquired" or "already running": anything else is printed (`error ...`) and ends the run
//! with exit 1. While it holds the instance it creates CRITICAL_FILE exclusively and removes it
//! before releasing, so two holders at once are caught (`overlap ...`, exit 99). Prints
//! `progress acquired=N refused=M` every 100 acquisitions and `done acquired=N refused=M` at
//! the end.

use std::io::Write;
use std::path::PathBuf;

use unique_instance::{Backend, Error, InstanceOptions};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `--defaults`: every option as a program would leave it (both backends, the lock file
    // watched), rather than the lock file alone, unwatched, the fastest churn.
    let defaults = args.last().is_some_and(|a| a == "--defaults");
    let args = &args[..args.len() - usize::from(defaults)];
    let (name, target, critical) = match args {
        [name, target, critical] => match target.parse::<u64>() {
            Ok(target) => (name.clone(), target, PathBuf::from(critical)),
            Err(_) => {
                eprintln!("churn: ACQUISITIONS must be a number, not {target:?}");
                std::process::exit(64);
            }
        },
        _ => {
            eprintln!("usage: churn NAME ACQUISITIONS CRITICAL_FILE [--defaults]");
            std::process::exit(64);
        }
    };
    let (mut acquired, mut refused) = (0u64, 0u64);
    while acquired < target {
        let attempt = if defaults {
            InstanceOptions::new(&name).notify_ready(false).acquire()
        } else {
            InstanceOptions::new(&name)
                .backend(Backend::LockFile)
                .watch_lock_file(false)
                .notify_ready(false)
                .acquire()
        };
        match attempt {
            Ok(guard) => {
                if let Err(e) = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&critical)
                {
                    say(&format!("overlap {e}"));
                    std::process::exit(99);
                }
                acquired += 1;
                if let Err(e) = std::fs::remove_file(&critical) {
                    say(&format!("error cannot remove {}: {e}", critical.display()));
                    std::process::exit(1);
                }
                if let Err(e) = guard.release() {
                    say(&format!(
                        "error release: {}",
                        e.to_string().replace('\n', " ")
                    ));
                    std::process::exit(1);
                }
                if acquired % 100 == 0 {
                    say(&format!("progress acquired={acquired} refused={refused}"));
                }
            }
            Err(Error::AlreadyRunning { .. }) => refused += 1,
            Err(e) => {
                say(&format!(
                    "error after acquired={acquired} refused={refused}: {}",
                    e.to_string().replace('\n', " ")
                ));
                std::process::exit(1);
            }
        }
    }
    say(&format!("done acquired={acquired} refused={refused}"));
}
