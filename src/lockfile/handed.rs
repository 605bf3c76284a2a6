//! A held lock handed to another process — `run`'s keeper, or any child given a duplicate of
//! [`InstanceGuard::lock_file_descriptor`](crate::InstanceGuard::lock_file_descriptor) — which
//! holds the instance on its own once the process that acquired it is gone: it names itself in
//! the record, so that refused copies name a live holder at once instead of a dead one (which
//! they report as "holder unknown", after the grace a record gets).
//!
//! Such a process can also keep the lock file as a guard keeps its own ([`HandedLockFile`]): its
//! directory watched with inotify (the acquiring process's own instance, when it was handed
//! over too: its unread events are judged first), and the file re-created when it is removed,
//! by the guard's own re-creation (`recover.rs`), with the same checks and rate limit.
//! Must not: take a lock other than on a file it re-creates in place of the removed one, or
//! write into a file that is not a lock file held through the descriptor it is given.
//!
//! Over 400 lines: the record's rewrite and the kept file share one contract (the descriptor
//! handed over, held through it), and its two constructors (a new watch, or the acquiring
//! process's own) one body; split, each half would have to restate the other's checks.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags};

use crate::error::{Error, Result};
use crate::options::InstanceOptions;
use crate::scope::Backend;

use super::dir::open_existing_dir;
use super::held::HeldLock;
use super::ofd::is_held;
use super::record::{LockRecord, read_content, write_or_unknown};
use super::recover::Judgement;
use super::watch::{NameHistory, WatchHandle, new_inotify};

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
/// A file that is not one of ours (it holds no holder record of ours: someone else's file,
/// given as the lock file, which nothing of ours is ever written into) is left as it is, and
/// this returns `Ok`: copies refused meanwhile are told the holder is unknown.
///
/// # Errors
///
/// [`Error::Io`] (naming the file) when `lock` is not a regular file, the lock is not held
/// through it (nobody holds it, or another open file does), or it cannot be read or written.
pub fn record_this_process_as_holder(lock: BorrowedFd<'_>) -> Result<()> {
    rewrite_as_holder(lock, false).map(drop)
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
    rewrite_as_holder(lock, true).map(drop)
}

/// The two above: with `keep_bus_name`, the bus name the current record gives is kept. Returns
/// the line written (or for a kept file the one a re-created file would get), and whether the
/// file is kept: anything but a record of ours ([`LockRecord::keep`] unset) is someone else's
/// file, or one of ours whose holder found no room for its record (nothing tells them apart; a
/// file of ours left behind, empty, keeps nobody out and lets no second copy in), and nothing
/// is written into it.
fn rewrite_as_holder(lock: BorrowedFd<'_>, keep_bus_name: bool) -> Result<(Vec<u8>, bool)> {
    let (line, keep, path) = holder_line(lock, keep_bus_name)?;
    if !keep {
        write_holder_line(lock, &line, &path)?;
    }
    Ok((line, keep))
}

/// The checks of [`rewrite_as_holder`], and the line it writes, with whether the file is kept
/// and the file's path (for errors); nothing is written. The line is never padded for a kept
/// file, nor marked kept: it is the one a re-created file, ours, would get.
fn holder_line(lock: BorrowedFd<'_>, keep_bus_name: bool) -> Result<(Vec<u8>, bool, PathBuf)> {
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
    let keep = current.as_ref().is_none_or(|current| current.keep);
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
    let mut line = LockRecord {
        keep: false,
        ..record
    }
    .to_line();
    if !keep && line.len() < content.len() {
        // `to_line` ends with the newline; JSON allows the spaces before it.
        line.pop();
        line.resize(content.len() - 1, b' ');
        line.push(b'\n');
    }
    Ok((line, keep, path))
}

/// Writes `line` (from [`holder_line`]) as the record of the lock file `lock`, at `path`.
fn write_holder_line(lock: BorrowedFd<'_>, line: &[u8], path: &Path) -> Result<()> {
    // No room (a full file system): emptied instead, "holder unknown"; the line is still the
    // one a re-created file gets.
    write_or_unknown(lock, line, path)
        .map_err(|e| Error::io("cannot write holder record to", path, e))?;
    Ok(())
}

