//! The watch of a held lock: what changed under it (`PathChange`), the inotify set-up on its
//! directory, the symlinks and every directory the path goes through (`way_to`), and the
//! re-verification that it still excludes other copies.
//! Must not: report a loss or re-create the file itself (see `recover.rs` and `watcher.rs`).
//!
//! Its memory of what inotify said is `history.rs`; the way the path goes, `way.rs`.

mod history;
mod way;

pub(super) use history::NameHistory;
use way::way_to;
pub(super) use way::{Way, others_may_rename_in};

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::loss::LossReason;

use super::held::Shared;
use super::ofd::{holds_write_lock, is_held, is_locked_at_all};

/// What changed under a held lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathChange {
    Removed,
    Replaced,
    /// The path cannot be followed any more (`EACCES`, `ELOOP`...): it cannot be confirmed to
    /// lead to our file.
    Unreachable,
}

/// Has the lock path stopped leading to our file, and how? `None` while it still does. A path
/// that can no longer be followed (`EACCES`) has stopped: it cannot be confirmed. With the
/// reason, whether the path leads nowhere while our directory still names our file: its
/// directory's path does not resolve (`ENOENT`, `ENOTDIR`: a link on the way removed, say),
/// so that no copy can take a lock through it.
pub(super) fn lock_change(handle: &WatchHandle) -> Option<(LossReason, bool)> {
    let (dev, ino) = handle.identity();
    let reason = lock_change_of(handle, dev, ino)?;
    if handle.in_dir_as(dev, ino).is_some() {
        return Some((reason, false));
    }
    match handle.path.parent().map(rustix::fs::stat) {
        Some(Err(Errno::NOENT | Errno::NOTDIR)) => Some((reason, true)),
        // It leads somewhere (again, if a link was made since the look): looked at once more.
        _ => lock_change_of(handle, dev, ino).map(|reason| (reason, false)),
    }
}

/// [`lock_change`] for the file (dev, ino), for a caller that holds the shared state's lock.
pub(super) fn lock_change_of(handle: &WatchHandle, dev: u64, ino: u64) -> Option<LossReason> {
    handle.path_as(dev, ino)?;
    Some(match handle.in_dir_as(dev, ino) {
        Some(PathChange::Removed) => LossReason::LockFileRemoved,
        Some(PathChange::Replaced) => LossReason::LockFileReplaced,
        // Our directory still has our file (or cannot be looked in any more), but the path no
        // longer leads there: the directory, or one on the way, was moved, removed or replaced
        // (or a symlink retargeted), or made one we may not enter.
        None | Some(PathChange::Unreachable) => LossReason::LockDirectoryRemoved,
    })
}

/// The events of a watched directory's entries (and of itself). `MASK_ADD`: a directory
/// watched twice (the lock directory as one the path goes through, or on a second call) keeps
/// every event it was given.
const DIR_ENTRY_EVENTS: rustix::fs::inotify::WatchFlags = rustix::fs::inotify::WatchFlags::DELETE
    .union(rustix::fs::inotify::WatchFlags::MOVED_FROM)
    .union(rustix::fs::inotify::WatchFlags::MOVED_TO)
    .union(rustix::fs::inotify::WatchFlags::CREATE)
    .union(rustix::fs::inotify::WatchFlags::DELETE_SELF)
    .union(rustix::fs::inotify::WatchFlags::MOVE_SELF)
    .union(rustix::fs::inotify::WatchFlags::ONLYDIR)
    .union(rustix::fs::inotify::WatchFlags::MASK_ADD);

pub(super) fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 4096];
    while matches!(rustix::io::read(fd, &mut buf), Ok(n) if n > 0) {}
}

/// A new inotify instance, for [`WatchHandle::add_watches`]. Made before the lock and the bus
/// connection are opened, so that their descriptors are numbered above it: see
/// [`HeldLock::move_above`](super::held::HeldLock::move_above) for why that order matters.
pub(crate) fn new_inotify() -> std::io::Result<OwnedFd> {
    use rustix::fs::inotify::{self, CreateFlags};
    Ok(inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?)
}

/// Identifies a held lock file's path and inode, for re-checks from another task.
#[derive(Debug, Clone)]
pub(crate) struct WatchHandle {
    pub(super) dir: Arc<OwnedFd>,
    pub(super) file_name: OsString,
    pub(super) path: PathBuf,
    pub(super) shared: Arc<Shared>,
}

