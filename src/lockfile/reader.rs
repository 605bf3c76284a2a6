//! Naming the holder of a held lock file from its record, and the short, event-driven grace a
//! just-started holder gets to write it.
//! Must not: decide who holds the lock; the kernel lock decides, never the record.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno;

use crate::holder::Holder;

use super::grace::{await_answer, await_answer_async};
use super::record::{LockRecord, read_content};

/// How long a refused copy waits for a just-started holder to write its record before it
/// reports the holder as unknown. The holder writes it right after locking, before it connects to
/// the bus, so the wait is normally a few system calls long.
pub(super) const RECORD_GRACE: Duration = Duration::from_secs(2);

/// A holder of `path` of whom nothing is known.
pub(super) fn unknown_holder(path: &Path) -> Holder {
    Holder {
        found_by: Some(crate::scope::Backend::LockFile),
        lock_file: Some(path.to_owned()),
        ..Holder::default()
    }
}

/// One look at a held file's record: `Some` when that is the answer (the record, or a holder
/// unknown because the file cannot be read), `None` when there is no record (yet).
///
/// A read error is not an empty record: it is logged, and the holder is unknown at once (no
/// grace: waiting cannot make the file readable). Either way the file stays held: the kernel
/// lock decides, never what could be read of it.
///
/// A record that names another user than the file's owner is not believed: whoever holds a
/// file of theirs may write anything in it (a review: another user's file in a shared sticky
/// directory named root's PID 1 as the running copy). The holder is then unknown, at once.
/// Root's record is believed in a file of another user's in a directory nobody but its owner
/// may write (a service's own lock directory, where root's copy gives the file to the
/// service's user): only root or that owner could have put it there. A holder otherwise seldom
/// writes into a file another user owns (one others may write, given with `lock_file`; a writer
/// in another user namespace, whose IDs read differently here): it is then unknown too, which
/// is not a wrong answer. Nor is a record believed whose process of this host runs as none of
/// the user it names (the file's owner naming root's PID 1: a review), as a holder that gave up
/// its user after acquiring is not: unknown, again.
///
/// A file that no record is coming to is unknown at once too, with no grace: one empty, or
/// whose content does not start as a record does (a record is only ever written over another
/// one, so a torn read starts as one). A file of ours has a record from the moment it has its
/// name (see `placeholder`), so these are someone else's files given as the lock file, which
/// nothing of ours is written into (see `Now::keep_file`), or rarely one of ours still being
/// set up where it could not be made under another name first.
pub(super) fn look_at_record(file: &OwnedFd, path: &Path) -> Option<Holder> {
    match read_content(file) {
        Ok(content) if !content.starts_with(b"{") && !content.starts_with(b"\t{") => {
            Some(unknown_holder(path))
        }
        Ok(content) => match LockRecord::parse(&content) {
            Some(record) if !vouched_for(file, path, record.uid) || runs_as_another(&record) => {
                tracing::debug!(path = %path.display(), uid = record.uid,
                    "a holder record naming another user than the lock file's owner; the holder is unknown");
                Some(unknown_holder(path))
            }
            record => record
                .filter(|record| !names_a_process_gone_from_here(record))
                .map(|record| record.into_holder(path.to_owned())),
        },
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %std::io::Error::from(e),
                "cannot read the holder record of a held lock file; the holder is unknown");
            Some(unknown_holder(path))
        }
    }
}

/// Does `record` name a process of this host (or of no host: every record of ours names one)
/// that runs now as none of the user the record names (by its real, effective, saved or file
/// system user ID)? False when that cannot be told, or the process is not there (see
/// [`names_a_process_gone_from_here`]).
fn runs_as_another(record: &LockRecord) -> bool {
    if record.hostname.is_some() && !of_this_host(record) {
        return false;
    }
    crate::holder::process_uids(record.pid).is_some_and(|uids| !uids.contains(&record.uid))
}

/// Does `record` give this host's name?
fn of_this_host(record: &LockRecord) -> bool {
    let here = rustix::system::uname();
    record.hostname.as_deref().map(str::as_bytes) == Some(here.nodename().to_bytes())
}

/// Could the user `uid` a record names have written it into `file`, at `path`? Its owner, or
/// root in a directory that nobody but its owner may write (see [`look_at_record`]). False when
/// that cannot be told.
fn vouched_for(file: &OwnedFd, path: &Path, uid: u32) -> bool {
    let Ok(st) = rustix::fs::fstat(file) else {
        return false;
    };
    st.st_uid == uid
        || (uid == 0
            && path
                .parent()
                .and_then(|dir| rustix::fs::stat(dir).ok())
                .is_some_and(|dir| dir.st_mode & 0o022 == 0))
}