/// A lock file held through a descriptor handed over by the process that acquired it, kept by
/// this process as an [`InstanceGuard`](crate::InstanceGuard) keeps its own once that process is
/// gone: `run`'s keeper holds it so while it stops what COMMAND left running.
///
/// Made with [`HandedLockFile::new`] (or [`HandedLockFile::with_watch`], with the acquiring
/// process's own inotify instance, whose events that process never read are judged first), it
/// names this process in the record (as [`record_this_process_as_holder`] does) and watches the
/// lock file's directory, the directories above it and the symlinks on the way with inotify, as
/// the guard's watch does:
/// [`HandedLockFile::watch_descriptor`] becomes readable on a change, and
/// [`HandedLockFile::check`] then looks. A lock file that was only removed (an administrator
/// cleaning `/run/lock`, a tmp cleaner), as the watch saw it go, is re-created by the guard's
/// own code, with every
/// check an acquisition makes: made anew (`O_EXCL`) in the same directory, still the one the
/// path leads to, locked, this record written, and verified held; a removal that comes too
/// often (more than 16 within a second) is a loss, as for the guard. Otherwise (replaced, moved,
/// its directory gone, another copy made a file at the path, or a removal found without having
/// been seen: before this was made, or without inotify, when another copy may have come and
/// gone in between; with [`HandedLockFile::with_watch`], before the acquisition only) the lock
/// no longer excludes other copies: [`HandedLockState::Lost`], and
/// nothing is re-created any more.
///
/// Dropping it closes its descriptors (the lock goes with the last descriptor of its open
/// file: others may hold some); the file is not removed, since the process that acquired it
/// is the one that removes it: should it be gone, the next copy takes the file over from the
/// record this one leaves and removes it. The one process that keeps it once the acquiring
/// process is gone removes it with [`HandedLockFile::release`]. A file that was there, empty, before the acquiring
/// process took it (`touch keep.flag`, a shared `job.lock`) is someone else's: nothing is ever
/// written into it (no record names this process there), and it is left as it is. Blocking
/// and synchronous: no thread, no runtime.
#[derive(Debug)]
#[must_use = "the lock file is kept only while this lives and `check` is called on each change"]
pub struct HandedLockFile {
    lock: HeldLock,
    handle: WatchHandle,
    /// `None` when inotify could not be set up (see [`HandedLockFile::watch_descriptor`]).
    inotify: Option<OwnedFd>,
    /// What its events said (see `NameHistory`), and the watch of our directory in `inotify`
    /// once it could be added (at `new`, or by a later re-watch); in a mutex since `check`
    /// takes `&self`.
    history: std::sync::Mutex<(NameHistory, Option<i32>)>,
    /// The watch is the acquiring process's, whose unread events the first `check` reads (see
    /// [`HandedLockFile::with_watch`]).
    unread: std::sync::atomic::AtomicBool,
    /// Lost by a rule of [`HandedLockFile::with_watch`] of its own (a link made anew among the
    /// events the acquiring process never read): final, as `Lost` is.
    given_up: std::sync::atomic::AtomicBool,
}

/// What [`HandedLockFile::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HandedLockState {
    /// The path still leads to the file held.
    Held,
    /// The file had been removed; a new one was made at the path, locked, and recorded, and it
    /// is the one held now (see [`HandedLockFile::descriptor`]).
    Recreated,
    /// The lock no longer excludes other copies (see [`HandedLockFile`]); final.
    Lost,
}

impl HandedLockFile {
    /// Keeps the lock file held through `lock`, the lock file of `options` (planned as an
    /// acquisition plans it, in this process's environment: give the options the acquiring
    /// process used). `lock` must be a descriptor, open for writing, of a lock file held through
    /// it (a duplicate of the acquiring process's lock), either still at the planned path or
    /// removed from it (then this process cannot know what happened at the path meanwhile:
    /// `check` reports it lost). `keep_bus_name`: the record keeps the bus name as
    /// [`record_this_process_as_holder_keeping_bus_name`] does. Call it once the acquiring
    /// process is gone, then [`HandedLockFile::check`] at once and each time
    /// [`HandedLockFile::watch_descriptor`] is readable.
    ///
    /// # Errors
    ///
    /// As [`record_this_process_as_holder`]; and those of an acquisition's planning and of its
    /// lock directory's checks ([`Error::UnsafeLockPath`], [`Error::NetworkFilesystem`]...); an
    /// [`Error::Io`] when the options plan no lock file, or when `lock` is a file with a name
    /// that is not the planned path. The lock is then not kept (`lock` is closed). Inotify that
    /// cannot be set up (the per-user limit of instances reached, a directory on the way that
    /// cannot be watched) is no error: it is logged at `warn`, and the caller looks
    /// periodically instead (see [`HandedLockFile::watch_descriptor`]).
    pub fn new(options: &InstanceOptions, lock: OwnedFd, keep_bus_name: bool) -> Result<Self> {
        Self::keep(options, lock, keep_bus_name, None)
    }