impl WatchHandle {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `fd` (a [`new_inotify`] instance) readable whenever an entry of the lock directory
    /// is removed, renamed or created, or the directory itself goes; whenever a directory the
    /// path goes through is renamed or removed (see [`way_to`]: the ancestors of the path as
    /// given, and, through each symlink, the directories above its target); and whenever an
    /// entry of a directory holding a symlink on the way changes (a flipped
    /// `current -> releases/vN`): every way the path can stop naming our file without a mount.
    ///
    /// Made at acquisition ([`WatchHandle::add_watches_now`]), so that whatever happens on the
    /// way from then on is an event the watch reads, however late its thread starts (a holder
    /// stopped just after acquiring, while a directory is moved away and back or a link flipped
    /// away and back, and another copy runs meanwhile); then again by the watch's thread (and
    /// `HandedLockFile::new`), which gets the same watches, through our directory's descriptor;
    /// and after each wake-up ([`WatchHandle::rewatch`]), since the path may go through other
    /// directories by then.
    ///
    /// Returns the watches (see [`Watches`]). An error only when our directory itself cannot
    /// be watched.
    pub(crate) fn add_watches(&self, fd: &OwnedFd) -> std::io::Result<Watches> {
        let dir = self.add_dir_watch(fd)?;
        let way = self.path.parent().map(way_to).unwrap_or_default();
        let (complete, links) = self.add_way_watches(fd, &way);
        Ok(Watches {
            dir,
            complete,
            links,
            others_may_rename: way.others_may_rename,
        })
    }

    /// [`WatchHandle::add_watches`] as the acquisition makes them, our directory's through the
    /// path just checked (see [`WatchHandle::add_dir_watch_now`]). Best effort: the watch's
    /// thread adds them again, and a directory left unwatched gets the periodic re-check.
    /// The way is the one the acquisition's walk went a moment ago: no system call but the
    /// watches' own. Returns the links on the way (see [`Watches::links`]): the watch's history
    /// must know them from the start, since the path may go another way by the time its thread
    /// adds its own.
    pub(crate) fn add_watches_now(&self, fd: &OwnedFd) -> std::io::Result<Vec<(i32, OsString)>> {
        self.add_dir_watch_now(fd)?;
        Ok(self.add_way_watches(fd, &self.shared.lock_dir.way).1)
    }

    /// The way the walk that opened our directory went (the acquisition's): where a watch's
    /// history starts (see [`NameHistory::new`]).
    pub(super) fn acquired_way(&self) -> Arc<Way> {
        Arc::clone(&self.shared.lock_dir.way)
    }

    /// The way the path goes now.
    pub(super) fn way_now(&self) -> Way {
        self.path.parent().map(way_to).unwrap_or_default()
    }

    /// The watches of [`WatchHandle::add_watches`] but our directory's own, along `way`:
    /// whether all could be added, and the links on the way (see [`Watches`]).
    fn add_way_watches(&self, fd: &OwnedFd, way: &Way) -> (bool, Vec<(i32, OsString)>) {
        use rustix::fs::inotify::{self, WatchFlags};
        let mut complete = true;
        let mut links = Vec::new();
        // Every directory holding a symlink on the way, so that a flipped link wakes us too
        // (its path then leads to another file), and is remembered (see `NameHistory`).
        for (parent, link) in &way.links {
            match inotify::add_watch(fd, parent.as_path(), DIR_ENTRY_EVENTS) {
                Ok(wd) => links.push((wd, link.clone())),
                Err(_) => complete = false,
            }
        }
        // And every directory the path goes through, for itself only: renaming or removing any
        // of them (`mv app app.old && mv app.new app`, the usual deploy, or the same above a
        // symlink's target) leads the path elsewhere without touching our directory. Self
        // events come only when that directory itself moves or goes, so they cost an idle
        // holder nothing.
        // The last is our directory itself, whose own watch has these events already (or, when
        // the path no longer leads there, the check finds a loss at once).
        for dir in way.entered.iter().rev().skip(1) {
            // One we may not read cannot be watched: the re-check decides then.
            complete &= inotify::add_watch(
                fd,
                dir.as_path(),
                WatchFlags::MOVE_SELF
                    | WatchFlags::DELETE_SELF
                    | WatchFlags::ONLYDIR
                    | WatchFlags::MASK_ADD,
            )
            .is_ok();
        }
        (complete, links)
    }

    /// [`WatchHandle::add_dir_watch`] as the acquisition makes it, on its path: through the
    /// path, checked a moment ago to lead to our directory, a third of the cost of the way
    /// through `/proc` (which the watch thread takes, getting the same watch). Should the path
    /// lead elsewhere by now, our file's removal goes unseen, and is a loss: never the other
    /// way round.
    fn add_dir_watch_now(&self, fd: &OwnedFd) -> std::io::Result<i32> {
        match self.path.parent() {
            Some(parent) if parent.is_absolute() => Ok(rustix::fs::inotify::add_watch(
                fd,
                parent,
                DIR_ENTRY_EVENTS,
            )?),
            _ => self.add_dir_watch(fd),
        }
    }

