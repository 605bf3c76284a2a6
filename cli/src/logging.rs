//! Log lines through `tracing`: off unless `RUST_LOG` asks, plain when stderr is the journal.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;

/// Installs the subscriber. Quiet by default: the wrapper's own messages (conflicts, losses,
/// errors) are printed directly; `RUST_LOG` adds the library's reasoning.
pub(crate) fn init() {
    // Nothing asked for: no subscriber at all. Building one costs more than the rest of a
    // refused copy's work (callgrind), and a start-up storm is made of refused copies.
    if std::env::var_os("RUST_LOG").is_none_or(|v| v.is_empty()) {
        return;
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Through say.rs's writer thread: a log line never blocks what the tool does.
        .with_writer(crate::say::QueuedStderr::default)
        // A line that cannot be written is dropped: by default the subscriber then complains
        // with `eprintln!`, which panics on the same broken stderr (see say.rs).
        .log_internal_errors(false)
        .with_target(false);
    if stderr_is_journal() {
        // journald stamps and tags each line itself; colours would show as escape codes.
        builder.without_time().with_ansi(false).init();
    } else {
        // Colours for a person at a terminal; plain text for files, pipes and CI logs.
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}

/// systemd sets `JOURNAL_STREAM=DEV:INO` for a service whose stderr is the journal; the value
/// only counts if it still names our stderr (it is inherited by children whose stderr may not be).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>() == Ok(stat.st_dev) && ino.parse::<u64>() == Ok(stat.st_ino)
}
