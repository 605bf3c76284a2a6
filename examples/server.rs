//! A small D-Bus server that refuses to run twice.
//!
//! ```text
//! cargo run --example server [--wait] [NAME]        # default NAME: org.example.Server
//! ```
//!
//! It becomes the single instance of NAME (lock file + bus name), serves `org.example.Server1`
//! at `/org/example/Server` on the connection that owns the name (methods `Ping` and `Pid`),
//! prints `ready: NAME pid PID` on stdout, and exits cleanly on SIGTERM or SIGINT. A second copy
//! prints who is running and exits with status 75; with `--wait` it waits for the running copy
//! to exit and takes over.
//!
//! It is also the model deployment: `systemd/` and `dbus/` hold the units, bus policy and
//! activation files `unique-instance generate` writes for it, installed as
//! `/usr/local/libexec/unique-instance/example-server`. Under those units it needs no flag: the
//! unit's `UNIQUE_INSTANCE_SCOPE=system` puts its lock file in the shared system directory, and
//! under `Type=notify` the library sends `READY=1` once the instance is held.

use std::process::ExitCode;

use tokio::signal::unix::{SignalKind, signal};
use unique_instance::{InstanceOptions, Wait};

struct Server {
    name: String,
}

#[zbus::interface(name = "org.example.Server1")]
impl Server {
    /// Answers "pong from NAME".
    fn ping(&self) -> String {
        format!("pong from {}", self.name)
    }

    /// The server's process ID.
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut wait = Wait::No;
    let mut name = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--wait" => wait = Wait::Forever,
            _ if !arg.starts_with('-') && name.is_none() => name = Some(arg),
            _ => {
                eprintln!("usage: server [--wait] [NAME]");
                return ExitCode::from(64);
            }
        }
    }
    let name = name.unwrap_or_else(|| "org.example.Server".to_owned());

    // Caught from the start: a SIGTERM that comes as soon as the name is visible still ends the
    // server cleanly (releasing the name and the lock file).
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("server: cannot install signal handlers");
        return ExitCode::from(70);
    };

    // Export the object before the name is requested, so a caller who sees the name can use it.
    let options = InstanceOptions::new(&name)
        .wait(wait)
        .serve_at("/org/example/Server", Server { name: name.clone() });
    let mut guard = match options.acquire_async().await {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("server: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    tracing::info!(?guard, "serving");
    println!("ready: {name} pid {}", std::process::id());

    let code = loop {
        tokio::select! {
            _ = term.recv() => break 0,
            _ = int.recv() => break 0,
            loss = guard.next_loss() => {
                if loss.still_exclusive {
                    tracing::warn!(%loss, "carrying on");
                } else {
                    eprintln!("server: {loss}");
                    break 1;
                }
            }
        }
    };
    tracing::info!("shutting down");
    if let Err(e) = guard.release_async().await {
        eprintln!("server: {e}");
        return ExitCode::from(70);
    }
    ExitCode::from(code)
}