    /// Watches our directory's entries (one of the watches of [`WatchHandle::add_watches`]):
    /// from then on the removal of our file, and any file made at its name, are events to read
    /// (see [`NameHistory`]). Returns the watch descriptor.
    fn add_dir_watch(&self, fd: &OwnedFd) -> std::io::Result<i32> {
        use rustix::fs::inotify::add_watch;
        // Through our directory descriptor, not its path: the path may have been replaced.
        let dir = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        match add_watch(fd, dir.as_str(), DIR_ENTRY_EVENTS) {
            // No /proc (a bare container or chroot): through its path, checked a moment ago to
            // lead to our directory. Should it lead elsewhere by now, our file's removal goes
            // unseen, and is a loss: never the other way round.
            Err(rustix::io::Errno::NOENT) => match self.path.parent() {
                Some(parent) => Ok(add_watch(fd, parent, DIR_ENTRY_EVENTS)?),
                None => Err(std::io::ErrorKind::NotFound.into()),
            },
            other => Ok(other?),
        }
    }

    /// [`WatchHandle::add_watches`] again, after a wake-up, before the path is checked: when the
    /// path still leads to our file, it may go through other directories by now (a directory
    /// renamed and a link pointed at its new name), which must wake us in turn. Watches already
    /// there stay as they are; those of directories the path has left only wake us in vain.
    /// The links found are remembered in `history`. Best effort: the check decides. Returns our
    /// directory's watch descriptor, when it could be watched.
    pub(super) fn rewatch(&self, fd: &OwnedFd, history: &mut NameHistory) -> Option<i32> {
        let watches = self.add_watches(fd).ok()?;
        history.note_others_may_rename(watches.others_may_rename);
        history.note_links(watches.links);
        Some(watches.dir)
    }

    /// See `Now::watch_verdict`: set by the watch as it stops for the release.
    pub(super) fn note_verdict(&self, verdict: Option<LossReason>) {
        self.shared.now().watch_verdict = Some(verdict);
    }

    /// How many times the holder re-created its lock file so far.
    pub(super) fn recreated(&self) -> u64 {
        self.shared.now().recreated
    }

    /// The file's name in its directory.
    pub(super) fn file_name(&self) -> &std::ffi::OsStr {
        &self.file_name
    }

    /// Is the path still our file? `None` when it is. Asked twice: of the name in the directory
    /// we opened, and of the whole path as given, re-resolved (its symlinks followed as they are
    /// now): a retargeted symlink on the way leads other copies to another file.
    pub(crate) fn check_path(&self) -> Option<PathChange> {
        let (dev, ino) = self.identity();
        self.path_as(dev, ino)
    }

    /// The (dev, ino) of the file the lock is on now.
    pub(super) fn identity(&self) -> (u64, u64) {
        let now = self.shared.now();
        (now.dev, now.ino)
    }

    /// [`WatchHandle::check_path`] for the file (dev, ino).
    pub(super) fn path_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        self.in_dir_as(dev, ino)
            .or_else(|| ours(rustix::fs::lstat(&self.path), dev, ino))
    }

    /// Does the name in the directory we opened still name the file (dev, ino)? `None` when it
    /// does.
    pub(super) fn in_dir_as(&self, dev: u64, ino: u64) -> Option<PathChange> {
        ours(
            rustix::fs::statat(
                &*self.dir,
                self.file_name.as_os_str(),
                AtFlags::SYMLINK_NOFOLLOW,
            ),
            dev,
            ino,
        )
    }
}

/// Is `st` (of the path, or an error getting it) the file (dev, ino)? `None` when it is.
fn ours(st: rustix::io::Result<Stat>, dev: u64, ino: u64) -> Option<PathChange> {
    match st {
        Ok(st) if st.st_dev == dev && st.st_ino == ino => None,
        Ok(_) => Some(PathChange::Replaced),
        Err(Errno::NOENT | Errno::NOTDIR) => Some(PathChange::Removed),
        // The path can no longer be followed to any file (`EACCES`: a directory on the way
        // replaced by one we may not enter, e.g. through `RENAME_EXCHANGE`; `ELOOP`): that it
        // leads to ours can no longer be confirmed, while a copy that can follow it (root)
        // would lock another file. Not "still ours".
        Err(_) => Some(PathChange::Unreachable),
    }
}

/// What [`WatchHandle::add_watches`] added to an inotify instance.
#[derive(Debug)]
pub(crate) struct Watches {
    /// Our directory's watch descriptor.
    pub(crate) dir: i32,
    /// Whether every other watch could be added too: one that could not (a directory we may
    /// enter but not read, the per-user limit of watches reached) leaves a change there to the
    /// periodic re-check, while our directory's own watch goes on seeing what happens to our
    /// file.
    pub(crate) complete: bool,
    /// Each symlink on the way: the watch descriptor of the directory holding it, and its name
    /// (for [`NameHistory::note_links`]).
    pub(super) links: Vec<(i32, OsString)>,
    /// Whether others may rename on the way the watches were added along (see
    /// [`Way::others_may_rename`]), for [`NameHistory::note_others_may_rename`].
    pub(super) others_may_rename: bool,
}