    /// As [`HandedLockFile::new`], watching with `inotify`, a duplicate of the acquiring
    /// process's own watch, from
    /// [`InstanceGuard::lock_file_watch_descriptor`](crate::InstanceGuard::lock_file_watch_descriptor)
    /// (`run`'s keeper gets one with the lock), instead of a new instance: its queue holds what
    /// happened at the path that the acquiring process never read (it was stopped, then killed),
    /// and the first [`HandedLockFile::check`] reads it and judges it as the guard's watch
    /// would have — a file made at our name by someone else (our file moved away and back while
    /// another copy ran), a directory on the way moved, a queue overflowed where that counts:
    /// lost; our file only removed: re-created, even if it was gone before this was made, since
    /// the removal is seen (its directory was watched since the acquisition). A new instance
    /// would know none of that, and take a path that leads to our file again for one that
    /// never left it.
    ///
    /// Never read from `inotify` while the acquiring process lives: its events are that
    /// process's watch's. It is made non-blocking (it is already, as the guard makes it).
    ///
    /// # Caveats
    ///
    /// What the acquiring process read but had not acted on when it died (killed between
    /// reading events and judging them: microseconds, unless it was stopped just there) is not
    /// in the queue any more, and nothing here knows it: a removal among it is found unseen (a
    /// loss, as without this), but a change another copy used, undone since, goes unseen.
    ///
    /// Stricter than the guard's own watch, never looser, where the queue cannot tell: a file
    /// the acquiring process re-created itself and whose creation it had not read yet counts
    /// as made by someone else (a loss); and so does a symlink on the way made anew, since
    /// whether its new way leaves the one the acquiring process last saw cannot be told here.
    ///
    /// # Errors
    ///
    /// As [`HandedLockFile::new`]; and an [`Error::Io`] when `inotify` is not an inotify
    /// instance (or cannot be made non-blocking). The lock is then not kept.
    pub fn with_watch(
        options: &InstanceOptions,
        lock: OwnedFd,
        keep_bus_name: bool,
        inotify: OwnedFd,
    ) -> Result<Self> {
        Self::keep(options, lock, keep_bus_name, Some(inotify))
    }

