//! A held lock handed to another process — `run`'s keeper, or any child given a duplicate of
//! [`InstanceGuard::lock_file_descriptor`](crate::InstanceGuard::lock_file_descriptor) — which
//! holds the instance on its own once the process that acquired it is gone: it names itself in
//! the record, so that refused copies name a live holder at once instead of a dead one (which
//! they report as "holder unknown", after the grace a record gets).
//! Must not: take a lock, or write into a file that is not a lock file held through the
//! descriptor it is given.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;

use rustix::fs::{FileType, Mode, OFlags};

use crate::error::{Error, Result};
use crate::scope::Backend;

use super::ofd::is_held;
use super::record::{LockRecord, read_content, write_or_unknown};

/// Writes this process's record (its PID, start time and executable; the lock file as its only
/// backend: for a process that holds the bus name too, see
/// [`record_this_process_as_holder_keeping_bus_name`]) into the lock file behind `lock`, in place of
/// the one there, padded to its length as a holder's own re-writes are.
///
/// `lock` must be a descriptor, open for writing, of a lock file held through it: a duplicate
/// of the acquiring process's lock (inherited, or passed over a Unix socket). Call it once
/// that process is gone (the record names one process: while the acquiring one lives, it is
/// the one to name). Needs `/proc` (to tell that the lock is held through this very
/// descriptor).
///
/// # Errors
///
/// [`Error::Io`] (naming the file) when `lock` is not a regular file, the lock is not held
/// through it (nobody holds it, or another open file does), the file holds anything but a
/// holder record (or nothing), or it cannot be read or written.
pub fn record_this_process_as_holder(lock: BorrowedFd<'_>) -> Result<()> {
    rewrite_as_holder(lock, false)
}

/// As [`record_this_process_as_holder`], for a process that also holds the bus name: one that
/// holds a duplicate of the socket of the acquiring process's bus connection (as `run`'s keeper
/// does, from [`InstanceGuard::bus_socket_descriptor`](crate::InstanceGuard)), which keeps the
/// name owned by that connection. The new record keeps the bus and the connection's unique name
/// the one there gives (written by the acquiring process once it owned the name), so that
/// `status` sees one holder of both, this process, and not a lock file held apart from the name.
/// A record that gives no bus name (the name was lost, or never owned) stays without one.
///
/// # Errors
///
/// As [`record_this_process_as_holder`].
pub fn record_this_process_as_holder_keeping_bus_name(lock: BorrowedFd<'_>) -> Result<()> {
    rewrite_as_holder(lock, true)
}

/// The two above: with `keep_bus_name`, the bus name the current record gives is kept.
fn rewrite_as_holder(lock: BorrowedFd<'_>, keep_bus_name: bool) -> Result<()> {
    let fd_path = PathBuf::from(format!("/proc/self/fd/{}", lock.as_raw_fd()));
    let path = std::fs::read_link(&fd_path).unwrap_or_else(|_| fd_path.clone());
    let invalid = |what: &'static str, message: &str| {
        Error::io(
            what,
            &path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, message),
        )
    };
    let st = rustix::fs::fstat(lock).map_err(|e| Error::io("cannot stat", &path, e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(invalid("cannot name this process in", "not a regular file"));
    }
    // Held through `lock`: another open file description of the same file finds it held, and
    // `lock`'s own does not (a lock never conflicts with its own open file description).
    let other = rustix::fs::open(
        &fd_path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| Error::io("cannot open again (is /proc mounted?)", &path, e.into()))?;
    let held_through_it =
        matches!(is_held(other.as_fd()), Ok(true)) && matches!(is_held(lock), Ok(false));
    if !held_through_it {
        return Err(invalid(
            "cannot name this process in",
            "the lock is not held through this descriptor",
        ));
    }
    let content =
        read_content(lock).map_err(|e| Error::io("cannot read the lock file", &path, e.into()))?;
    let current = LockRecord::parse_whole(&content);
    if !content.is_empty() && current.is_none() {
        return Err(invalid(
            "cannot name this process in",
            "it holds something other than a holder record",
        ));
    }
    let record = match current {
        Some(current)
            if keep_bus_name
                && current.backend.contains(&Backend::Dbus)
                && current.bus.is_some()
                && current.bus_unique_name.is_some() =>
        {
            LockRecord::for_self(
                vec![Backend::LockFile, Backend::Dbus],
                current.bus,
                current.bus_unique_name,
            )
        }
        _ => LockRecord::for_self(vec![Backend::LockFile], None, None),
    };
    let mut line = record.to_line();
    if line.len() < content.len() {
        // `to_line` ends with the newline; JSON allows the spaces before it.
        line.pop();
        line.resize(content.len() - 1, b' ');
        line.push(b'\n');
    }
    write_or_unknown(lock, &line, &path)
        .map(|_| ())
        .map_err(|e| Error::io("cannot write holder record to", &path, e))
}