// What a loss report needs beyond `check_path`: whether our lock is still what the kernel sees.
impl WatchHandle {
    /// Re-verifies, right now, that the lock still excludes other copies: no loss decided, our
    /// own description holds the write lock (see `holds_write_lock`), the path (from our
    /// directory, and resolved afresh) names our file, and a fresh open of it shows it locked
    /// (`F_OFD_GETLK` on a new open file description sees our lock as a conflicting one) with
    /// the same (dev, ino). Anything that cannot be checked counts as not verified.
    pub(crate) fn verify_held(&self) -> bool {
        let now = self.shared.now();
        // A loss the watch has decided, told or not, is not undone by a look now.
        if now.released || now.lost {
            return false;
        }
        // Our descriptors, looked at only under the lock of the shared state (see `Files`).
        let Some(files) = self.shared.files.upgrade() else {
            return false;
        };
        // Held through our own description, not merely by someone: a fresh open sees any
        // copy's lock, one taken once ours was let go through a description we share with
        // another process (`run`'s COMMAND, a forked child) included (a review). The kernel
        // says so in `/proc/self/fdinfo`; where it cannot be read (no `/proc`), a lock seen at
        // the path while our description meets no other one's, before and after, is ours.
        let lent = files.lent();
        let unopposed = || is_locked_at_all(lent) == Ok(false);
        if holds_write_lock(lent) {
            self.verify_held_as(now.dev, now.ino)
        } else {
            unopposed() && self.verify_held_as(now.dev, now.ino) && unopposed()
        }
    }

    /// [`WatchHandle::let_go_as`] for the file the lock is on now, unless the lock was released
    /// or lost already. Our own descriptors are looked at under the lock of the shared state,
    /// never after release (see `Files`): held any longer by this thread, they would keep the
    /// lock after the release returned, and a copy started then was refused (a test saw it).
    pub(crate) fn let_go(&self) -> bool {
        let (dev, ino) = {
            let now = self.shared.now();
            if now.released || now.lost {
                return false;
            }
            if self.locked_through_another() {
                return true;
            }
            (now.dev, now.ino)
        };
        self.unheld_at_the_path(dev, ino)
    }

    /// Whether our lock on the file (dev, ino), which the path still leads to, was let go (see
    /// [`LossReason::LockLetGo`]): another open file description holds a lock on it (ours, a
    /// write lock, would exclude any), or one opened now sees no write lock on it. Only what
    /// is seen: a look that fails (no descriptor to spare, the path changing) says nothing, and
    /// the path's own changes are the judgement's to report. For a caller that holds the lock
    /// of the shared state (a release).
    pub(super) fn let_go_as(&self, dev: u64, ino: u64) -> bool {
        self.locked_through_another() || self.unheld_at_the_path(dev, ino)
    }

    /// Does another open file description hold a lock on the file our descriptors refer to?
    /// Only with the lock of the shared state held (see `Files`).
    fn locked_through_another(&self) -> bool {
        self.shared
            .files
            .upgrade()
            .is_some_and(|files| is_locked_at_all(files.lent()) == Ok(true))
    }

    /// Does a description of the file at the path, opened now, find (dev, ino) there and no
    /// write lock on it? False when that cannot be seen.
    fn unheld_at_the_path(&self, dev: u64, ino: u64) -> bool {
        if self.path_as(dev, ino).is_some() {
            return false;
        }
        let Ok(file) = rustix::fs::openat(
            &*self.dir,
            self.file_name.as_os_str(),
            probe_flags(),
            Mode::empty(),
        ) else {
            return false;
        };
        let same = rustix::fs::fstat(&file).is_ok_and(|st| (st.st_dev, st.st_ino) == (dev, ino));
        same && is_held(&file) == Ok(false)
    }

    /// [`WatchHandle::verify_held`] for the file (dev, ino).
    pub(crate) fn verify_held_as(&self, dev: u64, ino: u64) -> bool {
        if self.path_as(dev, ino).is_some() {
            return false;
        }
        let file = if self.path.is_absolute() {
            rustix::fs::open(&self.path, probe_flags(), Mode::empty())
        } else {
            rustix::fs::openat(
                &*self.dir,
                self.file_name.as_os_str(),
                probe_flags(),
                Mode::empty(),
            )
        };
        let Ok(file) = file else { return false };
        let same = rustix::fs::fstat(&file).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino);
        same && is_held(&file).unwrap_or(false)
    }
}

/// Opening a lock file only to look at it: never following a symlink, never blocking on a FIFO,
/// never becoming a controlling terminal.
fn probe_flags() -> OFlags {
    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK
}
