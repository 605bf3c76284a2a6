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
use super::record::{LockRecord, read_content, write_whole};

/// Writes this process's record (its PID, start time and executable; the lock file as its only
/// backend, since a bus name is never handed down) into the lock file behind `lock`, in place of
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
    if !content.is_empty() && LockRecord::parse_whole(&content).is_none() {
        return Err(invalid(
            "cannot name this process in",
            "it holds something other than a holder record",
        ));
    }
    let mut line = LockRecord::for_self(vec![Backend::LockFile], None, None).to_line();
    if line.len() < content.len() {
        // `to_line` ends with the newline; JSON allows the spaces before it.
        line.pop();
        line.resize(content.len() - 1, b' ');
        line.push(b'\n');
    }
    write_whole(lock, &line).map_err(|e| Error::io("cannot write holder record to", &path, e))
}
