//! systemd's readiness protocol (`sd_notify(3)`), spoken through the `sd-notify` crate: a leaf,
//! told plain data (the name, the lock file, the bus) rather than handed the guard.
//!
//! Nothing here touches the process environment: `NOTIFY_SOCKET` is read, never removed (a
//! library has no business mutating global state other threads may be reading).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use sd_notify::NotifyState;

use crate::error::{Error, Result};
use crate::scope::BusKind;

/// What the `STATUS=` line of a ready instance names: plain data, so that this module depends on
/// no other part of the crate but the error and the bus's name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acquired<'a> {
    pub(crate) name: &'a str,
    pub(crate) lock_file: Option<&'a Path>,
    pub(crate) bus: Option<BusKind>,
}

/// Where the service manager listens, when it asked to be told (`Type=notify` units).
fn socket() -> Option<OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// A `STATUS=` value is one line: the protocol separates assignments by newlines.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Sends `READY=1` and a `STATUS=` line naming the instance, if `NOTIFY_SOCKET` is set.
pub(crate) fn ready(acquired: &Acquired<'_>) -> Result<()> {
    let Some(socket) = socket() else {
        return Ok(());
    };
    let mut status = format!(
        "{}: running as the single instance (pid {}",
        acquired.name,
        std::process::id()
    );
    if let Some(path) = acquired.lock_file {
        status.push_str(&format!(", lock file {}", path.display()));
    }
    if let Some(bus) = acquired.bus {
        status.push_str(&format!(", on the {bus} bus"));
    }
    status.push(')');
    let status = one_line(&status);
    sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]).map_err(|e| {
        Error::io(
            "cannot tell the service manager we are ready through",
            PathBuf::from(socket),
            e,
        )
    })?;
    tracing::debug!(%status, "told the service manager READY=1");
    Ok(())
}

/// Sends a `STATUS=` line, if `NOTIFY_SOCKET` is set; a failure is only logged (it changes
/// nothing about the instance).
pub(crate) fn status(text: &str) {
    if socket().is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[NotifyState::Status(&one_line(text))]) {
        tracing::warn!(error = %e, "cannot send a status line to the service manager");
    }
}

/// Tells systemd, when it asked (`NOTIFY_SOCKET`), how an attempt went: `READY=1` with a status
/// line once acquired, a status line naming the running copy when refused. A service manager
/// that cannot be told is logged, not a reason to give the instance up (systemd would time the
/// start out).
pub(crate) fn outcome(outcome: std::result::Result<Acquired<'_>, &Error>) {
    match outcome {
        Ok(acquired) => {
            if let Err(e) = ready(&acquired) {
                tracing::warn!(error = %e, "cannot notify the service manager");
            }
        }
        Err(e @ (Error::AlreadyRunning { .. } | Error::TimedOut { .. })) => {
            status(&e.to_string());
        }
        Err(_) => {}
    }
}