    /// [`HandedLockFile::new`], or [`HandedLockFile::with_watch`] with `lent`.
    fn keep(
        options: &InstanceOptions,
        lock: OwnedFd,
        keep_bus_name: bool,
        lent: Option<OwnedFd>,
    ) -> Result<Self> {
        let (_, _, plan, _) = options.resolve()?;
        let Some(plan) = plan else {
            return Err(Error::io(
                "the options plan no lock file to keep",
                PathBuf::new(),
                std::io::ErrorKind::InvalidInput.into(),
            ));
        };
        let path = plan.path();
        let lock_dir = open_existing_dir(&plan, options.allow_network_filesystem)?;
        let st = rustix::fs::fstat(&lock).map_err(|e| Error::io("cannot stat", &path, e.into()))?;
        let (line, keep, fd_path) = holder_line(lock.as_fd(), keep_bus_name)?;
        let lock =
            HeldLock::new(lock, &st, keep, &plan, &lock_dir, path.clone()).handed(line.clone());
        let handle = lock.watch_handle();
        // A file that still has a name must be the one the planned path leads to: any other
        // (the path naming nothing, another file, or nothing we can follow) is not the lock file
        // these options plan, and is refused. Checked before anything is written: a file handed
        // over by mistake is left as it was (a review found a record written into someone's data
        // file while the path named another one). An unlinked one (its holder's file was removed,
        // and this watch could not see it) is already a loss for `check`: nobody can find it, so
        // nothing is written into it either.
        if st.st_nlink > 0 && handle.path_as(st.st_dev, st.st_ino).is_some() {
            return Err(Error::io(
                "the descriptor handed over is not the lock file",
                path,
                std::io::ErrorKind::InvalidInput.into(),
            ));
        }
        if st.st_nlink > 0 && !keep {
            write_holder_line(lock.fd(), &line, &fd_path)?;
        }
        // Best effort: a directory left unwatched is still looked at by the periodic checks.
        let mut history = NameHistory::new(handle.recreated(), handle.acquired_way());
        let mut dir_watch = None;
        let inherited = lent.is_some();
        // Whether the lent instance watched our directory's entries before we add anything:
        // since the acquisition, then (see `lent::watches_entries_of`).
        let mut watched_since_acquired = false;
        let inotify = match lent {
            Some(lent) => {
                let refuse = |message: &str| {
                    Error::io(
                        "cannot keep the lock file with the watch handed over",
                        path.clone(),
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_owned()),
                    )
                };
                if !super::lent::is_inotify(lent.as_fd()) {
                    return Err(refuse("not an inotify instance"));
                }
                // `NameHistory::read` reads until the queue is empty.
                let flags = rustix::fs::fcntl_getfl(&lent)
                    .and_then(|flags| rustix::fs::fcntl_setfl(&lent, flags | OFlags::NONBLOCK))
                    .map_err(|e| {
                        Error::io("cannot make the watch non-blocking", path.clone(), e.into())
                    });
                flags?;
                let dir = rustix::fs::fstat(&*handle.dir).map_err(|e| {
                    Error::io("cannot stat the directory of", path.clone(), e.into())
                })?;
                watched_since_acquired =
                    super::lent::watches_entries_of(lent.as_fd(), dir.st_dev, dir.st_ino);
                Ok(lent)
            }
            None => new_inotify(),
        };
        let inotify = match inotify {
            Ok(inotify) => match handle.add_watches(&inotify) {
                // A directory on the way left unwatched is looked at by the periodic checks.
                Ok(watches) => {
                    history.note_others_may_rename(watches.others_may_rename);
                    history.note_links(watches.links);
                    dir_watch = Some(watches.dir);
                    Some(inotify)
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e,
                        "cannot watch the lock directory with inotify; its removals are not \
                         seen (a removed lock file is lost, not re-created)");
                    Some(inotify)
                }
            },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot watch the lock file with inotify");
                None
            }
        };
        // A removal read from now on is one of our file only if the path leads to it now that
        // our directory is watched: before, another copy's file may have been there (ours
        // unlinked before we were handed it), whose removal would look like ours. Not so in
        // the acquiring process's instance, which watched it since the acquisition: every file
        // made at our name since is in its queue, or was read by that process, which judged it.
        if dir_watch.is_none()
            || (!watched_since_acquired && handle.path_as(st.st_dev, st.st_ino).is_some())
        {
            history.watched_late();
        }
        Ok(HandedLockFile {
            lock,
            handle,
            inotify,
            history: std::sync::Mutex::new((history, dir_watch)),
            unread: std::sync::atomic::AtomicBool::new(inherited),
            given_up: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Readable when something changed that [`HandedLockFile::check`] must look at (an
    /// inotify instance: for `poll` or an async reactor, never to be read by the caller).
    /// `None` when inotify could not be set up: then nothing says when to look, and the caller
    /// calls `check` periodically (`run`'s keeper does every 200 ms in any case, since a
    /// directory on the way may have been left unwatched). A removal found so was not seen
    /// happen, and is a loss (see [`HandedLockFile`]).
    pub fn watch_descriptor(&self) -> Option<BorrowedFd<'_>> {
        self.inotify.as_ref().map(AsFd::as_fd)
    }

    /// The lock file's path, as planned.
    pub fn path(&self) -> &std::path::Path {
        self.lock.path()
    }

    /// The descriptor of the file held now: the same number after a re-creation, then
    /// referring to the new file.
    pub fn descriptor(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }

    /// Gives the lock file up as the process that acquired it would have: removed while still
    /// held, if the path still leads to it and no other process shares its lock (a duplicate
    /// given to a child that is still alive: then it is only closed here), then unlocked. A
    /// file that was someone else's before it was locked is left as it is. For the process
    /// that keeps the lock file once the acquiring process is gone, when it has no more use
    /// for it (`run`'s keeper, once the last of COMMAND's tree is gone): left behind, the file
    /// is taken over by the next copy, but a copy that may not write it (another user's, in a
    /// shared directory) cannot, and is kept out until its owner runs again (a review).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be removed; it is unlocked all the same.
    pub fn release(self) -> Result<()> {
        let mut lock = self.lock;
        lock.claim();
        lock.release()
    }

    /// Takes the pending changes and looks at the path: re-creates the lock file if it was
    /// only removed (see [`HandedLockFile`]). Once [`HandedLockState::Lost`], always `Lost`.
    pub fn check(&self) -> HandedLockState {
        let mut state = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (history, dir_watch) = &mut *state;
        use std::sync::atomic::Ordering::Relaxed;
        if self.given_up.load(Relaxed) {
            return HandedLockState::Lost;
        }
        if let Some(inotify) = &self.inotify {
            // Our directory unwatched (no descriptor matches -1): no removal is seen, so none
            // is re-created; the way's events still count.
            let _ = history.read(inotify, dir_watch.unwrap_or(-1), self.handle.file_name());
            // The acquiring process's unread events: a link made anew on the way among them
            // cannot be judged against the way that process last saw, unknown here.
            if self.unread.swap(false, Relaxed) && history.link_made() {
                tracing::warn!(path = %self.path().display(),
                    "a symlink on the lock path was made anew while the process that acquired \
                     was stopped or dying: taken for a loss");
                self.given_up.store(true, Relaxed);
                return HandedLockState::Lost;
            }
            // Before the check, as the guard's watch does: see `WatchHandle::rewatch`. Our
            // directory's watch, if it could not be added before, is taken from now on (a
            // removal before it is one not seen: a loss).
            let rewatched = self.handle.rewatch(inotify, history);
            if dir_watch.is_none() && rewatched.is_some() {
                *dir_watch = rewatched;
                history.watched_late();
            }
        }
        // As the guard's watch decides (see `WatchHandle::judge`).
        let inotify = self.inotify.as_ref().zip(*dir_watch);
        match self.handle.judge(history, inotify) {
            // Leading nowhere for now, as the guard's watch waits: still held.
            Judgement::Held | Judgement::Nowhere => HandedLockState::Held,
            Judgement::Recreated => HandedLockState::Recreated,
            Judgement::Lost(_) | Judgement::Over => HandedLockState::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor of another file, held through it and handed over by mistake with options
    /// that plan another lock file, is refused before anything is written into that file (a
    /// review found the holder record written into it, then the refusal).
    #[test]
    fn a_handed_descriptor_of_another_file_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("data.bin");
        std::fs::write(&other, b"").expect("create");
        let file: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&other)
            .expect("open")
            .into();
        super::super::ofd::lock_exclusive(&file, false).expect("lock");
        std::fs::create_dir(dir.path().join("locks")).expect("mkdir");
        let options = InstanceOptions::new("org.example.HandedByMistake")
            .lock_dir(dir.path().join("locks"))
            .backend(crate::Backend::LockFile);
        let refused = HandedLockFile::new(&options, file, false);
        assert!(refused.is_err(), "another file was taken: {refused:?}");
        assert_eq!(
            std::fs::read(&other).expect("read"),
            b"",
            "a file that is not the lock file was written"
        );
    }

    /// The same while the planned path names some other file (a stale, empty lock file): the
    /// descriptor is still not the lock file, and nothing is written into it, nor into the file
    /// at the path.
    #[test]
    fn a_handed_descriptor_of_another_file_is_refused_while_the_path_names_a_third() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = dir.path().join("data.bin");
        std::fs::write(&other, b"").expect("create");
        let file: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&other)
            .expect("open")
            .into();
        super::super::ofd::lock_exclusive(&file, false).expect("lock");
        let locks = dir.path().join("locks");
        std::fs::create_dir(&locks).expect("mkdir");
        let planned = locks.join("org.example.HandedByMistake.lock");
        std::fs::write(&planned, b"").expect("create the planned file");
        let options = InstanceOptions::new("org.example.HandedByMistake")
            .lock_dir(&locks)
            .backend(crate::Backend::LockFile);
        let refused = HandedLockFile::new(&options, file, false);
        let written = std::fs::read(&other).expect("read");
        assert!(refused.is_err(), "another file was taken");
        assert_eq!(
            written,
            b"",
            "a file that is not the lock file was written: {:?}",
            String::from_utf8_lossy(&written)
        );
        assert_eq!(std::fs::read(&planned).expect("read"), b"");
    }

    /// A descriptor of a file with no name left (its holder's file removed) is kept as already
    /// lost: nothing is written into it.
    #[test]
    fn a_handed_unlinked_descriptor_is_lost_and_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = dir.path().join("locks");
        std::fs::create_dir(&locks).expect("mkdir");
        let planned = locks.join("org.example.HandedUnlinked.lock");
        std::fs::write(&planned, b"").expect("create");
        let file: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&planned)
            .expect("open")
            .into();
        super::super::ofd::lock_exclusive(&file, false).expect("lock");
        std::fs::remove_file(&planned).expect("unlink");
        let probe = file.try_clone().expect("dup");
        let options = InstanceOptions::new("org.example.HandedUnlinked")
            .lock_dir(&locks)
            .backend(crate::Backend::LockFile);
        let kept = HandedLockFile::new(&options, file, false).expect("kept, as lost");
        assert!(
            matches!(kept.check(), HandedLockState::Lost),
            "an unlinked lock file is a loss"
        );
        assert_eq!(
            rustix::fs::fstat(&probe).expect("fstat").st_size,
            0,
            "a record was written into an unlinked file"
        );
    }
}