/// Does `record` name a process of this host that no longer exists? Then it is the record of a
/// holder that died, which the copy now holding the lock has not cleared yet (it does so right
/// after locking): it is treated like an empty file, given the same grace, and the holder is
/// reported as unknown if it stays, never as the dead process. (Also the case of a `run`
/// wrapper killed while its COMMAND keeps the lock; and a dead holder not yet reaped.) Only for reporting: the kernel lock
/// decides who holds the instance. A holder in another PID namespace with our host name looks
/// gone too: it is then reported as unknown, after the grace.
///
/// A process that is alive under the record's PID but started at another time than the record
/// says is not the holder either: the holder died and its PID was reused.
fn names_a_process_gone_from_here(record: &LockRecord) -> bool {
    // No host name: the first record of a copy of an earlier version, which wrote none there
    // (a long soak saw the dead PID of one killed right after writing it named as the holder).
    if record.hostname.is_some() && !of_this_host(record) {
        return false;
    }
    let Some(pid) = i32::try_from(record.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // A zombie is gone too: it died (and with it its lock), though its parent has not reaped
    // it yet (a `run` keeper whose wrapper is dead waits for its new parent).
    if rustix::process::test_kill_process(pid) == Err(Errno::SRCH)
        || crate::holder::process_is_zombie(record.pid)
    {
        return true;
    }
    started_elsewhen(record)
}

/// How far apart two readings of one process's start time may be. Both are the boot time plus
/// the process's ticks since boot, and the boot time is derived from the wall clock, so a step
/// of the clock between the two readings (an NTP step at boot) moves it; slewing does not.
/// A step larger than this makes a live holder "unknown" (never a wrong name); a process
/// that reused the PID within this margin of the holder's start would still be named.
const START_TIME_TOLERANCE_SECS: u64 = 5;

/// Did the process now under the record's PID start at another time than the record says?
/// `false` when either time is unknown: then nothing says it is another process.
fn started_elsewhen(record: &LockRecord) -> bool {
    let Some(recorded) = record.start_time else {
        return false;
    };
    let Some(now) = crate::holder::process_start_time(record.pid)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    else {
        return false;
    };
    now.as_secs().abs_diff(recorded) > START_TIME_TOLERANCE_SECS
}

/// An inotify instance (non-blocking) that becomes readable when `path` is written, for the
/// grace a holder gets to write its record. `None` when one cannot be had.
fn record_watch(path: &Path) -> Option<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let inotify = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK).ok()?;
    inotify::add_watch(&inotify, path, WatchFlags::MODIFY | WatchFlags::CLOSE_WRITE).ok()?;
    Some(inotify)
}

/// Reads the holder's record. A holder writes it just after locking, so an empty file is given a
/// short, event-driven grace (inotify, no polling) before the holder is reported as unknown.
///
/// This blocks for up to [`RECORD_GRACE`]: from async code use [`read_holder_async`].
pub(super) fn read_holder(file: &OwnedFd, path: &Path) -> Holder {
    if let Some(holder) = look_at_record(file, path) {
        return holder;
    }
    record_watch(path)
        .and_then(|inotify| {
            let deadline = Instant::now() + RECORD_GRACE;
            // Looked at again once the watch is in place, so a write between the two counts.
            await_answer(&inotify, None, deadline, || look_at_record(file, path))
        })
        .unwrap_or_else(|| unknown_holder(path))
}

/// [`read_holder`] for async code, in any runtime (no I/O or time driver needed): the grace is
/// waited out on a thread of its own while the executor runs other tasks, and dropping the
/// future ends that thread at once (see [`await_answer_async`]). The usual answer, a record
/// already there, costs no thread.
pub(super) async fn read_holder_async(file: &OwnedFd, path: &Path) -> Holder {
    if let Some(holder) = look_at_record(file, path) {
        return holder;
    }
    let (Some(inotify), Ok(file)) = (record_watch(path), file.try_clone()) else {
        return unknown_holder(path);
    };
    let deadline = Instant::now() + RECORD_GRACE;
    let thread_path = path.to_owned();
    await_answer_async(inotify, deadline, move || {
        look_at_record(&file, &thread_path)
    })
    .await
    .unwrap_or_else(|| unknown_holder(path))
}
